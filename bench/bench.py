#!/usr/bin/env python
"""Benchmarks for sqlalchemy-threadpool (issue 5): our sessions against the other ways to use SQL.

Run ``python bench/bench.py --help``; ``bench/README.md`` describes the workloads and variants.

How a run is organised:

- For each (database, event-loop backend) the parent process starts one worker process per
  variant (``multiprocessing``, spawn). A worker builds its engine once and then waits for jobs
  on a pipe, so each variant has its own process, its own connection pool and its own peak
  RSS, and one variant's threads never compete with another's.
- The parent sends the jobs one at a time, so only one worker is busy at any moment, and
  interleaves them: for each repeat, for each workload, every variant in turn (the order
  rotates from repeat to repeat). Drift of the shared 2-core machine then hits all variants
  alike, and ratios are taken per repeat (paired) before the median.
- Before each write-heavy job (W2/W3, W4) the parent deletes the rows earlier jobs wrote, so
  every job sees the same tables. Timing happens inside the worker, after a warm-up.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import functools
import inspect
import itertools
import json
import math
import multiprocessing
import os
import queue
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
from sqlalchemy import ForeignKey, String, create_engine, delete, func, insert, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

# -- configuration -------------------------------------------------------------------------

DATABASES = ("sqlite", "postgresql", "mysql")
BACKENDS = ("asyncio", "trio")
#: W0-W4 as issue 5 defines them; M: memory and threads with 1,000 concurrent scopes (issue 5);
#: G: guard on vs off (bench/guard_cost.py, issue 3).
WORKLOADS = ("W0", "W1", "W2", "W3", "W4", "M", "G")

DEFAULT_URLS = {
    "postgresql": "postgresql+psycopg2://postgres@127.0.0.1:5432/test",
    "mysql": "mysql+pymysql://root@127.0.0.1:3306/test",
}
URL_ENV_VARS = {
    "sqlite": "SATP_BENCH_SQLITE_URL",
    "postgresql": "SATP_BENCH_POSTGRESQL_URL",
    "mysql": "SATP_BENCH_MYSQL_URL",
}
#: The driver the ``asyncsession`` variant swaps in for each database.
ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "mysql": "mysql+aiomysql",
}

POOL_SIZE = 10
SEED_USERS = 5_000
SEED_POSTS_PER_USER = 3
W4_BATCHES = 50
TICK_S = 0.001
#: Threads for ``asyncio_to_thread``: the default executor's min(32, cpu + 4) = 6 threads on
#: 2 cores deadlocks W2 (tasks holding the 10 connections wait for a thread while all 6 threads
#: wait in pool checkout), so it gets as many as anyio's default limiter: 40.
ASYNCIO_TO_THREAD_WORKERS = 40
#: Threads of the by-hand variants: anyio's default limiter, and the executor above.
BY_HAND_THREADS = 40
#: Seconds M may take before it is reported as an error (a stall, not a measurement).
MEMORY_TIMEOUT_S = 90


@dataclass(frozen=True)
class Sizes:
    """How much work one measurement does, and how many times each is repeated."""

    hop_calls: int
    point_calls: int
    requests: int
    tasks: int
    rows: int
    repeats: int
    guard_calls: int
    guard_rounds: int
    scopes: int = 1_000


FULL = Sizes(
    hop_calls=1_000,
    point_calls=300,
    requests=192,
    tasks=32,
    rows=5_000,
    repeats=6,
    guard_calls=800,
    guard_rounds=2,
    scopes=1_000,
)
QUICK = Sizes(
    hop_calls=500,
    point_calls=150,
    requests=128,
    tasks=32,
    rows=1_000,
    repeats=3,
    guard_calls=300,
    guard_rounds=2,
    scopes=300,
)


@dataclass(frozen=True)
class WorkloadInfo:
    title: str
    unit: str
    higher_is_better: bool
    baseline: str


WORKLOAD_INFO = {
    "W0": WorkloadInfo(
        "bare hop: no-op call through the offload path", "µs/call", False, "anyio_to_thread"
    ),
    "W1": WorkloadInfo(
        "one ORM point query by primary key, sequential", "µs/call", False, "raw_sync"
    ),
    "W2": WorkloadInfo(
        "concurrent tasks, pool 10: get user, select posts, insert, commit",
        "req/s",
        True,
        "raw_sync",
    ),
    "W3": WorkloadInfo(
        "event-loop lag p99 while W2 runs (1 ms ticker overshoot)", "ms", False, "anyio_to_thread"
    ),
    "W4": WorkloadInfo(
        "unit of work: insert 5,000 rows (--quick: 1,000), read back with selectinload",
        "s",
        False,
        "raw_sync",
    ),
}
# -- schema --------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "bench_user"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))


class Post(Base):
    __tablename__ = "bench_post"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("bench_user.id"), index=True)
    title: Mapped[str] = mapped_column(String(200))


class Batch(Base):
    __tablename__ = "bench_batch"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    items: Mapped[list[BatchItem]] = relationship(lazy="raise", cascade="all, delete-orphan")


class BatchItem(Base):
    __tablename__ = "bench_batch_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("bench_batch.id"), index=True)
    payload: Mapped[str] = mapped_column(String(100))


def new_batches(rows: int) -> list[Batch]:
    """``rows`` items spread over ``W4_BATCHES`` parents (plain objects, no IO)."""
    per_batch = math.ceil(rows / W4_BATCHES)
    batches = []
    for b in range(W4_BATCHES):
        count = max(0, min(per_batch, rows - b * per_batch))
        items = [BatchItem(payload=f"item {b}.{i}") for i in range(count)]
        batches.append(Batch(name=f"batch {b}", items=items))
    return batches


def readback_statement(batches: Sequence[Batch]) -> Any:
    ids = [b.id for b in batches]
    return select(Batch).where(Batch.id.in_(ids)).options(selectinload(Batch.items))


def count_items(batches: Sequence[Batch], expected: int) -> None:
    found = sum(len(b.items) for b in batches)
    if found != expected:
        raise AssertionError(f"read back {found} items, wrote {expected}")


def new_post(user: User | None, uid: int, seen: int, i: int) -> Post:
    if user is None:
        raise AssertionError(f"user {uid} not found")
    return Post(author_id=user.id, title=f"request {i}, after {seen} posts")


def noop(_session: object = None) -> None:
    return None


def request_body(sess: Session, uid: int, i: int) -> None:
    """W2's request as plain sync code, without the commit: what one-hop variants run."""
    user = sess.get(User, uid)
    posts = sess.scalars(select(Post).where(Post.author_id == uid)).all()
    sess.add(new_post(user, uid, len(posts), i))


# -- database set-up (parent process) ------------------------------------------------------


def server_url(database: str, sqlite_dir: str) -> str:
    env = os.environ.get(URL_ENV_VARS[database])
    if env:
        return env
    if database == "sqlite":
        return f"sqlite:///{os.path.join(sqlite_dir, 'bench.db')}"
    return DEFAULT_URLS[database]


def async_url(database: str, url: str) -> str:
    return make_url(url).set(drivername=ASYNC_DRIVERS[database]).render_as_string(False)


def make_sync_engine(url: str) -> Engine:
    return create_engine(url, pool_size=POOL_SIZE, max_overflow=0)


class Fixture:
    """The parent's handle on one benchmark database: schema, seed data, resets."""

    def __init__(self, database: str, url: str) -> None:
        self.database = database
        self.url = url
        self.engine = create_engine(url, pool_size=1, max_overflow=0)
        if database == "sqlite":
            # Ten writers on one SQLite file: WAL lets readers run beside the writer.
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        Base.metadata.drop_all(self.engine)
        Base.metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            conn.execute(insert(User), [{"name": f"user {i}"} for i in range(SEED_USERS)])
            ids = list(conn.scalars(select(User.id).order_by(User.id)))
            conn.execute(
                insert(Post),
                [
                    {"author_id": uid, "title": f"seed {uid}.{k}"}
                    for uid in ids
                    for k in range(SEED_POSTS_PER_USER)
                ],
            )
            self.seed_post_max: int = conn.scalar(select(func.max(Post.id))) or 0
        self.user_ids = tuple(ids)

    def reset(self, job: str) -> None:
        """Delete what earlier jobs wrote, so each job starts from the same tables."""
        with self.engine.begin() as conn:
            if job in ("W23", "M"):
                conn.execute(delete(Post).where(Post.id > self.seed_post_max))
            elif job == "W4":
                conn.execute(delete(BatchItem))
                conn.execute(delete(Batch))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            Base.metadata.drop_all(self.engine)
        self.engine.dispose()


# -- measurement helpers -------------------------------------------------------------------


class NotApplicable(Exception):
    """This variant has no meaningful number for this workload (shown as ``n/a``)."""


class Unavailable(Exception):
    """The variant cannot run at all here (missing package, wrong loop): shown as skipped."""


def p99(samples: Sequence[float]) -> float:
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class LoopProbe:
    """A ticker task: sleeps 1 ms over and over and records how late it wakes up."""

    lags: list[float] = field(default_factory=list)
    peak_threads: int = 0
    peak_rss_mib: float = 0.0
    stopped: bool = False
    elapsed: float = math.nan

    async def run(self) -> None:
        while not self.stopped:
            start = time.perf_counter()
            await anyio.sleep(TICK_S)
            self.lags.append(time.perf_counter() - start - TICK_S)
            self.peak_threads = max(self.peak_threads, threading.active_count())
            if len(self.lags) % 20 == 0:
                self.peak_rss_mib = max(self.peak_rss_mib, current_rss_mib())

    def p99_ms(self) -> float:
        return p99(self.lags) * 1e3


async def idle_lag_ms(seconds: float = 0.3) -> float:
    """The ticker's p99 on an idle loop: the floor W3 numbers sit on."""
    probe = LoopProbe()
    async with anyio.create_task_group() as tg:
        tg.start_soon(probe.run)
        await anyio.sleep(seconds)
        probe.stopped = True
    return probe.p99_ms()


def current_rss_mib() -> float:
    """Resident set size now (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


#: (wall-clock, process CPU) per unit: CPU time counts every thread of the process, and is
#: far less disturbed than wall-clock time by other processes on a shared machine.
Timing = tuple[float, float]


class Clock:
    """Times ``n`` calls. With :meth:`lap` after each call, the wall-clock figure is the
    median over chunks of ``LAP`` calls rather than the total: a burst of another process's
    work then spoils one chunk, not the measurement. CPU time is always the total.
    """

    def __init__(self) -> None:
        self.wall = self.mark = time.perf_counter()
        self.cpu = time.process_time()
        self.calls = 0
        self.chunks: list[float] = []

    def lap(self) -> None:
        self.calls += 1
        if self.calls % LAP == 0:
            now = time.perf_counter()
            self.chunks.append(now - self.mark)
            self.mark = now

    def per(self, n: int, scale: float) -> Timing:
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        if len(self.chunks) >= 3:
            return statistics.median(self.chunks) / LAP * scale, cpu / n * scale
        return wall / n * scale, cpu / n * scale


#: Calls per chunk for :meth:`Clock.lap`.
LAP = 25


def peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# -- variants ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs to build its variant."""

    database: str
    url: str
    backend: str
    variant: str
    user_ids: tuple[int, ...]

    @property
    def async_url(self) -> str:
        return async_url(self.database, self.url)


#: What a job returns per workload: ("value", float) or ("na", reason).
Outcome = tuple[str, Any]


class Variant(abc.ABC):
    """One way of running the workloads. Each method returns the workload's number."""

    loops: ClassVar[tuple[str, ...]] = BACKENDS

    def __init__(self, spec: WorkerSpec) -> None:
        if spec.backend not in self.loops:
            raise Unavailable(f"n/a on {spec.backend} ({', '.join(self.loops)} only)")
        self.spec = spec
        self.backend = spec.backend
        self.user_ids = spec.user_ids
        self.sync_engine: Engine | None = None

    @abc.abstractmethod
    def hop(self, calls: int) -> Timing:
        """W0: µs per no-op call through the variant's way to a thread."""

    @abc.abstractmethod
    def point(self, calls: int) -> Timing:
        """W1: µs per ``get(User, id)``, each id new to the session."""

    @abc.abstractmethod
    def concurrent(self, requests: int, tasks: int, want: frozenset[str]) -> dict[str, Outcome]:
        """W2 (req/s) and W3 (p99 loop lag, ms), and peak threads, from concurrent requests."""

    @abc.abstractmethod
    def unit_of_work(self, rows: int) -> Timing:
        """W4: seconds to insert ``rows`` rows and read them back with selectinload."""

    def memory(self, scopes: int) -> dict[str, Outcome]:
        """M: ``scopes`` concurrent scopes (one W2 request each) against pool 10."""
        raise NotApplicable("no concurrent scopes")

    def close(self) -> None:
        """Release the variant's engine (end of the worker process)."""
        if self.sync_engine is not None:
            self.sync_engine.dispose()

    def run_job(self, job: str, sizes: Sizes, want: frozenset[str]) -> dict[str, Outcome]:
        if job == "W23":
            return self.concurrent(sizes.requests, sizes.tasks, want)
        if job == "M":
            try:
                return self.memory(sizes.scopes)
            except NotApplicable as exc:
                return {"M": ("na", str(exc))}
        measure: Callable[[], Timing] = {
            "W0": lambda: self.hop(sizes.hop_calls),
            "W1": lambda: self.point(sizes.point_calls),
            "W4": lambda: self.unit_of_work(sizes.rows),
        }[job]
        try:
            wall, cpu = measure()
        except NotApplicable as exc:
            return {job: ("na", str(exc))}
        return {job: ("value", wall), f"{job}.cpu": ("value", cpu)}

    def point_ids(self, calls: int) -> tuple[list[int], list[int]]:
        """(warm-up ids, timed ids): all distinct, so every get() misses the identity map."""
        warm = max(1, calls // 10)
        if warm + calls > len(self.user_ids):
            raise NotApplicable(f"--point-calls must stay below {len(self.user_ids) - warm}")
        return list(self.user_ids[:warm]), list(self.user_ids[warm : warm + calls])


class RawSync(Variant):
    """A plain sync ``Session`` called directly: the floor for W1/W4, TPE(10) for W2."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self.engine = self.sync_engine = make_sync_engine(spec.url)
        self.maker = sessionmaker(self.engine, expire_on_commit=False)

    def hop(self, calls: int) -> Timing:
        raise NotApplicable("no hop: calls run on the caller's thread")

    def point(self, calls: int) -> Timing:
        warm_ids, ids = self.point_ids(calls)
        with self.maker() as sess:
            for uid in warm_ids:
                sess.get(User, uid)
            clock = Clock()
            for uid in ids:
                sess.get(User, uid)
                clock.lap()
            return clock.per(len(ids), 1e6)

    def request(self, i: int) -> None:
        with self.maker() as sess:
            request_body(sess, self.user_ids[i % len(self.user_ids)], i)
            sess.commit()

    def concurrent(self, requests: int, tasks: int, want: frozenset[str]) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        if "W2" in want:
            with ThreadPoolExecutor(POOL_SIZE, thread_name_prefix="bench-raw") as pool:
                list(pool.map(self.request, range(POOL_SIZE)))  # warm-up: threads and pool
                start = time.perf_counter()
                list(pool.map(self.request, range(requests)))
                out["W2"] = ("value", requests / (time.perf_counter() - start))
                out["threads"] = ("value", threading.active_count())
        if "W3" in want:
            out["W3"] = (
                "value",
                anyio.run(self._on_the_loop, requests, tasks, backend=self.backend),
            )
        return out

    async def _on_the_loop(self, requests: int, tasks: int) -> float:
        """W3 for the sync Session called inside ``async def``: what the library prevents."""
        counter = itertools.count()

        async def client() -> None:
            while (i := next(counter)) < requests:
                self.request(i)  # blocks the loop for the whole request
                await anyio.lowlevel.checkpoint()

        probe = LoopProbe()
        async with anyio.create_task_group() as outer:
            outer.start_soon(probe.run)
            async with anyio.create_task_group() as tg:
                for _ in range(tasks):
                    tg.start_soon(client)
            probe.stopped = True
        return probe.p99_ms()

    def unit_of_work(self, rows: int) -> Timing:
        clock = Clock()
        with self.maker() as sess:
            batches = new_batches(rows)
            sess.add_all(batches)
            sess.commit()
        with self.maker() as sess:
            count_items(sess.scalars(readback_statement(batches)).all(), rows)
        return clock.per(1, 1.0)


class AsyncVariant(Variant):
    """The workload bodies for every variant driven from an event loop.

    Subclasses say how a session is opened and how each kind of call reaches the database;
    the bodies (and so the work done per request) are identical for all of them. Each
    measurement runs in its own ``anyio.run`` and warms up inside it (threads, pool).
    """

    # -- what a subclass provides ----------------------------------------------------------

    async def prepare(self) -> None:
        """Per measurement, inside the loop: objects bound to the running loop."""

    async def release(self) -> None:
        """Undo :meth:`prepare`."""

    @abc.abstractmethod
    def session(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A new session; leaving the block closes it (no commit)."""

    @abc.abstractmethod
    async def call_noop(self, sess: Any) -> None: ...

    @abc.abstractmethod
    async def get(self, sess: Any, entity: type[Any], ident: int) -> Any: ...

    @abc.abstractmethod
    async def all(self, sess: Any, statement: Any) -> Sequence[Any]:
        """``session.scalars(statement).all()``."""

    @abc.abstractmethod
    async def commit(self, sess: Any) -> None: ...

    # -- the workloads ---------------------------------------------------------------------

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def measured() -> Any:
            await self.prepare()
            try:
                return await fn(*args)
            finally:
                await self.release()

        return anyio.run(measured, backend=self.backend)

    def hop(self, calls: int) -> Timing:
        return self._run(self._hop, calls)  # type: ignore[no-any-return]

    async def _hop(self, calls: int) -> Timing:
        async with self.session() as sess:
            for _ in range(max(50, calls // 10)):
                await self.call_noop(sess)
            clock = Clock()
            for _ in range(calls):
                await self.call_noop(sess)
                clock.lap()
            return clock.per(calls, 1e6)

    def point(self, calls: int) -> Timing:
        return self._run(self._point, *self.point_ids(calls))  # type: ignore[no-any-return]

    async def _point(self, warm_ids: list[int], ids: list[int]) -> Timing:
        async with self.session() as sess:
            for uid in warm_ids:
                await self.get(sess, User, uid)
            clock = Clock()
            for uid in ids:
                await self.get(sess, User, uid)
                clock.lap()
            return clock.per(len(ids), 1e6)

    async def request(self, i: int) -> None:
        uid = self.user_ids[i % len(self.user_ids)]
        async with self.session() as sess:
            user = await self.get(sess, User, uid)
            posts = await self.all(sess, select(Post).where(Post.author_id == uid))
            sess.add(new_post(user, uid, len(posts), i))
            await self.commit(sess)

    def concurrent(self, requests: int, tasks: int, want: frozenset[str]) -> dict[str, Outcome]:
        rps, lag_ms, threads = self._run(self._concurrent, requests, tasks)
        out: dict[str, Outcome] = {"threads": ("value", threads)}
        if "W2" in want:
            out["W2"] = ("value", rps)
        if "W3" in want:
            out["W3"] = ("value", lag_ms)
        return out

    async def _clients(self, first: int, requests: int, tasks: int) -> None:
        counter = itertools.count(first)
        end = first + requests

        async def client() -> None:
            while (i := next(counter)) < end:
                await self.request(i)

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(client)

    async def _concurrent(self, requests: int, tasks: int) -> tuple[float, float, int]:
        await self._clients(0, tasks, tasks)  # warm-up: threads, connections
        probe = LoopProbe()
        async with anyio.create_task_group() as outer:
            outer.start_soon(probe.run)
            start = time.perf_counter()
            await self._clients(tasks, requests, tasks)
            elapsed = time.perf_counter() - start
            probe.stopped = True
        return requests / elapsed, probe.p99_ms(), probe.peak_threads

    def unit_of_work(self, rows: int) -> Timing:
        return self._run(self._unit_of_work, rows)  # type: ignore[no-any-return]

    async def _unit_of_work(self, rows: int) -> Timing:
        async with self.session() as sess:  # warm-up, not timed
            await self.all(sess, select(Batch).where(Batch.id < 0))
        clock = Clock()
        async with self.session() as sess:
            batches = new_batches(rows)
            sess.add_all(batches)
            await self.commit(sess)
        async with self.session() as sess:
            count_items(await self.all(sess, readback_statement(batches)), rows)
        return clock.per(1, 1.0)

    def memory(self, scopes: int) -> dict[str, Outcome]:
        rss_before = current_rss_mib()
        rps, peak_rss, peak_threads = self._run(self._memory, scopes)
        if self.sync_engine is not None:
            self.sync_engine.dispose()

        def threads_left(within: float) -> int:
            deadline = time.monotonic() + within  # let exiting threads finish exiting
            while (left := threading.active_count() - 1) and time.monotonic() < deadline:
                time.sleep(0.05)
            return left

        out: dict[str, Outcome] = {
            "M.rps": ("value", rps),
            "M.rss_before": ("value", rss_before),
            "M.rss_peak": ("value", max(peak_rss, rss_before)),
            "M.threads": ("value", peak_threads),
            "M.left": ("value", threads_left(1.0)),
        }
        if self.idle_timeout_s is not None:
            out["M.left_later"] = ("value", threads_left(self.idle_timeout_s + 2.0))
        return out

    #: Idle worker threads of the variant exit after this many seconds (None: no such
    #: threads): M also counts the threads left once that has passed.
    idle_timeout_s: float | None = None

    async def dispose(self) -> None:
        """The variant's own way to let go of everything at the end of M (in the loop)."""

    async def _memory(self, scopes: int) -> tuple[float, float, int]:
        probe = LoopProbe()
        with anyio.fail_after(MEMORY_TIMEOUT_S):
            await self._memory_run(probe, scopes)
        await self.dispose()
        return scopes / probe.elapsed, probe.peak_rss_mib, probe.peak_threads

    async def _memory_run(self, probe: LoopProbe, scopes: int) -> None:
        async with anyio.create_task_group() as outer:
            outer.start_soon(probe.run)
            start = time.perf_counter()
            await self._clients(0, scopes, scopes)  # every scope opened at once
            probe.elapsed = time.perf_counter() - start
            probe.stopped = True


class SyncSessionByHand(AsyncVariant):
    """A sync ``Session`` with every IO call wrapped by hand in a to-thread function."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self.engine = self.sync_engine = make_sync_engine(spec.url)
        self.maker = sessionmaker(self.engine, expire_on_commit=False)

    @abc.abstractmethod
    async def to_thread(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def memory(self, scopes: int) -> dict[str, Outcome]:
        if scopes > BY_HAND_THREADS:
            # Seen in a trial run: 41 threads alive, no progress for minutes. Every thread
            # waits in pool checkout (30 s timeout) while the tasks holding the 10
            # connections wait for a thread: what the maker's limiter (invariant 6) prevents.
            raise NotApplicable(
                f"stalls: {scopes} scopes on {BY_HAND_THREADS} threads against pool 10, "
                "every thread waits in pool checkout"
            )
        return super().memory(scopes)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        sess = self.maker()
        try:
            yield sess
        finally:
            await self.to_thread(sess.close)

    async def call_noop(self, sess: Session) -> None:
        await self.to_thread(noop, sess)

    async def get(self, sess: Session, entity: type[Any], ident: int) -> Any:
        return await self.to_thread(sess.get, entity, ident)

    async def all(self, sess: Session, statement: Any) -> Sequence[Any]:
        return await self.to_thread(lambda: sess.scalars(statement).all())  # type: ignore[no-any-return]

    async def commit(self, sess: Session) -> None:
        await self.to_thread(sess.commit)


class AnyioToThread(SyncSessionByHand):
    """``await anyio.to_thread.run_sync(...)`` around each call (anyio's shared 40 threads)."""

    async def to_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args)


class AsyncioToThread(SyncSessionByHand):
    """``await asyncio.to_thread(...)`` around each call (the loop's default executor)."""

    loops = ("asyncio",)

    async def prepare(self) -> None:
        executor = ThreadPoolExecutor(ASYNCIO_TO_THREAD_WORKERS, thread_name_prefix="bench")
        asyncio.get_running_loop().set_default_executor(executor)

    async def to_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)


class AsyncSessionVariant(AsyncVariant):
    """SQLAlchemy's ``AsyncSession`` on an async driver (asyncpg, aiomysql, aiosqlite)."""

    loops = ("asyncio",)

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        driver = make_url(spec.async_url).get_dialect().driver
        try:
            __import__(driver)
        except ImportError as exc:
            raise Unavailable(f"async driver {driver!r} is not installed: {exc}") from None

    async def prepare(self) -> None:
        # Async drivers' connections belong to one loop, and each measurement has its own:
        # a new engine per measurement, with the pool filled before timing starts.
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

        self.engine = create_async_engine(self.spec.async_url, pool_size=POOL_SIZE, max_overflow=0)
        self.maker = async_sessionmaker(self.engine, expire_on_commit=False)
        conns = [await self.engine.connect() for _ in range(POOL_SIZE)]
        for conn in conns:
            await conn.close()

    async def release(self) -> None:
        await self.engine.dispose()

    def session(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.maker()

    def hop(self, calls: int) -> Timing:
        raise NotApplicable("no thread hop: run_sync is a greenlet switch")

    async def call_noop(self, sess: Any) -> None:
        await sess.run_sync(noop)

    async def get(self, sess: Any, entity: type[Any], ident: int) -> Any:
        return await sess.get(entity, ident)

    async def all(self, sess: Any, statement: Any) -> Sequence[Any]:
        return (await sess.scalars(statement)).all()  # type: ignore[no-any-return]

    async def commit(self, sess: Any) -> None:
        await sess.commit()


class Threadpool(AsyncVariant):
    """Our ``threadpool_sessionmaker``; ``maker_kw`` selects options (see ``VARIANTS``)."""

    def __init__(self, spec: WorkerSpec, maker_kw: dict[str, Any]) -> None:
        super().__init__(spec)
        try:
            import sqlalchemy_threadpool
        except ImportError as exc:
            raise Unavailable(f"import sqlalchemy_threadpool failed: {exc}") from None
        self.lib = sqlalchemy_threadpool
        self.maker_kw = maker_kw
        self.engine = self.sync_engine = make_sync_engine(spec.url)
        try:  # fail at start-up, not in every job, if the library lacks an option
            self.lib.threadpool_sessionmaker(self.engine, **maker_kw)
        except TypeError as exc:
            raise Unavailable(f"threadpool_sessionmaker(**{maker_kw!r}): {exc}") from None

    async def prepare(self) -> None:
        # The maker's CapacityLimiter binds to the loop that first uses it: one per loop.
        self.maker = self.lib.threadpool_sessionmaker(self.engine, **self.maker_kw)

    async def dispose(self) -> None:
        shutdown = getattr(self.lib, "shutdown", None)
        if shutdown is not None:
            await shutdown(self.maker)  # the documented end of an application's DB work

    @property
    def idle_timeout_s(self) -> float | None:  # type: ignore[override]
        """With ``offload="worker"``, idle workers wait this long before they exit."""
        params = inspect.signature(self.lib.threadpool_sessionmaker).parameters
        offload = self.maker_kw.get("offload", getattr(params.get("offload"), "default", None))
        timeout = params.get("worker_idle_timeout")
        if offload != "worker" or timeout is None or self.maker_kw.get("guard") == "off":
            return None  # guard_off: same threads as "threadpool"; spare the run the wait
        idle = self.maker_kw.get("worker_idle_timeout", timeout.default)
        if idle is None:  # not given: the default WorkerPool's
            idle = inspect.signature(self.lib.WorkerPool).parameters["idle_timeout"].default
        return float(idle)

    def session(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.maker()

    async def call_noop(self, sess: Any) -> None:
        await sess.run(noop)

    async def get(self, sess: Any, entity: type[Any], ident: int) -> Any:
        return await sess.get(entity, ident)

    async def all(self, sess: Any, statement: Any) -> Sequence[Any]:
        return (await sess.scalars(statement)).all()  # type: ignore[no-any-return]

    async def commit(self, sess: Any) -> None:
        await sess.commit()


class OneHop(AsyncVariant):
    """W2's whole request as one sync function in one ``anyio.to_thread.run_sync`` call.

    What a FastAPI ``def`` endpoint does (anyio's shared 40-thread limiter, the request's
    session opened, used, committed and closed in that thread): issue 14's reference for an
    async endpoint on our session. Only W2/W3 and M: for one call (W0, W1) it is
    ``anyio_to_thread``.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self.engine = self.sync_engine = make_sync_engine(spec.url)
        self.maker = sessionmaker(self.engine, expire_on_commit=False)

    def sync_request(self, i: int) -> None:
        with self.maker() as sess:
            request_body(sess, self.user_ids[i % len(self.user_ids)], i)
            sess.commit()

    async def request(self, i: int) -> None:
        await anyio.to_thread.run_sync(self.sync_request, i)

    def hop(self, calls: int) -> Timing:
        raise NotApplicable("one call per hop: see anyio_to_thread")

    def point(self, calls: int) -> Timing:
        raise NotApplicable("one call per hop: see anyio_to_thread")

    def unit_of_work(self, rows: int) -> Timing:
        raise NotApplicable("one unit of work in one thread: see raw_sync")

    def memory(self, scopes: int) -> dict[str, Outcome]:
        raise NotApplicable("W2 reference only")

    def session(self) -> contextlib.AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def call_noop(self, sess: Any) -> None:
        raise NotImplementedError

    async def get(self, sess: Any, entity: type[Any], ident: int) -> Any:
        raise NotImplementedError

    async def all(self, sess: Any, statement: Any) -> Sequence[Any]:
        raise NotImplementedError

    async def commit(self, sess: Any) -> None:
        raise NotImplementedError


class ThreadpoolWhole(Threadpool):
    """Ours, the whole request in one ``run()``: ``async with threadpool_session(m) as s:
    await s.run(request)`` (the scope commits and closes on exit)."""

    async def request(self, i: int) -> None:
        uid = self.user_ids[i % len(self.user_ids)]
        async with self.lib.threadpool_session(self.maker) as sess:
            await sess.run(request_body, uid, i)

    def hop(self, calls: int) -> Timing:
        raise NotApplicable("same as threadpool")

    def point(self, calls: int) -> Timing:
        raise NotApplicable("same as threadpool")

    def unit_of_work(self, rows: int) -> Timing:
        raise NotApplicable("same as threadpool")

    def memory(self, scopes: int) -> dict[str, Outcome]:
        raise NotApplicable("same as threadpool")

    @property
    def idle_timeout_s(self) -> float | None:  # type: ignore[override]
        return None


class DedicatedThread(AsyncVariant):
    """W0 reference only: one minimal dedicated worker thread (a queue in, a loop wake-up out).

    Issue 5's anchor for what a hop can cost: no limiter, no cancellation, no session. Not a
    usable way to run a session; every other workload is ``n/a``.
    """

    async def prepare(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], anyio.Event, list[Any]] | None]
        self.jobs = queue.SimpleQueue()
        if self.backend == "asyncio":
            self.wake: Callable[[Callable[[], Any]], Any] = (
                asyncio.get_running_loop().call_soon_threadsafe
            )
        else:
            import trio

            self.wake = trio.lowlevel.current_trio_token().run_sync_soon
        self.thread = threading.Thread(target=self._serve, name="bench-dedicated", daemon=True)
        self.thread.start()

    async def release(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            fn, done, box = job
            box.append(fn())
            self.wake(done.set)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        yield None

    async def call_noop(self, sess: None) -> None:
        done, box = anyio.Event(), list[Any]()
        self.jobs.put((noop, done, box))
        await done.wait()

    def point(self, calls: int) -> Timing:
        raise NotApplicable("W0 reference only")

    def unit_of_work(self, rows: int) -> Timing:
        raise NotApplicable("W0 reference only")

    def concurrent(self, requests: int, tasks: int, want: frozenset[str]) -> dict[str, Outcome]:
        return {w: ("na", "W0 reference only") for w in want}

    def memory(self, scopes: int) -> dict[str, Outcome]:
        raise NotApplicable("W0 reference only")

    async def get(self, sess: Any, entity: type[Any], ident: int) -> Any:
        raise NotImplementedError

    async def all(self, sess: Any, statement: Any) -> Sequence[Any]:
        raise NotImplementedError

    async def commit(self, sess: Any) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class VariantInfo:
    factory: Callable[[WorkerSpec], Variant]
    summary: str


def offload_option() -> tuple[list[str], str | None]:
    """The values ``threadpool_sessionmaker(..., offload=...)`` accepts, and its default.

    ``([], None)`` when the installed library has no such option (before the fast path).
    Detected with :func:`inspect.signature`, then each candidate is tried on a throwaway
    engine (no connection is made), so a typo'd or renamed value does not become a variant.
    """
    try:
        from sqlalchemy_threadpool import threadpool_sessionmaker
    except ImportError:
        return [], None
    param = inspect.signature(threadpool_sessionmaker).parameters.get("offload")
    if param is None:
        return [], None
    default = param.default if isinstance(param.default, str) else None
    engine = create_engine("sqlite:///" + os.path.join(tempfile.gettempdir(), "satp-probe.db"))
    accepted = []
    try:
        for mode in OFFLOAD_CANDIDATES:
            try:
                option: dict[str, Any] = {"offload": mode}  # the values are not known here
                threadpool_sessionmaker(engine, **option)
            except Exception:
                continue
            accepted.append(mode)
    finally:
        engine.dispose()
    return accepted, default


OFFLOAD_CANDIDATES = ("worker", "anyio")
OFFLOAD_MODES, OFFLOAD_DEFAULT = offload_option()

#: Every variant, in table order. To benchmark another option of ours, add a line such as
#: ``"threadpool_x": VariantInfo(functools.partial(Threadpool, maker_kw={...}), "...")``:
#: the harness, tables and ratios pick it up.
VARIANTS: dict[str, VariantInfo] = {
    "raw_sync": VariantInfo(
        RawSync,
        "sync Session called directly; W2: ThreadPoolExecutor(10); "
        "W3: the sync Session called on the loop",
    ),
    "anyio_to_thread": VariantInfo(
        AnyioToThread, "sync Session, each call in anyio.to_thread.run_sync"
    ),
    "asyncio_to_thread": VariantInfo(
        AsyncioToThread,
        "sync Session, each call in asyncio.to_thread (40-thread default executor); asyncio only",
    ),
    "asyncsession": VariantInfo(
        AsyncSessionVariant,
        "AsyncSession on asyncpg / aiomysql / aiosqlite; asyncio only",
    ),
    "one_hop": VariantInfo(
        OneHop,
        "W2 reference: the whole request as one sync function in one anyio.to_thread.run_sync "
        "call (a FastAPI def endpoint)",
    ),
    "dedicated_thread": VariantInfo(
        DedicatedThread, "W0 reference: one bare worker thread, queue in, loop wake-up out"
    ),
    "threadpool": VariantInfo(
        functools.partial(Threadpool, maker_kw={}),
        "sqlalchemy_threadpool, defaults (guard='raise'"
        + (f", offload={OFFLOAD_DEFAULT!r})" if OFFLOAD_MODES else ")"),
    ),
}
for _mode in OFFLOAD_MODES:
    if _mode != OFFLOAD_DEFAULT:
        VARIANTS[f"threadpool_{_mode}"] = VariantInfo(
            functools.partial(Threadpool, maker_kw={"offload": _mode}),
            f"sqlalchemy_threadpool, offload={_mode!r}",
        )
VARIANTS["threadpool_whole"] = VariantInfo(
    functools.partial(ThreadpoolWhole, maker_kw={}),
    "sqlalchemy_threadpool, the whole W2 request in one run() inside threadpool_session()",
)
VARIANTS["threadpool_guard_off"] = VariantInfo(
    functools.partial(Threadpool, maker_kw={"guard": "off"}),
    "sqlalchemy_threadpool, defaults but guard='off'",
)

#: Our variants: the ones the targets are checked for.
OURS = [name for name in VARIANTS if name.startswith("threadpool") and "guard" not in name]

#: Extra ratios printed under a workload's table: (label, numerator, denominator).
PAIRED_RATIOS = [("guard on / off", "threadpool", "threadpool_guard_off")]

#: W2 throughput ratios printed under its table (issue 14's targets): (numerator, denominator).
W2_RATIOS = [
    ("threadpool", "one_hop"),
    ("threadpool_whole", "one_hop"),
    ("threadpool", "asyncsession"),
]


# -- worker process ------------------------------------------------------------------------


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """A worker process: build the variant, then run the jobs the parent sends."""
    try:
        variant = VARIANTS[spec.variant].factory(spec)
    except Unavailable as exc:
        conn.send(("unavailable", str(exc)))
        return
    except Exception as exc:
        conn.send(("unavailable", f"set-up failed: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    try:
        while (message := conn.recv()) is not None:
            job, sizes, want = message
            try:
                conn.send(("ok", variant.run_job(job, sizes, want), peak_rss_kb()))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}", peak_rss_kb()))
    finally:
        variant.close()


class Worker:
    """The parent's end of one worker process."""

    def __init__(self, spec: WorkerSpec, timeout: float) -> None:
        self.spec = spec
        self.timeout = timeout
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
        self.process.start()
        child.close()
        self.unavailable: str | None = None
        self.peak_rss_kb = 0

    def wait_ready(self) -> None:
        status, detail = self._receive(self.timeout)
        if status != "ready":
            self.unavailable = detail if status == "unavailable" else f"{status}: {detail}"
            self.stop()

    def run(self, job: str, sizes: Sizes, want: frozenset[str]) -> tuple[str, Any]:
        if self.unavailable is not None:
            return "unavailable", self.unavailable
        self.conn.send((job, sizes, want))
        status, detail, *rest = self._receive(self.timeout)
        if rest:
            self.peak_rss_kb = max(self.peak_rss_kb, rest[0])
        if status == "lost":
            self.unavailable = detail
            self.stop()
        return status, detail

    def _receive(self, timeout: float) -> tuple[Any, ...]:
        try:
            if not self.conn.poll(timeout):
                return ("lost", f"no answer within {timeout:g} s (hung?); stopped")
            return tuple(self.conn.recv())
        except (EOFError, OSError):
            return ("lost", f"worker process died (exit code {self.process.exitcode})")

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


# -- orchestration (parent process) --------------------------------------------------------


@dataclass
class Cell:
    """One (database, backend, workload, variant): a value per repeat, or why there is none."""

    values: list[float | None] = field(default_factory=list)
    note: str | None = None


@dataclass
class Section:
    database: str
    backend: str
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    rss_kb: dict[str, int] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    #: The ticker's p99 on an idle loop in the parent, once per repeat before W2/W3.
    idle_lag_ms: list[float] = field(default_factory=list)
    #: G: scenario label -> per-round (wall, CPU) ratios guard="raise" / guard="off".
    guard: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    guard_note: str | None = None

    def cell(self, workload: str, variant: str) -> Cell:
        return self.cells.setdefault((workload, variant), Cell())


def jobs_for(workloads: Sequence[str]) -> list[tuple[str, frozenset[str]]]:
    """Workloads to jobs: W2 and W3 come from one run (the ticker runs during W2)."""
    jobs: list[tuple[str, frozenset[str]]] = []
    for w in workloads:
        if w == "G":
            continue  # measured by guard_cost.py in the parent, after the matrix
        if w in ("W2", "W3"):
            want = frozenset(x for x in ("W2", "W3") if x in workloads)
            if ("W23", want) not in jobs:
                jobs.append(("W23", want))
        else:
            jobs.append((w, frozenset({w})))
    return jobs


STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"{time.monotonic() - STARTED:6.1f}s {message}", file=sys.stderr, flush=True)


def run_section(
    fixture: Fixture,
    backend: str,
    variants: Sequence[str],
    workloads: Sequence[str],
    sizes: Sizes,
    timeout: float,
) -> Section:
    section = Section(fixture.database, backend)
    workers = {
        name: Worker(
            WorkerSpec(fixture.database, fixture.url, backend, name, fixture.user_ids), timeout
        )
        for name in variants
    }
    try:
        for worker in workers.values():
            worker.wait_ready()
        for name, worker in workers.items():
            if worker.unavailable is not None:
                section.unavailable[name] = worker.unavailable
                log(f"[{fixture.database}/{backend}] {name}: {worker.unavailable}")
        for repeat in range(sizes.repeats):
            shift = repeat % len(variants)
            order = [*variants[shift:], *variants[:shift]]
            for job, want in jobs_for(workloads):
                if job == "M" and repeat > 0:
                    continue  # once per section: it is about memory and threads, not speed
                if job == "W23" and "W3" in want:
                    section.idle_lag_ms.append(anyio.run(idle_lag_ms, 0.5, backend=backend))
                line = []
                for name in order:
                    if workers[name].unavailable is not None:
                        continue
                    fixture.reset(job)
                    status, detail = workers[name].run(job, sizes, want)
                    line.append(record(section, name, want, repeat, status, detail))
                log(
                    f"[{fixture.database}/{backend}] repeat {repeat + 1}/{sizes.repeats} "
                    f"{job}: " + ", ".join(x for x in line if x)
                )
        for name, worker in workers.items():
            if worker.peak_rss_kb:
                section.rss_kb[name] = worker.peak_rss_kb
    finally:
        for worker in workers.values():
            worker.stop()
    if "G" in workloads:
        run_guard_cost(section, fixture, backend, sizes)
    return section


def run_guard_cost(section: Section, fixture: Fixture, backend: str, sizes: Sizes) -> None:
    """G: bench/guard_cost.py's interleaved raise/off comparison, on this database and loop."""
    import guard_cost  # bench/ is sys.path[0] when this file runs as a script

    if fixture.user_ids[:1] != (1,):
        section.guard_note = "n/a: guard_cost reads user id 1, which the seed did not create"
        return
    try:
        section.guard = guard_cost.measure(
            fixture.url, backend, sizes.guard_calls, sizes.guard_rounds
        )
    except Exception as exc:
        section.guard_note = f"error: {type(exc).__name__}: {exc}"
    for label, ratios in section.guard.items():
        walls = ", ".join(f"{wall:.3f}" for wall, _ in ratios)
        log(f"[{fixture.database}/{backend}] G {label}: raise/off wall {walls}")
    if section.guard_note:
        log(f"[{fixture.database}/{backend}] G {section.guard_note}")


def record(
    section: Section,
    variant: str,
    want: frozenset[str],
    repeat: int,
    status: str,
    detail: Any,
) -> str:
    """Store one job's outcome; return a short progress note."""
    if status != "ok":
        for w in want:
            cell = section.cell(w, variant)
            cell.values.append(None)
            cell.note = f"error: {detail}" if status == "error" else str(detail)
        return f"{variant} {status.upper()}: {detail}"
    notes = []
    for key, (kind, value) in detail.items():
        if key == "threads":
            section.threads[variant] = max(section.threads.get(variant, 0), int(value))
            continue
        cell = section.cell(key, variant)
        if kind == "value":
            cell.values.append(float(value))
            if not key.endswith(".cpu"):
                notes.append(f"{value:.4g}")
        else:
            cell.values.append(None)
            cell.note = f"n/a: {value}"
    return f"{variant} {'/'.join(notes)}" if notes else ""


# -- report --------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def paired_ratio(values: Sequence[float | None], base: Sequence[float | None]) -> float | None:
    """Median over repeats of value / baseline, each pair from the same repeat."""
    pairs = [v / b for v, b in zip(values, base, strict=False) if v is not None and b]
    return statistics.median(pairs) if pairs else None


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if value >= 1 else f"{value:.{digits}f}"


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in rows
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """One of issue 5's targets, checked per section for each of our variants."""

    label: str
    workload: str
    #: Variant for a paired ratio (ours / against), or None: the median itself is bounded.
    against: str | None
    op: str  # "<=", "<" or ">="
    bound: float

    def check(self, s: Section, ours: str) -> tuple[float, str] | None:
        values = s.cells.get((self.workload, ours))
        if values is None:
            return None
        if self.against is None:
            value = median(values.values)
        else:
            other = s.cells.get((self.workload, self.against))
            value = paired_ratio(values.values, other.values) if other else None
        if value is None:
            return None
        met = {"<=": value <= self.bound, "<": value < self.bound, ">=": value >= self.bound}
        return value, ("met" if met[self.op] else "NOT met")


TARGETS = [
    Target("W0 hop <= 0.5x anyio.to_thread", "W0", "anyio_to_thread", "<=", 0.5),
    Target("W1 <= 1.10x raw sync", "W1", "raw_sync", "<=", 1.10),
    Target("W1 below AsyncSession", "W1", "asyncsession", "<", 1.0),
    Target("W2 >= AsyncSession", "W2", "asyncsession", ">=", 1.0),
    Target("W2 >= 0.95x raw TPE(10)", "W2", "raw_sync", ">=", 0.95),
    Target("W2 >= 0.90x one hop per request (issue 14)", "W2", "one_hop", ">=", 0.90),
    Target("W2 >= 0.95x one hop per request (issue 14, whole)", "W2", "one_hop", ">=", 0.95),
    Target("W3 p99 <= 3 ms", "W3", None, "<=", 3.0),
    Target("W3 p99 below AsyncSession", "W3", "asyncsession", "<", 1.0),
    Target("W4 <= 1.05x raw sync", "W4", "raw_sync", "<=", 1.05),
]
GUARD_BOUND = 1.03


def targets_table(sections: Sequence[Section], variants: Sequence[str], markdown: bool) -> str:
    """Rows: target x our variant; columns: database/loop; cells: the ratio (or ms), met?"""
    headers = ["target", "variant", *(f"{s.database}/{s.backend}" for s in sections)]
    rows = []
    for target in TARGETS:
        for ours in (v for v in OURS if v in variants):
            row = [target.label, ours]
            for s in sections:
                checked = target.check(s, ours)
                if checked is None:
                    row.append("-")
                    continue
                value, verdict = checked
                shown = f"{value:.2f} ms" if target.against is None else f"{value:.2f}x"
                row.append(f"{shown} {verdict}")
            if any(c != "-" for c in row[2:]):
                rows.append(row)
    for label in guard_cost_labels(sections):
        row = [f"G guard raise/off <= {GUARD_BOUND}x: {label}", "threadpool"]
        for s in sections:
            ratios = s.guard.get(label)
            if not ratios:
                row.append("-")
                continue
            wall = statistics.median(r[0] for r in ratios)
            cpu = statistics.median(r[1] for r in ratios)
            verdict = "met" if cpu <= GUARD_BOUND else "NOT met"
            row.append(f"CPU {cpu:.3f}x {verdict} (wall {wall:.2f}x)")
        rows.append(row)
    return render(headers, rows, markdown)


def guard_cost_labels(sections: Sequence[Section]) -> list[str]:
    return list(dict.fromkeys(label for s in sections for label in s.guard))


def guard_report(s: Section, markdown: bool) -> str:
    import guard_cost

    if not s.guard:
        return f"G: guard on vs off: {s.guard_note or 'not measured'}"
    rows = []
    for label, ratios in s.guard.items():
        wall, cpu = [r[0] for r in ratios], [r[1] for r in ratios]
        rows.append(
            [
                label,
                f"{statistics.median(wall):.3f}x",
                f"{min(wall):.3f}-{max(wall):.3f}",
                f"{statistics.median(cpu):.3f}x",
                f"{min(cpu):.3f}-{max(cpu):.3f}",
                str(len(ratios)),
            ]
        )
    headers = ["scenario", "wall raise/off", "range", "CPU raise/off", "range", "chunk pairs"]
    return (
        f"G: guard on vs off, bench/guard_cost.py: calls of both modes interleaved in chunks of "
        f"{guard_cost.CHUNK}, median over adjacent chunk pairs (target <= 1.03x)\n\n"
        + render(headers, rows, markdown)
    )


def memory_report(s: Section, variants: Sequence[str], markdown: bool) -> str:
    keys = ["M.rps", "M.rss_before", "M.rss_peak", "M.threads", "M.left", "M.left_later"]
    rows = []
    for v in variants:
        if v in s.unavailable:
            continue
        if ("M", v) in s.cells:
            note = s.cells[("M", v)].note or ""
            if "W0 reference" not in note and "no concurrent scopes" not in note:
                rows.append([v, note, "", "", "", "", "", ""])
            continue
        values = [median(s.cells[(k, v)].values) if (k, v) in s.cells else None for k in keys]
        if all(x is None for x in values):
            continue
        rps, before, peak, threads, left, later = values
        rows.append(
            [
                v,
                fmt(rps),
                fmt(before),
                fmt(peak),
                f"{(peak or 0) - (before or 0):+.0f}",
                "-" if threads is None else str(int(threads)),
                "-" if left is None else str(int(left)),
                "-" if later is None else str(int(later)),
            ]
        )
    headers = [
        "variant",
        "req/s",
        "RSS before MiB",
        "RSS peak MiB",
        "growth",
        "peak threads",
        "threads left 1 s after dispose",
        "left after the idle timeout",
    ]
    return (
        "M: every scope opened at once (one W2 request each) against pool 10, once per "
        "section; peak threads: the whole process, main thread included; threads left: "
        "besides the main thread (any variant's, also earlier jobs' idle ones); dispose: "
        "`await shutdown(maker)` for ours, `engine.dispose()` for the others; the last column "
        "only where idle worker threads outlive their sessions (offload='worker')\n\n"
        + render(headers, rows, markdown)
    )


def report(
    sections: Sequence[Section], variants: Sequence[str], workloads: Sequence[str], markdown: bool
) -> str:
    out: list[str] = []
    heading = "### " if markdown else "== "
    if sections and any(w in workloads for w in ("W0", "W1", "W2", "W3", "W4", "G")):
        out.append(f"{heading}targets (issue 5), our variants, every database and loop")
        out.append("")
        out.append(
            "ratios are medians of per-repeat paired ratios (ours / other, same repeat); "
            "AsyncSession rows exist on asyncio only"
        )
        out.append("")
        out.append(targets_table(sections, variants, markdown))
        out.append("")
    for s in sections:
        out.append(f"{heading}{s.database} · {s.backend}")
        out.append("")
        for w in workloads:
            if w == "G":
                out.append(guard_report(s, markdown))
                out.append("")
                continue
            if w == "M":
                out.append(memory_report(s, variants, markdown))
                out.append("")
                continue
            info = WORKLOAD_INFO[w]
            better = "higher" if info.higher_is_better else "lower"
            out.append(f"{w}: {info.title} ({info.unit}, {better} is better)")
            out.append("")
            base = s.cell(w, info.baseline).values
            rows = []
            for v in variants:
                cell = s.cells.get((w, v))
                note = s.unavailable.get(v) or (cell.note if cell else None)
                values = cell.values if cell else []
                present = [x for x in values if x is not None]
                has_cpu = w in ("W0", "W1", "W4")
                if not present:
                    rows.append([v, note or "-", "", "", "", ""] + ["", ""] * has_cpu)
                    continue
                mid = median(values)
                spread = (max(present) - min(present)) / mid * 100 if mid else math.nan
                ratio = paired_ratio(values, base)
                best = max(present) if info.higher_is_better else min(present)
                row = [
                    v,
                    fmt(mid),
                    f"±{spread / 2:.0f}%",
                    fmt(best),
                    fmt(ratio, 2) + "x" if ratio is not None else "-",
                    str(len(present)),
                ]
                if has_cpu:
                    cpu = s.cells.get((f"{w}.cpu", v))
                    cpu_base = s.cells.get((f"{w}.cpu", info.baseline))
                    cpu_ratio = (
                        paired_ratio(cpu.values, cpu_base.values) if cpu and cpu_base else None
                    )
                    row.append(fmt(median(cpu.values)) if cpu else "-")
                    row.append(fmt(cpu_ratio, 2) + "x" if cpu_ratio is not None else "-")
                rows.append(row)
            headers = [
                "variant",
                f"median {info.unit}",
                "spread (±half range)",
                "best",
                f"vs {info.baseline}",
                "n",
            ]
            if w in ("W0", "W1", "W4"):
                headers += [f"CPU {info.unit}", f"CPU vs {info.baseline}"]
            out.append(render(headers, rows, markdown))
            for label, num, den in PAIRED_RATIOS if w != "W3" else ():
                on, off = s.cell(w, num).values, s.cell(w, den).values
                # as a time ratio (> 1: the guard costs time), also for W2's req/s
                ratio = paired_ratio(off, on) if info.higher_is_better else paired_ratio(on, off)
                if ratio is not None:
                    out.append(f"\n{label}, time ratio ({num} vs {den}): {ratio:.3f}x")
            for num, den in W2_RATIOS if w == "W2" else ():
                ratio = paired_ratio(s.cell(w, num).values, s.cell(w, den).values)
                if ratio is not None:
                    out.append(f"\nthroughput ratio {num} / {den}: {ratio:.3f}x")
            if w == "W3" and s.idle_lag_ms:
                out.append(
                    f"\nidle-loop ticker p99 (the machine's floor), parent process, once per "
                    f"repeat: median {fmt(statistics.median(s.idle_lag_ms))} ms, range "
                    f"{fmt(min(s.idle_lag_ms))}-{fmt(max(s.idle_lag_ms))} ms"
                )
            out.append("")
        rows = [
            [v, f"{s.rss_kb[v] / 1024:.0f}", str(s.threads.get(v, "-"))]
            for v in variants
            if v in s.rss_kb
        ]
        if rows:
            out.append(
                "per variant process: peak RSS over all its jobs; threads alive at the peak of W2"
            )
            out.append("")
            out.append(render(["variant", "peak RSS MiB", "threads (W2)"], rows, markdown))
            out.append("")
    return "\n".join(out)


def preamble(argv: Sequence[str] | None, sizes: Sizes, variants: Sequence[str]) -> str:
    """What was run, where, on what: the first lines of every report."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "absent"

    dists = ["sqlalchemy", "anyio", "trio", "greenlet", "psycopg2-binary", "pymysql"]
    dists += ["asyncpg", "aiomysql", "aiosqlite"]
    try:
        import subprocess

        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.getcwd(),
            check=False,
        ).stdout.strip()
    except OSError:
        commit = "?"
    command = " ".join(["python bench/bench.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        import sqlalchemy_threadpool

        library = os.path.dirname(sqlalchemy_threadpool.__file__ or "?")
    except ImportError as exc:
        library = f"not importable ({exc})"
    offload = (
        f"offload option: {', '.join(OFFLOAD_MODES)} (default {OFFLOAD_DEFAULT!r})"
        if OFFLOAD_MODES
        else "offload option: absent (one offload path)"
    )
    return "\n".join(
        [
            f"command: {command}",
            f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; git {commit or '?'}",
            f"machine: {os.cpu_count()} CPUs, load average at start "
            + " ".join(f"{x:.1f}" for x in os.getloadavg())
            + f"; python {sys.version.split()[0]}",
            "versions: " + ", ".join(f"{d} {ver(d)}" for d in dists),
            f"sqlalchemy_threadpool: {library}",
            f"{offload}; variants: {', '.join(variants)}",
            f"sizes: {sizes}",
            "",
        ]
    )


# -- CLI -----------------------------------------------------------------------------------


def csv_choice(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [x for x in names if x not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {unknown!r}; choose from {','.join(allowed)}"
            )
        return list(dict.fromkeys(names))

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] if __doc__ else None,
        epilog="URLs: SATP_BENCH_POSTGRESQL_URL, SATP_BENCH_MYSQL_URL (loopback defaults), "
        "SATP_BENCH_SQLITE_URL (default: a temporary file). See bench/README.md.",
    )
    parser.add_argument("--databases", type=csv_choice(DATABASES), default=list(DATABASES))
    parser.add_argument("--backends", type=csv_choice(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--workloads", type=csv_choice(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--variants", type=csv_choice(list(VARIANTS)), default=list(VARIANTS))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller measurements and 3 repeats: the whole matrix in < 5 min on 2 cores",
    )
    parser.add_argument("--repeats", type=int, help="repeats per measurement (default 7; quick 3)")
    parser.add_argument("--tasks", type=int, help="W2/W3 concurrent tasks (default 32)")
    parser.add_argument("--requests", type=int, help="W2/W3 requests per measurement")
    parser.add_argument("--hop-calls", type=int, help="W0 calls per measurement")
    parser.add_argument("--point-calls", type=int, help="W1 calls per measurement")
    parser.add_argument("--rows", type=int, help="W4 rows per measurement (default 5,000)")
    parser.add_argument("--guard-calls", type=int, help="G calls per mode per round")
    parser.add_argument("--guard-rounds", type=int, help="G rounds")
    parser.add_argument("--scopes", type=int, help="M concurrent scopes (default 1,000)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300,
        help="seconds one job may take before its worker is stopped",
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--json", metavar="PATH", help="also write every raw value as JSON")
    parser.add_argument("--list", action="store_true", help="list variants and exit")
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    overrides = {
        "repeats": args.repeats,
        "tasks": args.tasks,
        "requests": args.requests,
        "hop_calls": args.hop_calls,
        "point_calls": args.point_calls,
        "rows": args.rows,
        "guard_calls": args.guard_calls,
        "guard_rounds": args.guard_rounds,
        "scopes": args.scopes,
    }
    values = {**asdict(sizes), **{k: v for k, v in overrides.items() if v is not None}}
    return Sizes(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, info in VARIANTS.items():
            print(f"{name:22} {info.summary}")
        return 0
    sizes = sizes_from(args)
    workloads = [w for w in WORKLOADS if w in args.workloads]
    variants = [v for v in VARIANTS if v in args.variants]
    log(f"sizes: {sizes}")
    print(preamble(argv, sizes, variants))
    started = time.perf_counter()
    sections: list[Section] = []
    sqlite_dir = tempfile.mkdtemp(prefix="satp-bench-")
    try:
        for database in args.databases:
            url = server_url(database, sqlite_dir)
            try:
                fixture = Fixture(database, url)
            except Exception as exc:
                log(f"[{database}] skipped: cannot set up {make_url(url)!r}: {exc}")
                continue
            try:
                for backend in args.backends:
                    sections.append(
                        run_section(fixture, backend, variants, workloads, sizes, args.timeout)
                    )
            finally:
                fixture.close()
    finally:
        shutil.rmtree(sqlite_dir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print(report(sections, variants, workloads, args.markdown))
    print(
        f"{len(sections)} sections in {elapsed:.0f} s; sizes: {sizes}; python "
        f"{sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "sizes": asdict(sizes),
                    "elapsed_s": elapsed,
                    "sections": [
                        asdict(s)
                        | {"cells": {f"{w}/{v}": asdict(c) for (w, v), c in s.cells.items()}}
                        for s in sections
                    ],
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
