"""Event loops: makers, engines and sessions made once serve loop after loop, of either library.

A program may run several event loops one after the other in one process: pytest runs each
test in a loop of its own while makers are module-level, a script calls ``anyio.run`` twice,
one engine serves the asyncio and the trio tests of a suite. What we make once must then work in
every loop, though anyio's primitives belong to the event loop library that first waits on
them: an asyncio ``CapacityLimiter`` or ``Lock`` cannot be waited on under trio, nor a trio one
under asyncio (taking a free token never waits, and works under either).

- **Capacities** (:mod:`._capacity`): the slow path of admission (:func:`~._admission.admit`,
  only when a session must wait) calls :func:`bind_to_this_run`. Each limiter records the
  *run* (the asyncio loop, or trio's run token) it was last waited on in. In a run of the
  other library, one we made is replaced by a limiter of this library everywhere
  (``maker.limiter`` included), and the sessions holding its tokens hold the new one's. If
  the run it was waited on in is still running, two loops use the capacity at once:
  :class:`~._exceptions.EventLoopConflictError` (its waiters can only be woken in their own
  loop). A ``limiter=`` the application made is its own: never replaced.
- **A session's lock** (:mod:`._session_lock`): its cancellation check, or its waiters'
  queue, raises ``RuntimeError`` at once when they belong to the other library; the lock then
  looks them up again for this loop's library (the session is idle: no call is in flight), at
  no cost to the calls that take it normally.
- **A lost session's tokens** (:func:`give_back_lost`): given back in the run that waits on the
  limiter, if one does and still runs, else at once (nobody waits: nothing to wake).

A session that held a transaction when its loop ended keeps it, with its connection and its
capacity, until the next loop that uses it ends it, as a sync ``Session`` would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from . import _capacity
from ._exceptions import EventLoopConflictError

if TYPE_CHECKING:
    from ._capacity import Gate

__all__ = ["bind_to_this_run", "give_back_lost"]

logger = logging.getLogger(__name__)

#: The run each limiter was last waited on in (an asyncio loop or a trio run token), weakly:
#: a loop that ended and was collected is nobody's.
_runs: weakref.WeakKeyDictionary[anyio.CapacityLimiter, weakref.ref[Any]] = (
    weakref.WeakKeyDictionary()
)


def _last_run(limiter: anyio.CapacityLimiter) -> Any:
    """The run ``limiter`` was last waited on in, if that run's loop still exists."""
    ref = _runs.get(limiter)
    return None if ref is None else ref()


def current_run() -> Any:
    """What identifies the running event loop: the asyncio loop, or trio's run token."""
    loop = asyncio._get_running_loop()
    if loop is not None:
        return loop
    return sys.modules["trio"].lowlevel.current_trio_token()  # anyio's only other backend


def _scheduler(run: Any) -> Callable[..., object]:
    """The thread-safe "call soon" of ``run``."""
    if isinstance(run, asyncio.AbstractEventLoop):
        return run.call_soon_threadsafe
    return run.run_sync_soon  # type: ignore[no-any-return]


def _is_running(run: Any) -> bool:
    """Whether ``run``'s loop is running now (in any thread)."""
    if isinstance(run, asyncio.AbstractEventLoop):
        return run.is_running() and not run.is_closed()
    try:
        run.run_sync_soon(_nothing)
    except RuntimeError:  # trio.RunFinishedError: that run has ended
        return False
    return True


def _nothing() -> None:
    pass


def bind_to_this_run(gate: Gate) -> tuple[anyio.CapacityLimiter, ...]:
    """Before a session of ``gate`` waits: make each of its limiters one this run can wait on.

    Return the gate's limiters (renewed ones included). Cheap when the limiters were already
    waited on in this run (a dictionary look-up each); only admission's slow path calls it.
    """
    run = current_run()
    for limiter in gate.limiters:
        last = _last_run(limiter)
        if last is run:
            continue
        if last is not None and _is_running(last):
            raise EventLoopConflictError(
                f"{_capitalized(gate.describe(limiter))} is in use by sessions of another event "
                "loop, which is running now (in another thread). A maker, an engine and its "
                "capacity serve one event loop at a time: the tasks waiting for a connection "
                "can only be woken in their own loop. Give each loop its own engine (and "
                "maker), or run the work in one loop, e.g. from other threads with "
                "anyio.from_thread.run()."
            )
        if _library_of(limiter) not in (None, _library_of_run(run)):
            limiter = _renew(limiter)
        _runs[limiter] = weakref.ref(run)
    return gate.limiters


def _library_of_run(run: Any) -> str:
    return "asyncio" if isinstance(run, asyncio.AbstractEventLoop) else "trio"


def _library_of(limiter: anyio.CapacityLimiter) -> str | None:
    """The event loop library ``limiter`` belongs to; ``None``: not bound to one yet (made
    outside a loop and never used: anyio binds it to the first library that uses it)."""
    inner = getattr(limiter, "_internal_limiter", limiter)  # (anyio's adapter: its limiter)
    if inner is None:
        return None
    module: str = type(inner).__module__  # anyio._backends._asyncio, anyio._backends._trio
    return module.rpartition("._")[2] if module.startswith("anyio._backends.") else None


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _renew(limiter: anyio.CapacityLimiter) -> anyio.CapacityLimiter:
    """Replace ``limiter``, if it is ours, by one of the running loop's library, everywhere;
    move its borrowers (tickets) to it. Return the limiter to use."""
    capacities = [c for c in list(_capacity._live) if c.limiter is limiter]
    gates = list(_capacity._gates)
    caps = [g for g in gates if g.own_cap and g.cap is limiter]
    if not capacities and not caps:
        return limiter  # the application's own limiter=: not ours to replace
    renewed = anyio.CapacityLimiter(limiter.total_tokens)  # made in the loop: its library's
    for borrower in limiter.statistics().borrowers:
        taken = getattr(borrower, "taken", None)  # a Ticket (admission's borrower)
        if taken is None or limiter not in taken:
            continue
        try:
            renewed.acquire_on_behalf_of_nowait(borrower)
        except Exception:  # more borrowers than tokens (total_tokens was lowered): keep it
            continue
        taken[taken.index(limiter)] = renewed
        limiter.release_on_behalf_of(borrower)
    for capacity in capacities:
        capacity.limiter = renewed
    for gate in caps:
        gate.cap = renewed
    for gate in gates:
        gate.renew()
    return renewed


def give_back_lost(taken: list[anyio.CapacityLimiter], borrower: object) -> None:
    """Give back the tokens of a session collected while it held them, from any thread.

    A limiter some run waits on is given its token back in that run (waking a waiter is its
    loop's business); one that no running loop waits on, at once (nothing to wake).
    """
    while taken:
        limiter = taken.pop()
        run = _last_run(limiter)
        if run is not None and _is_running(run):
            try:
                _scheduler(run)(_release, limiter, borrower)
                continue
            except RuntimeError:  # that loop has closed (or its run finished)
                pass
        _release(limiter, borrower)


def _release(limiter: anyio.CapacityLimiter, borrower: object) -> None:
    try:
        limiter.release_on_behalf_of(borrower)
    except Exception:  # (not a borrower any more: a forked child gave it back already)
        logger.debug("giving back a lost session's token failed", exc_info=True)


def _forget_runs_after_fork() -> None:
    """A forked child runs none of its parent's loops (one may look running: its thread's)."""
    _runs.clear()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forget_runs_after_fork)
