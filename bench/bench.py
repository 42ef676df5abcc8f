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
import itertools
import json
import math
import multiprocessing
import os
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
WORKLOADS = ("W0", "W1", "W2", "W3", "W4")

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


@dataclass(frozen=True)
class Sizes:
    """How much work one measurement does, and how many times each is repeated."""

    hop_calls: int
    point_calls: int
    requests: int
    tasks: int
    rows: int
    repeats: int


FULL = Sizes(hop_calls=5_000, point_calls=2_000, requests=1_600, tasks=32, rows=5_000, repeats=7)
QUICK = Sizes(hop_calls=1_500, point_calls=500, requests=480, tasks=32, rows=5_000, repeats=3)


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
        "unit of work: insert 5,000 rows, read back with selectinload", "s", False, "raw_sync"
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
            if job == "W23":
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
    stopped: bool = False

    async def run(self) -> None:
        while not self.stopped:
            start = time.perf_counter()
            await anyio.sleep(TICK_S)
            self.lags.append(time.perf_counter() - start - TICK_S)
            self.peak_threads = max(self.peak_threads, threading.active_count())

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
    def hop(self, calls: int) -> float:
        """W0: µs per no-op call through the variant's way to a thread."""

    @abc.abstractmethod
    def point(self, calls: int) -> float:
        """W1: µs per ``get(User, id)``, each id new to the session."""

    @abc.abstractmethod
    def concurrent(self, requests: int, tasks: int, want: frozenset[str]) -> dict[str, Outcome]:
        """W2 (req/s) and W3 (p99 loop lag, ms), and peak threads, from concurrent requests."""

    @abc.abstractmethod
    def unit_of_work(self, rows: int) -> float:
        """W4: seconds to insert ``rows`` rows and read them back with selectinload."""

    def close(self) -> None:
        """Release the variant's engine (end of the worker process)."""
        if self.sync_engine is not None:
            self.sync_engine.dispose()

    def run_job(self, job: str, sizes: Sizes, want: frozenset[str]) -> dict[str, Outcome]:
        if job == "W23":
            return self.concurrent(sizes.requests, sizes.tasks, want)
        measure: Callable[[], float] = {
            "W0": lambda: self.hop(sizes.hop_calls),
            "W1": lambda: self.point(sizes.point_calls),
            "W4": lambda: self.unit_of_work(sizes.rows),
        }[job]
        try:
            return {job: ("value", measure())}
        except NotApplicable as exc:
            return {job: ("na", str(exc))}

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

    def hop(self, calls: int) -> float:
        raise NotApplicable("no hop: calls run on the caller's thread")

    def point(self, calls: int) -> float:
        warm_ids, ids = self.point_ids(calls)
        with self.maker() as sess:
            for uid in warm_ids:
                sess.get(User, uid)
            start = time.perf_counter()
            for uid in ids:
                sess.get(User, uid)
            return (time.perf_counter() - start) / len(ids) * 1e6

    def request(self, i: int) -> None:
        uid = self.user_ids[i % len(self.user_ids)]
        with self.maker() as sess:
            user = sess.get(User, uid)
            posts = sess.scalars(select(Post).where(Post.author_id == uid)).all()
            sess.add(new_post(user, uid, len(posts), i))
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

    def unit_of_work(self, rows: int) -> float:
        start = time.perf_counter()
        with self.maker() as sess:
            batches = new_batches(rows)
            sess.add_all(batches)
            sess.commit()
        with self.maker() as sess:
            count_items(sess.scalars(readback_statement(batches)).all(), rows)
        return time.perf_counter() - start


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

    def hop(self, calls: int) -> float:
        return float(self._run(self._hop, calls))

    async def _hop(self, calls: int) -> float:
        async with self.session() as sess:
            for _ in range(max(50, calls // 10)):
                await self.call_noop(sess)
            start = time.perf_counter()
            for _ in range(calls):
                await self.call_noop(sess)
            return (time.perf_counter() - start) / calls * 1e6

    def point(self, calls: int) -> float:
        return float(self._run(self._point, *self.point_ids(calls)))

    async def _point(self, warm_ids: list[int], ids: list[int]) -> float:
        async with self.session() as sess:
            for uid in warm_ids:
                await self.get(sess, User, uid)
            start = time.perf_counter()
            for uid in ids:
                await self.get(sess, User, uid)
            return (time.perf_counter() - start) / len(ids) * 1e6

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

    def unit_of_work(self, rows: int) -> float:
        return float(self._run(self._unit_of_work, rows))

    async def _unit_of_work(self, rows: int) -> float:
        async with self.session() as sess:  # warm-up, not timed
            await self.all(sess, select(Batch).where(Batch.id < 0))
        start = time.perf_counter()
        async with self.session() as sess:
            batches = new_batches(rows)
            sess.add_all(batches)
            await self.commit(sess)
        async with self.session() as sess:
            count_items(await self.all(sess, readback_statement(batches)), rows)
        return time.perf_counter() - start


class SyncSessionByHand(AsyncVariant):
    """A sync ``Session`` with every IO call wrapped by hand in a to-thread function."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self.engine = self.sync_engine = make_sync_engine(spec.url)
        self.maker = sessionmaker(self.engine, expire_on_commit=False)

    @abc.abstractmethod
    async def to_thread(self, fn: Callable[..., Any], *args: Any) -> Any: ...

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

    def session(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.maker()  # type: ignore[no-any-return]

    async def call_noop(self, sess: Any) -> None:
        await sess.run(noop)

    async def get(self, sess: Any, entity: type[Any], ident: int) -> Any:
        return await sess.get(entity, ident)

    async def all(self, sess: Any, statement: Any) -> Sequence[Any]:
        return (await sess.scalars(statement)).all()  # type: ignore[no-any-return]

    async def commit(self, sess: Any) -> None:
        await sess.commit()


@dataclass(frozen=True)
class VariantInfo:
    factory: Callable[[WorkerSpec], Variant]
    summary: str


#: Every variant, in table order. To benchmark another option of ours, add a line such as
#: ``"threadpool_anyio": VariantInfo(functools.partial(Threadpool, maker_kw={"offload":
#: "anyio"}), "...")``: the harness, tables and ratios pick it up.
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
        "sync Session, each call in asyncio.to_thread (40-thread default executor)",
    ),
    "asyncsession": VariantInfo(
        AsyncSessionVariant, "AsyncSession on asyncpg / aiomysql / aiosqlite"
    ),
    "threadpool": VariantInfo(
        functools.partial(Threadpool, maker_kw={}),
        "sqlalchemy_threadpool, defaults (guard='raise')",
    ),
    "threadpool_guard_off": VariantInfo(
        functools.partial(Threadpool, maker_kw={"guard": "off"}),
        "sqlalchemy_threadpool, guard='off'",
    ),
}

#: Extra ratios printed under a workload's table: (label, numerator, denominator).
PAIRED_RATIOS = [("guard on / off", "threadpool", "threadpool_guard_off")]


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
    idle_lag_ms: float = math.nan

    def cell(self, workload: str, variant: str) -> Cell:
        return self.cells.setdefault((workload, variant), Cell())


def jobs_for(workloads: Sequence[str]) -> list[tuple[str, frozenset[str]]]:
    """Workloads to jobs: W2 and W3 come from one run (the ticker runs during W2)."""
    jobs: list[tuple[str, frozenset[str]]] = []
    for w in workloads:
        if w in ("W2", "W3"):
            want = frozenset(x for x in ("W2", "W3") if x in workloads)
            if ("W23", want) not in jobs:
                jobs.append(("W23", want))
        else:
            jobs.append((w, frozenset({w})))
    return jobs


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_section(
    fixture: Fixture,
    backend: str,
    variants: Sequence[str],
    workloads: Sequence[str],
    sizes: Sizes,
    timeout: float,
) -> Section:
    section = Section(fixture.database, backend)
    section.idle_lag_ms = anyio.run(idle_lag_ms, backend=backend)
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
    return section


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


def report(
    sections: Sequence[Section], variants: Sequence[str], workloads: Sequence[str], markdown: bool
) -> str:
    out: list[str] = []
    heading = "### " if markdown else "== "
    for s in sections:
        out.append(f"{heading}{s.database} · {s.backend}")
        out.append("")
        for w in workloads:
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
                if not present:
                    rows.append([v, note or "-", "", "", ""])
                    continue
                mid = median(values)
                spread = (max(present) - min(present)) / mid * 100 if mid else math.nan
                ratio = paired_ratio(values, base)
                rows.append(
                    [
                        v,
                        fmt(mid),
                        f"±{spread / 2:.0f}%",
                        fmt(ratio, 2) + "x" if ratio is not None else "-",
                        str(len(present)),
                    ]
                )
            headers = ["variant", f"median {info.unit}", "spread", f"vs {info.baseline}", "n"]
            out.append(render(headers, rows, markdown))
            for label, num, den in PAIRED_RATIOS:
                ratio = paired_ratio(s.cell(w, num).values, s.cell(w, den).values)
                if ratio is not None:
                    out.append(f"\n{label} ({num} / {den}): {ratio:.3f}x")
            if w == "W3":
                out.append(f"\nidle-loop ticker p99 (floor): {fmt(s.idle_lag_ms)} ms")
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
        help="smaller measurements and 3 repeats: the default matrix in < 5 min",
    )
    parser.add_argument("--repeats", type=int, help="repeats per measurement (default 7; quick 3)")
    parser.add_argument("--tasks", type=int, help="W2/W3 concurrent tasks (default 32)")
    parser.add_argument("--requests", type=int, help="W2/W3 requests per measurement")
    parser.add_argument("--hop-calls", type=int, help="W0 calls per measurement")
    parser.add_argument("--point-calls", type=int, help="W1 calls per measurement")
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
