"""Worker pools: where a maker's sessions take their dedicated threads from, and which one.

A :class:`WorkerPool` is an object: the process's default one, a maker's own, or one an
application makes and gives to several makers (``workers=``). :func:`pool_for` is how a maker
picks its pool from its options, for the constructor and ``configure()`` alike. Every live pool
is known to the fork hook, so a forked child starts with empty pools. The threads themselves
are :mod:`._call`'s (``Worker``).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from ._call import Worker
from ._exceptions import ConfigurationError

__all__ = ["DEFAULT_POOL", "IDLE_TIMEOUT", "WorkerPool", "all_pools", "pool_for"]

#: Seconds an idle worker thread waits for work before it exits: the default pool's.
IDLE_TIMEOUT = 10.0


class WorkerPool:
    """Worker threads for ``offload="worker"`` makers, lent to one admitted session at a time.

    Threads start on demand and exit after ``idle_timeout`` seconds without work (at once on
    :meth:`stop_idle` and :func:`shutdown`), so an idle application keeps none. The makers'
    limiters bound how many are busy: one per admitted session. A maker given no ``workers=``
    uses the process's default pool (10 s) or, given ``worker_idle_timeout=``, a pool of its
    own; pass one pool to several makers to share their threads::

        workers = WorkerPool(idle_timeout=30)
        Orders = threadpool_sessionmaker(orders_engine, workers=workers)
        Billing = threadpool_sessionmaker(billing_engine, workers=workers)

    A forked child starts with empty pools (it has none of its parent's threads).
    """

    __slots__ = ("__weakref__", "_alive", "_idle", "_idle_timeout", "_lock")

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT) -> None:
        if isinstance(idle_timeout, bool) or not idle_timeout > 0:
            raise ConfigurationError(
                f"idle_timeout must be a positive number of seconds, not {idle_timeout!r}."
            )
        self._idle_timeout = float(idle_timeout)
        self._lock = threading.Lock()
        self._idle: list[Worker] = []
        self._alive = 0  # threads started and not retired (guarded by ``_lock``)
        _live_pools.add(self)  # the fork hook resets it in a child

    @property
    def idle_timeout(self) -> float:
        """Seconds an idle thread waits for another session before it exits."""
        return self._idle_timeout

    @property
    def idle(self) -> int:
        """How many threads wait in the pool."""
        with self._lock:
            return len(self._idle)

    @property
    def threads(self) -> int:
        """How many threads are alive: lent to a session, or idle in the pool."""
        return self._alive

    def stop_idle(self) -> int:
        """Make every idle thread exit now; return how many there were. Busy ones are kept."""
        with self._lock:
            idle, self._idle = self._idle, []
            for worker in idle:  # under the lock: none of them can retire meanwhile
                worker.stop()
        return len(idle)

    def __repr__(self) -> str:
        return (
            f"WorkerPool(idle_timeout={self._idle_timeout:g}, threads={self._alive}, "
            f"idle={len(self._idle)})"
        )

    def acquire(self, owner: object) -> Worker:
        """A worker thread of ``owner``'s own until :meth:`release`; started if none is idle."""
        with self._lock:
            if self._idle:
                worker = self._idle.pop()  # the most recently used: its siblings may time out
                worker.owner = weakref.ref(owner)
                return worker
            self._alive += 1
        # Outside the lock: starting a thread waits until it runs.
        try:
            return Worker(self, weakref.ref(owner))
        except BaseException:
            with self._lock:
                self._alive -= 1
            raise

    def release(self, worker: Worker) -> None:
        """Give ``worker`` back; it must have no call in flight."""
        worker.forget_loop()
        with self._lock:
            worker.owner = None
            self._idle.append(worker)

    def retire(self, worker: Worker) -> bool:
        """Called by a thread that was stopped or whose idle wait timed out: whether it leaves.

        Stopping (:meth:`stop_idle`) and retiring are one decision under the pool's lock: a
        stopped thread's wake-up was written under the lock, before this returns; a thread
        that retires itself leaves the idle list here, so :meth:`stop_idle` never sees it.
        Either way the pool is done with the thread's eventfds before the thread closes them.
        """
        with self._lock:
            leaves = True
            if worker._stopping:
                pass
            elif worker.owner is None:  # idle: in the list until now
                if worker in self._idle:
                    self._idle.remove(worker)
            elif worker.owner() is None:  # lent to a session that no longer exists
                worker.owner = None
            else:
                leaves = False
            if leaves:
                self._alive -= 1
            return leaves


#: Every pool alive in the process (the default one and those of makers and applications).
_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()

#: The pool of makers given neither ``workers=`` nor ``worker_idle_timeout=``.
DEFAULT_POOL = WorkerPool()


def all_pools() -> list[WorkerPool]:
    """Every pool alive in the process (``shutdown(engine)`` stops their idle threads)."""
    return list(_live_pools)


def _forget_threads_after_fork() -> None:
    """A forked child has none of its parent's threads: every pool starts empty."""
    for pool in list(_live_pools):
        pool._lock = threading.Lock()
        pool._idle = []
        pool._alive = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads_after_fork)


def pool_for(options: dict[str, Any], current: WorkerPool | None) -> WorkerPool:
    """The pool of a maker with these options (``worker_idle_timeout``, ``workers``).

    ``current`` is the maker's pool before a ``configure()``: its own pool is kept while its
    timeout does not change. Raises :class:`ConfigurationError` for options that cannot work.
    """
    idle, workers = options["worker_idle_timeout"], options["workers"]
    if idle is not None and (
        isinstance(idle, bool) or not (isinstance(idle, (int, float)) and idle > 0)
    ):
        raise ConfigurationError(
            f"worker_idle_timeout must be a positive number of seconds, not {idle!r}."
        )
    if workers is not None:
        if not isinstance(workers, WorkerPool):
            raise ConfigurationError(
                f"workers must be a WorkerPool, not {type(workers).__name__}: make one, "
                "WorkerPool(idle_timeout=...), and give it to every maker that shares its threads."
            )
        if idle is not None:
            raise ConfigurationError(
                f"worker_idle_timeout={idle!r} and workers= were both given, but the threads of "
                f"a given pool exit after the pool's own idle timeout ({workers.idle_timeout:g} "
                "s). Make the pool with WorkerPool(idle_timeout=...) and leave "
                "worker_idle_timeout= out."
            )
        return workers
    if idle is None:
        return DEFAULT_POOL
    if current is not None and current in _own_pools and current.idle_timeout == idle:
        return current  # the maker's own pool, for the same timeout: keep its threads
    pool = WorkerPool(idle)
    _own_pools.add(pool)
    return pool


#: The pools :func:`pool_for` made for makers given ``worker_idle_timeout=``.
_own_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
