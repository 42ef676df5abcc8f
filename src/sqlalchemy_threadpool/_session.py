"""``ThreadpoolSession``: the awaitable facade over one synchronous ``Session``.

It has the names and signatures of :class:`sqlalchemy.ext.asyncio.AsyncSession`, so code written
for ``AsyncSession`` ports by changing the import and the engine. Members that may do IO are
coroutines that run the sync method in a worker thread through the one offload path; members
that never do IO are the sync session's own, unchanged. Both kinds are generated from the
declarative lists in the class body (``_offloaded`` and ``_plain``); only the few methods whose
SQLAlchemy signature is overloaded, or whose behaviour differs, are written out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Generator, Iterator, Mapping
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Final, Generic, TypeVar, cast, overload

import anyio
from sqlalchemy.engine import Row
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session, SessionTransaction, object_session
from typing_extensions import ParamSpec, Self, TypeVarTuple, Unpack

from ._attrs import remember_facade
from ._offload import Offloader
from ._results import check_callable, make_loop_safe
from ._streams import ThreadpoolStreamResult, ThreadpoolStreamScalarResult, open_stream

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import _CoreAnyExecuteParams
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm.session import _BindArguments
    from sqlalchemy.sql.base import Executable
    from sqlalchemy.sql.selectable import TypedReturnsRows

    from ._maker import threadpool_sessionmaker

    #: Only names the types of AsyncSession's bound methods (see ``execute``); never exists.
    _ASYNC_SESSION = cast("AsyncSession", None)

__all__ = ["ThreadpoolSession", "ThreadpoolSessionTransaction"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
_Ts = TypeVarTuple("_Ts")
_TP = TypeVar("_TP", bound=tuple[Any, ...])  # SQLAlchemy 2.0's row type parameter


class _offloaded(Generic[P, R]):
    """Declares an IO member: the sync method, awaited, run in a worker, result made safe."""

    __slots__ = ("_method", "_name")

    def __init__(self, method: Callable[Concatenate[Session, P], R]) -> None:
        self._method = method
        self._name = method.__name__

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(
        self, obj: ThreadpoolSession, owner: type[Any]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    def __get__(self, obj: ThreadpoolSession | None, owner: type[Any]) -> Any:
        if obj is None:
            return self
        return partial(obj._call_method, self._method, self._name)


class _plain(Generic[P, R]):
    """Declares a member that never does IO: the sync session's own, bound to it."""

    __slots__ = ("_method",)

    def __init__(self, method: Callable[Concatenate[Session, P], R]) -> None:
        self._method = method

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, obj: ThreadpoolSession, owner: type[Any]) -> Callable[P, R]: ...
    def __get__(self, obj: ThreadpoolSession | None, owner: type[Any]) -> Any:
        if obj is None:
            return self
        return partial(self._method, obj.sync_session)


class _attribute(Generic[T]):
    """Declares a read-only attribute forwarded from the sync session."""

    __slots__ = ("_getter",)

    def __init__(self, getter: Callable[[Session], T]) -> None:
        self._getter = getter

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, obj: ThreadpoolSession, owner: type[Any]) -> T: ...
    def __get__(self, obj: ThreadpoolSession | None, owner: type[Any]) -> Any:
        if obj is None:
            return self
        return self._getter(obj.sync_session)


class ThreadpoolSession:
    """An ``AsyncSession``-like facade running a sync :class:`~sqlalchemy.orm.Session` in threads.

    Do not create it directly: call a :func:`threadpool_sessionmaker`, or open a scope with
    :func:`threadpool_session`. Calls of one session never overlap: concurrent tasks sharing it
    take turns (waiting takes no thread). Anything that returns a ``Result`` gets it fully
    buffered, so reading it on the event loop does no IO.
    """

    __slots__ = ("__weakref__", "_offloader", "maker", "sync_session")

    sync_session: Session
    """The synchronous session behind the facade; use it inside :meth:`run`."""

    def __init__(
        self, sync_session: Session, offloader: Offloader, maker: threadpool_sessionmaker
    ) -> None:
        self.sync_session = sync_session
        self._offloader = offloader
        self.maker: threadpool_sessionmaker = maker
        """The maker that made this session."""
        remember_facade(sync_session, self)  # for threadpool_session_of() / ThreadpoolAttrs

    def __repr__(self) -> str:
        state = "closed" if self._offloader.closed else "open"
        return f"<{type(self).__name__} {state} sync_session={self.sync_session!r}>"

    # -- the one way in ---------------------------------------------------------------

    async def _call_method(
        self, method: Callable[..., Any], name: str, /, *args: Any, **kwargs: Any
    ) -> Any:
        session = self.sync_session
        return await self._offloader.call(
            lambda: make_loop_safe(method(session, *args, **kwargs), name),
            recovers=method in _RECOVERING,
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
        return await self._offloader.call(
            lambda: make_loop_safe(fn(session, *args, **kwargs), "run()")
        )

    run_sync = run
    """Alias of :meth:`run`, the name ``AsyncSession`` uses."""

    # -- IO members, generated --------------------------------------------------------

    get: Final = _offloaded(Session.get)
    get_one: Final = _offloaded(Session.get_one)
    flush: Final = _offloaded(Session.flush)
    commit: Final = _offloaded(Session.commit)
    rollback: Final = _offloaded(Session.rollback)
    close: Final = _offloaded(Session.close)
    reset: Final = _offloaded(Session.reset)
    refresh: Final = _offloaded(Session.refresh)
    merge: Final = _offloaded(Session.merge)
    delete: Final = _offloaded(Session.delete)
    connection: Final = _offloaded(Session.connection)
    invalidate: Final = _offloaded(Session.invalidate)

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

    add: Final = _plain(Session.add)
    add_all: Final = _plain(Session.add_all)
    expunge: Final = _plain(Session.expunge)
    expunge_all: Final = _plain(Session.expunge_all)
    expire: Final = _plain(Session.expire)
    expire_all: Final = _plain(Session.expire_all)
    in_transaction: Final = _plain(Session.in_transaction)
    in_nested_transaction: Final = _plain(Session.in_nested_transaction)
    is_modified: Final = _plain(Session.is_modified)

    new: Final = _attribute(lambda s: s.new)
    dirty: Final = _attribute(lambda s: s.dirty)
    deleted: Final = _attribute(lambda s: s.deleted)
    identity_map: Final = _attribute(lambda s: s.identity_map)
    info: Final = _attribute(lambda s: s.info)
    bind: Final = _attribute(lambda s: s.bind)
    is_active: Final = _attribute(lambda s: s.is_active)
    autoflush: Final = _attribute(lambda s: s.autoflush)

    @property
    def no_autoflush(self) -> Any:
        """A context manager disabling autoflush: :attr:`sqlalchemy.orm.Session.no_autoflush`."""
        return self.sync_session.no_autoflush

    def __contains__(self, instance: object) -> bool:
        return instance in self.sync_session

    def __iter__(self) -> Iterator[object]:
        return iter(self.sync_session)

    # -- IO members whose SQLAlchemy signature is overloaded -------------------------

    if TYPE_CHECKING:
        # A ParamSpec cannot carry overloads, so these three take their types from the
        # installed AsyncSession's: 2.0 types rows as one tuple (``Select[Tuple[User]]``), 2.1
        # as a TypeVarTuple (``Select[User]``), and each line gets its own overloads.
        execute = _ASYNC_SESSION.execute
        scalar = _ASYNC_SESSION.scalar
        scalars = _ASYNC_SESSION.scalars
    else:
        execute = _offloaded(Session.execute)
        scalar = _offloaded(Session.scalar)
        scalars = _offloaded(Session.scalars)

    # -- streaming ---------------------------------------------------------------------
    #
    # Overloads for SQLAlchemy 2.0 (``Select[Tuple[int, str]]``) and 2.1 (``Select[int, str]``)
    # at once: each line is valid on one and ignored (``unused-ignore``) on the other.

    @overload
    async def stream(  # SQLAlchemy 2.0 (on 2.1: a single column of a tuple type)
        self,
        statement: TypedReturnsRows[_TP],
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolStreamResult[Row[_TP]]: ...
    @overload
    async def stream(  # SQLAlchemy 2.1
        self,
        statement: TypedReturnsRows[Unpack[_Ts]],  # type: ignore[valid-type, type-arg, unused-ignore]
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolStreamResult[Row[Unpack[_Ts]]]: ...  # type: ignore[valid-type, type-arg, unused-ignore]
    @overload
    async def stream(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolStreamResult[Any]: ...
    async def stream(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolStreamResult[Any]:
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
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolStreamScalarResult[T]: ...
    @overload
    async def stream_scalars(  # SQLAlchemy 2.1, one column
        self,
        statement: TypedReturnsRows[T],  # type: ignore[type-var, unused-ignore]
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolStreamScalarResult[T]: ...
    @overload
    async def stream_scalars(  # SQLAlchemy 2.1, several columns
        self,
        statement: TypedReturnsRows[T, Unpack[_Ts]],  # type: ignore[type-arg, valid-type, misc, unused-ignore]
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolStreamScalarResult[T]: ...
    @overload
    async def stream_scalars(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolStreamScalarResult[Any]: ...
    async def stream_scalars(
        self,
        statement: Executable,
        params: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
        bind_arguments: _BindArguments | None = None,
        **kw: Any,
    ) -> ThreadpoolStreamScalarResult[Any]:
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

    async def end(self, *, commit: bool, reason: str) -> None:
        """End the unit of work: commit (or roll back), then close; refuse IO afterwards.

        Shielded from cancellation. If the commit fails, the session is rolled back and closed
        and the commit error propagates; a failure while rolling back is logged and the
        connection invalidated, never raised over the caller's error. If a call of the unit of
        work was interrupted, nothing is committed: ``commit=True`` then raises
        :class:`TransactionInterruptedError`.
        """
        try:
            with anyio.CancelScope(shield=True):
                await self._offloader.finish(commit=commit)
        finally:
            self._offloader.end_scope(reason)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.end(commit=False, reason="its `async with` block exited")


#: Methods that acknowledge an interrupted unit of work (see TransactionInterruptedError).
_RECOVERING = (Session.rollback, Session.close, Session.reset, Session.invalidate)


class ThreadpoolSessionTransaction:
    """A transaction or SAVEPOINT of a :class:`ThreadpoolSession`, usable as ``async with``.

    ``await sess.begin()`` starts it and returns it; ``async with sess.begin():`` also commits
    when the block succeeds and rolls back when it raises or is cancelled.
    """

    __slots__ = ("nested", "session", "sync_transaction")

    def __init__(self, session: ThreadpoolSession, *, nested: bool) -> None:
        self.session: ThreadpoolSession = session
        self.nested: bool = nested
        self.sync_transaction: SessionTransaction | None = None

    @property
    def is_active(self) -> bool:
        return self.sync_transaction is not None and self.sync_transaction.is_active

    async def start(self) -> Self:
        """Begin the transaction (SAVEPOINT for a nested one) in a worker."""
        method = Session.begin_nested if self.nested else Session.begin
        session = self.session.sync_session
        self.sync_transaction = await self.session._offloader.call(partial(method, session))
        return self

    def __await__(self) -> Generator[Any, None, Self]:
        return self.start().__await__()

    async def commit(self) -> None:
        """Commit this transaction (RELEASE SAVEPOINT for a nested one)."""
        await self._end(commit=True)

    async def rollback(self) -> None:
        """Roll this transaction back (to its SAVEPOINT for a nested one)."""
        await self._end(commit=False)

    async def _end(self, *, commit: bool) -> None:
        transaction = self.sync_transaction
        if transaction is None:
            raise RuntimeError("This transaction was never started; `await` it first.")
        if not commit and not transaction.is_active:
            return  # already rolled back, e.g. after an interrupted call
        method = transaction.commit if commit else transaction.rollback
        with anyio.CancelScope(shield=not commit):
            await self.session._offloader.call(method, recovers=not commit)

    async def __aenter__(self) -> Self:
        await self.start()
        assert self.sync_transaction is not None
        # As AsyncSessionTransaction does: the sync transaction's own context manager (no IO
        # here) decides at the end what to commit, roll back or close.
        self.sync_transaction.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        transaction = self.sync_transaction
        if transaction is None:
            return
        offloader = self.session._offloader
        if exc_type is None:
            offloader.check_usable()  # never report an interrupted one committed
        elif offloader.interrupted:
            return  # the whole unit of work was rolled back already
        # SessionTransaction.__exit__ in a worker: commit (a failed commit or RELEASE rolls the
        # transaction or SAVEPOINT back before it raises), or roll back a transaction that is
        # still active, or close one a failed flush deactivated; shielded when unwinding.
        with anyio.CancelScope(shield=exc_type is not None):
            await offloader.call(partial(transaction.__exit__, exc_type, exc, tb))
