"""One call of a session, from the event loop to a worker thread and back.

:class:`Call` carries one callable to a thread and its outcome back, with the state of that
trip (the table is in its docstring). A thread runs :meth:`Call.run`: by default the session's
dedicated :class:`Worker`, lent to it by a :class:`~._worker_pool.WorkerPool` for as long as it
is admitted (``offload="worker"``), else one of anyio's (``anyio.to_thread.run_sync(call.run,
...)``, ``offload="anyio"``). Inside the thread the call makes its value safe for the loop
(:func:`~._results.make_loop_safe`), and the SQLAlchemy listeners of :mod:`._events` read the
call the thread runs (:data:`running`): a root ``COMMIT`` began and reached the database, or
the call was given up on and may start no further statement. Deciding what a call
is (:mod:`._offload`) and what happens to an interrupted one (:mod:`._recovery`) is not here.

**The dedicated worker.** :func:`anyio.to_thread.run_sync` is general: each call checks for
cancellation with a full trip round the event loop, opens a cancel scope, takes a limiter token,
and goes through anyio's shared queue of threads. A session that holds a connection runs its
calls one at a time, so it can instead *own* one thread while it is admitted (the aiosqlite
shape): a call is then appended to that thread's queue and the thread woken, and the answer
comes back by the event loop's own thread-safe wake-up: a per-loop ``eventfd`` reader on
asyncio (``call_soon_threadsafe`` where there is none), which resumes the awaiting task in its
own callback, so in the loop iteration that reads the wake-up; on trio, the awaiting task's own
``eventfd`` for a call alone in flight, else a per-run eventfd whose system task reschedules it
(a trio token's ``run_sync_soon`` where there are no eventfds); :mod:`._wakeup` has the
wake-ups, and why the loop keeps the GIL doing them.
Owning the thread also gives thread affinity, which drivers that want one thread per
connection need. :meth:`Worker.call` keeps the contract of ``anyio.to_thread.run_sync(...,
abandon_on_cancel=True)``: the callable runs in a copy of the caller's context, its exception
is re-raised unchanged, a cancellation of the awaiting task is seen at once, without waiting
for the thread, and the callable may call back into the loop with ``anyio.from_thread`` (the
call is the :class:`~._from_thread.Link` that serves it).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from contextvars import Context, copy_context
from functools import partial
from itertools import count
from typing import TYPE_CHECKING, Any, NoReturn

from anyio.lowlevel import current_token as _anyio_token

from . import _from_thread, _wakeup
from ._results import make_loop_safe

if TYPE_CHECKING:
    import anyio
    from anyio.lowlevel import EventLoopToken

    from ._worker_pool import WorkerPool as WorkerPool  # (its module imports this one)

__all__ = ["ABANDONED", "DONE", "PENDING", "RUNNING", "STOPPED", "Call", "CallState", "Worker"]

logger = logging.getLogger(__name__)

_get_running_loop = asyncio._get_running_loop
_names = count(1)


class CallState(enum.Enum):
    """Where a :class:`Call` is; the table of its transitions is in :class:`Call`."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    ABANDONED = "abandoned"
    STOPPED = "stopped"


PENDING, RUNNING, DONE = CallState.PENDING, CallState.RUNNING, CallState.DONE
ABANDONED, STOPPED = CallState.ABANDONED, CallState.STOPPED

#: ``running.call``: the call this thread is running (set by :meth:`Call.run`; ``None`` or
#: unset between calls), read by the SQLAlchemy listeners of :mod:`._events`, which fire in that
#: same thread. The one "current call".
running = threading.local()


class Call:
    """One callable of a session on its way to a thread and back, with its :class:`CallState`.

    ===========  ==================================================  =====================
    state        meaning                                             next
    ===========  ==================================================  =====================
    PENDING      made on the loop; no thread has started it          RUNNING, ABANDONED,
                                                                     STOPPED
    RUNNING      a thread runs it                                    DONE, ABANDONED,
                                                                     STOPPED
    DONE         it ran and left; ``value`` / ``error`` are set      ABANDONED, STOPPED
    ABANDONED    the loop stopped waiting for it (the awaiting       STOPPED
                 task was cancelled): if it had not started it
                 never runs; if it had, it may start no further
                 statement, and :mod:`._recovery` cancels it until
                 it leaves
    STOPPED      ``shutdown()`` gave up on it: as ABANDONED, and     (final)
                 its unit of work fails whatever it returns
    ===========  ==================================================  =====================

    Who moves it, where, and how:

    - PENDING -> RUNNING, and RUNNING -> DONE as it returns or raises: :meth:`run`, in the
      thread, under the call's lock. The thread never moves a call out of ABANDONED or
      STOPPED: one that had not started is skipped (``run`` returns ``None``), one that runs
      keeps its state and sets ``left`` as it leaves.
    - any of the first three -> ABANDONED: :meth:`abandon`, on the loop (the awaiting task,
      once its await was interrupted), under the call's lock.
    - any -> STOPPED: :meth:`stop`, on the loop (``shutdown()``'s task), under the call's lock.

    The lock makes "has it started?" and "give up on it" one decision, so a call the loop gave
    up on before a thread picked it up never runs. ``abandon()`` and ``stop()`` return
    ``left``, a :class:`threading.Event` set once the call has left its thread, made only then
    (most calls are never given up on), or ``None`` if it had not started.

    Facts beside the state: ``committing`` / ``committed`` (a root ``Session.commit()`` began
    in it / the database committed it; written by :mod:`._events`' listeners, in the thread),
    ``returned`` (a dedicated worker is done with it and has woken the awaiting task), and the
    :class:`~._from_thread.Link` fields (``token``, ``cancelled``, ``scope``) with the
    worker's wake-up (``notify``, ``waiter``), all set on the loop.
    """

    __slots__ = (
        "_lock",
        "cancelled",
        "committed",
        "committing",
        "context",
        "error",
        "fn",
        "left",
        "notify",
        "returned",
        "scope",
        "state",
        "token",
        "value",
        "waiter",
        "where",
    )

    def __init__(self, fn: Callable[[], Any], where: str | None = None) -> None:
        self.fn = fn
        #: Which call it is in messages (``"execute()"``): its value is then made loop-safe.
        self.where = where
        self.state = PENDING
        self._lock = threading.Lock()
        self.value: Any = None
        self.error: BaseException | None = None
        self.left: threading.Event | None = None
        self.committing = False
        self.committed = False
        #: The context the dedicated worker runs it in (set by :meth:`Worker.call`).
        self.context: Context
        # -- a dedicated worker's wake-up of the awaiting task (set on the loop):
        self.returned = False
        #: Called with the call in the worker thread once it is done: wakes the awaiting task.
        self.notify: Callable[[Call], object] | None = None
        #: What the awaiting task waits on: on asyncio its :class:`~._wakeup.DirectFuture`; on
        #: trio the task itself, while it waits (only touched on the loop).
        self.waiter: Any = None
        # -- for anyio.from_thread (see _from_thread.Link):
        self.token: EventLoopToken | None = None
        self.cancelled: Callable[[], NoReturn] | None = None
        self.scope: anyio.CancelScope | None = None

    def run(self) -> Any:
        """Run the callable in this thread, unless the loop gave up on it before it started."""
        with self._lock:
            if self.state is not PENDING:
                return None
            self.state = RUNNING
        outer = getattr(running, "call", None)
        running.call = self
        try:
            value = self.fn()
            where = self.where
            return value if where is None else make_loop_safe(value, where)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            running.call = outer
            with self._lock:
                if self.state is RUNNING:
                    self.state = DONE
                left = self.left
            if left is not None:
                left.set()

    def abandon(self) -> threading.Event | None:
        """The loop stops waiting: ABANDONED (unless STOPPED). Return ``left``, ``None`` if it
        never started (then it never will)."""
        return self._give_up(ABANDONED)

    def stop(self) -> threading.Event | None:
        """``shutdown()`` gives up on the call: STOPPED. Return ``left`` as :meth:`abandon`."""
        return self._give_up(STOPPED)

    def _give_up(self, state: CallState) -> threading.Event | None:
        with self._lock:
            was = self.state
            if was is not STOPPED:
                self.state = state
            if was is RUNNING or was is DONE:
                self.left = threading.Event()
                if was is DONE:
                    self.left.set()
            return self.left


class Worker:
    """One worker thread, lent to one session at a time by its :class:`WorkerPool`."""

    __slots__ = (
        "_fd",
        "_fd_notify",
        "_fd_waiter",
        "_go",
        "_loop",
        "_notifier",
        "_pool",
        "_queue",
        "_stopping",
        "_token",
        "_trio_notify",
        "_trio_run",
        "_wake_fd",
        "link",
        "owner",
        "thread",
    )

    def __init__(self, pool: WorkerPool, owner: weakref.ref[object]) -> None:
        self._pool = pool
        self._queue: deque[Call] = deque()
        # How the thread is woken: an eventfd where there is one (its write releases the GIL,
        # so the woken thread does not wake only to wait for the GIL), else a raw lock used as
        # a wake-up flag.
        self._wake_fd = (
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if _wakeup.EVENTFD else None
        )
        self._go = threading.Lock()
        self._go.acquire()
        self._stopping = False  # set by stop(): exit at the next wait instead of waiting
        #: The call the thread is running (for ``anyio.from_thread``: :mod:`._from_thread`).
        self.link: Call | None = None
        #: Who the worker is lent to (guarded by the pool's lock); ``None`` while idle.
        self.owner: weakref.ref[object] | None = owner
        #: trio: an eventfd the thread writes when a call is done (made on first use), and the
        #: ``notify`` that writes it.
        self._fd: int | None = None
        self._fd_notify: Callable[[Call], object] | None = None
        self._fd_waiter = False  # a task waits on ``_fd`` (trio allows one reader at a time)
        #: asyncio: the loop last waited on, and how to wake it (cached: a session keeps its loop).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notifier: Callable[[Call], object] | None = None
        #: anyio's token of the loop last waited on; on trio that run's waker (its own token
        #: without eventfds), and the ``notify`` that resumes a task through it.
        self._token: EventLoopToken | None = None
        self._trio_run: object = None
        self._trio_notify: Callable[[Call], object] | None = None
        self.thread: threading.Thread = threading.Thread(
            target=self._main, name=f"sqlalchemy-threadpool-worker-{next(_names)}", daemon=True
        )
        self.thread.start()

    # -- the loop side --------------------------------------------------------------------

    async def call(self, call: Call) -> Any:
        """Run ``call`` in this thread, in a copy of the current context; return its value.

        Cancellable at once: a cancelled caller does not wait for the thread (and gives up on
        the call: :meth:`Call.abandon`, which ``_offload`` does).
        """
        call.context = copy_context()
        loop = _get_running_loop()
        in_flight = _wakeup.in_flight
        in_flight.append(None)
        try:
            if loop is None:
                await self._wait_trio(call)
            else:  # (asyncio inline: one coroutine less per call)
                notifier = self._notifier
                if loop is not self._loop or notifier is None:
                    notifier, self._token = _wakeup.asyncio_notifier(loop)
                    self._notifier, self._loop, self._trio_run = notifier, loop, None
                call.token = self._token
                # Resumed by the loop's reader in the iteration that reads the wake-up.
                call.waiter = future = _wakeup.DirectFuture(loop=loop)
                call.notify = notifier
                self._queue.append(call)
                self._wake()
                try:
                    await future
                except BaseException as exc:
                    call.notify = None  # cancelled: the caller handles the call from here
                    if isinstance(exc, asyncio.CancelledError):
                        _from_thread.interrupted(call, _from_thread.raise_asyncio_cancelled)
                    raise
        finally:
            in_flight.pop()
        error = call.error
        if error is not None:
            raise error
        return call.value

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

    def _submit(self, call: Call) -> None:
        self._queue.append(call)
        self._wake()

    def _wake(self) -> None:
        fd = self._wake_fd
        if fd is not None:
            if len(_wakeup.in_flight) > 1 and _wakeup.write_keeping_gil is not None:
                # Other calls are in flight: keep the GIL (``_wakeup``'s docstring).
                _wakeup.write_keeping_gil(fd)
            else:
                os.eventfd_write(fd, 1)  # alone: hand the GIL to the woken thread
        else:
            with contextlib.suppress(RuntimeError):  # already released: a wake-up is pending
                self._go.release()

    async def _wait_trio(self, call: Call) -> None:
        trio = sys.modules["trio"]
        # The run: its waker (eventfds), else its token (``run_sync_soon``).
        run: Any = _wakeup.trio_waker() if _wakeup.EVENTFD else trio.lowlevel.current_trio_token()
        if run is not self._trio_run:
            self._trio_run, self._loop, self._notifier = run, None, None
            if _wakeup.EVENTFD:
                self._token, self._trio_notify = run.token, run.notify
            else:
                self._token = _anyio_token()
                self._trio_notify = partial(run.run_sync_soon, _trio_resume)
        call.token = self._token
        if _wakeup.EVENTFD and not self._fd_waiter and len(_wakeup.in_flight) == 1:
            # Alone in flight, the task waits for the thread's eventfd itself: the I/O manager
            # wakes it directly, without a trip through trio's run_sync_soon queue and its
            # system task. Not under concurrency: registering the fd with trio's epoll
            # (``epoll_ctl``) releases the GIL on the loop thread (``_wakeup``'s docstring).
            fd = self._fd
            if fd is None:
                fd = self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._fd_notify = _eventfd_notify(fd)
            call.notify = self._fd_notify
            self._submit(call)
            self._fd_waiter = True
            try:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    _wakeup.read_eventfd(fd)  # (a stale wake-up of an abandoned call: wait on)
                    if call.returned:
                        return
            except BaseException as exc:
                call.notify = None
                if isinstance(exc, trio.Cancelled):
                    _from_thread.interrupted(call, await _from_thread.trio_cancellation())
                raise
            finally:
                self._fd_waiter = False
        call.waiter = trio.lowlevel.current_task()
        call.notify = self._trio_notify
        self._submit(call)

        def abort(raise_cancel: Callable[[], NoReturn]) -> object:
            call.waiter = None
            call.notify = None
            call.cancelled = raise_cancel  # (as trio's threads keep it for check_cancelled)
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        except BaseException:
            _from_thread.interrupted(call, call.cancelled)
            raise

    # -- the thread -----------------------------------------------------------------------

    def _main(self) -> None:
        _from_thread.claim_thread(self)
        try:
            self._serve()
        finally:  # retired: nobody submits to it or waits on its eventfds any more
            for fd in (self._wake_fd, self._fd):
                if fd is not None:
                    os.close(fd)

    def _serve(self) -> None:
        calls, pool = self._queue, self._pool
        sleep = _wakeup.sleeper(self._wake_fd, self._go, pool._idle_timeout)
        while True:
            try:
                call = calls.popleft()
            except IndexError:
                if not self._stopping and sleep():
                    continue  # new work (or a stale wake-up)
                # Stopped, or the idle wait ended: whether it leaves is decided under the
                # pool's lock, after which nobody writes its eventfds (``_main`` closes them).
                if pool.retire(self):
                    return
                continue  # lent to a live session meanwhile
            self.link = call
            try:
                call.value = call.context.run(call.run)
            except BaseException as exc:  # delivered to the awaiting task
                call.error = exc
            self.link = None
            # Drop the callable (and what it holds: the session) before waking the task, so a
            # session its caller dropped is collectable as soon as the caller sees the result.
            del call.fn, call.context
            call.returned = True
            notify = call.notify
            if notify is not None:
                try:
                    notify(call)
                except Exception:  # the loop is gone (closed, or its run finished): no waiter
                    logger.debug("could not wake the event loop of a finished call", exc_info=True)
            del call, notify


def _trio_resume(call: Call) -> None:
    task, call.waiter = call.waiter, None
    if task is not None:  # still waiting (not aborted by a cancellation)
        sys.modules["trio"].lowlevel.reschedule(task)


def _eventfd_notify(fd: int) -> Callable[[Call], object]:
    """The ``notify`` of a call whose task waits on the worker's eventfd ``fd`` (trio)."""
    return lambda call: os.eventfd_write(fd, 1)
