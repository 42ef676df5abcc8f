"""The pure ASGI middleware: when the transaction is decided, and what the client sees.

Most tests drive the middleware with a minimal ASGI client (``webhelpers.call_http``), which
lets them look at the database at the exact moment ``http.response.start`` reaches the
server. The Starlette example app is driven through ``httpx.ASGITransport``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, UniqueConstraint, text

from helpers import checked_out, user_names
from models import User
from sqlalchemy_threadpool import (
    NoSessionError,
    SessionClosedError,
    ThreadpoolSession,
    current_session,
    threadpool_session,
    threadpool_sessionmaker,
)
from sqlalchemy_threadpool.integrations.asgi import CommitPolicy, SessionMiddleware
from sqlalchemy_threadpool.pytest_plugin import enable_sqlite_savepoints
from webhelpers import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    body_of,
    call_http,
    call_websocket,
    drop_web_tables,
    lifespan,
    load_example,
    only_on,
    status_of,
)

pytestmark = pytest.mark.anyio


def adding_app(status: int, name: str = "ada", *, flush: bool = True) -> ASGIApp:
    """An ASGI app that adds a user through ``current_session()`` and answers ``status``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sess = current_session()
        sess.add(User(name=name))
        if flush:
            await sess.flush()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"app body"})

    return app


def middleware(app: ASGIApp, engine: Engine, **kwargs: Any) -> SessionMiddleware:
    return SessionMiddleware(app, threadpool_sessionmaker(engine), **kwargs)


# -- the decision and its timing ------------------------------------------------------------


async def test_success_is_committed_before_the_response_starts(
    engine: Engine, other_engine: Engine
) -> None:
    seen_at_start: list[set[str]] = []

    def on_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            seen_at_start.append(user_names(other_engine))

    sent = await call_http(middleware(adding_app(201), engine), on_send=on_send)
    assert status_of(sent) == 201
    assert seen_at_start == [{"ada"}]
    assert checked_out(engine) == 0


@pytest.mark.parametrize("status", [400, 404, 422, 500, 503])
async def test_error_status_rolls_back(engine: Engine, other_engine: Engine, status: int) -> None:
    sent = await call_http(middleware(adding_app(status), engine))
    assert status_of(sent) == status
    assert body_of(sent) == b"app body"
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


async def test_redirect_rolls_back_unless_commit_on_redirect(
    engine: Engine, other_engine: Engine
) -> None:
    await call_http(middleware(adding_app(302, "plain"), engine))
    await call_http(middleware(adding_app(303, "opted"), engine, commit_on_redirect=True))
    assert user_names(other_engine) == {"opted"}
    assert checked_out(engine) == 0


async def test_extra_statuses_move_the_line(engine: Engine, other_engine: Engine) -> None:
    policy = {"extra_commit_statuses": {409}, "extra_rollback_statuses": [202]}
    await call_http(middleware(adding_app(409, "conflict"), engine, **policy))
    await call_http(middleware(adding_app(202, "accepted"), engine, **policy))
    await call_http(middleware(adding_app(200, "ok"), engine, **policy))
    assert user_names(other_engine) == {"conflict", "ok"}


def test_policy_table() -> None:
    policy = CommitPolicy(commit_on_redirect=True, extra_rollback_statuses={204, 301})
    statuses = (100, 200, 201, 204, 299, 301, 302, 399, 400, 500)
    assert [s for s in statuses if policy.commits(s)] == [200, 201, 299, 302, 399]


def test_overlapping_extra_statuses_are_a_value_error(engine: Engine) -> None:
    with pytest.raises(ValueError, match=r"\[409\] are in both"):
        middleware(
            adding_app(200),
            engine,
            extra_commit_statuses={409, 410},
            extra_rollback_statuses={409},
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"commit": "always"},
        {"extra_commit_statuses": {"201"}},
        {"extra_rollback_statuses": {99}},
        {"extra_commit_statuses": {True}},
    ],
)
def test_bad_settings_are_value_errors(engine: Engine, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        middleware(adding_app(200), engine, **kwargs)


def test_a_plain_sessionmaker_is_refused(engine: Engine) -> None:
    from sqlalchemy.orm import sessionmaker

    with pytest.raises(TypeError, match="threadpool_sessionmaker"):
        SessionMiddleware(adding_app(200), sessionmaker(engine))  # type: ignore[arg-type]


# -- commit failures become 500s --------------------------------------------------------------


async def test_failed_commit_sends_500_instead_of_the_2xx(
    engine: Engine, other_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    await call_http(middleware(adding_app(201), engine))
    # The duplicate is only flushed by the commit, so the unique violation happens there.
    with caplog.at_level(logging.ERROR, logger="sqlalchemy_threadpool.integrations"):
        sent = await call_http(middleware(adding_app(201, flush=False), engine))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert status_of(sent) == 500
    assert body_of(sent) == b"Internal Server Error"
    assert (b"content-length", b"21") in sent[0]["headers"]
    assert "client gets a 500 instead of the application's 201" in caplog.text
    assert user_names(other_engine) == {"ada"}
    assert checked_out(engine) == 0


@pytest.fixture
def deferred_table(engine: Engine) -> Iterator[Table]:
    """A table whose unique constraint is only checked at COMMIT (PostgreSQL)."""
    metadata = MetaData()
    table = Table(
        "satp_web_deferred",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("code", String(20)),
        UniqueConstraint("code", deferrable=True, initially="DEFERRED"),
    )
    metadata.drop_all(engine)
    metadata.create_all(engine)
    yield table
    metadata.drop_all(engine)


@only_on("postgresql")
async def test_deferred_constraint_failing_at_commit_sends_500(
    engine: Engine, deferred_table: Table
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sess = current_session()
        await sess.execute(deferred_table.insert(), [{"code": "x"}, {"code": "x"}])
        await sess.flush()  # nothing fails yet: the constraint is deferred to COMMIT
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"created"})

    sent = await call_http(middleware(app, engine))
    assert (status_of(sent), body_of(sent)) == (500, b"Internal Server Error")
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM satp_web_deferred")) == 0
    assert checked_out(engine) == 0


# -- exceptions, no response --------------------------------------------------------------


async def test_exception_rolls_back_and_propagates(engine: Engine, other_engine: Engine) -> None:
    boom = RuntimeError("boom")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current_session().add(User(name="ada"))
        await current_session().flush()
        raise boom

    with pytest.raises(RuntimeError) as caught:
        await call_http(middleware(app, engine))
    assert caught.value is boom
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


async def test_app_that_sends_nothing_rolls_back(engine: Engine, other_engine: Engine) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current_session().add(User(name="ada"))
        await current_session().flush()

    assert await call_http(middleware(app, engine)) == []
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


async def test_cancelled_request_rolls_back(engine: Engine, other_engine: Engine) -> None:
    flushed = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current_session().add(User(name="ada"))
        await current_session().flush()
        flushed.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(call_http, middleware(app, engine))
        await flushed.wait()
        tg.cancel_scope.cancel()
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


# -- streaming ------------------------------------------------------------------------------


async def test_streaming_keeps_the_session_until_the_last_chunk(
    engine: Engine, other_engine: Engine
) -> None:
    sessions: list[ThreadpoolSession] = []
    after_last: list[BaseException] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sess = current_session()
        sessions.append(sess)
        sess.add(User(name="ada"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):  # each chunk reads through the session, after the commit
            names = (await sess.scalars(text("SELECT name FROM satp_user"))).all()
            chunk = f"{i}:{names};".encode()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"end"})
        with pytest.raises(SessionClosedError, match="its response was sent") as caught:
            await sess.execute(text("SELECT 1"))
        after_last.append(caught.value)

    sent = await call_http(middleware(app, engine))
    assert body_of(sent) == b"0:['ada'];1:['ada'];2:['ada'];end"
    assert len(after_last) == 1  # background work after the response gets a clear error
    assert user_names(other_engine) == {"ada"}
    assert checked_out(engine) == 0


async def test_writes_after_the_decision_are_rolled_back(
    engine: Engine, other_engine: Engine
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sess = current_session()
        sess.add(User(name="before"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        sess.add(User(name="after"))
        await sess.flush()
        await send({"type": "http.response.body", "body": b"done"})

    await call_http(middleware(app, engine))
    assert user_names(other_engine) == {"before"}
    assert checked_out(engine) == 0


async def test_exception_mid_stream_keeps_what_was_committed(
    engine: Engine, other_engine: Engine
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current_session().add(User(name="ada"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await call_http(middleware(app, engine))
    assert user_names(other_engine) == {"ada"}  # the 200 had started: it was committed
    assert checked_out(engine) == 0


# -- manual mode, state, binding ------------------------------------------------------------


async def test_manual_mode_commits_only_what_the_app_commits(
    engine: Engine, other_engine: Engine
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sess = current_session()
        sess.add(User(name="committed"))
        await sess.commit()
        sess.add(User(name="left over"))
        await sess.flush()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await call_http(middleware(app, engine, commit="manual"))
    assert user_names(other_engine) == {"committed"}
    assert checked_out(engine) == 0


async def test_session_is_bound_and_in_scope_state(engine: Engine) -> None:
    seen: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["state"]["db"] is current_session())
        async with threadpool_session() as nested:  # nested scopes join the request's session
            seen.append(nested is current_session())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await call_http(middleware(app, engine, state_key="db"))
    assert seen == [True, True]
    with pytest.raises(NoSessionError):
        current_session()


async def test_concurrent_requests_get_their_own_sessions(
    engine: Engine, other_engine: Engine
) -> None:
    sessions: set[int] = set()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sess = current_session()
        sessions.add(id(sess))
        sess.add(User(name=scope["path"].strip("/")))
        await sess.flush()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app_with_sessions = middleware(app, engine)
    names = {f"user{i}" for i in range(20)}
    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(partial(call_http, app_with_sessions, path=f"/{name}"))
    assert len(sessions) == 20
    assert user_names(other_engine) == names
    assert checked_out(engine) == 0


async def test_request_joins_an_outer_session_of_the_same_maker_in_a_savepoint(
    engine: Engine, other_engine: Engine
) -> None:
    enable_sqlite_savepoints(engine)
    maker = threadpool_sessionmaker(engine)
    ok = SessionMiddleware(adding_app(201, "kept"), maker)
    rejected = SessionMiddleware(adding_app(422, "dropped"), maker)
    async with threadpool_session(maker) as outer:
        await call_http(ok)
        await call_http(rejected)
        names = (await outer.scalars(text("SELECT name FROM satp_user"))).all()
        assert names == ["kept"]  # the 422's SAVEPOINT was rolled back
        assert user_names(other_engine) == set()  # the owner has not committed yet
    assert user_names(other_engine) == {"kept"}
    assert checked_out(engine) == 0


# -- websocket, lifespan --------------------------------------------------------------------


def websocket_app(*, fail: bool = False) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            current_session().add(User(name=message["text"]))
            await current_session().flush()
            await send({"type": "websocket.send", "text": f"saved {message['text']}"})
        if fail:
            raise RuntimeError("handler failed")

    return app


async def test_websocket_commits_when_the_app_returns(
    engine: Engine, other_engine: Engine
) -> None:
    sent = await call_websocket(middleware(websocket_app(), engine), ["ada", "bob"])
    assert [m.get("text") for m in sent] == [None, "saved ada", "saved bob"]
    assert user_names(other_engine) == {"ada", "bob"}
    assert checked_out(engine) == 0


async def test_websocket_rolls_back_when_the_app_raises(
    engine: Engine, other_engine: Engine
) -> None:
    with pytest.raises(RuntimeError, match="handler failed"):
        await call_websocket(middleware(websocket_app(fail=True), engine), ["ada"])
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


async def test_websocket_denial_response_is_decided_by_status(
    engine: Engine, other_engine: Engine
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current_session().add(User(name="ada"))
        await current_session().flush()
        await send({"type": "websocket.http.response.start", "status": 403, "headers": []})
        await send({"type": "websocket.http.response.body", "body": b"forbidden"})

    sent = await call_websocket(middleware(app, engine), [])
    assert status_of(sent) == 403
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


async def test_websocket_in_manual_mode_keeps_only_explicit_commits(
    engine: Engine, other_engine: Engine
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        sess = current_session()
        while (message := await receive())["type"] == "websocket.receive":
            sess.add(User(name=message["text"]))
            if message["text"].startswith("commit-"):
                await sess.commit()
            else:
                await sess.flush()

    await call_websocket(middleware(app, engine, commit="manual"), ["commit-ada", "bob"])
    assert user_names(other_engine) == {"commit-ada"}
    assert checked_out(engine) == 0


async def test_websocket_denial_follows_the_extra_statuses(
    engine: Engine, other_engine: Engine
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current_session().add(User(name="ada"))
        await send({"type": "websocket.http.response.start", "status": 409, "headers": []})
        await send({"type": "websocket.http.response.body", "body": b"conflict"})

    sent = await call_websocket(middleware(app, engine, extra_commit_statuses={409}), [])
    assert (status_of(sent), body_of(sent)) == (409, b"conflict")
    assert user_names(other_engine) == {"ada"}
    assert checked_out(engine) == 0


async def test_lifespan_passes_through_without_a_session(engine: Engine) -> None:
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        with pytest.raises(NoSessionError):
            current_session()
        while True:
            message = await receive()
            events.append(message["type"])
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    async with lifespan(middleware(app, engine)) as sent:
        assert [m["type"] for m in sent] == ["lifespan.startup.complete"]
    assert events == ["lifespan.startup", "lifespan.shutdown"]


# -- the Starlette example, in process ------------------------------------------------------


async def test_starlette_example(db_url: str, engine: Engine) -> None:
    drop_web_tables(db_url)
    example = load_example("starlette_app")
    app = example.create_app(db_url)
    transport = httpx.ASGITransport(app=app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.post("/notes", json={"key": "a", "text": "hello"})).status_code == 201
        assert (await c.post("/notes", json={"key": "b", "text": "spam!"})).status_code == 422
        duplicate = await c.post("/notes", json={"key": "a", "text": "again"})
        assert (duplicate.status_code, duplicate.text) == (500, "Internal Server Error")
        assert (await c.get("/notes/a")).json() == {"key": "a", "text": "hello"}
        assert (await c.get("/notes/b")).status_code == 404
        assert (await c.get("/notes")).text == "a\thello\n"
        assert (await c.get("/health")).json() == {"status": "ok", "pool_checked_out": 0}
    assert app.state.engine.pool.checkedout() == 0


# -- import hygiene -------------------------------------------------------------------------

FRAMEWORKS = (
    "starlette",
    "fastapi",
    "litestar",
    "pydantic",
    "sqlmodel",
    "httpx",
    "uvicorn",
    "hypercorn",
)
#: The command line's package: only ``python -m sqlalchemy_threadpool`` imports it.
CLI = "sqlalchemy_threadpool.cli"


@pytest.mark.parametrize(
    "module", ["sqlalchemy_threadpool", "sqlalchemy_threadpool.integrations.asgi"]
)
def test_importing_imports_no_web_framework_and_no_cli(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}"
        f" or m == {CLI!r} or m.startswith({CLI + '.'!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
