"""Stats: a snapshot of admission and threads, for a maker or an engine.

:class:`ThreadpoolStats` is what ``maker.stats()``, :func:`engine_stats` and
``ThreadpoolEngine.stats()`` return. It is read from what admission keeps anyway (the limiters'
counts, :data:`~._admission.admitted` and :data:`~._admission.waiting`, each session's
``current`` call, the worker pools' thread counts), so the hot path pays nothing for it and a
snapshot costs a walk over the waiting and admitted sessions, with no lock held: cheap enough to
scrape every second. A snapshot taken off the event-loop thread (a metrics exporter's thread) is
consistent field by field, not as a whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy.engine import Connection, Engine

from . import _admission, _lazy_admission
from ._capacity import Capacity, capacity_for

if TYPE_CHECKING:
    from ._capacity import Gate
    from ._engine import ThreadpoolEngine
    from ._maker import threadpool_sessionmaker
    from ._offload import Offloader
    from ._worker_pool import WorkerPool

__all__ = ["ThreadpoolStats", "engine_stats", "maker_stats"]


@dataclass(frozen=True, repr=False)
class ThreadpoolStats:
    """A snapshot of admission and worker threads (``maker.stats()``, :func:`engine_stats`).

    ``repr()`` is a one-line summary, e.g.
    ``ThreadpoolStats(in_use=10/10, waiting=7, longest_wait=0.412s, in_flight=9, threads=10)``.
    A pool is saturated when ``in_use == capacity`` and ``waiting`` stays above 0; see the
    Operating guide for what to change.
    """

    capacity: int
    """How many sessions may hold a connection at once (the engine's pool, or a maker's cap)."""

    in_use: int
    """How many of them are admitted now (each may hold a connection and a worker thread)."""

    waiting: int
    """How many sessions are waiting for admission now (on the event loop: no thread)."""

    longest_wait: float
    """Seconds the oldest current waiter has waited so far; 0.0 when nobody waits."""

    threads: int
    """Worker threads alive (busy or idle) in the :class:`WorkerPool` (pools) used; 0 with
    ``offload="anyio"``, whose threads are anyio's, shared with the whole application."""

    in_flight: int
    """Calls handed to worker threads and not finished yet. For :func:`engine_stats`, those of
    the sessions admitted on the engine and of any other session that holds a connection of it
    (a session holds a token of an engine its routing ``get_bind`` reached, too)."""

    def __repr__(self) -> str:
        return (
            f"ThreadpoolStats(in_use={self.in_use}/{self.capacity}, waiting={self.waiting}, "
            f"longest_wait={self.longest_wait:.3f}s, in_flight={self.in_flight}, "
            f"threads={self.threads})"
        )


def maker_stats(maker: threadpool_sessionmaker[Any]) -> ThreadpoolStats:
    """``maker.stats()``: the maker's limiter, and its own sessions."""
    gate = maker._settings.gate
    owner = gate.owner
    workers = maker._workers
    return _snapshot(
        gate.limiter,
        lambda g: g.owner is owner,
        [] if workers is None else [workers],
        reaching=lambda g, c: g.owner is owner,
    )


def engine_stats(engine: Engine | Connection | ThreadpoolEngine) -> ThreadpoolStats:
    """A snapshot of the admission capacity of ``engine``, shared by everything on it.

    ``engine`` is a sync :class:`~sqlalchemy.engine.Engine` (or the ``Connection`` a maker is
    bound to) or a :class:`ThreadpoolEngine` (as its :meth:`~ThreadpoolEngine.stats`).
    ``waiting``, ``longest_wait`` and ``in_flight`` count the sessions of every maker and
    connection facade on the engine; ``threads`` the threads of the worker pools they use
    (the process's default pool is shared with makers on other engines). Cheap (no IO, no lock
    held), for a scrape every second.
    """
    from ._engine import ThreadpoolEngine  # it imports this module

    if isinstance(engine, ThreadpoolEngine):
        engine = engine.sync_engine
    if not isinstance(engine, (Engine, Connection)):
        raise TypeError(
            "engine_stats() takes a sqlalchemy Engine (or Connection) or a ThreadpoolEngine, "
            f"not {type(engine).__name__}; for a maker call maker.stats()."
        )
    capacity = capacity_for(engine)
    return _snapshot(
        capacity.limiter,
        lambda g: _has(g, capacity),
        list(capacity.pools),
        engine.engine,
        reaching=lambda g, c: c is capacity,
    )


def _has(gate: Gate, capacity: Capacity) -> bool:
    return capacity in gate.capacities


def _snapshot(
    limiter: anyio.CapacityLimiter,
    counts: Callable[[Gate], bool],
    pools: list[WorkerPool],
    engine: Engine | None = None,
    *,
    reaching: Callable[[Gate, Capacity], bool],
) -> ThreadpoolStats:
    """Read the counts; ``counts(gate)`` says whether a session with that gate is counted; a
    call in flight also counts if its session holds a connection of ``engine`` (one reached
    by a routing ``get_bind``, not in its gate); ``reaching(gate, capacity)`` whether a session
    admitted already and waiting for the capacity of an engine it reached is counted."""
    now = time.monotonic()
    # ``list()`` of a dict's items copies it without running Python code, so no other thread
    # can change it meanwhile; the same holds for ``list()`` of the admitted set.
    starts = [start for ticket, start in list(_admission.waiting.items()) if counts(ticket.gate)]
    starts += [
        wait.started
        for ticket, wait in list(_lazy_admission.waiting.items())
        if reaching(ticket.gate, wait.capacity)
    ]
    in_flight = 0
    for ticket in list(_admission.admitted):
        offloader: Offloader | None = ticket.owner()
        if offloader is None or offloader.current is None:
            continue
        if counts(offloader.limiter) or (engine is not None and offloader.uses(engine)):
            in_flight += 1
    return ThreadpoolStats(
        capacity=int(limiter.total_tokens),
        in_use=limiter.borrowed_tokens,
        waiting=len(starts),
        longest_wait=max(0.0, now - min(starts)) if starts else 0.0,
        threads=sum(pool.threads for pool in pools),
        in_flight=in_flight,
    )
