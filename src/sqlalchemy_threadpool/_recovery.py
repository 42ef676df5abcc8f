"""Interruption and recovery: what happens to a session's call that was cut.

A worker thread cannot be killed. When the task awaiting a call is cancelled (or times out), or
``shutdown()`` gives up on it, the :class:`~._offload.Offloader` hands the call here, and:

1. **cancel until it leaves**: the call is given up on (:meth:`~._call.Call.abandon`, or
   :meth:`~._call.Call.stop` for ``shutdown()``); a call that never started never will. If the
   worker is inside, the database is asked to cancel the statement in flight
   (:func:`~._cancel.cancel_statements`), again until the worker leaves; if it is still inside
   at the cleanup deadline (or ``shutdown()``'s), its connection's socket is shut down
   (:func:`~._cancel.sever`);
2. **fail** the unit of work, whatever the worker returned: the reason is recorded (every later
   call but ``rollback()`` / ``close()`` raises :class:`TransactionInterruptedError`), with
   what became of an interrupted ``commit()``;
3. **discard** the session: roll back and close in a worker within the cleanup deadline; the
   connection is invalidated instead if that fails, if a ``BaseException`` escaped the worker,
   or (its socket shut down) if the rollback does not come back in time.

All of it runs shielded: :func:`shielded` awaits a step to its end whatever cancels the
caller meanwhile, and the original cancellation (or ``TimeoutError``) is what propagates. The
functions take the offloader whose call or session they handle; they are its slow paths, never
run by a call that went well.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from sqlalchemy.orm import Session

from ._call import STOPPED, Call
from ._cancel import sever
from ._lazy_admission import stop_waiting

if TYPE_CHECKING:
    from ._offload import Offloader

__all__ = ["SHUTDOWN", "discard", "fail", "fail_interrupted", "shielded", "stop_for_shutdown"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Why a unit of work failed when ``shutdown()`` gave up on its call.
SHUTDOWN = "shutdown() stopped its call in flight"

#: First pause between two cancel requests while an interrupted worker is still inside.
_FIRST_RECANCEL_PAUSE = 0.05


async def fail_interrupted(off: Offloader, call: Call, exc: BaseException, own: bool) -> None:
    """Give up on a call that ``exc`` interrupted and fail it (``own``: raised by the worker)."""
    if own and call.state is STOPPED:
        await fail(off, call, SHUTDOWN, invalidate=False)
    elif own:  # a BaseException escaped the worker: connection state unknown
        what = f"{type(exc).__name__} escaped its worker thread"
        await fail(off, call, what, invalidate=True)
    else:
        left = call.abandon()
        if left is not None:  # interrupted while the worker was inside
            await _cancel_until_left(off, left)
            what = f"a call was interrupted by {type(exc).__name__} while it ran"
            await fail(off, call, what, invalidate=False)


async def stop_for_shutdown(off: Offloader, reason: str, sever_at: float) -> None:
    """``shutdown()``: fail the unit of work and stop its call in flight, if any (cancelled
    until it leaves, its connection cut at ``sever_at`` if the statement does not stop); the
    awaiting task then fails the unit of work itself (``_dispatch``)."""
    if off.failure is None:
        off.failure = reason
    call = off.current
    if call is not None:
        left = call.stop()
        if left is not None:  # started: cancel it; else it never will start
            await _cancel_until_left(off, left, sever_at)


async def _cancel_until_left(
    off: Offloader, left: threading.Event, sever_at: float | None = None
) -> None:
    """Make a call given up on leave its worker: cancel its statement until ``left``."""
    stop_waiting(off)  # (a worker waiting for admission on an engine it reached: no statement)
    canceller = off.canceller
    if canceller is None or not canceller.applies_to(off.session):
        # cancel_statements=False, or no mechanism for any engine of the session: wait, but
        if sever_at is not None:  # shutdown() cuts the connection at its deadline
            gone = await _wait(off, left, max(0.0, sever_at - anyio.current_time()))
            if not gone:
                sever(off.session)
        await _wait(off, left, None)
        return
    if sever_at is None:
        sever_at = anyio.current_time() + off.cleanup_timeout
    pause, loud = _FIRST_RECANCEL_PAUSE, True
    while not left.is_set():
        await anyio.to_thread.run_sync(  # each connection through its own engine's mechanism
            canceller.cancel,
            off.session,
            left,
            loud,
            limiter=off.anyio_threads(),
        )
        loud = False
        remaining = sever_at - anyio.current_time()
        if remaining <= 0:
            logger.warning(
                "the statement did not stop within %g s of being cancelled; shutting down "
                "its connection's socket",
                off.cleanup_timeout,
            )
            sever(off.session)
            await _wait(off, left, None)
            return
        await _wait(off, left, min(pause, remaining))
        pause = min(pause * 2, 1.0)


async def _wait(off: Offloader, left: threading.Event, seconds: float | None) -> bool:
    """Wait (in a helper thread) until a started call has ``left``; ``False`` if it has not
    within ``seconds``. Abandoned at once if cancelled (by ``shutdown()``'s limit)."""
    if left.is_set():
        return True
    return await anyio.to_thread.run_sync(
        left.wait, seconds, abandon_on_cancel=True, limiter=off.anyio_threads()
    )


async def fail(off: Offloader, call: Call, what: str, *, invalidate: bool) -> None:
    """Mark the unit of work failed, then discard the session; shielded."""
    if call.committing and call.committed:
        outcome = "its COMMIT had reached the database, so the transaction IS committed"
        logger.warning(
            "commit() was interrupted (%s) after the database had committed: the "
            "transaction IS committed, although the caller sees an interruption",
            what,
        )
    elif call.committing:
        outcome = "its commit() did not complete and it was rolled back"
        logger.warning(
            "commit() was interrupted (%s) while in flight: the database applies a "
            "transaction entirely or not at all, and as far as the driver reported it "
            "did not commit this one (if the connection was lost during COMMIT, check "
            "before retrying)",
            what,
        )
    else:
        outcome = "its transaction was rolled back, nothing of it is committed"
    if off.failure is None or call.state is STOPPED:
        off.failure = f"{what}; {outcome}"
    await discard(off, invalidate=invalidate)


async def discard(off: Offloader, *, invalidate: bool) -> None:
    """Roll back and close within the cleanup deadline; invalidate on failure; shielded."""
    session = off.session
    if not invalidate and not session.in_transaction():
        session.close()  # no transaction, so no connection: no IO
        return
    call = Call(lambda: discard_session(session, invalidate))
    with anyio.move_on_after(off.cleanup_timeout):
        await off.run_in_thread(call)
        return
    left = call.abandon()
    if left is None:  # never started: try again, invalidating, without a deadline
        await anyio.to_thread.run_sync(discard_session, session, True, limiter=off.anyio_threads())
        return
    if left.is_set():
        return
    logger.warning(
        "rolling back took longer than %g s; shutting down the connection's socket so it "
        "is invalidated instead",
        off.cleanup_timeout,
    )
    sever(session)
    await _wait(off, left, None)


def discard_session(session: Session, invalidate: bool) -> None:
    """Roll back and close (in a worker); invalidate the connection instead if that fails."""
    if not invalidate:
        try:
            session.rollback()
            session.close()
            return
        except Exception:
            logger.warning(
                "rolling back failed; invalidating the session's connection instead of "
                "returning it to the pool",
                exc_info=True,
            )
    try:
        session.invalidate()
    except Exception:
        logger.warning("invalidating the session's connection failed", exc_info=True)


async def shielded(step: Coroutine[Any, Any, T]) -> T:
    """Await a cleanup ``step`` to its end, whatever cancels the calling task meanwhile.

    ``anyio.CancelScope(shield=True)`` stops cancel scopes, but not asyncio's own
    ``Task.cancel()`` (which servers, ``asyncio.timeout()`` and ``wait_for()`` use): a second
    one arriving during the cleanup of the first would end the wait while the worker is still
    inside the session. So while the calling asyncio task is being cancelled the step runs in
    a task of its own; a further native cancellation of the caller only makes it wait again,
    and is re-raised once the step is done. (Otherwise the step is awaited directly, saving a
    task per scope on the common path: a first cancellation of one of its calls is handled
    by ``_dispatch``, which comes back here.) Trio has no cancellation but cancel scopes, so
    the shield is enough there.
    """
    with anyio.CancelScope(shield=True):
        if not _being_cancelled():
            return await step
        task = asyncio.ensure_future(step)
        cancelled: asyncio.CancelledError | None = None
        while True:
            try:
                await asyncio.shield(task)
                break
            except asyncio.CancelledError as exc:
                if task.cancelled():
                    raise
                cancelled = exc  # the caller's, not the step's: wait for the step again
            except BaseException:
                break  # the step's own error: re-raised below, unless a cancellation is
    if cancelled is not None:  # a cleanup error never replaces a cancellation
        raise cancelled from task.exception()
    return task.result()


def _being_cancelled() -> bool:
    """Whether the current asyncio task has a cancellation in progress (Python 3.10 cannot
    tell: always ``True`` there); ``False`` outside asyncio."""
    if asyncio._get_running_loop() is None:
        return False
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return cancelling is None or cancelling() > 0
