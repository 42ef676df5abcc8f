"""The single path from the event loop to worker threads.

Every IO call of a :class:`~sqlalchemy_threadpool.ThreadpoolSession` goes through
:meth:`Offloader.call` (the end of a unit of work through :meth:`Offloader.finish`); no other
module starts session work in a thread. The thread is, by default (``offload="worker"``), one
lent to the session by a :class:`~._worker_pool.WorkerPool` for as long as it is admitted; with
``offload="anyio"`` each call takes one of :func:`anyio.to_thread.run_sync`'s. One
``Offloader`` belongs to one session (the call handed to a thread, with its state, and the
dedicated thread are :mod:`._call`'s; taking and giving back the token is :mod:`._admission`'s)
and enforces, in this order:

1. **Scope and ownership**: a session whose scope has ended raises
   :class:`SessionClosedError` at once; a ``strict`` session used from a task other than its
   owner raises :class:`SessionOwnershipError`.
2. **Serialisation**: a :class:`~._session_lock.SessionLock` per session (a flag while
   uncontended, an :class:`anyio.Lock` queue for waiters), so calls of one session never
   overlap, waiters take turns in order, and waiting for a turn occupies no thread.
3. **Admission**: the maker's :class:`anyio.CapacityLimiter` is sized to the connection pool.
   A session takes one token before its first call and gives it back once it no longer holds
   a transaction (after commit, rollback or close). Only admitted sessions run threads and
   hold connections, so a session holding a connection never waits for a thread, threads
   never wait in pool checkout, and waiting for capacity is a plain cancellable await
   (:func:`~._admission.admit`).
4. **Dispatch**: the call is handed to the thread as a :class:`~._call.Call`, and the
   awaiting task stops waiting as soon as it is cancelled (:meth:`~._call.Worker.call`, or
   ``abandon_on_cancel=True`` on anyio's threads). A call interrupted that way (abandoned), or
   stopped by ``shutdown()``, goes to :mod:`._recovery`: a callable that had not started never
   runs, one that had is cancelled until it leaves its thread, and the unit of work fails
   (rolled back, the session discarded;
   every later call but ``rollback()`` / ``close()`` raises
   :class:`TransactionInterruptedError`); the original cancellation is what propagates.
5. **Release**: once the session holds no transaction its token and its thread go back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ._admission import Ticket, admit, release
from ._call import STOPPED, Call
from ._cancel import session_connections
from ._exceptions import (
    SessionClosedError,
    SessionOwnershipError,
    TransactionInterruptedError,
)
from ._recovery import SHUTDOWN, discard, fail, fail_interrupted, shielded, stop_for_shutdown
from ._session_lock import SessionLock

if TYPE_CHECKING:
    from ._call import Worker
    from ._cancel import StatementCanceller
    from ._capacity import Gate
    from ._worker_pool import WorkerPool

__all__ = ["CLEANUP_TIMEOUT", "Offloader"]

T = TypeVar("T")

#: Seconds a cleanup (stopping the statement, then rolling back) may take before the
#: connection is cut: the maker's ``cleanup_timeout`` default.
CLEANUP_TIMEOUT = 5.0


class Offloader:
    """Runs the calls of one sync :class:`~sqlalchemy.orm.Session` in worker threads."""

    __slots__ = (
        "__weakref__",
        "_closed_reason",
        "_lock",
        "_owner",
        "_strict",
        "_threads",
        "_worker",
        "_workers",
        "admission_timeout",
        "canceller",
        "cleanup_timeout",
        "current",
        "failure",
        "is_admitted",
        "limiter",
        "session",
        "ticket",
    )

    def __init__(
        self,
        session: Session,
        limiter: Gate,  # what admission takes (the maker's cap, its engines' capacities)
        *,
        admission_timeout: float | None,
        canceller: StatementCanceller | None,
        cleanup_timeout: float = CLEANUP_TIMEOUT,
        strict: bool = False,
        workers: WorkerPool | None = None,
    ) -> None:
        self.session: Session = session
        self.limiter = limiter
        self.admission_timeout = admission_timeout
        self.canceller = canceller
        self.cleanup_timeout = cleanup_timeout
        self._strict = strict
        self._owner: tuple[int, str] | None = _current_task() if strict else None
        # ``None`` when made outside a task: the first task that uses it becomes the owner.
        self._lock = SessionLock(self._forget_threads)
        self._threads: anyio.CapacityLimiter | None = None
        #: Where the session's dedicated threads come from; ``None``: anyio's worker threads.
        self._workers = workers
        #: The thread lent to this session while it is admitted (``workers`` only).
        self._worker: Worker | None = None
        self.is_admitted = False
        self.ticket: Ticket | None = None
        self._closed_reason: str | None = None
        #: Why the unit of work failed (an interruption), until it is rolled back.
        self.failure: str | None = None
        #: The call in a worker thread now (being awaited), for ``shutdown()``.
        self.current: Call | None = None

    # -- scope, ownership, failure -----------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def interrupted(self) -> bool:
        """Whether the unit of work failed by an interruption and was not rolled back since."""
        return self.failure is not None

    def end(self, reason: str) -> None:
        """Refuse every later call: the session's scope has ended."""
        self._closed_reason = reason

    def check_open(self) -> None:
        if self._closed_reason is not None:
            raise SessionClosedError(
                f"This session's scope has ended ({self._closed_reason}); it cannot run SQL "
                "any more. Use the session only inside its `async with threadpool_session(...)` "
                "block (or the request that owns it), or open a new one."
            )

    def check_usable(self) -> None:
        """Raise :class:`TransactionInterruptedError` if the unit of work has failed."""
        if self.failure is not None:
            raise TransactionInterruptedError(
                f"This session's unit of work failed: {self.failure}. Call "
                "`await sess.rollback()` to acknowledge it and start a new transaction (a "
                "`threadpool_session()` block that ends normally without it raises this error "
                "instead of committing), or let the cancellation propagate."
            )

    def _check_owner(self) -> None:
        if not self._strict:
            return
        task = _current_task()
        if task is None:
            return
        if self._owner is None:
            self._owner = task
        elif task[0] != self._owner[0]:
            raise SessionOwnershipError(
                f"This session belongs to task {self._owner[1]!r} and was used from task "
                f"{task[1]!r}; its maker has strict=True, so a session is never shared between "
                "tasks. In a child task open a session of its own with "
                "`async with threadpool_session(new=True) as sess:`, or hand the work back to "
                "the owner task. (Without strict=True concurrent use is serialised instead.)"
            )

    def uses(self, engine: Engine) -> bool:
        """Whether this session's connections (or its bind) come from ``engine``."""
        if any(c.engine is engine for c in session_connections(self.session)):
            return True
        bind = self.session.bind
        return bind is engine or (isinstance(bind, Connection) and bind.engine is engine)

    # -- the path to the worker ----------------------------------------------------------

    async def call(
        self, fn: Callable[[], T], *, where: str | None = None, recovers: bool = False
    ) -> T:
        """Run ``fn`` in a worker thread, serialised with the session's other calls.

        ``where`` names the call in messages (``"execute()"``) and has its value made safe for
        the loop in the worker (:func:`~._results.make_loop_safe`). ``recovers`` marks
        ``rollback()``/``close()``: they clear a failed unit of work.
        """
        # (the checks inline: a method call each only when it raises)
        if self._closed_reason is not None:
            self.check_open()
        if self._strict:
            self._check_owner()
        async with self._lock:
            if self._closed_reason is not None:
                self.check_open()
            if recovers:
                self.failure = None
            elif self.failure is not None:
                self.check_usable()
            if not self.is_admitted:
                await admit(self)
            try:
                return await self._dispatch(fn, where)  # type: ignore[no-any-return]
            finally:
                self._release_if_idle()

    async def finish(self, *, commit: bool) -> None:
        """End the unit of work: commit, or roll back; then close. Shielded.

        A commit error propagates after the rollback. A failed unit of work is never
        committed: with ``commit=True`` it raises :class:`TransactionInterruptedError`.
        Cleanup is never refused, not even to a non-owner task.
        """
        await shielded(self._finish(commit=commit))

    async def close(self) -> None:
        """``Session.close()``, shielded; the session stays usable (``async with sess:``).

        As ``AsyncSession``'s exit: the transaction is rolled back without expiring the
        objects, which are detached with their loaded state. No admission and no thread when
        there is no transaction; a failed unit of work is acknowledged, as by ``close()``. If
        closing fails, the connection is invalidated and the error propagates.
        """
        session = self.session
        if self._lock.locked() or session.in_transaction():
            await shielded(self._close())
            return
        # No transaction, so no connection: no IO and no await, so no other call of the
        # session can come in between and there is nothing to shield (the common exit of
        # ``async with maker() as sess:`` after a commit).
        self.failure = None
        try:
            session.close()
        except Exception:
            await shielded(self._invalidate())
            raise
        self._release_if_idle()

    async def _invalidate(self) -> None:
        async with self._lock:
            try:
                await discard(self, invalidate=True)
            finally:
                self._release_if_idle()

    async def _close(self) -> None:
        await self._lock.acquire_shielded()
        self.failure = None
        try:
            if self.session.in_transaction():
                await self._dispatch(self.session.close)
            else:
                self.session.close()  # no transaction, so no connection: no IO
        except Exception:
            await discard(self, invalidate=True)
            raise
        finally:
            self._release_if_idle()
            self._lock.release()

    async def _finish(self, *, commit: bool) -> None:
        await self._lock.acquire_shielded()  # (shielded: no cancellation check)
        failed = self.failure is not None
        closed = False
        try:
            if commit and not failed:
                if not self.is_admitted:
                    await admit(self)
                # One hop for both: closing after a commit detaches the objects, work
                # better done in the thread than on the loop.
                await self._dispatch(partial(_commit_and_close, self.session))
                closed = True
        finally:
            try:
                if not closed:  # (committed and closed: nothing left to discard)
                    await discard(self, invalidate=False)
                self._release_if_idle()
            finally:
                self._lock.release()
        if commit and failed:
            self.check_usable()

    def _release_if_idle(self) -> None:
        if _holds_connection(self.session):
            return
        if self.is_admitted:
            release(self)
        worker = self._worker
        if worker is not None and self._workers is not None:
            # No call of ours is in it: a started one was waited for, an abandoned one
            # that never started is skipped by the thread.
            self._worker = None
            self._workers.release(worker)

    def _forget_threads(self) -> None:
        """The session is used under another event loop library: its anyio thread limiter
        (``offload="anyio"``) belongs to the old one."""
        self._threads = None

    def anyio_threads(self) -> anyio.CapacityLimiter:
        """The limiter of this session's anyio threads, made on first use.

        Used by ``offload="anyio"`` calls and the helpers of the slow paths; a session on its
        dedicated worker usually never needs it. Threads are bounded by admission, not here:
        this limiter only exists so anyio does not count them against its default 40 tokens.
        """
        threads = self._threads
        if threads is None:
            threads = self._threads = anyio.CapacityLimiter(math.inf)
        return threads

    async def run_in_thread(self, call: Call) -> Any:
        """Hand ``call`` to a worker thread and await it; cancellable at once."""
        if self._workers is None:
            return await anyio.to_thread.run_sync(
                call.run, abandon_on_cancel=True, limiter=self.anyio_threads()
            )
        worker = self._worker
        if worker is None:  # kept until the session is released (``_release_if_idle``)
            worker = self._worker = self._workers.acquire(self)
        return await worker.call(call)

    async def _dispatch(self, fn: Callable[[], Any], where: str | None = None) -> Any:
        call = Call(fn, where)
        self.current = call
        try:
            try:
                workers = self._workers
                if workers is None:
                    value = await self.run_in_thread(call)
                else:  # (run_in_thread inline: one coroutine less per call)
                    worker = self._worker
                    if worker is None:  # kept until the session is released
                        worker = self._worker = workers.acquire(self)
                    value = await worker.call(call)
            except BaseException as exc:
                own = exc is call.error
                if own and isinstance(exc, Exception) and call.state is not STOPPED:
                    raise  # the database's (or the callable's) own error: unchanged
                await shielded(fail_interrupted(self, call, exc, own))
                if own and call.state is STOPPED and isinstance(exc, Exception):
                    self.check_usable()  # raises, chained to the driver's "cancelled" error
                raise
            if call.state is STOPPED:
                await shielded(fail(self, call, SHUTDOWN, invalidate=False))
                self.check_usable()
            return value
        finally:
            self.current = None

    # -- shutdown ------------------------------------------------------------------------

    async def shut_down(self, reason: str, sever_at: float) -> None:
        """Fail this session's unit of work from another task (``shutdown()``).

        The statement in flight is cancelled (its connection cut at ``sever_at`` if it does
        not stop); the awaiting task then sees :class:`TransactionInterruptedError`. An idle
        session holding a transaction is rolled back here.
        """
        await stop_for_shutdown(self, reason, sever_at)
        async with self._lock:
            if self.session.in_transaction():
                await discard(self, invalidate=False)
            self._release_if_idle()


def _commit_and_close(session: Session) -> None:
    """Commit, then close: the end of a unit of work that went well, in one worker call."""
    session.commit()
    session.close()


def _holds_connection(session: Session) -> bool:
    """Whether the session's transaction has a connection (one that never ran SQL has none,
    e.g. after ``merge(load=False)``: it keeps no capacity and no thread)."""
    transaction = session.get_transaction()
    return transaction is not None and bool(transaction._connections)


def _current_task() -> tuple[int, str] | None:
    try:
        task = anyio.get_current_task()
    except RuntimeError:  # not in an async context
        return None
    return task.id, task.name or f"task {task.id}"
