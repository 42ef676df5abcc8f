"""The public stream results: ``ThreadpoolResult`` and its scalar, mapping and tuple views.

:meth:`ThreadpoolSession.stream` returns a :class:`ThreadpoolResult`, the counterpart of
``AsyncResult`` member for member; ``scalars()``, ``mappings()``, ``tuples()`` / ``t``,
``columns()`` and ``unique()`` give its views (``ThreadpoolScalarResult``,
``ThreadpoolMappingResult``, ``ThreadpoolTupleResult``, as ``AsyncScalarResult``,
``AsyncMappingResult``, ``AsyncTupleResult``). All views of one stream share one position
(invariant 10): see :mod:`._stream_rows` for the rows and :mod:`._stream_views` for what
every view shares. ``ThreadpoolStreamResult``, ``ThreadpoolStreamScalarResult`` and
``ThreadpoolStreamMappingResult`` are the earlier names, kept as aliases.
:class:`StreamOpening` is what ``ThreadpoolConnection.stream()`` returns: awaited, or used
as ``async with``, it opens the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeAlias, TypeVar, overload

from sqlalchemy.engine import FrozenResult, Result, Row, RowMapping
from typing_extensions import Self, TypeVarTuple, Unpack

from ._stream_rows import STREAM_CHUNK_SIZE, StreamRows
from ._stream_views import StreamView

if TYPE_CHECKING:
    from sqlalchemy.engine.result import RMKeyView, _KeyIndexType

    from ._offload import Offloader

__all__ = [
    "STREAM_CHUNK_SIZE",
    "StreamOpening",
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
_TP = TypeVar("_TP", bound=tuple[Any, ...])  # SQLAlchemy 2.0's row type parameter
_Ts = TypeVarTuple("_Ts")
_T_co = TypeVar("_T_co", covariant=True)

#: What ``stream()`` of an untyped statement (``text()``) returns: any columns.
UntypedResult: TypeAlias = "ThreadpoolResult[Unpack[tuple[Any, ...]]]"


def open_stream(sync_result: Result[Any], offloader: Offloader) -> UntypedResult:
    """Wrap a server-side ``sync_result`` (fresh from a worker) as a stream."""
    rows = StreamRows(sync_result, offloader)
    return ThreadpoolResult(rows, rows)


# -- typing: one class, SQLAlchemy 2.0's and 2.1's meaning of its parameters ---------------
#
# ``ThreadpoolResult`` is generic as ``AsyncResult`` is: ``ThreadpoolResult[tuple[int, str]]``
# on SQLAlchemy 2.0, ``ThreadpoolResult[int, str]`` on 2.1 (a ``TypeVarTuple``, which takes
# both spellings). What a member returns depends on which line is installed, and only
# SQLAlchemy's ``Row`` knows: on 2.1 ``Row[int, str]`` is a ``tuple[int, str]``, on 2.0 it is
# not a tuple at all. So each member has an overload for 2.1 first, whose ``self`` is one of
# the protocols below (matched through ``_columns``, a ``Row[*columns]`` seen only by type
# checkers), then one for 2.0, whose ``self`` is ``ThreadpoolResult[tuple[...]]``: on each line
# exactly the overload that mirrors ``AsyncResult`` there applies.


class _Columns(Protocol[Unpack[_Ts]]):
    """A result whose rows are tuples of these columns (SQLAlchemy 2.1)."""

    @property
    def _columns(self) -> tuple[Unpack[_Ts]]: ...


class _FirstColumn(Protocol[_T_co]):
    """A result whose rows are tuples starting with a ``_T_co`` column (SQLAlchemy 2.1)."""

    @property
    def _columns(self) -> tuple[_T_co, Unpack[tuple[Any, ...]]]: ...


class _SeveralColumns(Protocol):
    """A result whose rows are tuples of two or more columns, or of any (SQLAlchemy 2.1)."""

    @property
    def _columns(self) -> tuple[Any, Any, Unpack[tuple[Any, ...]]]: ...


class _TupleView:
    """``ThreadpoolResult.t`` as type checkers see it: a property typed per SQLAlchemy line."""

    @overload
    def __get__(self, obj: None, owner: Any) -> Self: ...
    @overload
    def __get__(  # SQLAlchemy 2.1
        self, obj: _Columns[Unpack[_Ts]], owner: Any
    ) -> ThreadpoolTupleResult[tuple[Unpack[_Ts]]]: ...
    @overload
    def __get__(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self, obj: ThreadpoolResult[_TP], owner: Any
    ) -> ThreadpoolTupleResult[_TP]: ...
    def __get__(self, obj: Any, owner: Any) -> Any:
        return self if obj is None else obj.tuples()


class ThreadpoolResult(StreamView[Any], Generic[Unpack[_Ts]]):
    """A streaming result: rows are read from a server-side cursor in a worker.

    Returned by :meth:`ThreadpoolSession.stream`; the counterpart of ``AsyncResult``, and
    typed as it is: ``ThreadpoolResult[tuple[int, str]]`` on SQLAlchemy 2.0,
    ``ThreadpoolResult[int, str]`` on 2.1, for rows of ``Row[...]`` with the same parameters.
    Its views (:meth:`scalars`, :meth:`mappings`, :meth:`columns`, :meth:`tuples`,
    :meth:`unique`) share its position: every row is seen once, in order, whichever view
    reads it. It keeps the session's connection busy until it is exhausted or closed: use it
    as ``async with`` or exhaust it. Closing is shielded from cancellation.
    """

    __slots__ = ()

    if TYPE_CHECKING:

        @property
        def _columns(self) -> Row[Unpack[_Ts]]: ...  # type: ignore[valid-type, type-arg, misc, unused-ignore]

        # The row-returning members of ``StreamView``, typed with this result's rows.
        @overload
        async def fetchmany(
            self: _Columns[Unpack[_Ts]], size: int | None = None
        ) -> Sequence[Row[Unpack[_Ts]]]: ...  # type: ignore[valid-type, type-arg, misc, unused-ignore]
        @overload
        async def fetchmany(
            self: ThreadpoolResult[_TP], size: int | None = None
        ) -> Sequence[Row[_TP]]: ...
        async def fetchmany(self, size: int | None = None) -> Sequence[Any]: ...
        @overload
        def partitions(
            self: _Columns[Unpack[_Ts]], size: int | None = None
        ) -> AsyncIterator[Sequence[Row[Unpack[_Ts]]]]: ...  # type: ignore[valid-type, type-arg, misc, unused-ignore]
        @overload
        def partitions(
            self: ThreadpoolResult[_TP], size: int | None = None
        ) -> AsyncIterator[Sequence[Row[_TP]]]: ...
        def partitions(self, size: int | None = None) -> AsyncIterator[Sequence[Any]]: ...
        @overload
        async def fetchall(self: _Columns[Unpack[_Ts]]) -> Sequence[Row[Unpack[_Ts]]]: ...  # type: ignore[valid-type, type-arg, misc, unused-ignore]
        @overload
        async def fetchall(self: ThreadpoolResult[_TP]) -> Sequence[Row[_TP]]: ...
        async def fetchall(self) -> Sequence[Any]: ...
        @overload
        async def all(self: _Columns[Unpack[_Ts]]) -> Sequence[Row[Unpack[_Ts]]]: ...  # type: ignore[valid-type, type-arg, misc, unused-ignore]
        @overload
        async def all(self: ThreadpoolResult[_TP]) -> Sequence[Row[_TP]]: ...
        async def all(self) -> Sequence[Any]: ...
        @overload
        async def first(self: _Columns[Unpack[_Ts]]) -> Row[Unpack[_Ts]] | None: ...  # type: ignore[valid-type, type-arg, misc, unused-ignore]
        @overload
        async def first(self: ThreadpoolResult[_TP]) -> Row[_TP] | None: ...
        async def first(self) -> Any: ...
        @overload
        async def one(self: _Columns[Unpack[_Ts]]) -> Row[Unpack[_Ts]]: ...  # type: ignore[valid-type, type-arg, misc, unused-ignore]
        @overload
        async def one(self: ThreadpoolResult[_TP]) -> Row[_TP]: ...
        async def one(self) -> Any: ...
        @overload
        async def one_or_none(self: _Columns[Unpack[_Ts]]) -> Row[Unpack[_Ts]] | None: ...  # type: ignore[valid-type, type-arg, misc, unused-ignore]
        @overload
        async def one_or_none(self: ThreadpoolResult[_TP]) -> Row[_TP] | None: ...
        async def one_or_none(self) -> Any: ...
        @overload
        async def __anext__(self: _Columns[Unpack[_Ts]]) -> Row[Unpack[_Ts]]: ...  # type: ignore[valid-type, type-arg, misc, unused-ignore]
        @overload
        async def __anext__(self: ThreadpoolResult[_TP]) -> Row[_TP]: ...
        async def __anext__(self) -> Any: ...

        t = _TupleView()
    else:

        @property
        def t(self) -> ThreadpoolTupleResult[Any]:
            """Shorter synonym of :meth:`tuples`."""
            return self.tuples()

    def keys(self) -> RMKeyView:
        """The column names, as ``Result.keys()``."""
        return self._view.keys()  # type: ignore[no-any-return]

    def columns(self, *col_expressions: _KeyIndexType) -> Self:
        """Keep only these columns in each row (in place), as ``Result.columns()``."""
        self._view.columns(*col_expressions)
        return self

    @overload
    def scalars(  # SQLAlchemy 2.1
        self: _FirstColumn[_T], index: Literal[0] = ...
    ) -> ThreadpoolScalarResult[_T]: ...
    @overload
    def scalars(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self: ThreadpoolResult[tuple[_T]], index: Literal[0] = ...
    ) -> ThreadpoolScalarResult[_T]: ...
    @overload
    def scalars(self, index: _KeyIndexType = 0) -> ThreadpoolScalarResult[Any]: ...
    def scalars(self, index: _KeyIndexType = 0) -> ThreadpoolScalarResult[Any]:
        """A view returning one column (the first by default) of each row."""
        return ThreadpoolScalarResult(self._rows, self._view.scalars(index))

    def mappings(self) -> ThreadpoolMappingResult:
        """A view returning each row as a :class:`~sqlalchemy.engine.RowMapping`."""
        return ThreadpoolMappingResult(self._rows, self._view.mappings())

    @overload
    def tuples(  # SQLAlchemy 2.1
        self: _Columns[Unpack[_Ts]],
    ) -> ThreadpoolTupleResult[tuple[Unpack[_Ts]]]: ...
    @overload
    def tuples(self: ThreadpoolResult[_TP]) -> ThreadpoolTupleResult[_TP]: ...  # SQLAlchemy 2.0
    def tuples(self) -> ThreadpoolTupleResult[Any]:
        """A view typed as returning plain tuples (a ``Row`` is one already); also :attr:`t`.

        Same position and same rows as this result; as ``AsyncResult.tuples()``, which
        SQLAlchemy 2.1 deprecates because ``Row`` types unpack directly there (this one does
        not warn).
        """
        return ThreadpoolTupleResult(self._rows, self._view)

    @overload
    async def freeze(  # SQLAlchemy 2.1
        self: _Columns[Unpack[_Ts]],
    ) -> FrozenResult[Unpack[_Ts]]: ...  # type: ignore[valid-type, type-arg, misc, unused-ignore]
    @overload
    async def freeze(self: ThreadpoolResult[_TP]) -> FrozenResult[_TP]: ...  # SQLAlchemy 2.0
    async def freeze(self) -> FrozenResult[Any]:
        """Fetch the remaining rows in a worker and return them as a ``FrozenResult``.

        Calling the :class:`~sqlalchemy.engine.FrozenResult` makes a new, buffered sync
        ``Result`` over those rows, as many times as wanted (result caching). As
        ``AsyncResult.freeze()``, call it on an unconsumed result; it consumes the result.
        """
        return await self._run(lambda: FrozenResult(self._view))

    @overload
    async def fetchone(self: _Columns[Unpack[_Ts]]) -> Row[Unpack[_Ts]] | None: ...  # type: ignore[valid-type, type-arg, misc, unused-ignore]
    @overload
    async def fetchone(self: ThreadpoolResult[_TP]) -> Row[_TP] | None: ...
    async def fetchone(self) -> Any:
        """The next row or ``None``; served from the rows read ahead when it can be."""
        return await self._one_at_a_time(self._view.fetchone)

    @overload
    async def scalar(self: _SeveralColumns) -> Any: ...  # SQLAlchemy 2.1
    @overload
    async def scalar(self: _FirstColumn[_T]) -> _T | None: ...  # SQLAlchemy 2.1, one column
    @overload
    async def scalar(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self: ThreadpoolResult[tuple[_T]],
    ) -> _T | None: ...
    @overload
    async def scalar(self) -> Any: ...  # type: ignore[overload-cannot-match, unused-ignore]
    async def scalar(self) -> Any:
        """The first column of the next row, or ``None``; closes the result."""
        return await self._run(self._view.scalar)

    @overload
    async def scalar_one(self: _SeveralColumns) -> Any: ...  # SQLAlchemy 2.1
    @overload
    async def scalar_one(self: _FirstColumn[_T]) -> _T: ...  # SQLAlchemy 2.1, one column
    @overload
    async def scalar_one(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self: ThreadpoolResult[tuple[_T]],
    ) -> _T: ...
    @overload
    async def scalar_one(self) -> Any: ...  # type: ignore[overload-cannot-match, unused-ignore]
    async def scalar_one(self) -> Any:
        """The first column of the next row, which must be the last; closes the result."""
        return await self._run(self._view.scalar_one)

    @overload
    async def scalar_one_or_none(self: _SeveralColumns) -> Any | None: ...  # SQLAlchemy 2.1
    @overload
    async def scalar_one_or_none(
        self: _FirstColumn[_T],
    ) -> _T | None: ...  # SQLAlchemy 2.1, one column
    @overload
    async def scalar_one_or_none(  # type: ignore[overload-cannot-match, unused-ignore]  # SQLAlchemy 2.0
        self: ThreadpoolResult[tuple[_T]],
    ) -> _T | None: ...
    @overload
    async def scalar_one_or_none(self) -> Any | None: ...  # type: ignore[overload-cannot-match, unused-ignore]
    async def scalar_one_or_none(self) -> Any | None:
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
    async def scalar(self) -> Any: ...  # type: ignore[overload-cannot-match, unused-ignore]
    async def scalar(self) -> Any:
        """The first column of the next row, or ``None``; closes the result."""
        return await self._run(self._view.scalar)

    @overload
    async def scalar_one(self: ThreadpoolTupleResult[tuple[_T]]) -> _T: ...
    @overload
    async def scalar_one(self) -> Any: ...  # type: ignore[overload-cannot-match, unused-ignore]
    async def scalar_one(self) -> Any:
        """The first column of the next row, which must be the last; closes the result."""
        return await self._run(self._view.scalar_one)

    @overload
    async def scalar_one_or_none(self: ThreadpoolTupleResult[tuple[_T]]) -> _T | None: ...
    @overload
    async def scalar_one_or_none(self) -> Any | None: ...  # type: ignore[overload-cannot-match, unused-ignore]
    async def scalar_one_or_none(self) -> Any | None:
        """The first column of the next row or ``None``, raising if more remain; closes."""
        return await self._run(self._view.scalar_one_or_none)


#: Earlier name of :class:`ThreadpoolResult` (an alias: the same class).
ThreadpoolStreamResult = ThreadpoolResult
#: Earlier name of :class:`ThreadpoolScalarResult` (an alias: the same class).
ThreadpoolStreamScalarResult = ThreadpoolScalarResult
#: Earlier name of :class:`ThreadpoolMappingResult` (an alias: the same class).
ThreadpoolStreamMappingResult = ThreadpoolMappingResult


class _Closable(Protocol):
    async def close(self) -> None: ...


_C = TypeVar("_C", bound=_Closable)


class StreamOpening(Generic[_C]):
    """What :meth:`ThreadpoolConnection.stream` returns: ``await`` it, or ``async with`` it."""

    __slots__ = ("_open", "_result")

    def __init__(self, open_: Callable[[], Coroutine[Any, Any, _C]]) -> None:
        self._open = open_
        self._result: _C | None = None

    def __await__(self) -> Generator[Any, None, _C]:
        return self._open().__await__()

    async def __aenter__(self) -> _C:
        self._result = await self._open()
        return self._result

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._result is not None:
            await self._result.close()
