"""What comes back from a worker: buffered results, refused values, and streaming results.

Invariant 5 of the design: a value handed back to the event loop never does IO there. A
``Result`` (or its ``ScalarResult`` / ``MappingResult`` / ``TupleResult`` views) returned by a
callable is fully fetched in the worker before it crosses back; lazy values that would resume
work on the loop (a legacy ``Query``, a generator, a coroutine) are refused with a
``TypeError``. Streaming is explicit: :class:`ThreadpoolStreamResult` fetches each partition in a
worker.
"""

from __future__ import annotations

import inspect
import types
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from sqlalchemy.engine import CursorResult, Result, RowMapping
from sqlalchemy.engine.cursor import FullyBufferedCursorFetchStrategy  # private: see below
from sqlalchemy.engine.result import FilterResult
from sqlalchemy.orm import Query

if TYPE_CHECKING:
    from ._offload import Offloader

__all__ = ["ThreadpoolStreamResult", "check_callable", "make_loop_safe"]

_R = TypeVar("_R")

#: Rows fetched per worker call while iterating a stream with ``async for``.
STREAM_CHUNK_SIZE = 1000


#: Code flags of functions that must not be handed to a worker (async or generator functions).
_NOT_PLAIN = (
    inspect.CO_COROUTINE
    | inspect.CO_ITERABLE_COROUTINE
    | inspect.CO_GENERATOR
    | inspect.CO_ASYNC_GENERATOR
)


def check_callable(fn: object, where: str) -> None:
    """Refuse, on the loop and before taking a thread, what cannot run in a worker."""
    if (
        type(fn) is types.FunctionType
        and not fn.__code__.co_flags & _NOT_PLAIN
        and not hasattr(fn, "_is_coroutine_marker")  # inspect.markcoroutinefunction (3.12+)
    ):
        return  # the common case (a lambda or a def): decided without the inspect calls below
    if not callable(fn):
        raise TypeError(f"{where} takes a callable, got {type(fn).__name__!r}.")
    target = getattr(fn, "__call__", None) if not inspect.isroutine(fn) else fn  # noqa: B004
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(target):
        raise TypeError(
            f"{where} got an async function ({_name(fn)}), but it runs its callable in a "
            "worker thread with the synchronous Session. Pass a plain `def` function that "
            "takes the Session, e.g. `await sess.run(lambda s: s.scalars(select(User)))`; "
            "await other coroutines outside of run()."
        )
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise TypeError(
            f"{where} got a generator function ({_name(fn)}): a generator would resume on the "
            "event loop after the worker returned. Return a list instead, or use "
            "`sess.stream(...)` for large results."
        )


def make_loop_safe(value: Any, where: str) -> Any:
    """Prepare a worker's return value for the event loop (runs in the worker)."""
    if isinstance(value, Result):
        _buffer(value)
    elif isinstance(value, FilterResult):
        _buffer(value._real_result)
    elif isinstance(value, Query):
        raise TypeError(
            f"{where} returned a legacy Query, which would run its SQL on the event loop when "
            "iterated. Return `query.all()` (or use `s.scalars(select(...))`) inside the "
            "callable instead."
        )
    elif inspect.iscoroutine(value) or inspect.isasyncgen(value):
        if inspect.iscoroutine(value):
            value.close()  # no "coroutine was never awaited" warning
        raise TypeError(
            f"{where} returned an awaitable ({type(value).__name__}); the callable runs in a "
            "worker thread and must be a plain synchronous function returning a value."
        )
    elif inspect.isgenerator(value):
        value.close()
        raise TypeError(
            f"{where} returned a generator, which would resume on the event loop. Return a "
            "list instead, or use `sess.stream(...)` for large results."
        )
    return value


def _buffer(result: Result[Any]) -> None:
    """Fetch every row of ``result`` now so that reading it later does no IO.

    Reads SQLAlchemy internals (``_soft_closed``, ``cursor_strategy``, ``_is_server_side``,
    ``FullyBufferedCursorFetchStrategy``; ``_real_result`` above): the table of every private
    SQLAlchemy name the package uses, and how each is tested on 2.0 and 2.1, is in
    docs/guides/offload.md.
    """
    if isinstance(result, CursorResult):
        cursor = result
    else:
        raw = getattr(result, "raw", None)  # the ORM's ChunkedIteratorResult
        if not isinstance(raw, CursorResult):
            return  # already in memory (frozen, merged or iterator results)
        cursor = raw
    if cursor._soft_closed or not cursor.returns_rows:
        return  # fully read already (the ORM prebuffers), or no rows at all (DML)
    if cursor.context._is_server_side:
        cursor.close()
        raise TypeError(
            "A streaming (server-side cursor) result cannot be returned from run(); it would "
            "fetch on the event loop. Use `await sess.stream(stmt)` / `sess.stream_scalars()`."
        )
    strategy = cursor.cursor_strategy
    alternate = getattr(strategy, "alternate_cursor_description", None)
    rows = strategy.fetchall(cursor, cursor.cursor)  # reads everything, then soft-closes
    cursor.cursor_strategy = FullyBufferedCursorFetchStrategy(  # type: ignore[no-untyped-call,unused-ignore]
        None, alternate_description=alternate, initial_buffer=rows
    )


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


class ThreadpoolStreamResult(Generic[_R]):
    """An async-iterable result whose rows are fetched, a partition at a time, in a worker.

    Returned by :meth:`ThreadpoolSession.stream` (rows) and
    :meth:`ThreadpoolSession.stream_scalars` (scalars). It keeps the session's connection busy
    until it is exhausted or closed: use it as ``async with`` or exhaust it. Closing is
    shielded from cancellation, so a cancelled consumer never leaves a cursor open.
    """

    __slots__ = ("_buffer", "_offloader", "_sync")

    def __init__(self, sync_result: Any, offloader: Offloader) -> None:
        self._sync = sync_result
        self._offloader = offloader
        self._buffer: deque[_R] = deque()

    # -- plain views (no IO) ----------------------------------------------------------

    def scalars(self, index: int | str = 0) -> ThreadpoolStreamResult[Any]:
        """A view returning one column (the first by default) of each row."""
        return ThreadpoolStreamResult(self._sync.scalars(index), self._offloader)

    def mappings(self) -> ThreadpoolStreamResult[RowMapping]:
        """A view returning each row as a :class:`~sqlalchemy.engine.RowMapping`."""
        return ThreadpoolStreamResult(self._sync.mappings(), self._offloader)

    def unique(self, strategy: Callable[[Any], Any] | None = None) -> ThreadpoolStreamResult[_R]:
        """Apply unique filtering, as :meth:`sqlalchemy.engine.Result.unique`."""
        self._sync = self._sync.unique(strategy)
        return self

    @property
    def closed(self) -> bool:
        return bool(self._sync.closed)

    # -- IO in the worker -------------------------------------------------------------

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await self._offloader.call(fn)

    async def fetchmany(self, size: int | None = None) -> Sequence[_R]:
        """Fetch up to ``size`` rows (the result's default when ``None``)."""
        head = self._drain(size)
        want = None if size is None else size - len(head)
        if want is None or want > 0:
            head.extend(await self._call(lambda: self._sync.fetchmany(want)))
        return head

    async def fetchall(self) -> Sequence[_R]:
        """Fetch every remaining row."""
        head = self._drain(None)
        head.extend(await self._call(self._sync.fetchall))
        return head

    async def all(self) -> Sequence[_R]:
        """Fetch every remaining row (same as :meth:`fetchall`)."""
        return await self.fetchall()

    async def partitions(self, size: int | None = None) -> AsyncIterator[Sequence[_R]]:
        """Yield lists of up to ``size`` rows, each fetched in one worker call."""
        while True:
            part = await self.fetchmany(size or STREAM_CHUNK_SIZE)
            if not part:
                return
            yield part

    def __aiter__(self) -> ThreadpoolStreamResult[_R]:
        return self

    async def __anext__(self) -> _R:
        if not self._buffer:
            chunk = await self._call(lambda: self._sync.fetchmany(STREAM_CHUNK_SIZE))
            if not chunk:
                raise StopAsyncIteration
            self._buffer.extend(chunk)
        return self._buffer.popleft()

    async def first(self) -> _R | None:
        """The first row or ``None``; closes the result."""
        return await self._finish(self._sync.first)  # type: ignore[no-any-return]

    async def one(self) -> _R:
        """Exactly one row, else raise; closes the result."""
        return await self._finish(self._sync.one)  # type: ignore[no-any-return]

    async def one_or_none(self) -> _R | None:
        """One row or ``None``, raising if there are more; closes the result."""
        return await self._finish(self._sync.one_or_none)  # type: ignore[no-any-return]

    async def scalar(self) -> Any:
        """The first column of the first row, or ``None``; closes the result."""
        return await self._finish(self._sync.scalar)

    async def scalar_one(self) -> Any:
        """The first column of exactly one row; closes the result."""
        return await self._finish(self._sync.scalar_one)

    async def scalar_one_or_none(self) -> Any:
        """The first column of one row or ``None``; closes the result."""
        return await self._finish(self._sync.scalar_one_or_none)

    async def _finish(self, method: Callable[[], Any]) -> Any:
        if self._buffer:
            raise RuntimeError(
                "first()/one()/scalar() need an unread result; this stream was partly "
                "iterated already."
            )
        return await self._call(method)

    def _drain(self, size: int | None) -> list[_R]:
        count = len(self._buffer) if size is None else min(size, len(self._buffer))
        return [self._buffer.popleft() for _ in range(count)]

    async def close(self) -> None:
        """Release the cursor, in a worker and shielded from cancellation."""
        self._buffer.clear()
        if self._sync.closed or self._offloader.closed or self._offloader.interrupted:
            return  # nothing to release: the interrupted unit of work was rolled back
        with anyio.CancelScope(shield=True):
            await self._call(self._sync.close)

    async def __aenter__(self) -> ThreadpoolStreamResult[_R]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
