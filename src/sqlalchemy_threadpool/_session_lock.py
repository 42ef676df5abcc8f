"""The per-session lock: one call of a session at a time (invariant 2).

Almost always one task uses its session, so the lock is almost never contended: then it is a
flag and a cancellation check, and no :class:`anyio.Lock` is made at all (an anyio lock costs
a backend look-up to make, and per acquisition a task look-up, the same cancellation check and
an ownership check to release). Only when a task finds the session busy are the waiters
queued, on an :class:`anyio.Lock` made then and kept: anyio's queue, first come first served.

The rules that make the flag and the anyio lock one lock:

- the flag :attr:`SessionLock.held` says whether a task holds the session; it is taken
  without the anyio lock only when nobody is queued (so a newcomer never overtakes a waiter);
- a waiter counts as queued from the moment it finds the session busy until it holds it;
  the anyio lock orders the waiters, and the one that holds the anyio lock while the session
  is still held by a task of the flag path waits for that task's release on an
  :class:`anyio.Event`;
- whoever took the anyio lock releases it with the session; a release on the flag path sets
  the event a waiter may be waiting on.

A task cancelled before it holds the session never holds it, so its call never starts: the
flag path checks for cancellation first (as ``anyio.Lock(fast_acquire=True)`` does), the
queued path is anyio's cancellable waiting.

**Successive event loops.** A session may serve one loop after another, of either library
(:mod:`._loops`). The cancellation check and the waiters' queue belong to the library of the
loop that looked them up; used under the other one they raise ``RuntimeError`` at once, and
the lock then looks them up again for this library (``on_new_library`` tells its session,
whose anyio thread limiter belongs to the old one too). A session still held by a task of the
other library (in the middle of a call in another thread's loop) is refused with
:class:`~._exceptions.EventLoopConflictError`: a session serves one event loop at a time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType

import anyio
from anyio.lowlevel import current_token

from ._exceptions import EventLoopConflictError

__all__ = ["SessionLock"]


class SessionLock:
    """One holder at a time; a flag when uncontended, anyio's lock for the waiters."""

    __slots__ = (
        "_checkpoint",
        "_free",
        "_lock",
        "_on_new_library",
        "_queued",
        "_via_lock",
        "held",
    )

    def __init__(self, on_new_library: Callable[[], object] | None = None) -> None:
        #: Whether a task holds the session.
        self.held = False
        #: Tasks that found the session busy and do not hold it yet.
        self._queued = 0
        #: The waiters' queue, made when the first one comes.
        self._lock: anyio.Lock | None = None
        #: Set when a holder of the flag path releases, for the waiter next in line.
        self._free: anyio.Event | None = None
        #: Whether the holder holds :attr:`_lock` too (it came through the queue).
        self._via_lock = False
        #: The event loop library's "raise if cancelled", looked up at the first acquisition
        #: and again under another library; ``None`` also after a shielded acquisition, which
        #: does not say which library the holder runs in.
        self._checkpoint: Callable[[], Awaitable[None]] | None = None
        #: Called when the lock finds itself under another event loop library.
        self._on_new_library = on_new_library

    def locked(self) -> bool:
        """Whether a task holds the session."""
        return self.held

    async def __aenter__(self) -> None:
        if not self.held and not self._queued:
            checkpoint = self._checkpoint
            if checkpoint is None:
                checkpoint = self._look_up()
            try:
                await checkpoint()  # returns at once unless cancelled: then it raises
            except RuntimeError:  # the other library's, from a loop of it before: idle
                await self._look_up(renew=True)()
            if not self.held and not self._queued:
                self.held = True
                return
        await self._wait()

    async def acquire_shielded(self) -> None:
        """Take the session in a shielded scope (the end of a unit of work, which is never
        refused): no cancellation check, which could not raise there anyway."""
        if not self.held and not self._queued:
            self.held = True
            self._checkpoint = None  # (which library the holder runs in is not known)
            return
        await self._wait()

    def _look_up(self, *, renew: bool = False) -> Callable[[], Awaitable[None]]:
        """The running library's cancellation check, kept; ``renew``: the lock was last used
        under the other library, whose waiters' queue is dropped too."""
        checkpoint = self._checkpoint = current_token().backend_class.checkpoint_if_cancelled
        if renew:
            self._lock = self._free = None
            if self._on_new_library is not None:
                self._on_new_library()
        return checkpoint

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.release()

    async def _wait(self) -> None:
        """The contended path: queue on the anyio lock, then for the flag's holder if any."""
        if self.held and self._checkpoint is not None:
            checkpoint = current_token().backend_class.checkpoint_if_cancelled
            if checkpoint != self._checkpoint:
                raise EventLoopConflictError(
                    "This session is in the middle of a call in another event loop (or that "
                    "loop ended during the call). A session serves one event loop at a time: "
                    "open a session of its own in each loop (`async with maker() as sess:`)."
                )
        lock = self._lock
        if lock is None:
            lock = self._lock = anyio.Lock(fast_acquire=True)
        self._queued += 1
        try:
            try:
                await lock.acquire()
            except RuntimeError:  # the other library's queue, from a loop of it before
                if lock.locked() or lock is not self._lock:
                    raise
                lock = self._lock = anyio.Lock(fast_acquire=True)  # (nobody queues on it)
                await lock.acquire()
            try:
                while self.held:  # held through the flag path (at most once: nobody else
                    free = self._free = anyio.Event()  # takes it while we are queued)
                    await free.wait()
            except BaseException:
                lock.release()  # the next waiter in line
                raise
        finally:
            self._queued -= 1
        self.held = True
        self._via_lock = True

    def release(self) -> None:
        """Give the session to the next waiter, if any (by the task that holds it)."""
        self.held = False
        if self._via_lock:
            self._via_lock = False
            assert self._lock is not None
            self._lock.release()
            return
        free = self._free
        if free is not None:
            self._free = None
            free.set()
