"""How worker threads and the event loop wake each other: eventfds, kept GIL, one reader.

The wake-up half of :mod:`._call`'s dedicated workers: :data:`EVENTFD` says whether eventfds
are used; :data:`write_keeping_gil` and :data:`read_eventfd` are libc's
``eventfd_write``/``eventfd_read`` called through :class:`ctypes.PyDLL`, so without releasing
the GIL, and checked; :data:`in_flight` counts the calls in flight to a worker in the process;
:func:`asyncio_notifier` gives a worker the way to resolve a future of an asyncio loop (one
:class:`LoopWaker`, an eventfd reader, per loop); :func:`sleeper` is how an idle worker waits.
Everything here is reset in a forked child.

**The GIL and the event-loop thread.** Every ``os`` syscall releases the GIL, and a thread that
wants it back while another runs Python waits until that one blocks or the interpreter's switch
interval (5 ms) forces a switch. The loop thread drives every task, so it must not give the GIL
away in the middle of its work while workers are busy: under concurrency such waits were most
of its time and set the event loop's lag (profiled in ``bench/RESULTS.md``). So the loop resets
its eventfds with a read that keeps the GIL, and wakes a worker with a write that keeps it too
while other calls are in flight (libc through :class:`ctypes.PyDLL`; the eventfds are
non-blocking, so neither call can block). Only when the call is the only one in flight does the
wake-up release the GIL, which hands it straight to the woken thread: that makes a lone hop
(W0/W1) cheaper, and nobody else is waiting for it then. Workers release the GIL freely: to
wake the loop and in every driver call.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from anyio.lowlevel import current_token as _anyio_token

if TYPE_CHECKING:
    from anyio.lowlevel import EventLoopToken

__all__ = [
    "EVENTFD",
    "LoopWaker",
    "asyncio_notifier",
    "in_flight",
    "read_eventfd",
    "sleeper",
    "write_keeping_gil",
]

#: Wake-ups through an eventfd (Linux): cheaper than a socket write plus a loop callback.
EVENTFD = hasattr(os, "eventfd") and os.environ.get("SATP_WORKER_EVENTFD", "1") != "0"


class LoopWaker:
    """Resolves futures on one asyncio loop from worker threads, through one eventfd reader.

    The thread queues the future and writes the eventfd; the loop's reader callback resolves
    every queued future. Cheaper than ``call_soon_threadsafe`` (which writes a socket the loop
    then drains with two reads, and resolves in one more callback).
    """

    __slots__ = ("_fd", "_ready", "token")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ready: deque[asyncio.Future[None]] = deque()
        #: anyio's token of the loop (made once per loop, not once per lending of a thread).
        self.token = _anyio_token()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            closing = weakref.finalize(loop, os.close, self._fd)  # TypeError: no weakrefs
        except BaseException:
            os.close(self._fd)
            raise
        try:
            loop.add_reader(self._fd, self._resolve_ready)  # NotImplementedError: proactor
        except BaseException:
            closing()
            raise

    def notify(self, future: asyncio.Future[None]) -> None:  # in the worker thread
        self._ready.append(future)
        os.eventfd_write(self._fd, 1)

    def _resolve_ready(self) -> None:
        read_eventfd(self._fd)
        ready = self._ready
        while ready:
            _resolve(ready.popleft())


#: One entry per call in flight to a worker, in every event loop of the process (``deque``
#: appends and pops are atomic, so loops in several threads may share it): ``_wake`` keeps the
#: GIL when there is more than one.
in_flight: deque[None] = deque()


def _libc_eventfd_calls() -> tuple[Callable[[int], None], Callable[[int], None]] | None:
    """libc's ``eventfd_write(fd, 1)`` and ``eventfd_read(fd)`` through :class:`ctypes.PyDLL`,
    which calls them *without* releasing the GIL; ``None`` where they cannot be had."""
    try:
        import ctypes

        libc = ctypes.PyDLL(None, use_errno=True)
        c_write, c_read = libc.eventfd_write, libc.eventfd_read
    except (ImportError, OSError, AttributeError):  # no ctypes, or a libc without them
        return None
    get_errno = ctypes.get_errno
    c_write.argtypes = [ctypes.c_int, ctypes.c_uint64]
    c_write.restype = ctypes.c_int
    c_read.argtypes = [ctypes.c_int, ctypes.c_void_p]
    c_read.restype = ctypes.c_int
    # Shared by every caller: safe, since each call holds the GIL from start to end.
    counter = ctypes.c_uint64()
    where = ctypes.byref(counter)

    def write(fd: int) -> None:
        if c_write(fd, 1):  # -1: failed (EBADF: not an open eventfd), as os.eventfd_write raises
            code = get_errno()
            raise OSError(code, f"eventfd_write({fd}): {os.strerror(code)}")

    def read(fd: int) -> None:
        if c_read(fd, where):
            code = get_errno()
            if code != errno.EAGAIN:  # EAGAIN: already reset, nothing to do
                raise OSError(code, f"eventfd_read({fd}): {os.strerror(code)}")

    return write, read


def _os_eventfd_read(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):  # (reset by an earlier read)
        os.eventfd_read(fd)


_libc_calls = _libc_eventfd_calls() if EVENTFD else None
#: Wakes a worker without releasing the GIL (``None``: not available here).
write_keeping_gil: Callable[[int], None] | None = _libc_calls[0] if _libc_calls else None
#: Resets one of the event loop's eventfds, keeping the GIL where possible.
read_eventfd: Callable[[int], None] = _libc_calls[1] if _libc_calls else _os_eventfd_read

loop_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker] = (
    weakref.WeakKeyDictionary()
)


def asyncio_notifier(
    loop: asyncio.AbstractEventLoop,
) -> tuple[Callable[[asyncio.Future[None]], object], EventLoopToken]:
    """How a worker thread resolves a future of ``loop``, and anyio's token of ``loop`` (for
    ``anyio.from_thread``); called on the loop's thread."""
    if EVENTFD:
        try:
            waker = loop_wakers.get(loop)
            if waker is None:
                waker = loop_wakers[loop] = LoopWaker(loop)
            return waker.notify, waker.token
        except (NotImplementedError, TypeError):  # no add_reader (proactor), no weakref
            pass

    def notify(future: asyncio.Future[None]) -> None:
        loop.call_soon_threadsafe(_resolve, future)

    return notify, _anyio_token()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # not cancelled meanwhile
        future.set_result(None)


def sleeper(fd: int | None, go: threading.Lock, idle: float) -> Callable[[], bool]:
    """How a worker thread waits for a wake-up (on ``fd``, else on the raw lock ``go``), at
    most ``idle`` seconds (then ``False``)."""
    if fd is None:
        return lambda: go.acquire(timeout=idle)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    idle_ms = idle * 1000

    def sleep() -> bool:
        if not poller.poll(idle_ms):
            return False
        with contextlib.suppress(BlockingIOError):  # (reset by an earlier read)
            os.eventfd_read(fd)
        return True

    return sleep


def _forget_after_fork() -> None:
    """A forked child runs none of its parent's loops and has none of its calls in flight."""
    loop_wakers.clear()
    in_flight.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
