"""FastAPI dependencies: the middleware's session, or a standalone per-request session.

With :class:`~sqlalchemy_threadpool.integrations.asgi.SessionMiddleware` (recommended: the
transaction is decided by the response status, before the response starts)::

    app.add_middleware(SessionMiddleware, sessionmaker=Session)

    @app.post("/users")
    async def create_user(sess: DBSession) -> ...: ...

Without the middleware, :func:`session_dependency` opens the session itself::

    DB = Annotated[ThreadpoolSession, session_dependency(Session)]

It commits when the endpoint *function* returns and rolls back when it raises
(``HTTPException`` included), using FastAPI's ``Depends(scope="function")`` so that this happens
before the response is sent: a failed commit becomes a 500, never a 2xx after the fact. What it
cannot see: the status of a ``Response`` object the endpoint returns (a returned
``JSONResponse(status_code=400)`` commits) and streaming bodies (the session is closed before
they run). The middleware has neither limit.

Both dependencies are ``async def``: FastAPI runs sync dependencies in a worker thread with a
*copy* of the context, so a session bound there would be invisible to the endpoint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends

from .._context import bind_session, bound_session
from .._exceptions import NoSessionError
from .._maker import threadpool_sessionmaker
from .._session import ThreadpoolSession
from ._unit import CommitMode, RequestUnit, check_commit_mode

__all__ = ["DBSession", "get_session", "session_dependency"]


async def get_session() -> ThreadpoolSession:
    """The session :class:`SessionMiddleware` bound to this request."""
    session = bound_session()
    if session is None:
        raise NoSessionError(
            "No threadpool session is bound to this request. Add the middleware, "
            "`app.add_middleware(SessionMiddleware, sessionmaker=maker)` (from "
            "sqlalchemy_threadpool.integrations.asgi), or use a standalone dependency, "
            "`Annotated[ThreadpoolSession, session_dependency(maker)]`."
        )
    return session


DBSession = Annotated[ThreadpoolSession, Depends(get_session)]
"""``sess: DBSession`` in an endpoint or dependency: the middleware's session."""


def session_dependency(maker: threadpool_sessionmaker, *, commit: CommitMode = "auto") -> Any:
    """A ``Depends(...)`` that opens a session for the endpoint, without the middleware.

    The session is bound (so :func:`~sqlalchemy_threadpool.current_session` works below the
    endpoint), cached for the request like any dependency, and ends when the endpoint function
    returns, before the response is sent: commit on return, roll back on an exception; with
    ``commit="manual"`` it only rolls back what the endpoint did not commit. Use it as
    ``Annotated[ThreadpoolSession, session_dependency(maker)]``.
    """
    if not isinstance(maker, threadpool_sessionmaker):
        raise TypeError(
            f"session_dependency() takes a threadpool_sessionmaker, not {type(maker).__name__}."
        )
    check_commit_mode(commit)

    async def threadpool_session_dependency() -> AsyncIterator[ThreadpoolSession]:
        unit = await RequestUnit.open(maker, commit=commit)
        with bind_session(unit.session):
            try:
                yield unit.session
            except BaseException:
                await unit.finish(reason="its endpoint raised (session_dependency)")
                raise
            await unit.finish(commit=True, reason="its endpoint returned (session_dependency)")

    return Depends(threadpool_session_dependency, scope="function")
