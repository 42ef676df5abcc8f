"""Micro-benchmark of the offload path: the bare hop (W0) and a point query (W1).

    python bench/hop.py                      # W0 on asyncio and trio, W1 on every database
    python bench/hop.py --repeats 9 --calls 3000 --databases postgresql,mysql
    python bench/hop.py --w0-only

W0 (bare hop): µs per no-op call through

- ``anyio.to_thread.run_sync`` (the baseline of the ratios) and ``asyncio.to_thread``;
- a session of ours, ``await sess.run(noop)`` outside a transaction (each call is admitted and
  released, as a request's first call is), with ``offload="anyio"`` and ``offload="worker"``.

W1 (ORM point query by primary key, sequential): µs per ``get(User, id)``, each id new to the
session, for a plain sync ``Session`` called directly (the baseline) and for our session with
each ``offload`` mode, on SQLite (a file), PostgreSQL and MariaDB/MySQL.

Variants are interleaved (their order rotates every repetition) and each prints the median
of its repetitions, with the ratio to the baseline measured in the same run. Server URLs come
from ``SATP_BENCH_POSTGRESQL_URL`` / ``SATP_BENCH_MYSQL_URL`` (loopback defaults); the table
it creates has a name of its own and is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import Engine, String, create_engine, insert
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_threadpool import threadpool_sessionmaker

BACKENDS = ("asyncio", "trio")
DATABASES = ("sqlite", "postgresql", "mysql")
URLS = {
    "postgresql": os.environ.get(
        "SATP_BENCH_POSTGRESQL_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
    ),
    "mysql": os.environ.get("SATP_BENCH_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
TABLE = f"satp_hop_users_{os.getpid()}"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def noop(*args: object) -> None:
    return None


# -- W0: the bare hop ------------------------------------------------------------------------


def w0_variants(backend: str, engine: Engine) -> dict[str, Callable[[int], Awaitable[float]]]:
    async def timed(call: Callable[[], Awaitable[object]], calls: int) -> float:
        for _ in range(max(50, calls // 10)):
            await call()
        start = time.perf_counter()
        for _ in range(calls):
            await call()
        return (time.perf_counter() - start) / calls * 1e6

    async def to_thread(calls: int) -> float:
        return await timed(lambda: anyio.to_thread.run_sync(noop), calls)

    async def asyncio_to_thread(calls: int) -> float:
        return await timed(lambda: asyncio.to_thread(noop), calls)

    def session(offload: Any) -> Callable[[int], Awaitable[float]]:
        async def run(calls: int) -> float:
            maker = threadpool_sessionmaker(engine, offload=offload)
            async with maker() as sess:
                return await timed(lambda: sess.run(noop), calls)

        return run

    variants = {"anyio.to_thread": to_thread}
    if backend == "asyncio":
        variants["asyncio.to_thread"] = asyncio_to_thread
    variants["session offload=anyio"] = session("anyio")
    variants["session offload=worker"] = session("worker")
    return variants


def run_w0(args: argparse.Namespace, engine: Engine) -> dict[str, dict[str, float]]:
    samples: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeats):
        for backend in args.backends:

            async def one_round(backend: str = backend, rep: int = rep) -> None:
                variants = list(w0_variants(backend, engine).items())
                shift = rep % len(variants)
                for name, measure in variants[shift:] + variants[:shift]:
                    samples.setdefault((backend, name), []).append(await measure(args.calls))

            anyio.run(one_round, backend=backend)
        print(f"  W0 repetition {rep + 1}/{args.repeats} done", file=sys.stderr)
    return medians(samples)


# -- W1: a point query by primary key --------------------------------------------------------


def point_ids(rows: int, calls: int) -> tuple[list[int], list[int]]:
    warm = max(1, calls // 10)
    return list(range(1, warm + 1)), list(range(warm + 1, warm + 1 + calls))


def raw_sync(engine: Engine, calls: int) -> float:
    warm, ids = point_ids(0, calls)
    with sessionmaker(engine, expire_on_commit=False)() as sess:
        for uid in warm:
            sess.get(User, uid)
        start = time.perf_counter()
        for uid in ids:
            sess.get(User, uid)
        return (time.perf_counter() - start) / len(ids) * 1e6


def ours(engine: Engine, calls: int, backend: str, offload: str) -> float:
    warm, ids = point_ids(0, calls)

    async def main() -> float:
        maker = threadpool_sessionmaker(engine, offload=offload)  # type: ignore[arg-type]
        async with maker() as sess:
            for uid in warm:
                await sess.get(User, uid)
            start = time.perf_counter()
            for uid in ids:
                await sess.get(User, uid)
            elapsed = time.perf_counter() - start
            await sess.rollback()
        return elapsed / len(ids) * 1e6

    return float(anyio.run(main, backend=backend))


def run_w1(args: argparse.Namespace, database: str, url: str) -> dict[str, dict[str, float]]:
    engine = create_engine(url, pool_size=5, max_overflow=0) if database != "sqlite" else None
    engine = engine or create_engine(url)
    try:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        rows = args.calls + args.calls // 10 + 1
        with Session(engine) as sess, sess.begin():
            sess.execute(insert(User), [{"id": i, "name": f"user {i}"} for i in range(1, rows)])
        variants: list[tuple[str, str, Callable[[], float]]] = [
            ("-", "raw sync Session", lambda: raw_sync(engine, args.calls))
        ]
        for backend in args.backends:
            for offload in ("anyio", "worker"):
                variants.append(
                    (
                        backend,
                        f"ours offload={offload}",
                        lambda b=backend, o=offload: ours(engine, args.calls, b, o),
                    )
                )
        samples: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.repeats):
            shift = rep % len(variants)
            for backend, name, measure in variants[shift:] + variants[:shift]:
                samples.setdefault((backend, name), []).append(measure())
            print(f"  W1 {database} repetition {rep + 1}/{args.repeats} done", file=sys.stderr)
        return medians(samples)
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


# -- output ------------------------------------------------------------------------------------


def medians(samples: dict[tuple[str, str], list[float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for (backend, name), values in samples.items():
        out.setdefault(name, {})[backend] = statistics.median(values)
    return out


def table(
    title: str, results: dict[str, dict[str, float]], baseline: str, columns: list[str]
) -> str:
    lines = [title, ""]
    header = f"| {'variant':<26} |" + "".join(f" {c:>9} µs | {'ratio':>6} |" for c in columns)
    lines += [header, "|" + "-" * 28 + "|" + "------------:|-------:|" * len(columns)]
    base = results.get(baseline, {})
    for name, by_backend in results.items():
        row = f"| {name:<26} |"
        for column in columns:
            value = by_backend.get(column, by_backend.get("-"))
            ref = base.get(column, base.get("-"))
            if value is None:
                row += f" {'':>12} | {'':>6} |"
            else:
                ratio = f"{value / ref:.2f}x" if ref else ""
                row += f" {value:12.1f} | {ratio:>6} |"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--repeats", type=int, default=7, help="repetitions (medians)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--databases", default=",".join(DATABASES))
    parser.add_argument("--w0-only", action="store_true", help="skip W1")
    parser.add_argument("--w1-only", action="store_true", help="skip W0")
    parser.add_argument("--json", help="also write the medians to this file")
    args = parser.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    report: dict[str, Any] = {"calls": args.calls, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_url = f"sqlite:///{tmp}/hop.db"
        if not args.w1_only:
            engine = create_engine(sqlite_url)
            w0 = run_w0(args, engine)
            engine.dispose()
            report["W0"] = w0
            print(
                table(
                    f"W0 bare hop (median of {args.repeats} x {args.calls} calls)",
                    w0,
                    "anyio.to_thread",
                    args.backends,
                )
            )
            print()
        if not args.w0_only:
            for database in [d for d in args.databases.split(",") if d]:
                url = sqlite_url if database == "sqlite" else URLS[database]
                w1 = run_w1(args, database, url)
                report[f"W1 {database}"] = w1
                print(
                    table(
                        f"W1 point query by PK, {database} (median of {args.repeats} x "
                        f"{args.calls} calls)",
                        w1,
                        "raw sync Session",
                        args.backends,
                    )
                )
                print()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
