#!/usr/bin/env python
"""Soak test (issue 4): minutes of mixed load with random cancellations and one server restart.

Not a unit test. Run ``python bench/soak.py --minutes 3`` (PostgreSQL),
``python bench/soak.py --minutes 3 --server mysql`` (MariaDB) or ``--server sqlite`` (a file in
a temporary directory, no restart). By default it starts a throwaway server of its own
(``tests/servers.py``: a temporary data directory, a free port) and restarts it once, half-way
through; ``--url`` points it at an existing database instead, which it never restarts. The
shared test servers are never touched unless ``--url`` names them.

Many tasks (more than the pool has connections, so admission is contended) run, at random:

- ``commit``: insert a transaction's two rows, ``commit()``; acknowledged -> must be present;
- ``rollback``: insert two rows, then raise -> must be absent;
- ``cancel``: insert two rows, then a slow statement under ``move_on_after(<short>)`` -> must be
  absent; the time from the deadline to the scope's exit is the cancel latency;
- ``commit_timeout``: insert two rows, then ``commit()`` under ``fail_after(<0-20 ms>)`` -> if
  the timeout fired the outcome is unknown, but must be all or nothing;
- ``read`` and ``read_timeout`` (a slow read under ``fail_after``): no writes.

Any other error (the restart) fails that transaction: absent if it happened before ``commit()``,
unknown (all or nothing) if during it. When the load stops, the leak checks that need
the event loop run on it (nothing checked out, no capacity held, no admitted session, no thread
inside SQLAlchemy's own package), then ``shutdown(maker, dispose=False)``, as an application
ends; after it no worker thread of the library may be left. Then the integrity check over every
tag, the database's side (no idle-in-transaction or active backend; SQLite: the file is not
locked), no warning about a garbage-collected connection, and the figures, as text and
(``--json``) as JSON. Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import os
import random
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import sqlalchemy
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError, PendingRollbackError, SAWarning
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import ThrowawayServer, start_server
from sqlalchemy_threadpool import (
    TransactionInterruptedError,
    shutdown,
    threadpool_session,
    threadpool_sessionmaker,
)
from sqlalchemy_threadpool._admission import admitted_offloaders

#: Where SQLAlchemy's own modules live: a thread with a frame under it is inside SQLAlchemy.
#: (A plain "sqlalchemy" substring would also match this library's ``sqlalchemy_threadpool``.)
SQLALCHEMY_DIR = os.path.dirname(sqlalchemy.__file__) + os.sep

#: The name prefix of the library's dedicated worker threads (``_call.Worker``).
WORKER_THREAD_PREFIX = "sqlalchemy-threadpool-worker-"

OPS = {  # name: weight
    "commit": 35,
    "rollback": 10,
    "cancel": 15,
    "commit_timeout": 10,
    "read": 20,
    "read_timeout": 10,
}


class Abort(Exception):
    """Raised on purpose to roll a transaction back."""


class WarningCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages[record.getMessage().split(":")[0][:90]] += 1


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, server: ThrowawayServer | None):
        self.args = args
        self.url = url
        self.server = server
        self.rng = random.Random(args.seed)
        self.engine = create_engine(
            url, pool_size=args.pool, max_overflow=0, pool_pre_ping=args.pre_ping
        )
        self.maker = threadpool_sessionmaker(self.engine, cleanup_timeout=args.cleanup_timeout)
        self.dialect = self.engine.dialect.name
        self.committed: set[str] = set()
        self.rolled_back: set[str] = set()
        self.unknown: set[str] = set()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.cancel_latency: list[float] = []
        self.timeout_latency: list[float] = []
        self.op_latency: list[float] = []
        self.restart: dict[str, Any] = {}
        self.stop_at = 0.0
        self.first_error_time: float | None = None
        self.last_error_time: float | None = None
        self.restart_began = 0.0
        self.samples: list[dict[str, Any]] = []
        self.in_process: dict[str, int] = {}  # the leak checks taken on the loop, at the end

    # -- workload -------------------------------------------------------------------------

    def slow(self, seconds: float) -> Any:
        if self.dialect == "postgresql":
            return text(f"SELECT pg_sleep({seconds})")
        if self.dialect == "sqlite":  # long enough, stopped by sqlite3's interrupt()
            rows = int(seconds * 3_000_000)
            return text(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
                f"WHERE x < {rows}) SELECT count(*) FROM c"
            )
        return text(f"SELECT SLEEP({seconds})")

    async def write(self, sess: Any, tag: str) -> None:
        for part in (0, 1):
            await sess.execute(
                text("INSERT INTO soak (tag, part) VALUES (:tag, :part)"),
                {"tag": tag, "part": part},
            )
            if self.rng.random() < 0.3:
                await anyio.sleep(self.rng.uniform(0, 0.01))  # hold the transaction a little

    async def one(self, op: str) -> None:
        tag = uuid.uuid4().hex
        phase = "body"
        begun = anyio.current_time()
        try:
            if op == "commit":
                async with threadpool_session(self.maker) as sess:
                    await self.write(sess, tag)
                    phase = "commit"
                    await sess.commit()
                self.committed.add(tag)
            elif op == "rollback":
                try:
                    async with threadpool_session(self.maker) as sess:
                        await self.write(sess, tag)
                        raise Abort
                except Abort:
                    self.rolled_back.add(tag)
            elif op == "cancel":
                deadline = self.rng.uniform(0.02, 0.4)
                with anyio.move_on_after(deadline) as scope:
                    async with threadpool_session(self.maker) as sess:
                        await self.write(sess, tag)
                        await sess.execute(self.slow(2))
                        phase = "commit"  # not reached: 2 s is longer than the deadline
                if scope.cancelled_caught:
                    self.rolled_back.add(tag)
                    self.cancel_latency.append(anyio.current_time() - scope.deadline)
                else:  # pragma: no cover - the statement outlives the deadline
                    self.committed.add(tag)
            elif op == "commit_timeout":
                try:
                    async with threadpool_session(self.maker) as sess:
                        await self.write(sess, tag)
                        phase = "commit"
                        with anyio.fail_after(self.rng.uniform(0, 0.02)):
                            await sess.commit()
                except TimeoutError:  # the scope rolled back whatever was left
                    self.unknown.add(tag)
                    self.outcomes["commit_timeout:timed_out"] += 1
                    return
                self.committed.add(tag)
            elif op == "read":
                async with threadpool_session(self.maker) as sess:
                    await sess.scalar(text("SELECT count(*) FROM soak"))
                    await sess.execute(text("SELECT tag, part FROM soak LIMIT 20"))
            elif op == "read_timeout":
                limit = self.rng.uniform(0.02, 0.3)
                try:
                    with anyio.fail_after(limit) as scope:
                        async with threadpool_session(self.maker) as sess:
                            await sess.execute(self.slow(2))
                except TimeoutError:
                    self.timeout_latency.append(anyio.current_time() - scope.deadline)
            self.outcomes[f"{op}:ok"] += 1
            self.op_latency.append(anyio.current_time() - begun)
        except Exception as exc:
            name = type(exc).__name__
            orig = getattr(exc, "orig", None)
            if orig is not None:
                name += f"({type(orig).__module__}.{type(orig).__name__})"
            self.errors[name] += 1
            self.outcomes[f"{op}:error"] += 1
            now = time.monotonic()
            self.first_error_time = self.first_error_time or now
            self.last_error_time = now
            back = self.restart.get("back_at")
            # not explained by the restart: before it began, or 5 s after the server was back
            late = not self.restart_began or (back is not None and now - back > 5)
            if (late or not isinstance(exc, OperationalError)) and len(self.samples) < 8:
                line = str(exc).splitlines()[0][:160] if str(exc) else ""
                when = round(now - self.restart_began, 2) if self.restart_began else None
                self.samples.append(
                    {"op": op, "phase": phase, "s_after_restart": when, "error": f"{name}: {line}"}
                )
                if not isinstance(exc, OperationalError):
                    trace = "".join(traceback.format_exception(exc))
                    self.samples[-1]["traceback"] = trace[-3000:]
            if isinstance(exc, PendingRollbackError | TransactionInterruptedError):
                self.errors["UNEXPECTED " + type(exc).__name__] += 1
            if op in ("commit", "rollback", "cancel", "commit_timeout"):
                (self.unknown if phase == "commit" else self.rolled_back).add(tag)

    async def worker(self) -> None:
        names, weights = list(OPS), list(OPS.values())
        while time.monotonic() < self.stop_at:
            errors = sum(self.errors.values())
            await self.one(self.rng.choices(names, weights)[0])
            if sum(self.errors.values()) > errors:
                await anyio.sleep(0.05)  # a client backs off a little after an error

    async def restarter(self, at: float) -> None:
        await anyio.sleep(at)
        assert self.server is not None
        t0 = self.restart_began = time.monotonic()
        await anyio.to_thread.run_sync(self.server.stop)
        t1 = time.monotonic()
        await anyio.sleep(self.args.down)
        await anyio.to_thread.run_sync(self.server.start)
        t2 = time.monotonic()
        self.restart["back_at"] = t2
        self.restart |= {
            "at_s": round(at, 1),
            "stop_s": round(t1 - t0, 2),
            "down_s": round(t2 - t0, 2),
        }
        # Recovery: the first successful commit after the server is back.
        while time.monotonic() < self.stop_at:
            try:
                async with threadpool_session(self.maker) as sess:
                    await sess.execute(
                        text("INSERT INTO soak (tag, part) VALUES (:tag, 0), (:tag, 1)"),
                        {"tag": (tag := uuid.uuid4().hex)},
                    )
                self.committed.add(tag)
                self.restart["first_commit_after_start_s"] = round(time.monotonic() - t2, 3)
                return
            except Exception:
                await anyio.sleep(0.05)

    async def run(self) -> None:
        self.stop_at = time.monotonic() + self.args.minutes * 60
        async with anyio.create_task_group() as group:
            for _ in range(self.args.tasks):
                group.start_soon(self.worker)
            if self.server is not None:
                group.start_soon(self.restarter, self.args.minutes * 60 / 2)
        # Before shutdown(), which would roll back (and so hide) a session left admitted.
        self.in_process = self.in_process_leaks()
        await shutdown(self.maker, dispose=False)

    # -- checks ---------------------------------------------------------------------------

    def integrity(self) -> dict[str, Any]:
        admin = create_engine(self.url, poolclass=NullPool)
        with admin.connect() as conn:
            counts: dict[str, int] = dict(
                conn.execute(text("SELECT tag, count(*) FROM soak GROUP BY tag")).tuples().all()
            )
        admin.dispose()
        missing = [t for t in self.committed if counts.get(t) != 2]
        present = [t for t in self.rolled_back if t in counts]
        torn = [t for t, n in counts.items() if n != 2]
        known = self.committed | self.rolled_back | self.unknown
        phantom = [t for t in counts if t not in known]
        return {
            "acknowledged_commits": len(self.committed),
            "rolled_back": len(self.rolled_back),
            "unknown_outcome": len(self.unknown),
            "unknown_that_committed": sum(1 for t in self.unknown if t in counts),
            "acknowledged_commit_missing": len(missing),
            "rolled_back_present": len(present),
            "torn_transactions": len(torn),
            "phantom_tags": len(phantom),
            "ok": not (missing or present or torn or phantom),
        }

    def in_process_leaks(self) -> dict[str, int]:
        """What the process still holds once the load has stopped (on the loop, no IO)."""
        gc.collect()
        inside = 0
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue
            stack: FrameType | None = frame
            while stack is not None:
                if stack.f_code.co_filename.startswith(SQLALCHEMY_DIR):
                    inside += 1
                    break
                stack = stack.f_back
        return {
            "checked_out": self.engine.pool.checkedout(),  # type: ignore[attr-defined]
            "borrowed_tokens": int(self.maker.limiter.borrowed_tokens),
            "admitted_sessions": len(admitted_offloaders(self.engine)),
            "threads_inside_sqlalchemy": inside,
        }

    def leaks(self) -> dict[str, Any]:
        """After ``shutdown()``: the library's threads are gone, the database is quiet."""
        workers = [t for t in threading.enumerate() if t.name.startswith(WORKER_THREAD_PREFIX)]
        for thread in workers:  # shutdown() told the idle ones to exit: give them a moment
            thread.join(timeout=5)
        left = sum(1 for thread in workers if thread.is_alive())
        if self.dialect == "sqlite":
            return self.result(left, *self.sqlite_locked())
        admin = create_engine(self.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            if self.dialect == "postgresql":
                rows = conn.execute(
                    text(
                        "SELECT state, count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND pid <> pg_backend_pid() GROUP BY state"
                    )
                ).all()
                states = {str(s): int(n) for s, n in rows}
                idle_in_tx = sum(n for s, n in states.items() if s.startswith("idle in trans"))
                active = states.get("active", 0)
            else:
                idle_in_tx = int(
                    conn.scalar(
                        text(
                            "SELECT count(*) FROM information_schema.innodb_trx t JOIN "
                            "information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
                            "WHERE p.db = DATABASE() AND p.id <> CONNECTION_ID()"
                        )
                    )
                    or 0
                )
                active = int(
                    conn.scalar(
                        text(
                            "SELECT count(*) FROM information_schema.processlist WHERE "
                            "db = DATABASE() AND id <> CONNECTION_ID() AND command = 'Query'"
                        )
                    )
                    or 0
                )
        admin.dispose()
        return self.result(left, idle_in_tx, active)

    def sqlite_locked(self) -> tuple[int, int]:
        """SQLite has no process list: a writer's lock or a reader still running shows as 1."""
        raw = sqlite3.connect(self.engine.url.database or "", timeout=0, isolation_level=None)
        try:
            raw.execute("BEGIN EXCLUSIVE")
            raw.execute("ROLLBACK")
        except sqlite3.OperationalError:
            return 1, 1
        finally:
            raw.close()
        return 0, 0

    def result(self, workers_left: int, idle_in_tx: int, active: int) -> dict[str, Any]:
        result: dict[str, Any] = {
            **self.in_process,
            "worker_threads_after_shutdown": workers_left,
            "idle_in_transaction": idle_in_tx,
            "active_statements": active,
        }
        result["ok"] = not any(result.values())
        return result


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {
        "n": len(values),
        "p50_ms": at(0.5),
        "p95_ms": at(0.95),
        "p99_ms": at(0.99),
        "max_ms": round(max(values) * 1000, 1),
        "mean_ms": round(statistics.fmean(values) * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument(
        "--server",
        choices=["postgresql", "mysql", "sqlite"],
        default="postgresql",
        help="sqlite: a database file in a temporary directory (nothing to restart)",
    )
    parser.add_argument("--url", help="an existing database (not restarted) instead")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--down", type=float, default=2.0, help="seconds the server is down")
    parser.add_argument("--no-pre-ping", dest="pre_ping", action="store_false")
    parser.add_argument("--cleanup-timeout", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    counter = WarningCounter()
    logging.getLogger("sqlalchemy_threadpool").addHandler(counter)
    unraisable: list[str] = []
    sys.unraisablehook = lambda u: unraisable.append(repr(u.exc_value))
    server = None
    scratch = None
    if args.url:
        url = args.url
    elif args.server == "sqlite":
        scratch = tempfile.mkdtemp(prefix="soak-")
        url = f"sqlite:///{scratch}/soak.db"
    else:
        started = time.monotonic()
        server = start_server(args.server)
        url = server.url
        took = time.monotonic() - started
        print(f"throwaway {args.server} on port {server.port}, started in {took:.1f} s")
    try:
        setup = create_engine(url, poolclass=NullPool)
        with setup.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS soak"))
            conn.execute(
                text("CREATE TABLE soak (tag VARCHAR(40), part INT, PRIMARY KEY (tag, part))")
            )
        setup.dispose()
        soak = Soak(args, url, server)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            began = time.monotonic()
            anyio.run(soak.run, backend=args.backend)
            elapsed = time.monotonic() - began
            integrity = soak.integrity()
            leaks = soak.leaks()
            gc.collect()
        sa_warnings = [str(w.message) for w in caught if issubclass(w.category, SAWarning)]
        total_ops = sum(soak.outcomes.values())
        figures = {
            "database": soak.dialect,
            "url": url if args.url else f"throwaway {args.server}",
            "threads_at_end": threading.active_count(),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "backend": args.backend,
            "tasks": args.tasks,
            "pool": args.pool,
            "pre_ping": args.pre_ping,
            "seconds": round(elapsed, 1),
            "operations": total_ops,
            "ops_per_s": round(total_ops / elapsed, 1),
            "outcomes": dict(sorted(soak.outcomes.items())),
            "errors": dict(soak.errors),
            "cancel_latency": percentiles(soak.cancel_latency),
            "timeout_latency": percentiles(soak.timeout_latency),
            "op_latency": percentiles(soak.op_latency),
            "restart": {k: v for k, v in soak.restart.items() if k != "back_at"},
            "error_samples": soak.samples,
            "errors_from_s_to_s_after_restart_began": [
                round(t - soak.restart_began, 2) if t and soak.restart_began else None
                for t in (soak.first_error_time, soak.last_error_time)
            ],
            "library_warnings": dict(counter.messages),
            "sa_warnings": len(sa_warnings),
            "unraisable": len(unraisable),
            "integrity": integrity,
            "leaks": leaks,
        }
        unexpected = sum(n for k, n in soak.errors.items() if k.startswith("UNEXPECTED"))
        figures["ok"] = (
            bool(integrity["ok"] and leaks["ok"] and not sa_warnings and not unraisable)
            and not unexpected
        )
        print(json.dumps(figures, indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        soak.engine.dispose()
        return 0 if figures["ok"] else 1
    finally:
        if server is not None:
            server.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
