"""Dedicated worker threads: the short way from the event loop to a thread and back.

:func:`anyio.to_thread.run_sync` is general: each call checks for cancellation with a full trip
round the event loop, opens a cancel scope, takes a limiter token, and goes through anyio's
shared queue of worker threads. A session that holds a connection runs its calls one at a time,
so it can instead *own* one thread for as long as it is admitted (the aiosqlite shape): then a
call is a job appended to that thread's queue plus a wake-up of the thread, and the answer
comes back by the event loop's own thread-safe wake-up: a per-loop ``eventfd`` reader on
asyncio (``call_soon_threadsafe`` where there is none); on trio, the awaiting task's own
``eventfd`` for a call alone in flight, else a trio token's ``run_sync_soon`` and
``reschedule``. Owning the thread also gives thread affinity, which drivers that insist on one
thread per connection need.

**The GIL and the event-loop thread.** Every ``os`` syscall releases the GIL, and a thread that
wants it back while another runs Python waits until that one blocks or the interpreter's switch
interval (5 ms) forces a switch. The loop thread drives every task, so it must not give the GIL
away in the middle of its work while workers are busy: under concurrency such waits were most
of its time and set the event loop's lag (profiled in ``bench/RESULTS.md``). So the loop resets
its eventfds with a read that keeps the GIL, and wakes a worker with a write that keeps it too
while other calls are in flight (:mod:`._wakeup`: libc through :class:`ctypes.PyDLL`; the
eventfds are non-blocking, so neither call can block). Only when the call is the only one in
flight does the wake-up release the GIL, which hands it straight to the woken thread: that
makes a lone hop (W0/W1) cheaper, and nobody else is waiting for it then. Workers release
the GIL freely: to wake the loop and in every driver call.

Threads wait in a :class:`~._worker_pool.WorkerPool` between sessions and exit after its idle
timeout; the maker's limiter bounds how many sessions (and so threads) are busy at once.

This module only moves callables and results; the start/abandon handshake, cancellation and
cleanup policy live in :mod:`._offload`. :meth:`Worker.call` keeps the contract that
``anyio.to_thread.run_sync(..., abandon_on_cancel=True)`` has: the callable runs in a copy of
the caller's context, its exception is re-raised unchanged, a cancellation of the awaiting
task is seen at once, without waiting for the thread, and the callable may call back into the
loop with ``anyio.from_thread`` (each job is the :class:`~._from_thread.Link` that serves it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from contextvars import Context, copy_context
from functools import partial
from itertools import count
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from anyio.lowlevel import current_token as _anyio_token

from . import _from_thread, _wakeup

if TYPE_CHECKING:
    import anyio
    from anyio.lowlevel import EventLoopToken

    from ._worker_pool import WorkerPool as WorkerPool  # (its module imports this one)

__all__ = ["Worker"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_get_running_loop = asyncio._get_running_loop
_names = count(1)


class _Job:
    """One call handed to a worker thread; written by the thread, read after its wake-up.

    Also the :class:`~._from_thread.Link` of the call: how ``anyio.from_thread`` calls made in
    it find the awaiting task's loop (``token``) and its cancellation.
    """

    __slots__ = (
        "cancelled",
        "context",
        "done",
        "error",
        "fn",
        "notify",
        "scope",
        "task",
        "token",
        "value",
    )

    def __init__(self, fn: Callable[[], Any], context: Context) -> None:
        self.fn = fn
        self.context = context
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = False
        #: Called in the worker thread once the job is done: wakes the awaiting task.
        self.notify: Callable[[], object] | None = None
        #: trio: the task waiting for the job, while it waits (only touched on the loop).
        self.task: Any = None
        # For anyio.from_thread (set on the loop thread, see _from_thread.Link).
        self.token: EventLoopToken | None = None
        self.cancelled: Callable[[], NoReturn] | None = None
        self.scope: anyio.CancelScope | None = None


class Worker:
    """One worker thread, lent to one session at a time by its :class:`WorkerPool`."""

    __slots__ = (
        "_fd",
        "_fd_waiter",
        "_go",
        "_jobs",
        "_loop",
        "_notifier",
        "_pool",
        "_stopping",
        "_token",
        "_trio_token",
        "_wake_fd",
        "link",
        "owner",
        "thread",
    )

    def __init__(self, pool: WorkerPool, owner: weakref.ref[object]) -> None:
        self._pool = pool
        self._jobs: deque[_Job] = deque()
        # How the thread is woken: an eventfd where there is one (its write releases the GIL,
        # so the woken thread does not wake only to wait for the GIL), else a raw lock used as
        # a wake-up flag.
        self._wake_fd = (
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if _wakeup.EVENTFD else None
        )
        self._go = threading.Lock()
        self._go.acquire()
        self._stopping = False  # set by stop(): exit at the next wait instead of waiting
        #: The job the thread is running (for ``anyio.from_thread``: :mod:`._from_thread`).
        self.link: _Job | None = None
        #: Who the worker is lent to (guarded by the pool's lock); ``None`` while idle.
        self.owner: weakref.ref[object] | None = owner
        #: trio: an eventfd the thread writes when a job is done (made on first use).
        self._fd: int | None = None
        self._fd_waiter = False  # a task waits on ``_fd`` (trio allows one reader at a time)
        #: asyncio: the loop last waited on, and how to wake it (cached: a session keeps its loop).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notifier: Callable[[asyncio.Future[None]], object] | None = None
        #: anyio's token of the loop last waited on, and on trio that loop's own token.
        self._token: EventLoopToken | None = None
        self._trio_token: object = None
        self.thread: threading.Thread = threading.Thread(
            target=self._main, name=f"sqlalchemy-threadpool-worker-{next(_names)}", daemon=True
        )
        self.thread.start()

    # -- the loop side --------------------------------------------------------------------

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in this thread, in a copy of the current context, and return its value.

        Cancellable at once: a cancelled caller does not wait for the thread. ``fn`` itself
        must decide whether to run when it starts (``_offload`` gives it that handshake).
        """
        job = _Job(fn, copy_context())
        loop = _get_running_loop()
        _wakeup.in_flight.append(None)
        try:
            if loop is not None:
                await self._wait_asyncio(job, loop)
            else:
                await self._wait_trio(job)
        finally:
            _wakeup.in_flight.pop()
        if job.error is not None:
            error, job.error = job.error, None  # no reference cycle through the traceback
            raise error
        value: T = job.value
        return value

    def forget_loop(self) -> None:
        """Drop the cached asyncio loop (the next holder may run another one)."""
        self._loop = self._notifier = None

    def stop(self) -> None:
        """Make the idle thread exit now instead of after its idle timeout.

        Only :meth:`WorkerPool.stop_idle` calls it, under the pool's lock and for a thread it
        took out of the pool: the thread cannot have retired, so its eventfd is still open.
        """
        self._stopping = True
        self._wake()

    def _submit(self, job: _Job) -> None:
        self._jobs.append(job)
        self._wake()

    def _wake(self) -> None:
        fd = self._wake_fd
        if fd is not None:
            if len(_wakeup.in_flight) > 1 and _wakeup.write_keeping_gil is not None:
                # Other calls are in flight: keep the GIL (module docstring).
                _wakeup.write_keeping_gil(fd)
            else:
                os.eventfd_write(fd, 1)  # alone: hand the GIL to the woken thread
        else:
            with contextlib.suppress(RuntimeError):  # already released: a wake-up is pending
                self._go.release()

    async def _wait_asyncio(self, job: _Job, loop: asyncio.AbstractEventLoop) -> None:
        notifier = self._notifier
        if loop is not self._loop or notifier is None:
            notifier, self._token = _wakeup.asyncio_notifier(loop)
            self._notifier, self._loop, self._trio_token = notifier, loop, None
        job.token = self._token
        future = loop.create_future()
        job.notify = partial(notifier, future)
        self._submit(job)
        try:
            await future
        except BaseException as exc:
            job.notify = None  # cancelled: the caller handles the job from here
            if isinstance(exc, asyncio.CancelledError):
                _from_thread.interrupted(job, _from_thread.raise_asyncio_cancelled)
            raise

    async def _wait_trio(self, job: _Job) -> None:
        trio = sys.modules["trio"]
        trio_token = trio.lowlevel.current_trio_token()
        if trio_token is not self._trio_token:
            self._token = _anyio_token()
            self._trio_token, self._loop, self._notifier = trio_token, None, None
        job.token = self._token
        if _wakeup.EVENTFD and not self._fd_waiter and len(_wakeup.in_flight) == 1:
            # Alone in flight, the task waits for the thread's eventfd itself: the I/O manager
            # wakes it directly, without a trip through trio's run_sync_soon queue and its
            # system task. Not under concurrency: registering the fd with trio's epoll
            # (``epoll_ctl``) releases the GIL on the loop thread (module docstring).
            fd = self._fd
            if fd is None:
                fd = self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            job.notify = partial(os.eventfd_write, fd, 1)
            self._submit(job)
            self._fd_waiter = True
            try:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    _wakeup.read_eventfd(fd)  # (a stale wake-up of an abandoned job: wait on)
                    if job.done:
                        return
            except BaseException as exc:
                job.notify = None
                if isinstance(exc, trio.Cancelled):
                    _from_thread.interrupted(job, await _from_thread.trio_cancellation())
                raise
            finally:
                self._fd_waiter = False
        job.task = trio.lowlevel.current_task()
        job.notify = partial(trio_token.run_sync_soon, _trio_resume, job)
        self._submit(job)

        def abort(raise_cancel: Callable[[], NoReturn]) -> object:
            job.task = None
            job.notify = None
            job.cancelled = raise_cancel  # (as trio's threads keep it for check_cancelled)
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        except BaseException:
            _from_thread.interrupted(job, job.cancelled)
            raise

    # -- the thread -----------------------------------------------------------------------

    def _sleeper(self) -> Callable[[], bool]:
        """How the thread waits for a wake-up, at most the pool's idle timeout (``False``)."""
        fd, idle = self._wake_fd, self._pool._idle_timeout
        if fd is None:
            go = self._go
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

    def _main(self) -> None:
        _from_thread.claim_thread(self)
        try:
            self._serve()
        finally:  # retired: nobody submits to it or waits on its eventfds any more
            for fd in (self._wake_fd, self._fd):
                if fd is not None:
                    os.close(fd)

    def _serve(self) -> None:
        jobs, sleep, pool = self._jobs, self._sleeper(), self._pool
        while True:
            try:
                job = jobs.popleft()
            except IndexError:
                if not self._stopping and sleep():
                    continue  # new work (or a stale wake-up)
                # Stopped, or the idle wait ended: whether it leaves is decided under the
                # pool's lock, after which nobody writes its eventfds (``_main`` closes them).
                if pool.retire(self):
                    return
                continue  # lent to a live session meanwhile
            self.link = job
            try:
                job.value = job.context.run(job.fn)
            except BaseException as exc:  # delivered to the awaiting task
                job.error = exc
            self.link = None
            # Drop the callable (and what it holds: the session) before waking the task, so a
            # session its caller dropped is collectable as soon as the caller sees the result.
            del job.fn, job.context
            job.done = True
            notify = job.notify
            if notify is not None:
                try:
                    notify()
                except Exception:  # the loop is gone (closed, or its run finished): no waiter
                    logger.debug("could not wake the event loop of a finished call", exc_info=True)
            del job, notify


def _trio_resume(job: _Job) -> None:
    task, job.task = job.task, None
    if task is not None:  # still waiting (not aborted by a cancellation)
        sys.modules["trio"].lowlevel.reschedule(task)
