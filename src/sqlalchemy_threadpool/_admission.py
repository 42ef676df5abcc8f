"""Admission bookkeeping: the limiter token an admitted session borrows, and who is admitted.

A session is *admitted* while it may hold a connection: it has borrowed one of its maker's
:class:`anyio.CapacityLimiter` tokens (sized to the connection pool) through a :class:`Ticket`.
The ticket, not the session, is the borrower, so that a session dropped without being closed
stays collectable; :func:`release_lost`, its finalizer, gives the token back on the event loop.
:data:`admitted` lists the admitted sessions for ``shutdown()``. The admission itself (waiting,
its timeout) is :meth:`~._offload.Offloader.call`'s.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from sqlalchemy.engine import Engine

if TYPE_CHECKING:
    from ._offload import Offloader

__all__ = [
    "Ticket",
    "admitted",
    "admitted_offloaders",
    "loop_scheduler",
    "release_lost",
    "would_block",
]

logger = logging.getLogger(__name__)

#: Admitted sessions (they may hold a connection), for ``shutdown()``.
admitted: weakref.WeakSet[Offloader] = weakref.WeakSet()


def admitted_offloaders(engine: Engine) -> list[Offloader]:
    """The admitted sessions (those that may hold a connection) that use ``engine``."""
    return [offloader for offloader in list(admitted) if offloader.uses(engine)]


class Ticket:
    """What an admitted session borrows the maker's limiter token on behalf of.

    Not the :class:`Offloader` itself: the limiter keeps its borrowers, and a session that was
    dropped without being closed must stay collectable, so that its connection goes back to the
    pool and :func:`release_lost` gives its token back instead of losing it for good.
    """

    __slots__ = ("__weakref__", "held", "limiter", "schedule")

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self.limiter = limiter
        self.held = False
        #: The event loop's thread-safe "call soon", set at the first admission.
        self.schedule: Callable[..., object] | None = None


def loop_scheduler() -> Callable[..., object]:
    """The running event loop's thread-safe way to run a callback soon (asyncio or trio)."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:  # not asyncio: anyio's only other backend
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon


def would_block() -> tuple[type[Exception], ...]:
    """What a full limiter's ``acquire_on_behalf_of_nowait`` raises: ``except would_block():``.

    ``anyio.WouldBlock``; anyio before 4.14.2 lets trio's own ``trio.WouldBlock`` escape on the
    trio backend instead. An ``except`` clause is evaluated only when something was raised, so
    the fast path pays nothing for the look-up.
    """
    trio = sys.modules.get("trio")
    return (anyio.WouldBlock,) if trio is None else (anyio.WouldBlock, trio.WouldBlock)


def release_lost(ticket: Ticket) -> None:
    """Finalizer of an Offloader: give back the token of a session dropped while admitted.

    Runs wherever the garbage collector ran; the release itself is handed to the loop.
    """
    if not ticket.held or ticket.schedule is None:
        return
    ticket.held = False
    try:
        ticket.schedule(ticket.limiter.release_on_behalf_of, ticket)
    except RuntimeError:  # the loop has closed: its limiter is gone with it
        return
    logger.warning(
        "a ThreadpoolSession was garbage-collected while it held a transaction; its "
        "transaction was lost and its connection capacity given back. End every session: "
        "`async with maker() as sess:`, `async with threadpool_session(...)`, or "
        "`await sess.close()`"
    )
