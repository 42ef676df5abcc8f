"""Admission: the tokens an admitted session borrows, who is admitted, and who waits.

A session is *admitted* while it may hold a connection: it has borrowed, through a
:class:`Ticket`, one token of each limiter of its maker's :class:`~._capacity.Gate` (the
maker's ``limiter=`` cap, if any, then the capacity of each engine it binds, shared by
everything on that engine), taken in the gate's order. The ticket, not the session, is the
borrower, so that a session dropped without being closed stays collectable;
:func:`release_lost`, called when it is collected, gives the tokens back (also after its
loop ended).
:data:`admitted` lists the tickets of the admitted sessions for ``shutdown()`` and the stats;
:data:`waiting` the tickets waiting for admission, since when; a forked child forgets those of
its parent. :func:`admit` takes the tokens (waiting at most the admission timeout, and logging
a wait longer than the gate's threshold on this module's logger), :func:`release` gives them
back.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from typing import TYPE_CHECKING

import anyio
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ._exceptions import AdmissionTimeoutError, SessionClosedError
from ._loops import bind_to_this_run, give_back_lost
from ._session_lock import SessionLock

if TYPE_CHECKING:
    from ._capacity import Gate
    from ._offload import Offloader

__all__ = [
    "Ticket",
    "admit",
    "admitted",
    "admitted_offloaders",
    "log_wait",
    "release",
    "release_lost",
    "would_block",
]

logger = logging.getLogger(__name__)

#: The tickets of the admitted sessions (they may hold a connection), for ``shutdown()`` and
#: the stats (:attr:`Ticket.owner` is the session's offloader). A plain set: adding and
#: discarding is one C call each (a ``WeakKeyDictionary`` made a weak reference for both).
admitted: set[Ticket] = set()

#: Every ticket whose session is alive: keeps its weak reference to the session, and so the
#: callback that gives back the tokens of a session dropped while admitted, alive even when
#: the session is collected as part of a reference cycle.
_watched: set[Ticket] = set()

#: Tickets waiting for admission now, and when (``time.monotonic()``) they began to wait.
waiting: dict[Ticket, float] = {}


def admitted_offloaders(engine: Engine) -> list[Offloader]:
    """The admitted sessions (those that may hold a connection) that use ``engine``."""
    offloaders = [ticket.owner() for ticket in list(admitted)]
    return [o for o in offloaders if o is not None and o.uses(engine)]


class Ticket:
    """What an admitted session borrows its gate's tokens on behalf of.

    Not the :class:`Offloader` itself: a limiter keeps its borrowers, and a session that was
    dropped without being closed must stay collectable, so that its connection goes back to the
    pool and :func:`release_lost` gives its tokens back instead of losing them for good.
    """

    __slots__ = ("__weakref__", "gate", "owner", "taken")

    def __init__(self, gate: Gate, owner: Offloader) -> None:
        self.gate = gate
        #: The limiters it holds a token of, in the order taken.
        self.taken: list[anyio.CapacityLimiter] = []
        #: The session it borrows for; when that is collected, :func:`release_lost` runs.
        self.owner: weakref.ref[Offloader] = weakref.ref(owner, self._lost)
        _watched.add(self)

    def _lost(self, _: object) -> None:
        _watched.discard(self)
        admitted.discard(self)
        release_lost(self)

    def give_back(self) -> None:
        """Release every token it holds (on the loop thread)."""
        taken = self.taken
        while taken:
            taken.pop().release_on_behalf_of(self)


def would_block() -> tuple[type[Exception], ...]:
    """What a full limiter's ``acquire_on_behalf_of_nowait`` raises: ``except would_block():``.

    ``anyio.WouldBlock``; anyio before 4.14.2 lets trio's own ``trio.WouldBlock`` escape on the
    trio backend instead. An ``except`` clause is evaluated only when something was raised, so
    the fast path pays nothing for the look-up.
    """
    trio = sys.modules.get("trio")
    return (anyio.WouldBlock,) if trio is None else (anyio.WouldBlock, trio.WouldBlock)


def release_lost(ticket: Ticket) -> None:
    """A session was collected: give back the tokens it held if it was dropped while admitted.

    Runs wherever the garbage collector ran, also after the session's loop has ended: each
    token goes back in the loop that waits on its limiter, if one does (:mod:`._loops`).
    """
    if not ticket.taken:
        return
    taken, ticket.taken = ticket.taken, []  # (the session is gone: nobody else uses it)
    give_back_lost(taken, ticket)
    logger.warning(
        "a ThreadpoolSession was garbage-collected while it held a transaction; its "
        "transaction was lost and its connection capacity given back. End every session: "
        "`async with maker() as sess:`, `async with threadpool_session(...)`, or "
        "`await sess.close()`"
    )


async def admit(offloader: Offloader) -> None:
    """Take a token of each limiter of the session's gate: at once when each has one free and
    nobody queued, else waiting (in the gate's order) at most its admission timeout."""
    ticket = offloader.ticket
    if ticket is None:
        ticket = offloader.ticket = Ticket(offloader.limiter, offloader)
    limiters = ticket.gate.limiters
    taken = ticket.taken
    try:  # capacity free and nobody queued: no trip round the loop, no cancel scope
        for limiter in limiters:
            limiter.acquire_on_behalf_of_nowait(ticket)
            taken.append(limiter)
    except would_block():
        await _wait(offloader, ticket, limiters)
    else:
        offloader.is_admitted = True
        admitted.add(ticket)


async def _wait(
    offloader: Offloader, ticket: Ticket, limiters: tuple[anyio.CapacityLimiter, ...]
) -> None:
    """The slow path of :func:`admit`: wait for the tokens not taken yet, in order.

    A cancel scope only when an admission timeout applies (anyio's only timed wait): without
    one the wait is a plain cancellable await of the limiters, and a cancellation still gives
    back the tokens already taken.
    """
    timeout = offloader.admission_timeout
    limiters = bind_to_this_run(ticket.gate)  # (waited on in another loop before?)
    started = waiting[ticket] = time.monotonic()
    outcome = "was cancelled"
    try:
        if timeout is None:
            await _take(ticket, limiters)
        else:
            with anyio.move_on_after(timeout) as scope:
                await _take(ticket, limiters)
            if scope.cancelled_caught:
                outcome = "gave up (admission_timeout)"
                raise AdmissionTimeoutError(
                    f"No database connection became free within {timeout:g} s: "
                    f"{ticket.gate.describe(limiters[len(ticket.taken)])} is all held by "
                    "other sessions. Keep scopes short, raise pool_size/max_overflow (the "
                    "engine's capacity follows the pool), or pass a larger admission_timeout "
                    "to the maker."
                )
        offloader.is_admitted = True
        admitted.add(ticket)
        outcome = "was admitted"
    finally:
        del waiting[ticket]
        taken = ticket.taken
        # the limiter waited for last (the last taken once admitted)
        limiter = limiters[len(taken) - 1 if outcome == "was admitted" else len(taken)]
        if not offloader.is_admitted:
            ticket.give_back()  # the tokens taken before the one it waited for
        threshold = ticket.gate.log_threshold
        if threshold is not None:
            waited = time.monotonic() - started
            if waited >= threshold:
                log_wait(ticket.gate.describe(limiter), limiter, waited, outcome)


async def _take(ticket: Ticket, limiters: tuple[anyio.CapacityLimiter, ...]) -> None:
    """Wait for each limiter's token not taken yet, in the gate's order."""
    taken = ticket.taken
    for limiter in limiters[len(taken) :]:
        await limiter.acquire_on_behalf_of(ticket)
        taken.append(limiter)


def log_wait(
    what: str, limiter: anyio.CapacityLimiter, waited: float, outcome: str, *, where: str = ""
) -> None:
    """Log an admission wait on this module's logger: ``what`` the capacity waited for (its
    description), ``where`` how the session came to need it (``" of an engine ..."``)."""
    total, in_use = int(limiter.total_tokens), limiter.borrowed_tokens
    queued = limiter.statistics().tasks_waiting
    logger.warning(
        "a session waited %.3f s for a database connection%s and %s: %s, %d in use, %d waiting",
        waited,
        where,
        outcome,
        what,
        in_use,
        queued,
        extra={
            "admission_wait": waited,
            "capacity": total,
            "in_use": in_use,
            "waiting": queued,
        },
    )


def release(offloader: Offloader) -> None:
    """Give back the tokens of an admitted session (it holds no transaction any more)."""
    offloader.is_admitted = False
    ticket = offloader.ticket
    assert ticket is not None
    admitted.discard(ticket)
    ticket.give_back()


# -- a forked child ----------------------------------------------------------------------------

#: Sessions a forked child inherited while they were admitted in its parent, and their sync
#: sessions: kept referenced and never used, so that collecting them cannot roll back or close
#: (on a socket the parent still uses) the connection they hold, nor give their tokens back a
#: second time.
_inherited: list[object] = []

_INHERITED = (
    "it was running in the process that forked this one, which still owns its transaction "
    "and its connection"
)


def _after_fork_in_child() -> None:
    """A forked child: the parent's admitted sessions are not admitted here.

    Their tasks and threads do not exist in the child, and their connections belong to the
    parent: ``shutdown()`` in the child must not cancel, sever or roll them back. So they are
    forgotten, their scope ended (using one raises :class:`SessionClosedError`), and the tokens
    they had borrowed given back to their limiters (the engines' capacities and the caps
    makers made are replaced in the child anyway; a cap passed with ``limiter=`` is kept).

    Ending them must not touch the parent's connection, nor wait for the parent's worker
    thread or for a lock a parent's task held: each gets an empty stand-in sync session, a
    fresh lock and no thread. Leaving ``async with sess:`` then returns at once, leaving a
    ``threadpool_session()`` scope with an error too; leaving it normally (a commit) raises
    :class:`SessionClosedError`, as every other IO does: nothing of it is committed here.
    """
    inherited = list(admitted)
    admitted.clear()
    waiting.clear()
    for ticket in inherited:
        offloader = ticket.owner()
        if offloader is not None:
            offloader.end(_INHERITED)
            _inherited.extend((offloader, offloader.session))
            offloader.session = _InheritedSession()
            offloader._lock = SessionLock()
            offloader._worker = offloader.current = None
            offloader.is_admitted = False
        while ticket.taken:
            try:
                ticket.taken.pop().release_on_behalf_of(ticket)
            except Exception:  # it woke a waiter of a loop the child does not run
                logger.debug("giving back a token after fork failed", exc_info=True)


class _InheritedSession(Session):
    """What a forked child's copy of a parent's admitted session ends: nothing to commit."""

    def commit(self) -> None:
        raise SessionClosedError(
            f"This session's scope has ended ({_INHERITED}): nothing of its transaction can "
            "be committed in this process. Open sessions of the child's own in the child."
        )


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
