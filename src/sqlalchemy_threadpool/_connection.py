"""``ThreadpoolConnection``: ``AsyncConnection``'s facade, and its transactions.

A connection from :meth:`ThreadpoolEngine.connect() <._engine.ThreadpoolEngine.connect>` is
backed by a :class:`~._session.ThreadpoolSession` of the maker its engine owns, and its sync
:class:`~sqlalchemy.engine.Connection` is that session's ``connection()``: every IO call is a
call of the session's :class:`~._offload.Offloader`, so there is no second path to the worker
threads, and results and streams are the session's.

The one difference from ``AsyncConnection`` follows from admission: the DBAPI connection is
held for a transaction, not from ``connect()`` to ``close()``. It is checked out when the
first statement (or ``begin()``) runs and goes back to the pool at ``commit()`` /
``rollback()``, so a later transaction may get another pooled connection (connection-level
``execution_options()`` are re-applied to it; temporary tables and session variables are not).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, TypeVar, cast, overload

import anyio
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import InvalidRequestError, ResourceClosedError
from typing_extensions import ParamSpec, Self, TypeVarTuple, Unpack

from ._results import check_callable, make_loop_safe
from ._session import ThreadpoolSession
from ._streams import (
    StreamOpening,
    ThreadpoolResult,
    ThreadpoolScalarResult,
    UntypedResult,
    open_stream,
)
from ._transaction import ThreadpoolTransaction

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import (
        CoreExecuteOptionsParameter,
        Dialect,
        IsolationLevel,
        _CoreAnyExecuteParams,
    )
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.sql.base import Executable
    from sqlalchemy.sql.selectable import TypedReturnsRows

    from ._engine import ThreadpoolEngine
    from ._offload import Offloader

    #: Only names the types of AsyncConnection's bound methods (see ``execute``); never exists.
    _ASYNC_CONNECTION = cast("AsyncConnection", None)

__all__ = ["ThreadpoolConnection"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
_Ts = TypeVarTuple("_Ts")
_TP = TypeVar("_TP", bound=tuple[Any, ...])  # SQLAlchemy 2.0's row type parameter


class ThreadpoolConnection:
    """An ``AsyncConnection``-like facade; every IO call runs in a worker thread.

    From :meth:`ThreadpoolEngine.connect` (``async with``, or ``await engine.connect()`` and
    :meth:`close`) or :meth:`ThreadpoolEngine.begin`. Commit-as-you-go as on a sync
    ``Connection``: the first statement begins a transaction, :meth:`commit` /
    :meth:`rollback` end it, :meth:`close` rolls back what is left. Results are buffered.
    """

    __slots__ = ("_closed", "_invalidated", "_last", "_options", "_session", "engine")

    def __init__(self, engine: ThreadpoolEngine) -> None:
        self.engine: ThreadpoolEngine = engine
        """The :class:`ThreadpoolEngine` this connection came from."""
        self._session: ThreadpoolSession = engine._maker(bind=engine.sync_engine)
        self._options: dict[str, Any] = {}
        self._last: Connection | None = None
        self._closed = False
        self._invalidated = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {state} engine={self.engine!r}>"

    # -- the one way in ---------------------------------------------------------------

    @property
    def _offloader(self) -> Offloader:
        return self._session._offloader

    def _check_open(self) -> None:
        if self._closed:
            raise ResourceClosedError(
                "This ThreadpoolConnection is closed (its `async with` block exited or "
                "close() was called); it cannot run SQL any more. Open a new one with "
                "`async with engine.connect() as conn:`."
            )

    async def _call(
        self,
        fn: Callable[[Connection], T],
        where: str,
        *,
        buffer: bool = True,
        begin: bool = False,
    ) -> T:
        """Run ``fn(sync connection)`` in a worker through the session's offload path.

        The connection of a new transaction (``begin``: an explicit one) first gets the
        options set with :meth:`execution_options`. ``buffer=False``: a stream's result.
        """
        self._check_open()
        session, options = self._session.sync_session, self._options

        def in_worker() -> tuple[T, Connection]:
            fresh = begin or not session.in_transaction()
            if begin:
                session.begin()
            if fresh and options:
                connection = session.connection(execution_options=options)
            else:
                connection = session.connection()
            value = fn(connection)
            return (make_loop_safe(value, where) if buffer else value), connection

        value, self._last = await self._offloader.call(in_worker)
        self._invalidated = False
        return value

    async def run_sync(
        self, fn: Callable[Concatenate[Connection, P], R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Call ``fn(sync_connection, *args, **kwargs)`` in a worker thread; return its value.

        E.g. ``await conn.run_sync(Base.metadata.create_all)``. A ``Result`` it returns is
        fully fetched in the worker.
        """
        check_callable(fn, "run_sync()")
        return await self._call(lambda c: fn(c, *args, **kwargs), "run_sync()")

    # -- statements ---------------------------------------------------------------------

    if TYPE_CHECKING:
        # Overloaded in SQLAlchemy, differently on 2.0 and 2.1: the installed line's types.
        execute = _ASYNC_CONNECTION.execute
        scalar = _ASYNC_CONNECTION.scalar
        scalars = _ASYNC_CONNECTION.scalars
        exec_driver_sql = _ASYNC_CONNECTION.exec_driver_sql
    else:

        async def execute(self, statement, parameters=None, *, execution_options=None):
            """Execute ``statement`` in a worker; the ``CursorResult`` comes back buffered."""
            return await self._call(
                lambda c: c.execute(statement, parameters, execution_options=execution_options),
                "execute()",
            )

        async def scalar(self, statement, parameters=None, *, execution_options=None):
            """Execute ``statement`` in a worker; the first column of the first row."""
            return await self._call(
                lambda c: c.scalar(statement, parameters, execution_options=execution_options),
                "scalar()",
            )

        async def scalars(self, statement, parameters=None, *, execution_options=None):
            """Execute ``statement`` in a worker; a buffered ``ScalarResult`` of column 0."""
            return await self._call(
                lambda c: c.scalars(statement, parameters, execution_options=execution_options),
                "scalars()",
            )

        async def exec_driver_sql(self, statement, parameters=None, execution_options=None):
            """Run a driver-level SQL string in a worker; the ``CursorResult`` is buffered."""
            return await self._call(
                lambda c: c.exec_driver_sql(statement, parameters, execution_options),
                "exec_driver_sql()",
            )

    # -- streaming ---------------------------------------------------------------------
    #
    # Overloads for SQLAlchemy 2.0 (``Select[Tuple[int, str]]``) and 2.1 (``Select[int, str]``)
    # at once, as ThreadpoolSession.stream's.

    @overload
    def stream(  # SQLAlchemy 2.0 (on 2.1: a single column of a tuple type)
        self,
        statement: TypedReturnsRows[_TP],
        parameters: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: CoreExecuteOptionsParameter | None = None,
    ) -> StreamOpening[ThreadpoolResult[_TP]]: ...
    @overload
    def stream(  # SQLAlchemy 2.1
        self,
        statement: TypedReturnsRows[Unpack[_Ts]],  # type: ignore[valid-type, type-arg, unused-ignore]
        parameters: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: CoreExecuteOptionsParameter | None = None,
    ) -> StreamOpening[ThreadpoolResult[Unpack[_Ts]]]: ...  # type: ignore[valid-type, type-arg, unused-ignore]
    @overload
    def stream(
        self,
        statement: Executable,
        parameters: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: CoreExecuteOptionsParameter | None = None,
    ) -> StreamOpening[UntypedResult]: ...
    def stream(
        self,
        statement: Executable,
        parameters: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: CoreExecuteOptionsParameter | None = None,
    ) -> StreamOpening[UntypedResult]:
        """Execute with a server-side cursor; rows are read a chunk at a time in a worker.

        ``async with conn.stream(stmt) as result:`` closes the cursor at the end; ``result =
        await conn.stream(stmt)`` leaves that to you (exhaust or ``close()`` it).
        """
        options = {**(execution_options or {}), "stream_results": True}

        async def open_() -> UntypedResult:
            self._check_open()
            result = await self._call(
                lambda c: c.execute(statement, parameters, execution_options=options),
                "stream()",
                buffer=False,
            )
            return open_stream(result, self._offloader)

        return StreamOpening(open_)

    @overload
    def stream_scalars(  # SQLAlchemy 2.0 (on 2.1: a single column of a tuple type)
        self,
        statement: TypedReturnsRows[tuple[T, Unpack[tuple[Any, ...]]]],
        parameters: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: CoreExecuteOptionsParameter | None = None,
    ) -> StreamOpening[ThreadpoolScalarResult[T]]: ...
    @overload
    def stream_scalars(  # SQLAlchemy 2.1, one column
        self,
        statement: TypedReturnsRows[T],  # type: ignore[type-var, unused-ignore]
        parameters: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: CoreExecuteOptionsParameter | None = None,
    ) -> StreamOpening[ThreadpoolScalarResult[T]]: ...
    @overload
    def stream_scalars(  # SQLAlchemy 2.1, several columns
        self,
        statement: TypedReturnsRows[T, Unpack[_Ts]],  # type: ignore[type-arg, valid-type, misc, unused-ignore]
        parameters: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: CoreExecuteOptionsParameter | None = None,
    ) -> StreamOpening[ThreadpoolScalarResult[T]]: ...
    @overload
    def stream_scalars(
        self,
        statement: Executable,
        parameters: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: CoreExecuteOptionsParameter | None = None,
    ) -> StreamOpening[ThreadpoolScalarResult[Any]]: ...
    def stream_scalars(
        self,
        statement: Executable,
        parameters: _CoreAnyExecuteParams | None = None,
        *,
        execution_options: CoreExecuteOptionsParameter | None = None,
    ) -> StreamOpening[ThreadpoolScalarResult[Any]]:
        """Like :meth:`stream`, returning the first column of each row."""

        async def open_() -> ThreadpoolScalarResult[Any]:
            opened = self.stream(statement, parameters, execution_options=execution_options)
            return (await opened).scalars()

        return StreamOpening(open_)

    # -- transactions ------------------------------------------------------------------

    def begin(self) -> ThreadpoolTransaction:
        """Begin a transaction: ``async with conn.begin():`` commits at the end of the block;
        ``await conn.begin()`` begins it and returns it."""
        return ThreadpoolTransaction(self, nested=False)

    def begin_nested(self) -> ThreadpoolTransaction:
        """Begin a SAVEPOINT: ``async with conn.begin_nested():`` releases or rolls back to it."""
        return ThreadpoolTransaction(self, nested=True)

    async def commit(self) -> None:
        """Commit the transaction in progress, if any; the connection goes back to the pool."""
        self._check_open()
        await self._offloader.call(self._session.sync_session.commit)

    async def rollback(self) -> None:
        """Roll back the transaction in progress, if any (also after an interrupted call)."""
        self._check_open()
        await self._offloader.call(self._session.sync_session.rollback, recovers=True)

    async def invalidate(self, exception: BaseException | None = None) -> None:
        """Invalidate the DBAPI connection in use (it is discarded, not pooled) and end the
        transaction; the next statement gets a fresh connection."""
        self._check_open()
        session, connection = self._session.sync_session, self.sync_connection

        def invalidate() -> None:
            if connection is not None:
                connection.invalidate(exception)
            session.invalidate()

        await self._offloader.call(invalidate, recovers=True)
        self._invalidated = True

    async def close(self) -> None:
        """Roll back what is left and give the connection back; shielded. Idempotent."""
        if self._closed:
            return
        self._closed = True
        offloader = self._offloader
        try:
            with anyio.CancelScope(shield=True):
                await offloader.finish(commit=False)
        finally:
            offloader.end("its ThreadpoolConnection was closed")

    async def aclose(self) -> None:
        """Same as :meth:`close`, for :func:`contextlib.aclosing`."""
        await self.close()

    def in_transaction(self) -> bool:
        """Whether a transaction is in progress."""
        return self._session.sync_session.in_transaction()

    def in_nested_transaction(self) -> bool:
        """Whether a SAVEPOINT is in progress."""
        return self._session.sync_session.in_nested_transaction()

    def get_transaction(self) -> ThreadpoolTransaction | None:
        """The transaction in progress, or ``None``."""
        return ThreadpoolTransaction._of(self, self._session.sync_session.get_transaction())

    def get_nested_transaction(self) -> ThreadpoolTransaction | None:
        """The innermost SAVEPOINT in progress, or ``None``."""
        nested = self._session.sync_session.get_nested_transaction()
        return ThreadpoolTransaction._of(self, nested)

    async def execution_options(self, **opt: Any) -> Self:
        """Set options on this connection (and every pooled connection it uses later).

        Applied to the connection in use now (in a worker) if a transaction is in progress;
        ``isolation_level`` can then only change after ``commit()`` / ``rollback()``, as on a
        sync ``Connection``.
        """
        self._check_open()
        if self.in_transaction():
            await self._call(lambda c: c.execution_options(**opt), "execution_options()")
        self._options = {**self._options, **opt}
        return self

    async def get_isolation_level(self) -> IsolationLevel:
        """The isolation level of the connection in use, read from the database in a worker."""
        return await self._call(lambda c: c.get_isolation_level(), "get_isolation_level()")

    # -- attributes (no IO) ------------------------------------------------------------

    @property
    def sync_engine(self) -> Engine:
        """The sync engine."""
        return self.engine.sync_engine

    @property
    def sync_connection(self) -> Connection | None:
        """The sync :class:`~sqlalchemy.engine.Connection` of the transaction in progress;
        ``None`` between transactions. SQL on it from the event loop raises (the guard)."""
        connection = self._last
        if connection is None or connection.closed or not self.in_transaction():
            return None
        return connection

    @property
    def info(self) -> dict[Any, Any]:
        """The :attr:`~sqlalchemy.engine.Connection.info` of the connection in use."""
        connection = self.sync_connection
        if connection is None:
            self._check_open()
            raise InvalidRequestError(
                "This ThreadpoolConnection holds no DBAPI connection right now (it takes one "
                "from the pool when a transaction begins and gives it back at commit() or "
                "rollback()): read `info` after `await conn.begin()` or a first statement."
            )
        return connection.info

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the ``async with`` block exited)."""
        return self._closed

    @property
    def invalidated(self) -> bool:
        """Whether :meth:`invalidate` was called and no statement ran since."""
        return self._invalidated

    @property
    def dialect(self) -> Dialect:
        """The engine's dialect."""
        return self.engine.sync_engine.dialect

    @property
    def default_isolation_level(self) -> IsolationLevel | None:
        """The dialect's isolation level of a new connection (no IO)."""
        return self.engine.sync_engine.dialect.default_isolation_level

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> Self:
        """What ``await engine.connect()`` does: nothing yet (the pool is used lazily)."""
        self._check_open()
        return self

    def __await__(self) -> Generator[Any, None, Self]:
        return self.start().__await__()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
