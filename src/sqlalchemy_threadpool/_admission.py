"""Admission: the limiter token an admitted session borrows, and who is admitted.

A session is *admitted* while it may hold a connection: it has borrowed one of its maker's
:class:`anyio.CapacityLimiter` tokens (sized to the connection pool) through a :class:`Ticket`.
The ticket, not the session, is the borrower, so that a session dropped without being closed
stays collectable; :func:`release_lost`, its finalizer, gives the token back on the event loop.
:data:`admitted` lists the admitted sessions for ``shutdown()``; a forked child forgets those of
its parent. :func:`admit` takes a token for a session (waiting at most its admission
timeout), :func:`release` gives it back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from sqlalchemy.engine import Engine

from ._exceptions import AdmissionTimeoutError

if TYPE_CHECKING:
    from ._offload import Offloader

__all__ = [
    "Ticket",
    "admit",
    "admitted",
    "admitted_offloaders",
    "loop_scheduler",
    "release",
    "release_lost",
    "would_block",
]

logger = logging.getLogger(__name__)

#: Admitted sessions (they may hold a connection), for ``shutdown()``, and their tickets.
admitted: weakref.WeakKeyDictionary[Offloader, Ticket] = weakref.WeakKeyDictionary()


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


async def admit(offloader: Offloader) -> None:
    """Take a token of the session's limiter (sized to the pool): at once when one is free and
    nobody is queued, else waiting at most its admission timeout."""
    ticket = offloader.ticket
    limiter = offloader.limiter
    if ticket is None:
        ticket = offloader.ticket = Ticket(limiter)
        ticket.schedule = loop_scheduler()
        finalizer = weakref.finalize(offloader, release_lost, ticket)
        finalizer.atexit = False
    try:  # capacity free and nobody queued: no trip round the loop, no cancel scope
        limiter.acquire_on_behalf_of_nowait(ticket)
    except would_block():
        pass
    else:
        offloader.is_admitted = ticket.held = True
        admitted[offloader] = ticket
        return
    timeout = offloader.admission_timeout
    with anyio.move_on_after(math.inf if timeout is None else timeout) as scope:
        await limiter.acquire_on_behalf_of(ticket)
        offloader.is_admitted = ticket.held = True
        admitted[offloader] = ticket
    if scope.cancelled_caught:
        raise AdmissionTimeoutError(
            f"No database connection became free within {timeout:g} s: all "
            f"{limiter.total_tokens:g} connections of the pool are held by other "
            "sessions. Keep scopes short, raise pool_size/max_overflow (the maker's limiter "
            "follows the pool), or pass a larger admission_timeout to the maker."
        )


def release(offloader: Offloader) -> None:
    """Give back the token of an admitted session (it holds no transaction any more)."""
    offloader.is_admitted = False
    admitted.pop(offloader, None)
    ticket = offloader.ticket
    assert ticket is not None
    ticket.held = False
    offloader.limiter.release_on_behalf_of(ticket)


# -- a forked child ----------------------------------------------------------------------------

#: Sessions a forked child inherited while they were admitted in its parent: kept referenced
#: and never used, so that collecting them cannot roll back or close (on a socket the parent
#: still uses) the connection they hold, nor give their tokens back a second time.
_inherited: list[Offloader] = []

_INHERITED = (
    "it was running in the process that forked this one, which still owns its transaction "
    "and its connection"
)


def _after_fork_in_child() -> None:
    """A forked child: the parent's admitted sessions are not admitted here.

    Their tasks and threads do not exist in the child, and their connections belong to the
    parent: ``shutdown()`` in the child must not cancel, sever or roll them back. So they are
    forgotten, their scope ended (using one raises :class:`SessionClosedError`), and the tokens
    they had borrowed given back to their limiters (the maker's own limiter is replaced in the
    child anyway; one passed with ``limiter=`` is kept).
    """
    inherited = list(admitted.items())
    admitted.clear()
    for offloader, ticket in inherited:
        offloader.end(_INHERITED)
        _inherited.append(offloader)
        if ticket.held:
            ticket.held = False
            try:
                ticket.limiter.release_on_behalf_of(ticket)
            except Exception:  # it woke a waiter of a loop the child does not run
                logger.debug("giving back a token after fork failed", exc_info=True)


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
