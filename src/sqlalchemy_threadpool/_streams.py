"""The public stream results: ``ThreadpoolResult`` and its scalar, mapping and tuple views.

:meth:`ThreadpoolSession.stream` returns a :class:`ThreadpoolResult`, the counterpart of
``AsyncResult`` member for member; ``scalars()``, ``mappings()``, ``tuples()`` / ``t``,
``columns()`` and ``unique()`` give its views (``ThreadpoolScalarResult``,
``ThreadpoolMappingResult``, ``ThreadpoolTupleResult``, as ``AsyncScalarResult``,
``AsyncMappingResult``, ``AsyncTupleResult``). All views of one stream share one position
(invariant 10): see :mod:`._stream_rows` for the rows and :mod:`._stream_views` for what
every view shares. ``ThreadpoolStreamResult``, ``ThreadpoolStreamScalarResult`` and
``ThreadpoolStreamMappingResult`` are the earlier names, kept as aliases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, overload

from sqlalchemy.engine import FrozenResult, Result, Row, RowMapping
from typing_extensions import Self, TypeVarTuple, Unpack

from ._stream_rows import STREAM_CHUNK_SIZE, StreamRows
from ._stream_views import StreamView

if TYPE_CHECKING:
    from sqlalchemy.engine.result import RMKeyView, _KeyIndexType

    from ._offload import Offloader

__all__ = [
    "STREAM_CHUNK_SIZE",
    "ThreadpoolMappingResult",
    "ThreadpoolResult",
    "ThreadpoolScalarResult",
    "ThreadpoolStreamMappingResult",
    "ThreadpoolStreamResult",
    "ThreadpoolStreamScalarResult",
    "ThreadpoolTupleResult",
    "open_stream",
]

_T = TypeVar("_T")
_TP = TypeVar("_TP")
_TP20 = TypeVar("_TP20", bound=tuple[Any, ...])  # SQLAlchemy 2.0's row type parameter
_Ts = TypeVarTuple("_Ts")
_R_co = TypeVar("_R_co", covariant=True)
_T_co = TypeVar("_T_co", covariant=True)


def open_stream(sync_result: Result[Any], offloader: Offloader) -> ThreadpoolResult[Any]:
    """Wrap a server-side ``sync_result`` (fresh from a worker) as a stream."""
    rows = StreamRows(sync_result, offloader)
    return ThreadpoolResult(rows, rows)


class _HasTuple(Protocol[_T_co]):
    """A ``Row`` seen through its ``_tuple()``, the same on SQLAlchemy 2.0 and 2.1."""

    def _tuple(self) -> _T_co: ...


class ThreadpoolResult(StreamView[_R_co]):
    """A streaming result: rows are read from a server-side cursor in a worker.

    Returned by :meth:`ThreadpoolSession.stream`; the counterpart of ``AsyncResult``. Its
    views (:meth:`scalars`, :meth:`mappings`, :meth:`columns`, :meth:`tuples`,
    :meth:`unique`) share its position: every row is seen once, in order, whichever view
    reads it. It keeps the session's connection busy until it is exhausted or closed: use it
    as ``async with`` or exhaust it. Closing is shielded from cancellation.
    """

    __slots__ = ()

    def keys(self) -> RMKeyView:
        """The column names, as ``Result.keys()``."""
        return self._view.keys()  # type: ignore[no-any-return]

    def columns(self, *col_expressions: _KeyIndexType) -> Self:
        """Keep only these columns in each row (in place), as ``Result.columns()``."""
        self._view.columns(*col_expressions)
        return self

    @overload
    def scalars(
        self: ThreadpoolResult[_HasTuple[tuple[_T]]], index: Literal[0] = ...
    ) -> ThreadpoolScalarResult[_T]: ...
    @overload
    def scalars(  # SQLAlchemy 2.1: Row[int, str] is a tuple[int, str]
        self: ThreadpoolResult[tuple[_T, Unpack[tuple[Any, ...]]]],
        index: Literal[0] = ...,
    ) -> ThreadpoolScalarResult[_T]: ...
    @overload
    def scalars(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self: ThreadpoolResult[Row[tuple[_T]]], index: Literal[0] = ...
    ) -> ThreadpoolScalarResult[_T]: ...
    @overload
    def scalars(self, index: int | str = 0) -> ThreadpoolScalarResult[Any]: ...
    def scalars(self, index: int | str = 0) -> ThreadpoolScalarResult[Any]:
        """A view returning one column (the first by default) of each row."""
        return ThreadpoolScalarResult(self._rows, self._view.scalars(index))

    def mappings(self) -> ThreadpoolMappingResult:
        """A view returning each row as a :class:`~sqlalchemy.engine.RowMapping`."""
        return ThreadpoolMappingResult(self._rows, self._view.mappings())

    def tuples(self: ThreadpoolResult[_HasTuple[_TP]]) -> ThreadpoolTupleResult[_TP]:
        """A view typed as returning plain tuples (a ``Row`` is one already).

        Same position and same rows as this result; as ``AsyncResult.tuples()``, which
        SQLAlchemy 2.1 deprecates because ``Row`` types unpack directly there (this one does
        not warn).
        """
        return ThreadpoolTupleResult(self._rows, self._view)

    @property
    def t(self: ThreadpoolResult[_HasTuple[_TP]]) -> ThreadpoolTupleResult[_TP]:
        """Shorter synonym of :meth:`tuples`."""
        return ThreadpoolTupleResult(self._rows, self._view)

    @overload
    async def freeze(self: ThreadpoolResult[Row[_TP20]]) -> FrozenResult[_TP20]: ...
    @overload
    async def freeze(  # SQLAlchemy 2.1
        self: ThreadpoolResult[Row[Unpack[_Ts]]],  # type: ignore[type-arg, valid-type, misc, unused-ignore]
    ) -> FrozenResult[Unpack[_Ts]]: ...  # type: ignore[type-arg, valid-type, misc, unused-ignore]
    async def freeze(self) -> FrozenResult[Any]:
        """Fetch the remaining rows in a worker and return them as a ``FrozenResult``.

        Calling the :class:`~sqlalchemy.engine.FrozenResult` makes a new, buffered sync
        ``Result`` over those rows, as many times as wanted (result caching). As
        ``AsyncResult.freeze()``, call it on an unconsumed result; it consumes the result.
        """
        return await self._run(lambda: FrozenResult(self._view))

    async def fetchone(self) -> _R_co | None:
        """The next row or ``None``; served from the rows read ahead when it can be."""
        return await self._one_at_a_time(self._view.fetchone)

    @overload
    async def scalar(self: ThreadpoolResult[_HasTuple[tuple[_T]]]) -> _T | None: ...
    @overload
    async def scalar(
        self: ThreadpoolResult[tuple[_T, Unpack[tuple[Any, ...]]]],
    ) -> _T | None: ...
    @overload
    async def scalar(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self: ThreadpoolResult[Row[tuple[_T]]],
    ) -> _T | None: ...
    @overload
    async def scalar(self) -> Any: ...
    async def scalar(self) -> Any:
        """The first column of the next row, or ``None``; closes the result."""
        return await self._run(self._view.scalar)

    @overload
    async def scalar_one(self: ThreadpoolResult[_HasTuple[tuple[_T]]]) -> _T: ...
    @overload
    async def scalar_one(
        self: ThreadpoolResult[tuple[_T, Unpack[tuple[Any, ...]]]],
    ) -> _T: ...
    @overload
    async def scalar_one(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self: ThreadpoolResult[Row[tuple[_T]]],
    ) -> _T: ...
    @overload
    async def scalar_one(self) -> Any: ...
    async def scalar_one(self) -> Any:
        """The first column of the next row, which must be the last; closes the result."""
        return await self._run(self._view.scalar_one)

    @overload
    async def scalar_one_or_none(
        self: ThreadpoolResult[_HasTuple[tuple[_T]]],
    ) -> _T | None: ...
    @overload
    async def scalar_one_or_none(
        self: ThreadpoolResult[tuple[_T, Unpack[tuple[Any, ...]]]],
    ) -> _T | None: ...
    @overload
    async def scalar_one_or_none(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self: ThreadpoolResult[Row[tuple[_T]]],
    ) -> _T | None: ...
    @overload
    async def scalar_one_or_none(self) -> Any: ...
    async def scalar_one_or_none(self) -> Any:
        """The first column of the next row or ``None``, raising if more remain; closes."""
        return await self._run(self._view.scalar_one_or_none)


class ThreadpoolScalarResult(StreamView[_T_co]):
    """A view of a stream returning one column of each row: ``AsyncScalarResult``'s twin.

    From :meth:`ThreadpoolResult.scalars` or :meth:`ThreadpoolSession.stream_scalars`.
    """

    __slots__ = ()


class ThreadpoolMappingResult(StreamView[RowMapping]):
    """A view of a stream returning :class:`~sqlalchemy.engine.RowMapping` objects.

    From :meth:`ThreadpoolResult.mappings`: ``AsyncMappingResult``'s twin.
    """

    __slots__ = ()

    def keys(self) -> RMKeyView:
        """The column names, as ``MappingResult.keys()``."""
        return self._view.keys()  # type: ignore[no-any-return]

    def columns(self, *col_expressions: _KeyIndexType) -> Self:
        """Keep only these columns in each mapping (in place)."""
        self._view.columns(*col_expressions)
        return self

    async def fetchone(self) -> RowMapping | None:
        """The next mapping or ``None``; served from the rows read ahead when it can be."""
        return await self._one_at_a_time(self._view.fetchone)


class ThreadpoolTupleResult(StreamView[_T_co]):
    """A view of a stream typed as returning plain tuples: ``AsyncTupleResult``'s twin.

    From :meth:`ThreadpoolResult.tuples` or :attr:`ThreadpoolResult.t`. Its rows are the
    stream's ``Row`` objects (a ``Row`` is a tuple), read from the stream's one position.
    """

    __slots__ = ()

    async def fetchone(self) -> _T_co | None:
        """The next tuple or ``None``; served from the rows read ahead when it can be."""
        return await self._one_at_a_time(self._view.fetchone)

    @overload
    async def scalar(self: ThreadpoolTupleResult[tuple[_T]]) -> _T | None: ...
    @overload
    async def scalar(self) -> Any: ...
    async def scalar(self) -> Any:
        """The first column of the next row, or ``None``; closes the result."""
        return await self._run(self._view.scalar)

    @overload
    async def scalar_one(self: ThreadpoolTupleResult[tuple[_T]]) -> _T: ...
    @overload
    async def scalar_one(self) -> Any: ...
    async def scalar_one(self) -> Any:
        """The first column of the next row, which must be the last; closes the result."""
        return await self._run(self._view.scalar_one)

    @overload
    async def scalar_one_or_none(self: ThreadpoolTupleResult[tuple[_T]]) -> _T | None: ...
    @overload
    async def scalar_one_or_none(self) -> Any: ...
    async def scalar_one_or_none(self) -> Any:
        """The first column of the next row or ``None``, raising if more remain; closes."""
        return await self._run(self._view.scalar_one_or_none)


#: Earlier name of :class:`ThreadpoolResult` (an alias: the same class).
ThreadpoolStreamResult = ThreadpoolResult
#: Earlier name of :class:`ThreadpoolScalarResult` (an alias: the same class).
ThreadpoolStreamScalarResult = ThreadpoolScalarResult
#: Earlier name of :class:`ThreadpoolMappingResult` (an alias: the same class).
ThreadpoolStreamMappingResult = ThreadpoolMappingResult
