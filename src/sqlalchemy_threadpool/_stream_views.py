"""What every view of a stream shares: one worker call per fetch, ``async for``, ``close``.

:class:`StreamView` is the base of the public stream results in :mod:`._streams`
(``ThreadpoolResult`` and its scalar, mapping and tuple views). Each wraps one of
SQLAlchemy's sync views (``Result``, ``ScalarResult``, ``MappingResult``) over the stream's
single :class:`~._stream_rows.StreamRows`, so every view reads from one position. A fetch
that may need rows from the cursor runs in a worker, as each is one ``greenlet_spawn`` in
``AsyncResult``; ``async for`` and ``fetchone()`` are served on the loop from the rows read
ahead, a chunk per worker call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
from typing_extensions import Self

from ._stream_rows import NeedRows, StreamRows

__all__ = ["StreamView"]

T = TypeVar("T")
_R_co = TypeVar("_R_co", covariant=True)

#: What ``next(view, _END)`` returns after the last row.
_END: Any = object()


class StreamView(Generic[_R_co]):
    """What every view of a stream has: one worker call per fetch, close, ``async with``."""

    __slots__ = ("_rows", "_view")

    def __init__(self, rows: StreamRows, view: Any) -> None:
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
                except NeedRows:
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
        """Up to ``size`` rows (the chunk size, 1000 by default), in one worker call."""
        return await self._run(lambda: self._view.fetchmany(size))

    def partitions(self, size: int | None = None) -> AsyncIterator[Sequence[_R_co]]:
        """Lists of up to ``size`` rows (the chunk size by default), a worker call each.

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

    def yield_per(self, num: int) -> Self:
        """Read ``num`` rows per worker call from now on (in place, for every view).

        ``async for`` and ``fetchone()`` then read ahead ``num`` rows at a time, and
        ``fetchmany()`` / ``partitions()`` without a size return ``num`` rows: the
        counterpart of :meth:`sqlalchemy.engine.Result.yield_per`.
        """
        if num < 1:
            raise ValueError(f"yield_per() needs a positive number of rows, got {num!r}")
        self._rows._yield_per = num
        return self


class _Partitions(Generic[_R_co]):
    """The async iterator that ``partitions()`` returns."""

    __slots__ = ("_size", "_view")

    def __init__(self, view: StreamView[_R_co], size: int | None) -> None:
        self._view = view
        self._size = size

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Sequence[_R_co]:
        part = await self._view.fetchmany(self._size)
        if not part:
            raise StopAsyncIteration
        return part
