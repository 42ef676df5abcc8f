"""Small helpers shared by the tests: counting rows from outside, slow statements."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, func, select, text
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
    # by sqlite3's interrupt() or runs to its (large) end.
    rows = int(seconds * 3_000_000)
    return text(
        f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) "
        "SELECT count(*) FROM c"
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
