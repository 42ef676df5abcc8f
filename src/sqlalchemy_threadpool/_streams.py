"""Streaming results: one server-side result whose views all read from a single position.

:meth:`ThreadpoolSession.stream` returns a :class:`ThreadpoolStreamResult`; ``scalars()``,
``mappings()``, ``columns()``, ``unique()`` and ``tuples()`` are views of it, as in
``AsyncResult``. Every view is SQLAlchemy's own sync view (``ScalarResult``, ``MappingResult``,
...) over one :class:`_StreamRows`, which holds the raw rows read ahead and, behind them, the
sync result: so views share one position and see each row once, in order (invariant 10), and
row processing, ``unique()`` and ``columns()`` are SQLAlchemy's.

IO happens only in a worker (invariant 5). ``async for`` and ``fetchone()`` read a chunk of
``STREAM_CHUNK_SIZE`` (1000) raw rows per worker call and serve the rows on the loop from that
chunk; every other fetch is one worker call, as each is one ``greenlet_spawn`` in
``AsyncResult``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, overload

import anyio
from sqlalchemy.engine import Result, Row, RowMapping
from sqlalchemy.exc import ResourceClosedError
from typing_extensions import Self, Unpack

if TYPE_CHECKING:
    from ._offload import Offloader

__all__ = [
    "STREAM_CHUNK_SIZE",
    "ThreadpoolStreamMappingResult",
    "ThreadpoolStreamResult",
    "ThreadpoolStreamScalarResult",
    "open_stream",
]

#: Raw rows read per worker call by ``async for`` and ``fetchone()``, and the default size
#: of ``fetchmany()`` / ``partitions()``.
STREAM_CHUNK_SIZE = 1000

T = TypeVar("T")
_T = TypeVar("_T")
_TP = TypeVar("_TP")
_R_co = TypeVar("_R_co", covariant=True)
_T_co = TypeVar("_T_co", covariant=True)


#: What ``next(view, _END)`` returns after the last row.
_END: Any = object()


class _NeedRows(Exception):
    """Raised on the loop when a view needs rows that are not read ahead yet."""


class _StreamRows(Result[Any]):
    """The one source of rows of a stream: rows read ahead, then the sync result behind them.

    A ``Result`` whose raw rows come first from the read-ahead deque, then from the sync
    result (the IO). Views are built on it as on any ``Result``, so they share its position.
    Outside a worker (``_io`` false) it never touches the sync result: it raises
    :class:`_NeedRows` instead and the caller reads a chunk ahead in a worker.
    """

    def __init__(self, real: Result[Any], offloader: Offloader) -> None:
        super().__init__(real._metadata)
        self._real = real
        self._offloader = offloader
        self._ahead: deque[Any] = deque()
        self._exhausted = False  # the sync result returned no more rows
        self._hard_closed = False
        self._io = False  # a worker runs a call of this stream now
        self._busy = 0  # calls of this stream started on the loop and not finished
        self._unique_filter_state = real._unique_filter_state
        self._source_supports_scalars = real._source_supports_scalars
        self._yield_per = real._yield_per
        self._attributes = real._attributes
        if real._row_logging_fn is not None:  # echo="debug" logs rows as they are made
            self._row_logging_fn = real._row_logging_fn

    # -- on the loop --------------------------------------------------------------------

    def loop_may_read(self) -> bool:
        """Whether rows may be served on the loop now (no worker is inside this stream)."""
        return not self._busy and not self._offloader.interrupted

    def read_ahead(self) -> None:
        """Read a chunk of raw rows into the deque (runs in a worker)."""
        if not self._exhausted and not self._hard_closed:
            self._ahead.extend(self._read(STREAM_CHUNK_SIZE))

    def close_without_io(self) -> None:
        """Mark closed when the sync result is gone or already released."""
        self._hard_closed = True
        self._ahead.clear()
        if self._real._soft_closed and not self._real.closed:
            self._real.close()  # the cursor is released already: only bookkeeping

    # -- what SQLAlchemy's views call ---------------------------------------------------

    def _read(self, size: int | None) -> list[Any]:
        if self._exhausted:
            return []
        if not self._io:
            raise _NeedRows
        rows = list(self._real._fetchmany_impl(size))
        if not rows:
            self._exhausted = True
        return rows

    def _check_open(self) -> None:
        if self._hard_closed:
            raise ResourceClosedError("This result object is closed.")

    def _fetchone_impl(self, hard_close: bool = False) -> Any:
        self._check_open()
        if self._ahead:
            return self._ahead.popleft()
        rows = self._read(1)
        if rows:
            return rows[0]
        if hard_close:
            self._soft_close(hard=True)
        return None

    def _fetchmany_impl(self, size: int | None = None) -> list[Any]:
        self._check_open()
        if size is None:
            size = self._yield_per or STREAM_CHUNK_SIZE
        ahead = self._ahead
        if len(ahead) < size and not self._io and not self._exhausted:
            raise _NeedRows  # before taking anything: nothing is lost
        rows = [ahead.popleft() for _ in range(min(size, len(ahead)))]
        if len(rows) < size:
            rows.extend(self._read(size - len(rows)))
        return rows

    def _fetchall_impl(self) -> list[Any]:
        self._check_open()
        if not self._exhausted and not self._io:
            raise _NeedRows
        rows = list(self._ahead)
        self._ahead.clear()
        if not self._exhausted:
            rows.extend(self._real._fetchall_impl())
            self._exhausted = True
        return rows

    def _fetchiter_impl(self) -> Iterator[Any]:
        while (row := self._fetchone_impl()) is not None:
            yield row

    def _raw_row_iterator(self) -> Iterator[Any]:
        return self._fetchiter_impl()

    def _soft_close(self, hard: bool = False, **kw: Any) -> None:
        if hard:
            self._hard_closed = True
            self._ahead.clear()
        self._real._soft_close(hard=hard)

    @property
    def _soft_closed(self) -> bool:
        return self._hard_closed or (not self._ahead and self._real._soft_closed)

    @property
    def closed(self) -> bool:
        return self._hard_closed or self._real.closed


def open_stream(sync_result: Result[Any], offloader: Offloader) -> ThreadpoolStreamResult[Any]:
    """Wrap a server-side ``sync_result`` (fresh from a worker) as a stream."""
    rows = _StreamRows(sync_result, offloader)
    return ThreadpoolStreamResult(rows, rows)


class _HasTuple(Protocol[_T_co]):
    """A ``Row`` seen through its ``_tuple()``, the same on SQLAlchemy 2.0 and 2.1."""

    def _tuple(self) -> _T_co: ...


class _StreamView(Generic[_R_co]):
    """What every view of a stream has: one worker call per fetch, close, ``async with``."""

    __slots__ = ("_rows", "_view")

    def __init__(self, rows: _StreamRows, view: Any) -> None:
        self._rows = rows
        self._view = view  # SQLAlchemy's sync view over ``rows``

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a method of the sync view) in a worker, where it may read rows."""
        rows = self._rows

        def in_worker() -> T:
            rows._io = True
            try:
                return fn()
            finally:
                rows._io = False

        rows._busy += 1
        try:
            return await rows._offloader.call(in_worker)
        finally:
            rows._busy -= 1

    async def _one_at_a_time(self, fn: Callable[[], T]) -> T:
        """Run a one-row getter on the loop, reading a chunk ahead in a worker when needed."""
        rows = self._rows
        while True:
            if rows.loop_may_read():
                try:
                    return fn()
                except _NeedRows:
                    pass
            await self._run(rows.read_ahead)

    @property
    def closed(self) -> bool:
        """Whether the stream was closed (explicitly, or by ``first()``, ``one()``, ...)."""
        return bool(self._view.closed)

    async def close(self) -> None:
        """Release the cursor, in a worker and shielded from cancellation."""
        rows = self._rows
        if rows._hard_closed:
            return
        offloader = rows._offloader
        if rows._real.closed or rows._real._soft_closed or offloader.closed:
            rows.close_without_io()  # nothing left to release, or no session to do it
        elif offloader.interrupted:
            rows.close_without_io()  # the interrupted unit of work was rolled back
        else:
            with anyio.CancelScope(shield=True):
                await self._run(rows.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> _R_co:
        view = self._view
        row = await self._one_at_a_time(lambda: next(view, _END))
        if row is _END:
            raise StopAsyncIteration
        return row  # type: ignore[no-any-return]

    async def fetchmany(self, size: int | None = None) -> Sequence[_R_co]:
        """Up to ``size`` rows (1000 by default), in one worker call."""
        return await self._run(lambda: self._view.fetchmany(size))

    def partitions(self, size: int | None = None) -> AsyncIterator[Sequence[_R_co]]:
        """Lists of up to ``size`` rows (1000 by default), a worker call each.

        A plain async iterator, not an async generator: breaking out of the loop leaves
        nothing to finalise.
        """
        return _Partitions(self, size)

    async def fetchall(self) -> Sequence[_R_co]:
        """Every remaining row, in one worker call."""
        return await self._run(self._view.fetchall)

    async def all(self) -> Sequence[_R_co]:
        """Every remaining row (same as :meth:`fetchall`)."""
        return await self._run(self._view.all)

    async def first(self) -> _R_co | None:
        """The next row or ``None``; closes the result."""
        return await self._run(self._view.first)

    async def one(self) -> _R_co:
        """The next row, which must be the last; closes the result."""
        return await self._run(self._view.one)

    async def one_or_none(self) -> _R_co | None:
        """The next row or ``None``, raising if more remain; closes the result."""
        return await self._run(self._view.one_or_none)

    def unique(self, strategy: Callable[[Any], Any] | None = None) -> Self:
        """Apply unique filtering, as :meth:`sqlalchemy.engine.Result.unique` (in place)."""
        self._view.unique(strategy)
        return self


class _Partitions(Generic[_R_co]):
    """The async iterator that ``partitions()`` returns."""

    __slots__ = ("_size", "_view")

    def __init__(self, view: _StreamView[_R_co], size: int | None) -> None:
        self._view = view
        self._size = size

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Sequence[_R_co]:
        part = await self._view.fetchmany(self._size)
        if not part:
            raise StopAsyncIteration
        return part


class ThreadpoolStreamResult(_StreamView[_R_co]):
    """A streaming result: rows are read from a server-side cursor in a worker.

    Returned by :meth:`ThreadpoolSession.stream`; the counterpart of ``AsyncResult``. Its
    views (:meth:`scalars`, :meth:`mappings`, :meth:`columns`, :meth:`tuples`,
    :meth:`unique`) share its position: every row is seen once, in order, whichever view
    reads it. It keeps the session's connection busy until it is exhausted or closed: use it
    as ``async with`` or exhaust it. Closing is shielded from cancellation.
    """

    __slots__ = ()

    def keys(self) -> Any:
        """The column names, as ``Result.keys()``."""
        return self._view.keys()

    def columns(self, *col_expressions: Any) -> Self:
        """Keep only these columns in each row (in place), as ``Result.columns()``."""
        self._view.columns(*col_expressions)
        return self

    @overload
    def scalars(
        self: ThreadpoolStreamResult[_HasTuple[tuple[_T]]], index: Literal[0] = ...
    ) -> ThreadpoolStreamScalarResult[_T]: ...
    @overload
    def scalars(  # SQLAlchemy 2.1: Row[int, str] is a tuple[int, str]
        self: ThreadpoolStreamResult[tuple[_T, Unpack[tuple[Any, ...]]]],
        index: Literal[0] = ...,
    ) -> ThreadpoolStreamScalarResult[_T]: ...
    @overload
    def scalars(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self: ThreadpoolStreamResult[Row[tuple[_T]]], index: Literal[0] = ...
    ) -> ThreadpoolStreamScalarResult[_T]: ...
    @overload
    def scalars(self, index: int | str = 0) -> ThreadpoolStreamScalarResult[Any]: ...
    def scalars(self, index: int | str = 0) -> ThreadpoolStreamScalarResult[Any]:
        """A view returning one column (the first by default) of each row."""
        return ThreadpoolStreamScalarResult(self._rows, self._view.scalars(index))

    def mappings(self) -> ThreadpoolStreamMappingResult:
        """A view returning each row as a :class:`~sqlalchemy.engine.RowMapping`."""
        return ThreadpoolStreamMappingResult(self._rows, self._view.mappings())

    def tuples(self: ThreadpoolStreamResult[_HasTuple[_TP]]) -> ThreadpoolStreamResult[_TP]:
        """This result, typed as returning plain tuples (``Row`` is one already)."""
        return self  # type: ignore[return-value]

    async def fetchone(self) -> _R_co | None:
        """The next row or ``None``; served from the rows read ahead when it can be."""
        return await self._one_at_a_time(self._view.fetchone)

    @overload
    async def scalar(self: ThreadpoolStreamResult[_HasTuple[tuple[_T]]]) -> _T | None: ...
    @overload
    async def scalar(
        self: ThreadpoolStreamResult[tuple[_T, Unpack[tuple[Any, ...]]]],
    ) -> _T | None: ...
    @overload
    async def scalar(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self: ThreadpoolStreamResult[Row[tuple[_T]]],
    ) -> _T | None: ...
    @overload
    async def scalar(self) -> Any: ...
    async def scalar(self) -> Any:
        """The first column of the next row, or ``None``; closes the result."""
        return await self._run(self._view.scalar)

    @overload
    async def scalar_one(self: ThreadpoolStreamResult[_HasTuple[tuple[_T]]]) -> _T: ...
    @overload
    async def scalar_one(
        self: ThreadpoolStreamResult[tuple[_T, Unpack[tuple[Any, ...]]]],
    ) -> _T: ...
    @overload
    async def scalar_one(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self: ThreadpoolStreamResult[Row[tuple[_T]]],
    ) -> _T: ...
    @overload
    async def scalar_one(self) -> Any: ...
    async def scalar_one(self) -> Any:
        """The first column of the next row, which must be the last; closes the result."""
        return await self._run(self._view.scalar_one)

    @overload
    async def scalar_one_or_none(
        self: ThreadpoolStreamResult[_HasTuple[tuple[_T]]],
    ) -> _T | None: ...
    @overload
    async def scalar_one_or_none(
        self: ThreadpoolStreamResult[tuple[_T, Unpack[tuple[Any, ...]]]],
    ) -> _T | None: ...
    @overload
    async def scalar_one_or_none(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self: ThreadpoolStreamResult[Row[tuple[_T]]],
    ) -> _T | None: ...
    @overload
    async def scalar_one_or_none(self) -> Any: ...
    async def scalar_one_or_none(self) -> Any:
        """The first column of the next row or ``None``, raising if more remain; closes."""
        return await self._run(self._view.scalar_one_or_none)


class ThreadpoolStreamScalarResult(_StreamView[_T_co]):
    """A view of a stream returning one column of each row: ``AsyncScalarResult``'s twin.

    From :meth:`ThreadpoolStreamResult.scalars` or :meth:`ThreadpoolSession.stream_scalars`.
    """

    __slots__ = ()


class ThreadpoolStreamMappingResult(_StreamView[RowMapping]):
    """A view of a stream returning :class:`~sqlalchemy.engine.RowMapping` objects.

    From :meth:`ThreadpoolStreamResult.mappings`: ``AsyncMappingResult``'s twin.
    """

    __slots__ = ()

    def keys(self) -> Any:
        """The column names, as ``MappingResult.keys()``."""
        return self._view.keys()

    def columns(self, *col_expressions: Any) -> Self:
        """Keep only these columns in each mapping (in place)."""
        self._view.columns(*col_expressions)
        return self

    async def fetchone(self) -> RowMapping | None:
        """The next mapping or ``None``; served from the rows read ahead when it can be."""
        return await self._one_at_a_time(self._view.fetchone)
