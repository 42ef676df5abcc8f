"""Litestar: ``ThreadpoolSessionPlugin`` injects the session and decides before the response.

Litestar runs on anyio, and these tests run it in process (``httpx.ASGITransport``) on asyncio
and on trio; ``test_servers.py`` also serves the example under uvicorn.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import httpx
import pytest
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.response import Stream
from sqlalchemy import Connection, Engine, event, select

from helpers import checked_out, user_names
from models import User
from sqlalchemy_threadpool import ThreadpoolSession, current_session, threadpool_sessionmaker
from sqlalchemy_threadpool.integrations.litestar import DBSession, ThreadpoolSessionPlugin
from webhelpers import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    drop_web_tables,
    lifespan,
    load_example,
)

pytestmark = pytest.mark.anyio


def asgi(app: Litestar | ASGIApp) -> ASGIApp:
    """Litestar types its ASGI messages as TypedDicts; the test helpers take any mapping."""
    return cast("ASGIApp", app)


def client(app: Litestar | ASGIApp) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=asgi(app), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def observe_start(app: Litestar, engine: Engine, seen: list[set[str]]) -> ASGIApp:
    """Wrap ``app``: record the committed user names when its response starts."""

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        async def observing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen.append(user_names(engine))
            await send(message)

        await asgi(app)(scope, receive, observing_send)

    return outer


@post("/users/{name:str}", status_code=201)
async def create_user(name: FromPath[str], db_session: DBSession) -> dict[str, str]:
    assert db_session is current_session()
    db_session.add(User(name=name))
    if name.startswith("lazy-"):  # flushed by the commit (a duplicate fails there)
        return {"name": name}
    await db_session.flush()
    if name.startswith("http-"):
        raise HTTPException(status_code=409, detail="rejected")
    if name.startswith("crash-"):
        raise RuntimeError("bug")
    if name.startswith("response-"):
        return Response({"detail": "rejected"}, status_code=400)  # type: ignore[return-value]
    if name.startswith("redirect-"):
        return Response({}, status_code=303, headers={"location": "/"})  # type: ignore[return-value]
    return {"name": name}


@get("/users")
async def stream_users(db_session: DBSession) -> Stream:
    async def rows() -> AsyncIterator[str]:
        # Runs after the response started: the session is still open.
        for name in (await db_session.scalars(select(User.name).order_by(User.name))).all():
            yield name + "\n"

    return Stream(rows(), media_type="text/plain")


def litestar_app(engine: Engine, **plugin_kwargs: Any) -> Litestar:
    plugin = ThreadpoolSessionPlugin(threadpool_sessionmaker(engine), **plugin_kwargs)
    return Litestar(route_handlers=[create_user, stream_users], plugins=[plugin])


# -- injection ------------------------------------------------------------------------------


async def test_session_is_injected_under_a_configurable_key(engine: Engine) -> None:
    seen: list[bool] = []

    @get("/")
    async def handler(db: DBSession, request: Request[Any, Any, Any]) -> dict[str, bool]:
        seen.append(db is current_session() is request.scope["state"]["db"])
        return {"ok": True}

    plugin = ThreadpoolSessionPlugin(threadpool_sessionmaker(engine), dependency_key="db")
    app = Litestar(route_handlers=[handler], plugins=[plugin])
    async with client(app) as c:
        assert (await c.get("/")).status_code == 200
    assert seen == [True]
    assert checked_out(engine) == 0


async def test_one_session_per_request(engine: Engine) -> None:
    sessions: list[ThreadpoolSession] = []  # kept alive: ids of freed objects are reused

    @get("/")
    async def handler(db_session: DBSession) -> None:
        sessions.append(db_session)

    app = Litestar(
        route_handlers=[handler],
        plugins=[ThreadpoolSessionPlugin(threadpool_sessionmaker(engine))],
    )
    async with client(app) as c:
        for _ in range(3):
            assert (await c.get("/")).status_code == 200
    assert len({id(sess) for sess in sessions}) == 3
    assert checked_out(engine) == 0


# -- the decision ---------------------------------------------------------------------------


async def test_commits_in_a_worker_before_the_response_starts(
    engine: Engine, other_engine: Engine
) -> None:
    commit_threads: list[int] = []

    def on_commit(conn: Connection) -> None:
        commit_threads.append(threading.get_ident())

    event.listen(engine, "commit", on_commit)
    seen: list[set[str]] = []
    async with client(observe_start(litestar_app(engine), other_engine, seen)) as c:
        assert (await c.post("/users/ada")).status_code == 201
    assert seen == [{"ada"}]  # committed before the 201 left the application
    assert len(commit_threads) == 1
    assert commit_threads[0] != threading.get_ident()  # in a worker, not on the loop
    assert checked_out(engine) == 0


@pytest.mark.parametrize(
    ("name", "status"),
    [("http-ada", 409), ("crash-ada", 500), ("response-ada", 400), ("redirect-ada", 303)],
)
async def test_error_statuses_roll_back(
    engine: Engine, other_engine: Engine, name: str, status: int
) -> None:
    async with client(litestar_app(engine)) as c:
        assert (await c.post(f"/users/{name}")).status_code == status
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


async def test_policy_knobs_reach_the_middleware(engine: Engine, other_engine: Engine) -> None:
    app = litestar_app(engine, commit_on_redirect=True, extra_rollback_statuses={201})
    async with client(app) as c:
        assert (await c.post("/users/redirect-kept")).status_code == 303
        assert (await c.post("/users/created-dropped")).status_code == 201
    assert user_names(other_engine) == {"redirect-kept"}
    assert checked_out(engine) == 0


async def test_manual_mode_leaves_committing_to_the_handler(
    engine: Engine, other_engine: Engine
) -> None:
    @post("/", status_code=201)
    async def handler(db_session: DBSession) -> None:
        db_session.add(User(name="committed"))
        await db_session.commit()
        db_session.add(User(name="left over"))
        await db_session.flush()

    plugin = ThreadpoolSessionPlugin(threadpool_sessionmaker(engine), commit="manual")
    async with client(Litestar(route_handlers=[handler], plugins=[plugin])) as c:
        assert (await c.post("/")).status_code == 201
    assert user_names(other_engine) == {"committed"}
    assert checked_out(engine) == 0


async def test_failed_commit_is_a_500_not_a_201(engine: Engine, other_engine: Engine) -> None:
    async with client(litestar_app(engine)) as c:
        assert (await c.post("/users/lazy-ada")).status_code == 201
        duplicate = await c.post("/users/lazy-ada")  # unique violation at commit
    assert (duplicate.status_code, duplicate.text) == (500, "Internal Server Error")
    assert user_names(other_engine) == {"lazy-ada"}
    assert checked_out(engine) == 0


async def test_streaming_reads_after_the_response_started(engine: Engine) -> None:
    async with client(litestar_app(engine)) as c:
        await c.post("/users/bob")
        await c.post("/users/ada")
        assert (await c.get("/users")).text == "ada\nbob\n"
    assert checked_out(engine) == 0


# -- configuration and shutdown -------------------------------------------------------------


@pytest.fixture
def disposals(engine: Engine) -> Iterator[list[Engine]]:
    disposed: list[Engine] = []
    listener = disposed.append
    event.listen(engine, "engine_disposed", listener)
    yield disposed
    event.remove(engine, "engine_disposed", listener)


@pytest.mark.parametrize("dispose_engine", [True, False])
async def test_shutdown_disposes_the_engine_unless_told_not_to(
    engine: Engine, disposals: list[Engine], dispose_engine: bool
) -> None:
    app = litestar_app(engine, dispose_engine=dispose_engine)
    async with lifespan(asgi(app)):
        async with client(app) as c:
            assert (await c.post("/users/ada")).status_code == 201
        assert disposals == []
    assert disposals == ([engine] if dispose_engine else [])


async def test_a_maker_bound_to_a_connection_leaves_its_engine_alone(
    engine: Engine, disposals: list[Engine]
) -> None:
    """The connection's owner (e.g. the pytest plugin) manages that engine, not the app."""
    with engine.connect() as connection:
        plugin = ThreadpoolSessionPlugin(threadpool_sessionmaker(connection))
        app = Litestar(route_handlers=[create_user], plugins=[plugin])
        async with lifespan(asgi(app)):
            pass
    assert disposals == []


def test_bad_configuration_fails_at_construction(engine: Engine) -> None:
    from sqlalchemy.orm import sessionmaker

    with pytest.raises(TypeError, match="threadpool_sessionmaker"):
        ThreadpoolSessionPlugin(sessionmaker(engine))  # type: ignore[arg-type]
    maker = threadpool_sessionmaker(engine)
    with pytest.raises(ValueError, match="'auto' or 'manual'"):
        ThreadpoolSessionPlugin(maker, commit="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[409\] are in both"):
        ThreadpoolSessionPlugin(
            maker, extra_commit_statuses={409}, extra_rollback_statuses={409, 410}
        )


# -- the example ------------------------------------------------------------------------------


async def test_litestar_example(db_url: str, engine: Engine) -> None:
    drop_web_tables(db_url)
    app = load_example("litestar_app").create_app(db_url)
    example_engine = app.state.engine
    async with lifespan(asgi(app)), client(app) as c:
        assert (await c.post("/notes", json={"key": "a", "text": "hello"})).status_code == 201
        assert (await c.post("/notes", json={"key": "b", "text": "spam!"})).status_code == 422
        duplicate = await c.post("/notes", json={"key": "a", "text": "again"})
        assert (duplicate.status_code, duplicate.text) == (500, "Internal Server Error")
        assert (await c.get("/notes/a")).json() == {"key": "a", "text": "hello"}
        assert (await c.get("/notes/b")).status_code == 404
        assert (await c.get("/notes")).text == "a\thello\n"
        assert (await c.get("/health")).json() == {"status": "ok", "pool_checked_out": 0}
    assert example_engine.pool.checkedout() == 0
