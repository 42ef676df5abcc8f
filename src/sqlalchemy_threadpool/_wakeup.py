"""How worker threads and the event loop wake each other: eventfds, kept GIL, one reader.

The wake-up half of :mod:`._call`'s dedicated workers: :data:`EVENTFD` says whether eventfds
are used; :data:`write_keeping_gil` and :data:`read_eventfd` are libc's
``eventfd_write``/``eventfd_read`` called through :class:`ctypes.PyDLL`, so without releasing
the GIL, and checked; :data:`in_flight` counts the calls in flight to a worker in the process;
:func:`asyncio_notifier` gives a worker the way to resume the task awaiting its call on an
asyncio loop (one :class:`LoopWaker`, an eventfd reader, per loop, resuming in its own callback
the tasks whose :class:`DirectFuture` it resolves); :func:`sleeper` is how an idle worker waits.
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
wake the loop (the woken loop thread takes it at once: measured, a wake-up that kept it made
the way back slower) and in every driver call; but a worker just woken resets its own eventfd
keeping the GIL it has just taken back (:data:`read_eventfd`), not to wait for it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from contextvars import Context
from typing import TYPE_CHECKING, Any, Protocol

from anyio.lowlevel import current_token as _anyio_token

if TYPE_CHECKING:
    from anyio.lowlevel import EventLoopToken

__all__ = [
    "EVENTFD",
    "DirectFuture",
    "LoopWaker",
    "Resumable",
    "TrioWaker",
    "asyncio_notifier",
    "in_flight",
    "read_eventfd",
    "sleeper",
    "trio_waker",
    "write_keeping_gil",
]

#: Wake-ups through an eventfd (Linux): cheaper than a socket write plus a loop callback.
EVENTFD = hasattr(os, "eventfd") and os.environ.get("SATP_WORKER_EVENTFD", "1") != "0"


class Resumable(Protocol):
    """What a worker thread hands to a :class:`LoopWaker`: a call with its awaited future."""

    #: The future the awaiting task waits on (set on the loop thread before the worker runs it).
    waiter: Any


class DirectFuture(asyncio.Future[None]):
    """A future whose awaiting task a :class:`LoopWaker` resumes at once, in its own callback.

    An asyncio task awaiting a future registers its wake-up with ``add_done_callback``, and
    ``set_result`` then *schedules* it: the task resumes one event-loop iteration after the one
    that resolved the future. This future keeps the first callback (the awaiting task's) aside,
    and :meth:`resume` runs it directly, in the task's context, so the task resumes in the
    iteration that read the worker's wake-up: one iteration per hop instead of two, and one
    ``epoll_wait`` less (which releases the GIL). Everything else is a plain
    :class:`asyncio.Future` (``isinstance`` holds, as anyio's cancel scopes check): a
    cancellation schedules the kept callback as ``cancel()`` would, and a further callback is
    registered the usual way. Only the loop's thread touches it.
    """

    __slots__ = ("_wakeup", "_wakeup_context")
    _wakeup: Callable[[DirectFuture], object]  # (unset until a task awaits it)
    _wakeup_context: Context | None

    def add_done_callback(
        self, fn: Callable[[DirectFuture], object], *, context: Context | None = None
    ) -> None:
        try:
            self._wakeup  # noqa: B018 (set: a second callback, kept the usual way)
        except AttributeError:
            if not self.done():  # the first one: the awaiting task's wake-up
                self._wakeup = fn
                self._wakeup_context = context
                return
        super().add_done_callback(fn, context=context)

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        self._schedule_wakeup()
        return True

    def resume(self) -> None:
        """Resolve the future and resume its awaiting task now (on the loop's thread); nothing
        if it is done already (cancelled meanwhile: the cancellation woke the task)."""
        if self.done():
            return
        self.set_result(None)  # (schedules only the callbacks registered the usual way)
        try:
            wakeup, context = self._wakeup, self._wakeup_context
        except AttributeError:  # nobody awaits it (yet): nothing to resume
            return
        del self._wakeup, self._wakeup_context
        if context is None:
            wakeup(self)
        else:
            context.run(wakeup, self)

    def _schedule_wakeup(self) -> None:
        try:
            wakeup, context = self._wakeup, self._wakeup_context
        except AttributeError:
            return
        del self._wakeup, self._wakeup_context
        self.get_loop().call_soon(wakeup, self, context=context)


class LoopWaker:
    """Resumes the tasks of one asyncio loop that wait for worker threads, through one eventfd
    reader.

    The thread queues its call and writes the eventfd; the loop's reader callback resumes the
    task awaiting each call queued then (:meth:`DirectFuture.resume`), in that same callback:
    the calls done together resume together, in one loop iteration. Cheaper than
    ``call_soon_threadsafe`` (which writes a socket the loop then drains with two reads, and
    resolves in one more callback, whose task steps in one more iteration).
    """

    __slots__ = ("_fd", "_ready", "token")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ready: deque[Resumable] = deque()
        #: anyio's token of the loop (made once per loop, not once per lending of a thread).
        self.token = _anyio_token()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            closing = weakref.finalize(loop, os.close, self._fd)  # TypeError: no weakrefs
        except BaseException:
            os.close(self._fd)
            raise
        try:
            loop.add_reader(self._fd, self._resume_ready)  # NotImplementedError: proactor
        except BaseException:
            closing()
            raise

    def notify(self, call: Resumable) -> None:  # in the worker thread
        self._ready.append(call)
        os.eventfd_write(self._fd, 1)  # (releasing the GIL: the woken loop thread takes it)

    def _resume_ready(self) -> None:
        read_eventfd(self._fd)
        ready = self._ready
        # Those queued by now; one queued later wrote the eventfd after the read above, so the
        # next iteration resumes it (the loop polls its other file descriptors in between).
        for _ in range(len(ready)):
            call = ready.popleft()
            try:
                call.waiter.resume()
            except BaseException:
                if ready:  # (KeyboardInterrupt, SystemExit: the rest at the next iteration)
                    os.eventfd_write(self._fd, 1)
                raise


class TrioWaker:
    """Reschedules the trio tasks that wait for worker threads, from one system task per run.

    Under concurrency a trio task waiting for its call does not wait on a file descriptor of
    its own (registering it with trio's epoll releases the GIL on the loop thread, at every
    call): the worker queues the call and writes this run's eventfd, and one system task reads
    it and reschedules the task of every call queued then. Cheaper than
    ``TrioToken.run_sync_soon`` (a lock, a socket write in the worker; two socket reads that
    release the GIL on the loop thread). The eventfd is closed as the run ends, under the lock
    that every wake-up takes, so a worker that comes back later (an abandoned call) writes
    nothing.
    """

    __slots__ = ("_closed", "_fd", "_lock", "_ready", "token")

    def __init__(self) -> None:
        self._ready: deque[Resumable] = deque()
        self._lock = threading.Lock()
        self._closed = False
        #: anyio's token of the run (for ``anyio.from_thread``).
        self.token = _anyio_token()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def notify(self, call: Resumable) -> None:  # in the worker thread
        with self._lock:
            if self._closed:  # the run is over: nobody waits
                return
            self._ready.append(call)
            os.eventfd_write(self._fd, 1)

    async def _serve(self) -> None:
        lowlevel = sys.modules["trio"].lowlevel
        fd, ready = self._fd, self._ready
        try:
            while True:
                await lowlevel.wait_readable(fd)
                read_eventfd(fd)
                for _ in range(len(ready)):  # those queued by now (later ones wrote again)
                    call = ready.popleft()
                    task, call.waiter = call.waiter, None
                    if task is not None:  # still waiting (not aborted by a cancellation)
                        lowlevel.reschedule(task)
        finally:
            with self._lock:
                self._closed = True
                os.close(fd)


_trio_wakers: Any = None  # trio.lowlevel.RunVar, made on first use (trio is optional)


def trio_waker() -> TrioWaker:
    """The :class:`TrioWaker` of the current trio run, started on first use."""
    global _trio_wakers
    wakers = _trio_wakers
    if wakers is None:
        wakers = _trio_wakers = sys.modules["trio"].lowlevel.RunVar("sqlalchemy_threadpool")
    waker: TrioWaker | None = wakers.get(None)
    if waker is None:
        waker = TrioWaker()
        try:
            sys.modules["trio"].lowlevel.spawn_system_task(
                waker._serve, name="sqlalchemy_threadpool wake-ups"
            )
        except BaseException:
            os.close(waker._fd)
            raise
        wakers.set(waker)
    return waker


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
#: Resets an eventfd (the loop's, or an idle worker's once woken), keeping the GIL where possible.
read_eventfd: Callable[[int], None] = _libc_calls[1] if _libc_calls else _os_eventfd_read

loop_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker] = (
    weakref.WeakKeyDictionary()
)


def asyncio_notifier(
    loop: asyncio.AbstractEventLoop,
) -> tuple[Callable[[Resumable], object], EventLoopToken]:
    """How a worker thread resumes the task awaiting its call (whose ``waiter`` is a
    :class:`DirectFuture` of ``loop``), and anyio's token of ``loop`` (for
    ``anyio.from_thread``); called on the loop's thread."""
    if EVENTFD:
        try:
            waker = loop_wakers.get(loop)
            if waker is None:
                waker = loop_wakers[loop] = LoopWaker(loop)
            return waker.notify, waker.token
        except (NotImplementedError, TypeError):  # no add_reader (proactor), no weakref
            pass

    def notify(call: Resumable) -> None:
        loop.call_soon_threadsafe(call.waiter.resume)

    return notify, _anyio_token()


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
        read_eventfd(fd)  # (keeping the GIL just taken back: no second wait for it)
        return True

    return sleep


def _forget_after_fork() -> None:
    """A forked child runs none of its parent's loops and has none of its calls in flight."""
    loop_wakers.clear()
    in_flight.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
