"""SQLModel: a ``ThreadpoolSession`` with SQLModel's ``exec()``, and the maker that makes it.

The counterpart of ``sqlmodel.ext.asyncio.session.AsyncSession`` for blocking drivers::

    from sqlmodel import select
    from sqlalchemy_threadpool.integrations.sqlmodel import sqlmodel_sessionmaker

    Session = sqlmodel_sessionmaker(engine)   # async_sessionmaker(engine, class_=AsyncSession)

    async with Session() as sess:
        heroes = (await sess.exec(select(Hero).offset(0).limit(10))).all()

``await sess.exec(...)`` runs ``sqlmodel.Session.exec`` in the session's worker thread and
returns its result fully buffered (``select(Hero)`` gives a ``ScalarResult[Hero]``), typed as
SQLModel's ``AsyncSession.exec``. In FastAPI, serve it with the usual dependency::

    SessionDep = Annotated[ThreadpoolSQLModelSession, session_dependency(Session)]

Importing this module imports SQLModel (install ``sqlalchemy-threadpool[sqlmodel]``);
``import sqlalchemy_threadpool`` never does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session
from sqlmodel import Session as SQLModelSession

from .._maker import threadpool_sessionmaker
from .._members import generate_members, offloaded
from .._session import ThreadpoolSession

if TYPE_CHECKING:
    from sqlmodel.ext.asyncio.session import AsyncSession

    #: Only names the type of SQLModel's AsyncSession.exec (see ``exec``); never exists.
    _SQLMODEL_ASYNC_SESSION = cast("AsyncSession", None)

__all__ = ["ThreadpoolSQLModelSession", "sqlmodel_sessionmaker"]


@generate_members
class ThreadpoolSQLModelSession(ThreadpoolSession):
    """A :class:`~sqlalchemy_threadpool.ThreadpoolSession` over a ``sqlmodel.Session``.

    Everything a ``ThreadpoolSession`` has, plus :meth:`exec`. Made by
    :class:`sqlmodel_sessionmaker`, by ``threadpool_sessionmaker(engine,
    class_=ThreadpoolSQLModelSession)``, or directly, ``ThreadpoolSQLModelSession(engine)``.
    """

    sync_session_class: type[Session] = SQLModelSession

    sync_session: SQLModelSession
    """The ``sqlmodel.Session`` behind the facade; use it inside
    :meth:`~sqlalchemy_threadpool.ThreadpoolSession.run`."""

    if TYPE_CHECKING:
        # A ParamSpec cannot carry overloads: the types are those of the installed SQLModel's
        # AsyncSession.exec (``select(Hero)`` -> ScalarResult[Hero], several columns ->
        # TupleResult, ``update()``/``delete()`` -> CursorResult), whichever version it is.
        exec = _SQLMODEL_ASYNC_SESSION.exec
    else:
        exec = offloaded(SQLModelSession.exec)
        """Run ``sqlmodel.Session.exec`` in a worker; the result comes back buffered."""


class sqlmodel_sessionmaker(threadpool_sessionmaker[ThreadpoolSQLModelSession]):
    """A :class:`~sqlalchemy_threadpool.threadpool_sessionmaker` of SQLModel sessions.

    It takes the same arguments; its sessions are :class:`ThreadpoolSQLModelSession` objects
    over ``sqlmodel.Session`` (or the ``sync_session_class=`` given, a subclass of it).
    Use it wherever a ``threadpool_sessionmaker`` goes: ``threadpool_session(maker)``,
    ``SessionMiddleware``,
    ``session_dependency()``, ``shutdown()``.
    """

    def __init__(
        self,
        bind: Engine | Connection | None = None,
        *,
        sync_session_class: type[SQLModelSession] = SQLModelSession,
        **kw: Any,
    ) -> None:
        if not (
            isinstance(sync_session_class, type)
            and issubclass(sync_session_class, SQLModelSession)
        ):
            raise TypeError(
                "sqlmodel_sessionmaker(sync_session_class=...) must be sqlmodel.Session or a "
                f"subclass of it, not {sync_session_class!r}: exec() is its method."
            )
        super().__init__(
            bind, class_=ThreadpoolSQLModelSession, sync_session_class=sync_session_class, **kw
        )
