"""``ThreadpoolSession``: the awaitable facade over one synchronous ``Session``.

It has the names and signatures of :class:`sqlalchemy.ext.asyncio.AsyncSession`, so code written
for ``AsyncSession`` ports by changing the import and the engine. Members that may do IO are
coroutines that run the sync method in a worker thread through the one offload path; members
that never do IO are the sync session's own, unchanged. Both kinds are declared once in the
class body and generated as real methods with SQLAlchemy's signatures (:mod:`._members`); only
the few methods whose SQLAlchemy signature is overloaded, or whose behaviour differs, are
written out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Final, TypeVar, cast, overload

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session, object_session
from sqlalchemy.util import EMPTY_DICT
from typing_extensions import ParamSpec, Self, TypeVarTuple, Unpack

from ._attrs import remember_facade
from ._exceptions import ConfigurationError
from ._members import attribute, generate_members, offloaded, plain, settable
from ._results import check_callable
from ._streams import ThreadpoolResult, ThreadpoolScalarResult, UntypedResult, open_stream
from ._transaction import ThreadpoolSessionTransaction

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import _CoreAnyExecuteParams
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm.session import _BindArguments
    from sqlalchemy.sql.base import Executable
    from sqlalchemy.sql.selectable import TypedReturnsRows

    from ._engine import ThreadpoolEngine
    from ._maker import threadpool_sessionmaker

    #: Only names the types of AsyncSession's bound methods (see ``execute``); never exists.
    _ASYNC_SESSION = cast("AsyncSession", None)

__all__ = ["ThreadpoolSession"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
_Ts = TypeVarTuple("_Ts")
_TP = TypeVar("_TP", bound=tuple[Any, ...])  # SQLAlchemy 2.0's row type parameter


@generate_members
class ThreadpoolSession:
    """An ``AsyncSession``-like facade running a sync :class:`~sqlalchemy.orm.Session` in threads.

    Made like ``AsyncSession``: by a :class:`threadpool_sessionmaker`, directly
    (``ThreadpoolSession(engine)``, ``ThreadpoolSession(bind=engine, autoflush=False)``), or
    by a :func:`threadpool_session` scope. A session made directly shares the admission of
    every other such session on its bind (the limiter sized to the pool), and its guard and
    canceller, through an implicit maker per bind (see :attr:`maker`).

    Calls of one session never overlap: concurrent tasks sharing it take turns (waiting takes
    no thread). Anything that returns a ``Result`` gets it fully buffered, so reading it on the
    event loop does no IO. ``async with sess:`` closes the session when the block exits, as
    ``AsyncSession`` does; it can be used again afterwards.
    """

    sync_session_class: type[Session] = Session
    """The :class:`~sqlalchemy.orm.Session` class behind the facade (``sync_session_class=``).

    On the class, the default for sessions and makers that are given none (a subclass may
    override it); on a session, the class its maker was configured with.
    """

    sync_session: Session
    """The synchronous session behind the facade; use it inside :meth:`run`."""

    maker: threadpool_sessionmaker[Any]
    """The maker that made this session; for a session made directly, the implicit maker of
    its bind, shared by the sessions made directly on that bind while any of them exists."""

    def __init__(
        self,
        bind: Engine | Connection | ThreadpoolEngine | None = None,
        *,
        binds: dict[Any, Engine | Connection | ThreadpoolEngine] | None = None,
        sync_session_class: type[Session] | None = None,
        maker: threadpool_sessionmaker[Any] | None = None,
        **kw: Any,
    ) -> None:
        """Make a session: ``kw`` goes to the sync session, as ``AsyncSession(...)``'s.

        :param bind: the engine (or connection) of the session; a
            :class:`ThreadpoolEngine` means its sync engine.
        :param binds: per-entity binds, as :class:`~sqlalchemy.orm.Session`'s.
        :param sync_session_class: the :class:`~sqlalchemy.orm.Session` class to use.
        :param maker: the :class:`threadpool_sessionmaker` whose configuration (limiter,
            guard, canceller, ``sync_session_class``) the session uses; ``maker()`` passes
            itself. Without one, the implicit maker of ``bind`` (and ``binds``) is used, made
            on first use exactly as ``threadpool_sessionmaker(bind, binds=binds,
            sync_session_class=sync_session_class)`` would be.
        """
        sync_bind: Engine | Connection | None = None
        sync_binds: dict[Any, Engine | Connection] | None = None
        if bind is not None or binds is not None:  # (``maker()`` passes neither)
            from ._binds import unwrap_binds

            unwrapped = unwrap_binds({"bind": bind, "binds": binds})
            sync_bind, sync_binds = unwrapped["bind"], unwrapped["binds"]
        if maker is None:
            from ._maker import implicit_maker  # the maker module imports this one

            maker = implicit_maker(
                sync_bind, sync_binds, sync_session_class or self.sync_session_class
            )
        elif sync_session_class is not None and sync_session_class is not maker.sync_class:
            raise ConfigurationError(
                "sync_session_class= cannot differ from the maker's: its listeners are "
                "installed on the maker's sync sessionmaker. Make a "
                "threadpool_sessionmaker(..., sync_session_class=...) instead."
            )
        session_kw = dict(kw)
        if sync_bind is not None:
            session_kw["bind"] = sync_bind
        if sync_binds is not None:
            session_kw["binds"] = sync_binds
        self.sync_session, self._offloader = maker.open_sync_session(session_kw)
        self.sync_session_class = maker.sync_class
        self.maker = maker
        remember_facade(self.sync_session, self)  # for threadpool_session_of() / ThreadpoolAttrs

    def __repr__(self) -> str:
        state = "ended" if self._offloader.closed else "open"
        return f"<{type(self).__name__} {state} sync_session={self.sync_session!r}>"

    # -- the one way in ---------------------------------------------------------------

    async def _call_method(
        self, method: Callable[..., Any], name: str, /, *args: Any, **kwargs: Any
    ) -> Any:
        session = self.sync_session
        return await self._offloader.call(
            lambda: method(session, *args, **kwargs), where=name, recovers=method in _RECOVERING
        )

    async def run(
        self, fn: Callable[Concatenate[Session, P], R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Call ``fn(sync_session, *args, **kwargs)`` in a worker thread and return its value.

        ``fn`` must be a plain synchronous callable. A ``Result`` (or ``ScalarResult``,
        ``MappingResult``, ``TupleResult``) it returns is fully fetched in the worker, so it can
        be iterated on the event loop; a legacy ``Query``, generator or coroutine is refused
        with ``TypeError``. Lazy loads inside ``fn`` are fine: they run in the worker.
        """
        check_callable(fn, "run()")
        session = self.sync_session
        return await self._offloader.call(lambda: fn(session, *args, **kwargs), where="run()")

    run_sync = run
    """:meth:`run` under ``AsyncSession``'s name: ``fn(sync_session, *args, **kwargs)``."""

    # -- IO members, generated --------------------------------------------------------

    get: Final = offloaded(Session.get)
    get_one: Final = offloaded(Session.get_one)
    flush: Final = offloaded(Session.flush)
    commit: Final = offloaded(Session.commit)
    rollback: Final = offloaded(Session.rollback)
    close: Final = offloaded(Session.close)
    reset: Final = offloaded(Session.reset)
    refresh: Final = offloaded(Session.refresh)
    merge: Final = offloaded(Session.merge)
    delete: Final = offloaded(Session.delete)
    connection: Final = offloaded(Session.connection)
    invalidate: Final = offloaded(Session.invalidate)
    if hasattr(Session, "merge_all"):  # SQLAlchemy 2.1
        merge_all: Final = offloaded(Session.merge_all)
    if hasattr(Session, "delete_all"):  # SQLAlchemy 2.1
        delete_all: Final = offloaded(Session.delete_all)

    async def load(self, instance: object, attribute: str) -> Any:
        """Load ``instance.<attribute>`` in a worker and return it: an awaitable lazy load.

        ``posts = await sess.load(user, "posts")`` loads a lazy relationship, a deferred column
        or an expired attribute without blocking the event loop; afterwards plain
        ``user.posts`` reads the loaded value with no IO. ``instance`` must belong to this
        session (or be detached): loading through another session's connection from this
        session's worker could touch that session from two threads at once.
        """
        owner = object_session(instance)
        if owner is not None and owner is not self.sync_session:
            raise InvalidRequestError(
                f"{instance!r} belongs to another session: load its attributes with that "
                "session's `load()`."
            )
        return await self._offloader.call(lambda: getattr(instance, attribute))

    async def aclose(self) -> None:
        """Same as :meth:`close`, for :func:`contextlib.aclosing`."""
        await self.close()

    # -- non-IO members, generated ----------------------------------------------------

    __contains__: Final = plain(Session.__contains__)
    __iter__: Final = plain(Session.__iter__)
    add: Final = plain(Session.add)
    add_all: Final = plain(Session.add_all)
    expunge: Final = plain(Session.expunge)
    expunge_all: Final = plain(Session.expunge_all)
    expire: Final = plain(Session.expire)
    expire_all: Final = plain(Session.expire_all)
    in_transaction: Final = plain(Session.in_transaction)
    in_nested_transaction: Final = plain(Session.in_nested_transaction)
    is_modified: Final = plain(Session.is_modified)
    if TYPE_CHECKING:  # generic in the mapper's class: a ParamSpec cannot carry it
        get_bind = _ASYNC_SESSION.get_bind
    else:

        def get_bind(
            self, mapper: Any = None, clause: Any = None, bind: Any = None, **kw: Any
        ) -> Engine | Connection:
            """The engine or connection the session uses for ``mapper`` / ``clause`` (no IO).

            AsyncSession's signature (``clause`` and ``bind`` may be positional) over
            :meth:`sqlalchemy.orm.Session.get_bind`; to route binds, subclass ``Session``
            and pass it as ``sync_session_class=``.
            """
            return self.sync_session.get_bind(mapper, clause=clause, bind=bind, **kw)

    bind_mapper: Final = plain(Session.bind_mapper)
    bind_table: Final = plain(Session.bind_table)

    new: Final = attribute(lambda s: s.new)
    dirty: Final = attribute(lambda s: s.dirty)
    deleted: Final = attribute(lambda s: s.deleted)
    identity_map: Final = attribute(lambda s: s.identity_map)
    info: Final = attribute(lambda s: s.info)
    bind: Final = attribute(lambda s: s.bind)
    is_active: Final = attribute(lambda s: s.is_active)
    no_autoflush: Final = attribute(lambda s: s.no_autoflush)
    autoflush = settable(lambda s: s.autoflush)
    if "binds" in Session.__annotations__:  # SQLAlchemy 2.1 (an attribute of each session)
        binds: Final = attribute(lambda s: s.binds)  # type: ignore[attr-defined, unused-ignore]
    if hasattr(Session, "execution_options"):  # SQLAlchemy 2.1
        execution_options = settable(lambda s: s.execution_options)  # type: ignore[attr-defined, unused-ignore]

    # Session's classmethods, as AsyncSession has them (``object_session`` gives the Session).
    object_session: Final = Session.object_session
    identity_key: Final = Session.identity_key

    def get_transaction(self) -> ThreadpoolSessionTransaction | None:
        """The current root transaction in progress, if any (no IO), wrapped as
        :class:`ThreadpoolSessionTransaction` (:meth:`sqlalchemy.orm.Session.get_transaction`)."""
        return ThreadpoolSessionTransaction._wrap(self, self.sync_session.get_transaction())

    def get_nested_transaction(self) -> ThreadpoolSessionTransaction | None:
        """The current nested transaction (SAVEPOINT) in progress, if any (no IO)."""
        nested = self.sync_session.get_nested_transaction()
        return ThreadpoolSessionTransaction._wrap(self, nested)

    # -- IO members whose SQLAlchemy signature is overloaded -------------------------

    if TYPE_CHECKING:
        # A ParamSpec cannot carry overloads, so these three take their types from the
        # installed AsyncSession's: 2.0 types rows as one tuple (``Select[Tuple[User]]``), 2.1
        # as a TypeVarTuple (``Select[User]``), and each line gets its own overloads.
        execute = _ASYNC_SESSION.execute
        scalar = _ASYNC_SESSION.scalar
        scalars = _ASYNC_SESSION.scalars
    else:
        execute = offloaded(Session.execute)
        scalar = offloaded(Session.scalar)
        scalars = offloaded(Session.scalars)

    # -- streaming ---------------------------------------------------------------------
    # Overloads for SQLAlchemy 2.0 (``Select[Tuple[int, str]]``) and 2.1 (``Select[int, str]``)
    # at once: each line is valid on one and ignored (``unused-ignore``) on the other.

    @overload
    async def stream(  # SQLAlchemy 2.0 (on 2.1: a single column of a tuple type)
        self,
        statement: TypedReturnsRows[_TP],
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolResult[_TP]: ...
    @overload
    async def stream(  # SQLAlchemy 2.1
        self,
        statement: TypedReturnsRows[Unpack[_Ts]],  # type: ignore[valid-type, type-arg, unused-ignore]
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolResult[Unpack[_Ts]]: ...  # type: ignore[valid-type, type-arg, unused-ignore]
    @overload
    async def stream(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> UntypedResult: ...
    async def stream(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> UntypedResult:
        """Execute with a server-side cursor; rows are read a chunk at a time in a worker.

        Use ``async with await sess.stream(stmt) as result:`` (or exhaust it) so the cursor is
        released even if the consumer is cancelled. Its views (``scalars()``, ``mappings()``,
        ...) share its position: each row is seen once, whichever view reads it.
        """
        options = {**(execution_options or {}), "stream_results": True}
        session = self.sync_session
        sync_result = await self._offloader.call(
            lambda: session.execute(
                statement,
                params,
                execution_options=options,
                bind_arguments=bind_arguments,
                **kw,
            )
        )
        return open_stream(sync_result, self._offloader)

    @overload
    async def stream_scalars(  # SQLAlchemy 2.0 (on 2.1: a single column of a tuple type)
        self,
        statement: TypedReturnsRows[tuple[T, Unpack[tuple[Any, ...]]]],
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolScalarResult[T]: ...
    @overload
    async def stream_scalars(  # SQLAlchemy 2.1, one column
        self,
        statement: TypedReturnsRows[T],  # type: ignore[type-var, unused-ignore]
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolScalarResult[T]: ...
    @overload
    async def stream_scalars(  # SQLAlchemy 2.1, several columns
        self,
        statement: TypedReturnsRows[T, Unpack[_Ts]],  # type: ignore[type-arg, valid-type, misc, unused-ignore]
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolScalarResult[T]: ...
    @overload
    async def stream_scalars(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolScalarResult[Any]: ...
    async def stream_scalars(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = EMPTY_DICT,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolScalarResult[Any]:
        """Like :meth:`stream`, returning the first column of each row."""
        result = await self.stream(
            statement,
            params,
            execution_options=execution_options,
            bind_arguments=bind_arguments,
            **kw,
        )
        return result.scalars()

    # -- transactions ------------------------------------------------------------------

    def begin(self) -> ThreadpoolSessionTransaction:
        """Begin a transaction: ``async with sess.begin():`` commits on success."""
        return ThreadpoolSessionTransaction(self, nested=False)

    def begin_nested(self) -> ThreadpoolSessionTransaction:
        """Begin a SAVEPOINT: ``async with sess.begin_nested():`` releases or rolls back to it."""
        return ThreadpoolSessionTransaction(self, nested=True)

    # -- lifecycle ---------------------------------------------------------------------

    async def _end(self, *, commit: bool, reason: str) -> None:
        """End the session for good: commit (or roll back), close, refuse IO afterwards.

        For ``threadpool_session()`` scopes and the integrations, which own the session;
        ``async with sess:`` only closes it. Shielded from cancellation. If the commit fails,
        the session is rolled back and closed and the commit error propagates; a failure
        while rolling back is logged and the connection invalidated, never raised over the
        caller's error. If a call of the unit of work was interrupted, nothing is committed:
        ``commit=True`` then raises :class:`TransactionInterruptedError`.
        """
        try:
            await self._offloader.finish(commit=commit)  # (shielded)
        finally:
            self._offloader.end(reason)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the session, as ``AsyncSession`` does: shielded from cancellation.

        The transaction is rolled back and the connection returned; the objects are detached
        and keep their loaded state. The session can be used again: its next call begins a
        new transaction. Closing costs no capacity and no thread when there is no
        transaction.
        """
        await self._offloader.close()


#: Methods that acknowledge an interrupted unit of work (see TransactionInterruptedError).
_RECOVERING = (Session.rollback, Session.close, Session.reset, Session.invalidate)
