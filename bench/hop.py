"""Micro-benchmark of the offload path: the bare hop (W0) and a point query (W1).

    python bench/hop.py                      # W0 on asyncio and trio, W1 on every database
    python bench/hop.py --repeats 5 --rounds 20 --databases postgresql,mysql
    python bench/hop.py --w0-only

W0 (bare hop): µs per no-op call through

- ``anyio.to_thread.run_sync`` (the baseline of the ratios) and ``asyncio.to_thread``;
- a session of ours, ``await sess.run(noop)`` outside a transaction (each call is admitted and
  released, as a request's first call is), with ``offload="anyio"`` and ``offload="worker"``.

W1 (ORM point query by primary key, sequential): µs per ``get(User, id)``, each id new to the
session, for a plain sync ``Session`` called directly (the baseline) and for our session with
each ``offload`` mode, on SQLite (a file), PostgreSQL and MariaDB/MySQL.

Variants are interleaved: within one event loop per backend, rounds of ``--calls`` calls per
variant, the order rotating every round; ``--repeats`` such loops per backend. Each table
prints the median of the samples with the ratio to the baseline measured in the same run, once
in wall-clock time and once in process CPU time per call (user + system, all threads): on a
busy machine the wall-clock is mostly waiting for a CPU, while the CPU time still shows what a
hop costs. ``SATP_WORKER_EVENTFD=0`` makes ``offload="worker"`` use its portable wake-ups (a
raw lock, ``call_soon_threadsafe``, trio's ``run_sync_soon``) instead of eventfds.

Server URLs come from ``SATP_BENCH_POSTGRESQL_URL`` / ``SATP_BENCH_MYSQL_URL`` (loopback
defaults); the table it creates has a name of its own and is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
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

Measure = Callable[[int], Awaitable[float]]


#: The process CPU time (user + system, all threads) per call of the last measurement: it
#: counts the work a hop costs, without the time spent waiting for a CPU on a busy machine.
last_cpu = [0.0]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stopwatch() -> Callable[[int], float]:
    """Start timing; the returned function gives wall µs per call (and sets ``last_cpu``)."""
    wall, cpu = time.perf_counter(), _cpu()

    def stop(calls: int) -> float:
        elapsed = time.perf_counter() - wall
        last_cpu[0] = (_cpu() - cpu) / calls * 1e6
        return elapsed / calls * 1e6

    return stop


async def timed(call: Callable[[], Awaitable[object]], calls: int) -> float:
    stop = stopwatch()
    for _ in range(calls):
        await call()
    return stop(calls)


async def interleaved(
    variants: list[tuple[str, Measure]], args: argparse.Namespace, backend: str, key: str
) -> dict[tuple[str, str], list[float]]:
    """Rounds of ``args.calls`` calls per variant, the order rotating each round."""
    samples: dict[tuple[str, str], list[float]] = {}
    for _, measure in variants:  # warm up: threads started, caches filled
        await measure(max(20, args.calls // 5))
    for round_ in range(args.rounds):
        shift = round_ % len(variants)
        for name, measure in variants[shift:] + variants[:shift]:
            samples.setdefault((key, name), []).append(await measure(args.calls))
            samples.setdefault((key, f"{name} [cpu]"), []).append(last_cpu[0])
    return samples


def w0(args: argparse.Namespace, url: str) -> dict[str, dict[str, float]]:
    engine = create_engine(url)
    try:
        return run_w0(args, engine)
    finally:
        engine.dispose()


def run_w0(args: argparse.Namespace, engine: Engine) -> dict[str, dict[str, float]]:
    samples: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.repeats):
        for backend in args.backends:

            async def main(backend: str = backend) -> None:
                makers = {
                    offload: threadpool_sessionmaker(engine, offload=offload)
                    for offload in ("anyio", "worker")
                }
                async with makers["anyio"]() as by_anyio, makers["worker"]() as by_worker:
                    variants: list[tuple[str, Measure]] = [
                        ("anyio.to_thread", hop(anyio.to_thread.run_sync, noop))
                    ]
                    if backend == "asyncio":
                        variants.append(
                            (
                                "asyncio.to_thread",
                                lambda n: timed(lambda: asyncio.to_thread(noop), n),
                            )
                        )
                    variants += [
                        ("session offload=anyio", lambda n: timed(lambda: by_anyio.run(noop), n)),
                        (
                            "session offload=worker",
                            lambda n: timed(lambda: by_worker.run(noop), n),
                        ),
                    ]
                    for key, values in (
                        await interleaved(variants, args, backend, backend)
                    ).items():
                        samples.setdefault(key, []).extend(values)

            anyio.run(main, backend=backend)
        print(f"  W0 repetition {rep + 1}/{args.repeats} done", file=sys.stderr)
    return medians(samples)


def hop(way: Callable[..., Awaitable[object]], fn: Callable[..., None]) -> Measure:
    return lambda n: timed(lambda: way(fn), n)


# -- W1: a point query by primary key --------------------------------------------------------


def run_w1(args: argparse.Namespace, database: str, url: str) -> dict[str, dict[str, float]]:
    if database == "sqlite":
        engine = create_engine(url)
    else:
        engine = create_engine(url, pool_size=5, max_overflow=0)
    warm = list(range(1, 11))
    ids = list(range(11, 11 + args.calls))
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        with Session(engine) as sess, sess.begin():
            rows = [{"id": i, "name": f"user {i}"} for i in range(1, 12 + args.calls)]
            sess.execute(insert(User), rows)
        plain = sessionmaker(engine, expire_on_commit=False)

        async def raw_sync(n: int) -> float:
            # A plain sync Session called directly (here on the idle loop's thread).
            with plain() as sess:
                for uid in warm:
                    sess.get(User, uid)
                stop = stopwatch()
                for uid in ids[:n]:
                    sess.get(User, uid)
                return stop(n)

        def ours(maker: threadpool_sessionmaker) -> Measure:
            async def measure(n: int) -> float:
                async with maker() as sess:  # each id new to the session
                    for uid in warm:
                        await sess.get(User, uid)
                    stop = stopwatch()
                    for uid in ids[:n]:
                        await sess.get(User, uid)
                    elapsed = stop(n)
                    await sess.rollback()
                return elapsed

            return measure

        for rep in range(args.repeats):
            for backend in args.backends:

                async def main(backend: str = backend) -> None:
                    variants: list[tuple[str, Measure]] = [("raw sync Session", raw_sync)]
                    for offload in ("anyio", "worker"):
                        maker = threadpool_sessionmaker(engine, offload=offload)
                        variants.append((f"ours offload={offload}", ours(maker)))
                    for key, values in (
                        await interleaved(variants, args, backend, backend)
                    ).items():
                        samples.setdefault(key, []).extend(values)

                anyio.run(main, backend=backend)
            print(f"  W1 {database} repetition {rep + 1}/{args.repeats} done", file=sys.stderr)
        return medians(samples)
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


# -- output ------------------------------------------------------------------------------------


def split(results: dict[str, dict[str, float]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(wall-clock medians, CPU-time medians)."""
    wall = {k: v for k, v in results.items() if not k.endswith(" [cpu]")}
    cpu = {k.removesuffix(" [cpu]"): v for k, v in results.items() if k.endswith(" [cpu]")}
    return wall, cpu


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
            value = by_backend.get(column)
            ref = base.get(column)
            if value is None:
                row += f" {'':>12} | {'':>6} |"
            else:
                ratio = f"{value / ref:.2f}x" if ref else ""
                row += f" {value:12.1f} | {ratio:>6} |"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per sample")
    parser.add_argument("--rounds", type=int, default=15, help="samples per variant and run")
    parser.add_argument("--repeats", type=int, default=3, help="runs (event loops) per backend")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--databases", default=",".join(DATABASES))
    parser.add_argument("--w0-only", action="store_true", help="skip W1")
    parser.add_argument("--w1-only", action="store_true", help="skip W0")
    parser.add_argument("--json", help="also write the medians to this file")
    args = parser.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    report: dict[str, Any] = {
        "calls": args.calls,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "eventfd": os.environ.get("SATP_WORKER_EVENTFD", "1"),
    }
    workloads: list[tuple[str, str, Callable[[], dict[str, dict[str, float]]]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_url = f"sqlite:///{tmp}/hop.db"
        if not args.w1_only:
            workloads.append(("W0 bare hop", "anyio.to_thread", lambda: w0(args, sqlite_url)))
        if not args.w0_only:
            for database in [d for d in args.databases.split(",") if d]:
                url = sqlite_url if database == "sqlite" else URLS[database]
                workloads.append(
                    (
                        f"W1 point query by PK, {database}",
                        "raw sync Session",
                        lambda d=database, u=url: run_w1(args, d, u),  # type: ignore[misc]
                    )
                )
        samples = f"median of {args.repeats * args.rounds} samples of {args.calls} calls"
        for title, baseline, run in workloads:
            wall, cpu = split(run())
            report[title] = {"wall_us": wall, "cpu_us": cpu}
            print(
                table(
                    f"{title}: wall-clock µs per call ({samples})", wall, baseline, args.backends
                )
            )
            print()
            print(
                table(
                    f"{title}: process CPU µs per call, all threads (same samples)",
                    cpu,
                    baseline,
                    args.backends,
                )
            )
            print()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
