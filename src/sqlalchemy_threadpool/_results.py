"""What comes back from a worker: buffered results and refused values.

Invariant 5 of the design: a value handed back to the event loop never does IO there. A
``Result`` (or its ``ScalarResult`` / ``MappingResult`` / ``TupleResult`` views) returned by a
callable is fully fetched in the worker before it crosses back; lazy values that would resume
work on the loop (a legacy ``Query``, a generator, a coroutine) are refused with a
``TypeError``. Streaming is explicit: see :mod:`._streams`.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.engine.cursor import FullyBufferedCursorFetchStrategy  # private: see below
from sqlalchemy.engine.result import FilterResult
from sqlalchemy.orm import ORMExecuteState, Query

__all__ = ["check_callable", "make_loop_safe", "prebuffer_rows"]


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
    if value is None:
        return None  # (most calls: flush(), commit(), add-style callables; no checks needed)
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


def prebuffer_rows(state: ORMExecuteState) -> None:
    """``do_orm_execute`` listener: ORM results are fully loaded in the worker, as
    AsyncSession does, unless streaming."""
    options = state.execution_options
    if not options.get("stream_results") and not options.get("yield_per"):
        state.update_execution_options(prebuffer_rows=True)
