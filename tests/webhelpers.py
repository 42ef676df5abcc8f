"""Helpers for the web tests: a minimal ASGI client, the lifespan protocol, example loading."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
from sqlalchemy import MetaData, create_engine
from sqlalchemy.pool import NullPool

from conftest import SELECTED_DATABASES

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (once) as module ``<name>``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def drop_web_tables(db_url: str) -> None:
    """Drop the ``satp_web_*`` tables the examples create, so each test starts empty."""
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        metadata = MetaData()
        with engine.begin() as conn:
            names = [n for n in engine.dialect.get_table_names(conn) if n.startswith("satp_web_")]
            metadata.reflect(conn, only=names)
            metadata.drop_all(conn)
    finally:
        engine.dispose()


def only_on(database: str) -> pytest.MarkDecorator:
    """Run a test that asks for ``engine``/``db_url`` on this one database (if selected)."""
    if database not in SELECTED_DATABASES:
        return pytest.mark.skip(reason=f"{database} is not in SATP_TEST_DATABASES")
    return pytest.mark.parametrize("db_url", [database], indirect=True)


def http_scope(method: str = "GET", path: str = "/") -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


async def call_http(
    app: ASGIApp,
    *,
    method: str = "GET",
    path: str = "/",
    body: bytes = b"",
    on_send: Callable[[Message], None] | None = None,
) -> list[Message]:
    """Call an ASGI app with one HTTP request; return the messages it sent, in order.

    ``on_send`` runs synchronously as each message arrives at the server side, before it is
    recorded: the place to observe the database at the moment a response starts.
    """
    sent: list[Message] = []
    request_sent = False

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if on_send is not None:
            on_send(message)
        sent.append(message)

    await app(http_scope(method, path), receive, send)
    return sent


def status_of(messages: list[Message]) -> int:
    starts = [m for m in messages if m["type"].endswith("http.response.start")]
    assert len(starts) == 1, messages
    return int(starts[0]["status"])


def body_of(messages: list[Message]) -> bytes:
    return b"".join(m.get("body", b"") for m in messages if m["type"].endswith("response.body"))


async def call_websocket(
    app: ASGIApp, incoming: list[str], on_send: Callable[[Message], None] | None = None
) -> list[Message]:
    """Open a websocket, send ``incoming`` texts, then disconnect; return what the app sent."""
    queue: list[Message] = [{"type": "websocket.connect"}]
    queue += [{"type": "websocket.receive", "text": text} for text in incoming]
    queue.append({"type": "websocket.disconnect", "code": 1000})
    sent: list[Message] = []

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if on_send is not None:
            on_send(message)
        sent.append(message)

    scope: Scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "subprotocols": [],
        "extensions": {"websocket.http.response": {}},
    }
    await app(scope, receive, send)
    return sent


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[list[Message]]:
    """Run the ASGI lifespan protocol around the block: startup, then shutdown.

    Yields the messages the app sent (``lifespan.startup.complete``, ...).
    """
    to_app_send, to_app_receive = anyio.create_memory_object_stream[Message](2)
    sent: list[Message] = []
    started = anyio.Event()
    stopped = anyio.Event()

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"].startswith("lifespan.startup."):
            started.set()
        if message["type"].startswith("lifespan.shutdown."):
            stopped.set()

    async def receive() -> Message:
        return await to_app_receive.receive()

    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
    scope["state"] = {}

    async def run_app() -> None:
        await app(scope, receive, send)

    async with to_app_send, to_app_receive, anyio.create_task_group() as tg:
        tg.start_soon(run_app)
        with anyio.fail_after(30):
            await to_app_send.send({"type": "lifespan.startup"})
            await started.wait()
        assert sent[-1]["type"] == "lifespan.startup.complete", sent
        yield sent
        with anyio.fail_after(30):
            await to_app_send.send({"type": "lifespan.shutdown"})
            await stopped.wait()
        assert sent[-1]["type"] == "lifespan.shutdown.complete", sent
