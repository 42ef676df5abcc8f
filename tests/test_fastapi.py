"""FastAPI: the middleware's session through ``DBSession``, and the standalone dependency.

FastAPI runs on anyio, so these run on asyncio and trio (in process, through
``httpx.ASGITransport``); ``test_servers.py`` also serves the example under uvicorn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import Engine, select

from helpers import checked_out, user_names
from models import User
from sqlalchemy_threadpool import (
    NoSessionError,
    ThreadpoolSession,
    current_session,
    threadpool_sessionmaker,
)
from sqlalchemy_threadpool.integrations.asgi import SessionMiddleware
from sqlalchemy_threadpool.integrations.fastapi import DBSession, session_dependency
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


def client(app: ASGIApp) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def observe_start(app: ASGIApp, engine: Engine, seen: list[set[str]]) -> ASGIApp:
    """Wrap ``app``: record the committed user names when its response starts."""

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        async def observing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen.append(user_names(engine))
            await send(message)

        await app(scope, receive, observing_send)

    return outer


# -- with the middleware ---------------------------------------------------------------------


def middleware_app(engine: Engine) -> FastAPI:
    app = FastAPI()
    app.add_middleware(SessionMiddleware, sessionmaker=threadpool_sessionmaker(engine))

    @app.post("/users/{name}", status_code=201)
    async def create(name: str, sess: DBSession) -> dict[str, str]:
        sess.add(User(name=name))
        await sess.flush()
        if name.startswith("http-"):
            raise HTTPException(status_code=409, detail="rejected")
        if name.startswith("response-"):
            return JSONResponse({"detail": "rejected"}, status_code=400)  # type: ignore[return-value]
        if name.startswith("crash-"):
            raise RuntimeError("bug")
        return {"name": name}

    @app.get("/same")
    async def same(sess: DBSession, again: DBSession) -> dict[str, bool]:
        return {"same": sess is again is current_session()}

    @app.get("/stream")
    async def stream(sess: DBSession) -> StreamingResponse:
        async def rows() -> AsyncIterator[str]:
            for name in (await sess.scalars(select(User.name).order_by(User.name))).all():
                yield name + "\n"

        return StreamingResponse(rows())

    return app


async def test_dbsession_commits_before_the_201(engine: Engine, other_engine: Engine) -> None:
    seen: list[set[str]] = []
    app = observe_start(middleware_app(engine), other_engine, seen)
    async with client(app) as c:
        assert (await c.post("/users/ada")).status_code == 201
    assert seen == [{"ada"}]
    assert checked_out(engine) == 0


@pytest.mark.parametrize(
    ("name", "status"), [("http-x", 409), ("response-x", 400), ("crash-x", 500)]
)
async def test_dbsession_rolls_back_errors(
    engine: Engine, other_engine: Engine, name: str, status: int
) -> None:
    async with client(middleware_app(engine)) as c:
        assert (await c.post(f"/users/{name}")).status_code == status
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


async def test_dbsession_is_one_session_per_request(engine: Engine) -> None:
    async with client(middleware_app(engine)) as c:
        assert (await c.get("/same")).json() == {"same": True}


async def test_streaming_endpoint_reads_after_the_response_started(engine: Engine) -> None:
    async with client(middleware_app(engine)) as c:
        await c.post("/users/ada")
        await c.post("/users/bob")
        assert (await c.get("/stream")).text == "ada\nbob\n"
    assert checked_out(engine) == 0


async def test_dbsession_without_the_middleware_says_what_to_add(engine: Engine) -> None:
    app = FastAPI()

    @app.get("/")
    async def endpoint(sess: DBSession) -> None:
        raise AssertionError("not reached")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        with pytest.raises(NoSessionError, match=r"app.add_middleware\(SessionMiddleware"):
            await c.get("/")


# -- the standalone dependency ------------------------------------------------------------


def standalone_app(engine: Engine, **kwargs: object) -> FastAPI:
    # Default-value style: a local ``Annotated`` alias would be an unresolvable string
    # annotation under ``from __future__ import annotations``.
    db = session_dependency(threadpool_sessionmaker(engine), **kwargs)  # type: ignore[arg-type]
    app = FastAPI()

    async def audit(sess: ThreadpoolSession = db) -> ThreadpoolSession:  # the request's (cached)
        return sess

    @app.post("/users/{name}", status_code=201)
    async def create(
        name: str,
        sess: ThreadpoolSession = db,
        audited: ThreadpoolSession = Depends(audit),  # noqa: B008
    ) -> dict[str, object]:
        assert sess is audited is current_session()
        sess.add(User(name=name))
        if name.startswith("flush-"):
            await sess.flush()
        if name.startswith("http-"):
            await sess.flush()
            raise HTTPException(status_code=409, detail="rejected")
        if name.startswith("response-"):
            await sess.flush()
            return JSONResponse({"detail": "rejected"}, status_code=400)  # type: ignore[return-value]
        if name.startswith("commit-"):
            await sess.commit()
        return {"name": name}

    return app


async def test_standalone_commits_before_the_response(
    engine: Engine, other_engine: Engine
) -> None:
    seen: list[set[str]] = []
    app = observe_start(standalone_app(engine), other_engine, seen)
    async with client(app) as c:
        assert (await c.post("/users/ada")).status_code == 201
    assert seen == [{"ada"}]
    assert checked_out(engine) == 0


async def test_standalone_rolls_back_when_the_endpoint_raises(
    engine: Engine, other_engine: Engine
) -> None:
    async with client(standalone_app(engine)) as c:
        assert (await c.post("/users/http-ada")).status_code == 409
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


async def test_standalone_failed_commit_is_a_500_not_a_201(
    engine: Engine, other_engine: Engine
) -> None:
    async with client(standalone_app(engine)) as c:
        assert (await c.post("/users/ada")).status_code == 201
        assert (await c.post("/users/ada")).status_code == 500  # unique violation at commit
    assert user_names(other_engine) == {"ada"}
    assert checked_out(engine) == 0


async def test_standalone_cannot_see_a_returned_error_response(
    engine: Engine, other_engine: Engine
) -> None:
    """The documented limit: a returned (not raised) 400 still commits. Use the middleware."""
    async with client(standalone_app(engine)) as c:
        assert (await c.post("/users/response-ada")).status_code == 400
    assert user_names(other_engine) == {"response-ada"}


async def test_standalone_manual_mode_keeps_only_explicit_commits(
    engine: Engine, other_engine: Engine
) -> None:
    async with client(standalone_app(engine, commit="manual")) as c:
        assert (await c.post("/users/flush-ada")).status_code == 201
        assert (await c.post("/users/commit-bob")).status_code == 201
    assert user_names(other_engine) == {"commit-bob"}
    assert checked_out(engine) == 0


def test_standalone_refuses_a_plain_sessionmaker(engine: Engine) -> None:
    from sqlalchemy.orm import sessionmaker

    with pytest.raises(TypeError, match="threadpool_sessionmaker"):
        session_dependency(sessionmaker(engine))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'auto' or 'manual'"):
        session_dependency(threadpool_sessionmaker(engine), commit="later")  # type: ignore[arg-type]


# -- the example ------------------------------------------------------------------------------


async def test_fastapi_example(db_url: str, engine: Engine) -> None:
    drop_web_tables(db_url)
    app = load_example("fastapi_app").create_app(db_url)
    async with lifespan(app), client(app) as c:
        assert (await c.post("/notes", json={"key": "a", "text": "hello"})).status_code == 201
        assert (await c.post("/notes", json={"key": "b", "text": "spam!"})).status_code == 422
        duplicate = await c.post("/notes", json={"key": "a", "text": "again"})
        assert (duplicate.status_code, duplicate.text) == (500, "Internal Server Error")
        assert (await c.get("/notes/a")).json() == {"key": "a", "text": "hello"}
        assert (await c.get("/notes/b")).status_code == 404
        assert (await c.get("/notes")).text == "# 1 notes\na\thello\n"
        assert (await c.get("/health")).json() == {"status": "ok", "pool_checked_out": 0}
    assert app.state.engine.pool.checkedout() == 0
