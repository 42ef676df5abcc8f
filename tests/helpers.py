"""Small helpers shared by the tests: counting rows from outside, slow statements."""

from __future__ import annotations

import gc
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import anyio
import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import SAWarning
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool
from sqlalchemy.sql.elements import TextClause

from models import User


def user_names(engine: Engine) -> set[str]:
    """The user names committed in the database, read through a separate connection."""
    with Session(engine) as session:
        return set(session.scalars(select(User.name)))


def user_count(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(User)) or 0


def slow_statement(dialect: str, seconds: float) -> TextClause:
    """A statement that keeps the server busy for about ``seconds``."""
    if dialect == "postgresql":
        return text(f"SELECT pg_sleep({seconds})")
    if dialect == "mysql":
        return text(f"SELECT SLEEP({seconds})")
    # SQLite: a recursive CTE long enough to take far more than ``seconds``; it is stopped
    # by sqlite3's interrupt() or runs to its (large) end. Reading sqlite_master makes it
    # hold a read lock on the file while it runs, as a real query would, so that
    # ``busy_backends`` can see it.
    rows = int(seconds * 3_000_000)
    return text(
        f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) "
        "SELECT count(*) FROM c WHERE x > (SELECT count(*) FROM sqlite_master)"
    )


class Overlap:
    """Counts how many worker calls are inside a critical section at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.calls = 0

    @contextmanager
    def inside(self) -> Iterator[None]:
        with self._lock:
            self.active += 1
            self.calls += 1
            self.peak = max(self.peak, self.active)
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1


def checked_out(engine: Engine) -> int:
    """How many connections of the engine's pool are checked out right now."""
    pool = engine.pool
    assert isinstance(pool, QueuePool), f"the tests expect a QueuePool, got {pool!r}"
    return pool.checkedout()


# -- what the server is doing, seen from another connection (cancellation and leak checks) --


def busy_backends(observer: Engine) -> list[str]:
    """Other connections to the test database that run a statement or hold a transaction.

    Read through ``observer`` (an engine other than the one under test). PostgreSQL: every
    backend of the database that is not ``idle`` (running, or idle in a transaction); MariaDB:
    every connection of the database running a command, or holding an InnoDB transaction;
    SQLite: the file is locked against a writer (a statement still reads, or a transaction
    still writes).
    """
    dialect = observer.dialect.name
    if dialect == "sqlite":
        raw = sqlite3.connect(observer.url.database or "", timeout=0, isolation_level=None)
        try:
            raw.execute("BEGIN EXCLUSIVE")
            raw.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            return [f"sqlite: {exc}"]
        finally:
            raw.close()
        return []
    if dialect == "postgresql":
        query = text(
            "SELECT pid, state, query FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state IS DISTINCT FROM 'idle'"
        )
        with observer.connect() as conn:
            return [" | ".join(str(v) for v in row) for row in conn.execute(query)]
    running = text(
        "SELECT id, command, info FROM information_schema.processlist "
        "WHERE db = DATABASE() AND id <> CONNECTION_ID() AND command <> 'Sleep'"
    )
    in_transaction = text(
        "SELECT p.id, 'in transaction', t.trx_query FROM information_schema.innodb_trx t "
        "JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
        "WHERE p.db = DATABASE() AND p.id <> CONNECTION_ID()"
    )
    with observer.connect() as conn:
        rows = list(conn.execute(running))
        transactions = list(conn.execute(in_transaction))
        if transactions:  # InnoDB caches this table for 0.1 s: make sure it is not stale
            time.sleep(0.11)
            transactions = list(conn.execute(in_transaction))
    return [" | ".join(str(v) for v in row) for row in rows + transactions]


async def wait_until_running(
    observer: Engine, started: threading.Event, statement: str = "sleep"
) -> None:
    """Wait until a worker has started its slow statement and the server is running it.

    On a server, "running it" means a busy connection whose query contains ``statement`` (or
    ``benchmark``), case-insensitively.
    """
    assert await anyio.to_thread.run_sync(started.wait, 10), "the worker never started"
    if observer.dialect.name == "sqlite":
        await anyio.sleep(0.05)  # no process list: give the statement time to start
        return
    for _ in range(1000):
        rows = busy_backends(observer)
        if any(statement in row.lower() or "benchmark" in row.lower() for row in rows):
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"no {statement!r} statement ever ran on the server")


async def cancel_once_running(
    work: Callable[[], Awaitable[object]],
    observer: Engine,
    started: threading.Event,
    statement: str = "sleep",
) -> anyio.CancelScope:
    """Await ``work()`` in a cancel scope that is cancelled once its slow statement runs on the
    server (:func:`wait_until_running`); return the scope (``cancelled_caught`` says whether
    the cancellation ended it)."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:

            async def cancel_when_running() -> None:
                await wait_until_running(observer, started, statement)
                scope.cancel()

            group.start_soon(cancel_when_running)
            await work()
    return scope


def assert_clean(engine: Engine, observer: Engine, checked_out_at_start: int = 0) -> None:
    """The leak checks every cancellation test ends with.

    The pool has every connection back, nothing runs or holds a transaction on the server, and
    garbage collection finds no connection that was dropped without being returned (SQLAlchemy
    would warn about it while collecting).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, SAWarning)] == []
    assert checked_out(engine) == checked_out_at_start
    assert busy_backends(observer) == []


def only_on(*databases: str) -> pytest.MarkDecorator:
    """Run a test on these databases only (those that ``SATP_TEST_DATABASES`` selects).

    For behaviour that exists on one database (BENCHMARK(), deferred triggers): the test is
    not collected elsewhere instead of being skipped, so a CI run shows no skips.
    """
    raw = os.environ.get("SATP_TEST_DATABASES", "")
    selected = [part.strip() for part in raw.split(",") if part.strip()]
    chosen = [name for name in databases if not selected or name in selected]
    return pytest.mark.parametrize("db_url", chosen, indirect=True)
