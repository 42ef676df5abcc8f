"""Capacity: one admission limit per engine, and the gate a maker's sessions pass through.

Invariant 6 (the thread pool never outgrows the connection pool) holds only if everything on
an engine counts against one limit. So a sync :class:`~sqlalchemy.engine.Engine` has exactly
one :class:`Capacity` (:func:`capacity_for`: made on first use, sized from the pool's capacity,
kept in a weak registry; engines made with ``execution_options()`` share their parent's, as
they share its pool; a ``Connection`` given as a bind is a capacity of one of its own). Every
maker, session and connection facade on the engine takes its tokens from it.

A maker turns its binds and its ``limiter=`` option into a :class:`Gate`: the ordered
limiters a session takes to be admitted: the maker's own cap first (``limiter=``: a share of
the engine's capacity, e.g. so background jobs cannot take every connection), then the
capacity of each engine it binds, in one process-wide order. Taking them in one order is what
keeps two sessions on the same two engines from waiting for each other for ever. An engine
the maker was not given, reached through a routing ``get_bind``, is admitted on when reached
(:mod:`._lazy_admission`).

A forked child gets fresh limiters of the same sizes (its parent's tasks hold the old tokens).
"""

from __future__ import annotations

import math
import os
import weakref
from itertools import count
from typing import TYPE_CHECKING, Any

import anyio
from sqlalchemy.engine import Connection, Engine

from ._binds import pool_capacity
from ._exceptions import ConfigurationError

if TYPE_CHECKING:
    from ._worker_pool import WorkerPool

__all__ = [
    "UNBOUNDED_POOL_TOKENS",
    "Capacity",
    "Gate",
    "capacity_for",
    "find_capacity",
    "make_gate",
]

#: Tokens when the pool does not bound connections (NullPool, unlimited overflow) or when
#: the engine is not known (a maker without a bind: its sessions are admitted on the engines
#: they reach as they reach them, :mod:`._lazy_admission`): as many threads as anyio's own
#: default limiter allows.
UNBOUNDED_POOL_TOKENS = 40

_order = count()

#: Every capacity alive: those of engines and those of makers without a known engine.
_live: weakref.WeakSet[Capacity] = weakref.WeakSet()

#: Every gate alive (the fork hook renews their limiters).
_gates: weakref.WeakSet[Gate] = weakref.WeakSet()


class Capacity:
    """How many sessions may hold a connection of one engine at once, for everything on it."""

    __slots__ = ("__weakref__", "limiter", "name", "order", "pools")

    def __init__(self, tokens: int, name: str) -> None:
        self.limiter = anyio.CapacityLimiter(tokens)
        #: What it is the capacity of, for messages and logs (the URL, password hidden).
        self.name = name
        #: The process-wide order in which sessions take capacities (:class:`Gate`).
        self.order = next(_order)
        #: The worker pools of the makers that use it (for :func:`~._stats.engine_stats`).
        self.pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
        _live.add(self)  # the fork hook renews its limiter in a child

    def __repr__(self) -> str:
        limiter = self.limiter
        return f"<Capacity {self.name}: {limiter.borrowed_tokens}/{limiter.total_tokens:g}>"


#: The capacity of each engine (its root engine: see :func:`_root`) or Connection bind.
_capacities: weakref.WeakKeyDictionary[Engine | Connection, Capacity] = weakref.WeakKeyDictionary()


def _root(bind: Engine | Connection) -> Engine | Connection:
    """The engine whose pool ``bind`` uses: ``execution_options()`` engines proxy their parent."""
    while isinstance(bind, Engine) and isinstance(getattr(bind, "_proxied", None), Engine):
        bind = bind._proxied  # type: ignore[attr-defined]  # OptionEngine (2.0 and 2.1)
    return bind


def find_capacity(bind: Engine | Connection) -> Capacity | None:
    """The capacity of ``bind``'s engine if anything made it yet (no side effect)."""
    return _capacities.get(_root(bind))


def capacity_for(bind: Engine | Connection) -> Capacity:
    """The one capacity of ``bind``'s engine, sized from its pool when first asked for."""
    root = _root(bind)
    capacity = _capacities.get(root)
    if capacity is None:
        tokens = pool_capacity(root)
        if tokens is None or tokens == math.inf:
            tokens = UNBOUNDED_POOL_TOKENS
        engine = root.engine if isinstance(root, Connection) else root
        name = engine.url.render_as_string(hide_password=True)
        if isinstance(root, Connection):
            name = f"a Connection of {name}"
        capacity = _capacities[root] = Capacity(int(tokens), name)
    return capacity


class Gate:
    """What a maker's session takes to be admitted: its cap, then each engine's capacity.

    :attr:`limiters` is read at each admission (a forked child renews it); a ticket keeps the
    limiters it took, so it gives back exactly those.
    """

    __slots__ = (
        "__weakref__",
        "cap",
        "capacities",
        "limiters",
        "log_threshold",
        "own_cap",
        "owner",
    )

    def __init__(
        self,
        cap: anyio.CapacityLimiter | None,
        capacities: tuple[Capacity, ...],
        *,
        own_cap: bool = False,
        log_threshold: float | None,
        owner: object,
    ) -> None:
        #: The maker's own limit (``limiter=``) within the capacities, if it has one.
        self.cap = cap
        #: Whether the cap was made here (``limiter=N``): a forked child renews it then.
        self.own_cap = own_cap
        #: The capacities of the maker's engines, in the process-wide order.
        self.capacities = capacities
        #: Seconds of admission wait above which the wait is logged; ``None``: never.
        self.log_threshold = log_threshold
        #: Whose sessions these are (the maker's weak reference), for the maker's stats.
        self.owner = owner
        #: The limiters to take, in order: the cap first, then the capacities.
        self.limiters: tuple[anyio.CapacityLimiter, ...] = ()
        self.renew()
        _gates.add(self)

    def renew(self) -> None:
        """Read the capacities' limiters again (a forked child replaced them)."""
        limiters = tuple(c.limiter for c in self.capacities)
        self.limiters = limiters if self.cap is None else (self.cap, *limiters)

    def rebound(self, binds: list[Engine | Connection]) -> Gate:
        """The same maker's gate for a session given binds of its own (``maker(bind=...)``)."""
        capacities = _capacities_of(binds) or self.capacities
        if capacities == self.capacities:
            return self
        return self.copy(capacities, self.log_threshold)

    def copy(self, capacities: tuple[Capacity, ...], log_threshold: float | None) -> Gate:
        """A gate with the same cap (and its tokens) and owner, for these capacities."""
        return Gate(
            self.cap,
            capacities,
            own_cap=self.own_cap,
            log_threshold=log_threshold,
            owner=self.owner,
        )

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The limiter that bounds the maker's sessions: its cap, else the smallest capacity."""
        if self.cap is not None:
            return self.cap
        return min((c.limiter for c in self.capacities), key=lambda lim: lim.total_tokens)

    def describe(self, limiter: anyio.CapacityLimiter) -> str:
        """What ``limiter`` is, for messages: the maker's cap or an engine's capacity."""
        for capacity in self.capacities:
            if capacity.limiter is limiter:
                return f"the {limiter.total_tokens:g}-session capacity of {capacity.name}"
        return f"the maker's limiter={limiter.total_tokens:g}"


def make_gate(
    binds: list[Engine | Connection],
    limiter: Any,
    *,
    log_threshold: float | None,
    owner: object,
) -> Gate:
    """The gate of a maker whose sessions use ``binds`` and which was given ``limiter=``.

    Without binds (sessions given theirs later, a routing ``get_bind``) the engines are not
    known: the maker's sessions then share a capacity of :data:`UNBOUNDED_POOL_TOKENS` of
    the maker's own, as before capacities were per engine. Raises
    :class:`ConfigurationError` for a ``limiter=`` that cannot work.
    """
    if log_threshold is not None and (
        isinstance(log_threshold, bool)
        or not isinstance(log_threshold, (int, float))
        or log_threshold < 0
    ):
        raise ConfigurationError(
            "admission_log_threshold must be a number of seconds (0 logs every wait), 'auto' "
            f"or None (never log), not {log_threshold!r}."
        )
    capacities = _capacities_of(binds)
    if not capacities:
        capacities = (Capacity(UNBOUNDED_POOL_TOKENS, "a maker without a bind"),)
    cap = None if limiter is None else _check_cap(limiter, binds, capacities)
    return Gate(
        cap,
        capacities,
        own_cap=cap is not None and cap is not limiter,
        log_threshold=log_threshold,
        owner=owner,
    )


def _capacities_of(binds: list[Engine | Connection]) -> tuple[Capacity, ...]:
    """The capacities of ``binds``' engines, each once, in the process-wide order."""
    unique = {id(c): c for c in map(capacity_for, binds)}
    return tuple(sorted(unique.values(), key=_order_of))


def _order_of(capacity: Capacity) -> int:
    return capacity.order


def _check_cap(
    limiter: Any, binds: list[Engine | Connection], capacities: tuple[Capacity, ...]
) -> anyio.CapacityLimiter | None:
    if isinstance(limiter, bool) or not isinstance(limiter, (int, anyio.CapacityLimiter)):
        raise ConfigurationError(
            f"limiter must be an int or an anyio.CapacityLimiter, not {type(limiter).__name__}."
        )
    if any(limiter is c.limiter for c in capacities):
        return None  # an engine's own capacity (another maker's ``.limiter``): no extra cap
    tokens = limiter if isinstance(limiter, int) else limiter.total_tokens
    if tokens < 1:
        raise ConfigurationError(f"limiter must allow at least 1 session, not {tokens}.")
    sizes = [c for c in map(pool_capacity, binds) if c is not None]
    capacity = min(sizes) if sizes else None
    if capacity is not None and tokens > capacity:
        raise ConfigurationError(
            f"limiter={tokens:g} is larger than the connection pool ({capacity:g} connections: "
            "pool_size + max_overflow). limiter= caps this maker's share of the engine's "
            "capacity, which follows the pool: sessions admitted beyond the pool would block "
            "worker threads in pool checkout. Omit limiter= (or pass limiter=None to "
            "configure()) to use the whole pool, or grow the pool "
            "(create_engine(..., pool_size=N, max_overflow=M))."
        )
    return limiter if isinstance(limiter, anyio.CapacityLimiter) else anyio.CapacityLimiter(tokens)


def _after_fork_in_child() -> None:
    """A forked child: every capacity (and every cap a maker made) gets a fresh limiter.

    The parent's tokens were borrowed by tasks that do not exist in the child, tasks of loops
    it does not run may be queued in it, and anyio binds a limiter to the first event loop
    library that uses it while the child may run another.
    """
    for capacity in list(_live):
        capacity.limiter = anyio.CapacityLimiter(capacity.limiter.total_tokens)
    for gate in list(_gates):
        if gate.own_cap and gate.cap is not None:
            gate.cap = anyio.CapacityLimiter(gate.cap.total_tokens)
        gate.renew()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
