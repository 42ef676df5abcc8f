"""What a maker's bind implies: its engine, its pool's capacity and timeout, and whether threads
can share its database.

A :class:`~._maker.threadpool_sessionmaker` derives its configuration from the engines it is
bound to (invariant 6: the thread pool never outgrows the connection pool); these functions read
that from an ``Engine`` or ``Connection`` and change nothing, except :func:`unwrap_binds`, which
replaces a :class:`~sqlalchemy_threadpool.ThreadpoolEngine` facade by its sync engine (the one
place that does). In-memory SQLite and DuckDB databases that every thread would see empty are
refused here with the fix.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import (
    AssertionPool,
    NullPool,
    Pool,
    QueuePool,
    SingletonThreadPool,
    StaticPool,
)

from ._exceptions import ConfigurationError

__all__ = [
    "binds_of",
    "check_memory_database",
    "engine_of",
    "pool_capacity",
    "pool_timeout",
    "unwrap_binds",
]


def engine_of(bind: Engine | Connection | None) -> Engine | None:
    """The engine behind a maker's ``bind``."""
    if isinstance(bind, Connection):
        return bind.engine
    return bind


def pool_capacity(bind: Engine | Connection | None) -> float | None:
    """How many connections the bind can hand out at once (``math.inf``: no bound)."""
    if isinstance(bind, Connection):
        return 1
    if bind is None:
        return None
    pool: Pool = bind.pool
    if isinstance(pool, QueuePool):
        overflow = pool._max_overflow
        return math.inf if overflow < 0 else pool.size() + overflow
    if isinstance(pool, (StaticPool, AssertionPool)):
        return 1
    if isinstance(pool, SingletonThreadPool):
        return pool.size
    if isinstance(pool, NullPool):
        return math.inf
    return None


def pool_timeout(bind: Engine | Connection | None) -> float:
    """How long a checkout from the bind's pool waits (``admission_timeout="pool"``)."""
    engine = engine_of(bind)
    if engine is not None and isinstance(engine.pool, QueuePool):
        return engine.pool.timeout()
    return 30.0


def check_memory_database(bind: Engine | Connection | None) -> None:
    """Refuse an in-memory SQLite or DuckDB bind whose threads would each see an empty one."""
    engine = engine_of(bind)
    if engine is not None and engine.dialect.name == "duckdb":
        _check_duckdb_memory(engine)
    if engine is None or engine.dialect.name != "sqlite":
        return
    url = engine.url
    in_memory = url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    if in_memory and isinstance(engine.pool, SingletonThreadPool):
        raise ConfigurationError(
            "This SQLite engine is in memory with SingletonThreadPool, which gives every "
            "thread its own empty database: tables created in one worker thread would be "
            "missing in the next. Share one connection across threads instead: "
            "create_threadpool_engine('sqlite://') does it for you, or\n"
            "    create_engine('sqlite://', poolclass=StaticPool, "
            "connect_args={'check_same_thread': False})\n"
            "(from sqlalchemy.pool import StaticPool), or use a file database."
        )


def _check_duckdb_memory(engine: Engine) -> None:
    """``duckdb://`` and ``duckdb:///:memory:`` give each connection its own private database."""
    if engine.url.database not in (None, "", ":memory:"):
        return  # a file, or a named in-memory database (":memory:NAME") shared by connections
    if isinstance(engine.pool, (StaticPool, AssertionPool)):
        return
    raise ConfigurationError(
        f"This DuckDB engine is in memory with {type(engine.pool).__name__}, which gives every "
        "connection (and so every worker thread) its own empty database: tables created in one "
        "session would be missing in the next. Use a named in-memory database, which all "
        "connections of the process share:\n"
        "    create_engine('duckdb:///:memory:app')\n"
        "or one shared connection, create_engine('duckdb:///:memory:', poolclass=StaticPool), "
        "or a database file."
    )


def binds_of(kw: dict[str, Any]) -> list[Engine | Connection]:
    """The binds a session made with these sessionmaker arguments may use."""
    bind = kw.get("bind")
    return [b for b in (bind, *(kw.get("binds") or {}).values()) if b is not None]


def unwrap_binds(kw: dict[str, Any]) -> dict[str, Any]:
    """A :class:`ThreadpoolEngine` given as ``bind=`` or in ``binds=`` means its sync engine.

    The one place the engine facade is unwrapped; changes ``kw`` in place and returns it.
    """
    if "bind" not in kw and not kw.get("binds"):
        return kw
    from ._engine import ThreadpoolEngine  # (it imports the maker, which imports this module)

    def sync(bind: Any) -> Any:
        return bind.sync_engine if isinstance(bind, ThreadpoolEngine) else bind

    if "bind" in kw:
        kw["bind"] = sync(kw["bind"])
    if kw.get("binds"):
        kw["binds"] = {key: sync(value) for key, value in kw["binds"].items()}
    return kw
