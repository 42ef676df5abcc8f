"""Litestar plugin: a threadpool session per request, injected under a dependency key.

.. code-block:: python

    from sqlalchemy_threadpool.integrations.litestar import ThreadpoolSessionPlugin

    app = Litestar(route_handlers=[...], plugins=[ThreadpoolSessionPlugin(Session)])

    @post("/users")
    async def create_user(db_session: DBSession, data: UserIn) -> UserOut: ...

``DBSession`` is ``NamedDependency[ThreadpoolSession]`` (plain ``ThreadpoolSession`` on
Litestar before 2.23, which had no ``NamedDependency``): Litestar injects by parameter *name*
(the plugin's ``dependency_key``), and since 2.23 it wants such parameters marked explicitly.

The plugin registers :class:`~sqlalchemy_threadpool.integrations.asgi.SessionMiddleware` as
application middleware, so the transaction is decided exactly as there: committed in a worker
when the handler's response starts with a commit status (2xx, plus the configured extras),
rolled back otherwise, and a failed commit turns the response into a 500 before anything
reaches the client. Litestar turns handler exceptions into error responses *inside* the
middleware stack, so they arrive as error statuses and roll back. The session is also what
:func:`~sqlalchemy_threadpool.current_session` returns while the request runs. On shutdown
the plugin ends the work still running on the maker's engine with
:func:`~sqlalchemy_threadpool.shutdown` and disposes the engine (in a worker thread).

Why middleware rather than a ``before_send`` hook: a hook sees the response start but cannot
replace it (the 500) and is never called when a request dies before or while responding
(client disconnect, exception mid-stream), which would leak the session's connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPluginProtocol
from sqlalchemy.engine import Engine

from .._context import bound_session
from .._exceptions import NoSessionError
from .._maker import threadpool_sessionmaker
from .._session import ThreadpoolSession
from .._shutdown import shutdown
from ._unit import CommitMode, check_commit_mode
from .asgi import CommitPolicy, SessionMiddleware

if TYPE_CHECKING:
    from litestar.config.app import AppConfig

__all__ = ["DBSession", "ThreadpoolSessionPlugin"]

if TYPE_CHECKING:
    DBSession: TypeAlias = ThreadpoolSession
else:
    try:
        from litestar.di import NamedDependency
    except ImportError:  # Litestar < 2.23 injects by name without being told
        DBSession = ThreadpoolSession
    else:
        DBSession = NamedDependency[ThreadpoolSession]
"""The annotation of a handler parameter that receives the plugin's session."""


class ThreadpoolSessionPlugin(InitPluginProtocol):
    """Provide a per-request :class:`ThreadpoolSession` under ``dependency_key``.

    :param sessionmaker: the :class:`~sqlalchemy_threadpool.threadpool_sessionmaker`.
    :param dependency_key: the handler parameter name that receives the session.
    :param commit, commit_on_redirect, extra_commit_statuses, extra_rollback_statuses: the
        transaction policy, as for :class:`SessionMiddleware`.
    :param dispose_engine: dispose the maker's engine when the application shuts down (only
        when the maker is bound to an ``Engine``; a ``Connection``'s owner disposes its own).
    """

    __slots__ = ("_middleware_kwargs", "dependency_key", "dispose_engine", "sessionmaker")

    def __init__(
        self,
        sessionmaker: threadpool_sessionmaker,
        *,
        dependency_key: str = "db_session",
        commit: CommitMode = "auto",
        commit_on_redirect: bool = False,
        extra_commit_statuses: Iterable[int] | None = None,
        extra_rollback_statuses: Iterable[int] | None = None,
        dispose_engine: bool = True,
    ) -> None:
        if not isinstance(sessionmaker, threadpool_sessionmaker):
            raise TypeError(
                f"ThreadpoolSessionPlugin needs a threadpool_sessionmaker, not "
                f"{type(sessionmaker).__name__}."
            )
        check_commit_mode(commit)
        self.sessionmaker: threadpool_sessionmaker = sessionmaker
        self.dependency_key: str = dependency_key
        self.dispose_engine: bool = dispose_engine
        policy = CommitPolicy(  # validates now rather than at the first request
            commit_on_redirect=commit_on_redirect,
            extra_commit_statuses=extra_commit_statuses,
            extra_rollback_statuses=extra_rollback_statuses,
        )
        self._middleware_kwargs: dict[str, Any] = {
            "commit": commit,
            "commit_on_redirect": policy.commit_on_redirect,
            "extra_commit_statuses": policy.extra_commit_statuses,
            "extra_rollback_statuses": policy.extra_rollback_statuses,
            "state_key": dependency_key,
        }

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.middleware.append(
            DefineMiddleware(
                # Litestar types ASGI messages as TypedDicts; the middleware takes any mapping.
                cast("Callable[..., Any]", SessionMiddleware),
                sessionmaker=self.sessionmaker,
                **self._middleware_kwargs,
            )
        )
        app_config.dependencies[self.dependency_key] = Provide(_provide_session)
        # Handlers in modules with ``from __future__ import annotations`` name these as strings.
        app_config.signature_namespace.setdefault("ThreadpoolSession", ThreadpoolSession)
        app_config.signature_namespace.setdefault("DBSession", DBSession)
        if self.dispose_engine:
            app_config.on_shutdown.append(self._dispose)
        return app_config

    async def _dispose(self) -> None:
        # Only an Engine bind is ours to dispose: a maker bound to a Connection (the pytest
        # plugin's, say) belongs to whoever opened that connection, and so does its engine.
        bind = self.sessionmaker.sync_maker.kw.get("bind")
        if isinstance(bind, Engine):
            # Sessions still working (e.g. a stream the server gave up on) are stopped first,
            # then the pool is disposed in a worker thread.
            await shutdown(bind)


async def _provide_session() -> ThreadpoolSession:
    session = bound_session()
    if session is None:
        raise NoSessionError(
            "No threadpool session is bound to this request: the handler is outside the "
            "ThreadpoolSessionPlugin's middleware (e.g. a mounted ASGI app or a route "
            "excluded from middleware)."
        )
    return session
