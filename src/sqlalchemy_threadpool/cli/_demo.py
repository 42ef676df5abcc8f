"""``python -m sqlalchemy_threadpool demo``: the point of the library on one screen.

It runs the same few hundred concurrent ORM "requests" (read a user, list their posts, run a
report query, add a post, commit) twice against one database:

- **threadpool**: each request in ``async with threadpool_session(maker)``, every query in a
  worker thread;
- **naive**: a plain sync ``Session`` called directly inside ``async def``, as happens when a
  sync driver is used from async code without help.

While each variant runs, a ticker task measures how late the event loop wakes it up (the lag
every other request of a real service would feel), and the demo prints requests per second
and lag percentiles side by side.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
from sqlalchemy import ForeignKey, String, create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .. import threadpool_session, threadpool_sessionmaker
from ._lag import recording_lag


class _Base(DeclarativeBase):
    pass


class DemoUser(_Base):
    __tablename__ = "satp_demo_user"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class DemoPost(_Base):
    __tablename__ = "satp_demo_post"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("satp_demo_user.id"), index=True)
    title: Mapped[str] = mapped_column(String(100))


USERS = 50
#: A report query that keeps the database busy for a moment, like a real request's heavier
#: query: the database's time is what blocks the loop in the naive variant.
_REPORT = {
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) "
    "SELECT count(*) FROM c",
    "postgresql": "SELECT count(*) FROM generate_series(1, 20000)",
    "mysql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) "
    "SELECT count(*) FROM c",
}


@dataclass
class Outcome:
    name: str
    requests: int
    seconds: float
    lags_ms: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def lag(self, q: float) -> float:
        if len(self.lags_ms) < 2:
            return max(self.lags_ms, default=0.0)
        return statistics.quantiles(self.lags_ms, n=100, method="inclusive")[int(q) - 1]


def _report_sql(engine: Engine) -> str:
    return _REPORT.get(engine.dialect.name, "SELECT 1")


def _request_sync(session: Session, user_id: int, report: str) -> int:
    user = session.get(DemoUser, user_id)
    assert user is not None
    posts = session.scalars(select(DemoPost).where(DemoPost.author_id == user_id)).all()
    session.execute(text(report)).scalar_one()
    session.add(DemoPost(author_id=user_id, title=f"post {len(posts) + 1} of {user.name}"))
    session.commit()
    return len(posts)


async def _measure(
    name: str, requests: int, concurrency: int, one: Callable[[int], Awaitable[Any]]
) -> Outcome:
    counter = iter(range(requests))

    async def worker() -> None:
        for n in counter:
            await one(n % USERS + 1)

    async with recording_lag() as lags:
        await anyio.sleep(0.01)
        start = time.perf_counter()
        async with anyio.create_task_group() as workers:
            for _ in range(concurrency):
                workers.start_soon(worker)
        seconds = time.perf_counter() - start
    return Outcome(name, requests, seconds, lags)


async def _run(engine: Engine, requests: int, concurrency: int) -> list[Outcome]:
    report = _report_sql(engine)
    maker = threadpool_sessionmaker(engine)

    async def threadpool_request(user_id: int) -> None:
        async with threadpool_session(maker) as sess:
            await sess.run(_request_sync, user_id, report)

    plain = sessionmaker(engine, expire_on_commit=False)

    async def naive_request(user_id: int) -> None:
        with plain() as session:  # blocks the event loop for the whole request
            _request_sync(session, user_id, report)
        await anyio.lowlevel.checkpoint()

    outcomes = [await _measure("threadpool", requests, concurrency, threadpool_request)]
    outcomes.append(
        await _measure("naive (sync on the loop)", requests, concurrency, naive_request)
    )
    return outcomes


def _setup(url: str | None) -> Engine:
    if url is None:
        path = os.path.join(tempfile.mkdtemp(prefix="satp-demo-"), "demo.db")
        url = f"sqlite:///{path}"
    engine = create_engine(url, pool_size=10, max_overflow=0, pool_timeout=30)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _wal(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

    _Base.metadata.drop_all(engine)
    _Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(DemoUser(id=i, name=f"user{i}") for i in range(1, USERS + 1))
        session.commit()
    return engine


def _print(outcomes: list[Outcome], url: str, backend: str, concurrency: int) -> None:
    print(f"database: {url}")
    print(f"event loop: {backend}; {outcomes[0].requests} requests, {concurrency} at a time")
    print()
    header = f"{'variant':<26}{'req/s':>9}{'lag p50':>10}{'lag p99':>10}{'lag max':>10}"
    print(header)
    print("-" * len(header))
    for o in outcomes:
        print(
            f"{o.name:<26}{o.rate:>9.0f}{o.lag(50):>8.1f}ms{o.lag(99):>8.1f}ms"
            f"{max(o.lags_ms, default=0):>8.1f}ms"
        )
    ours, naive = outcomes
    print()
    print(
        f"While the naive variant ran, other tasks waited up to "
        f"{max(naive.lags_ms, default=0):.0f} ms for the loop (p99 {naive.lag(99):.1f} ms); "
        "with threadpool sessions p99 was "
        f"{ours.lag(99):.1f} ms. Throughput: {ours.rate:.0f} vs {naive.rate:.0f} req/s."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sqlalchemy_threadpool demo",
        description="Concurrent ORM requests through threadpool sessions vs sync-on-the-loop.",
    )
    parser.add_argument("--url", help="database URL (default: an embedded SQLite file)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    if args.backend == "trio" and importlib.util.find_spec("trio") is None:
        print("error: --backend trio needs trio: pip install 'sqlalchemy-threadpool[trio]'")
        return 1
    try:
        engine = _setup(args.url)
    except Exception as exc:  # a bad URL or an unreachable server: one clear line
        print(f"error: cannot prepare the demo database: {type(exc).__name__}: {exc}")
        return 1
    try:
        outcomes = anyio.run(_run, engine, args.requests, args.concurrency, backend=args.backend)
        _print(
            outcomes,
            engine.url.render_as_string(hide_password=True),
            args.backend,
            args.concurrency,
        )
    finally:
        if args.url:
            _Base.metadata.drop_all(engine)
        engine.dispose()
    return 0
