#!/usr/bin/env python
"""Where the CPU time of W1/W2 goes: the event-loop thread, the worker threads, the server.

``bench/bench.py`` says how fast each variant is; this says *why*, for one variant at a time,
in one process (no subprocesses, so the numbers are this process's threads):

- per request (W2) or per call (W1), the CPU time of the event-loop thread, of all other
  threads of this process (the workers), and of the database server's processes (PostgreSQL
  backends or the MariaDB server; SQLite runs inside the workers), read from Linux's
  ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds of CPU, exact, unlike sampling);
- with ``--cprofile N``, the N functions of the event-loop thread with the most own time
  (``cProfile`` only sees the thread it is enabled in: the loop); ``--cprofile-cpu`` times
  them in the thread's CPU time instead of wall-clock time, so that time spent preempted or
  waiting for the GIL is not charged to whatever function was running.

On 2 cores the process's threads share one GIL: the loop thread's and the workers' Python
time add up to what one core can give, and the server runs on the other. A variant whose
loop-side work per request is larger serves fewer requests per second even where every
hop is fast.

    python bench/profile_cpu.py --database postgresql --variant threadpool raw_sync
    python bench/profile_cpu.py --database mysql --backend trio --cprofile 25 --variant threadpool
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import io
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench


def _schedstat_ns(path: str) -> int:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def thread_cpu_ns() -> dict[int, int]:
    """CPU nanoseconds of every thread of this process, by native thread id."""
    out = {}
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/schedstat"):
        out[int(path.split("/")[-2])] = _schedstat_ns(path)
    return out


def server_cpu_ns(database: str) -> int:
    """CPU nanoseconds of every process of the database server (0 for SQLite)."""
    names = {"postgresql": ("postgres",), "mysql": ("mariadbd", "mysqld")}.get(database, ())
    total = 0
    for comm_path in glob.glob("/proc/[0-9]*/comm"):
        try:
            with open(comm_path, encoding="ascii") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in names:
            pid_dir = os.path.dirname(comm_path)
            for path in glob.glob(f"{pid_dir}/task/*/schedstat"):
                total += _schedstat_ns(path)
    return total


class Split:
    """CPU of the loop thread, the other threads and the server over one measured stretch,
    with ``profile`` (if any) enabled for the stretch: it sees only the thread it runs in."""

    def __init__(self, database: str, profile: cProfile.Profile | None) -> None:
        self.database = database
        self.profile = profile
        self.loop_tid = threading.get_native_id()

    def __enter__(self) -> Split:
        self.wall = time.perf_counter()
        self.threads = thread_cpu_ns()
        self.server = server_cpu_ns(self.database)
        if self.profile is not None:
            self.profile.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.profile is not None:
            self.profile.disable()
        self.wall = time.perf_counter() - self.wall
        after = thread_cpu_ns()
        self.server = server_cpu_ns(self.database) - self.server
        self.loop = after.get(self.loop_tid, 0) - self.threads.get(self.loop_tid, 0)
        self.others = sum(
            ns - self.threads.get(tid, 0) for tid, ns in after.items() if tid != self.loop_tid
        )


def w2(variant: bench.Variant, requests: int, tasks: int, split: Split) -> None:
    if isinstance(variant, bench.RawSync):
        with ThreadPoolExecutor(bench.POOL_SIZE) as pool:
            list(pool.map(variant.request, range(bench.POOL_SIZE)))
            with split:
                list(pool.map(variant.request, range(requests)))
        return
    assert isinstance(variant, bench.AsyncVariant)

    async def measured() -> None:
        await variant._clients(0, tasks, tasks)  # warm-up
        with split:
            await variant._clients(tasks, requests, tasks)

    variant._run(measured)  # prepare(), anyio.run, release(): as bench.py measures


def w1(variant: bench.Variant, calls: int, split: Split) -> None:
    warm, ids = variant.point_ids(calls)
    if isinstance(variant, bench.RawSync):
        with variant.maker() as sess:
            for uid in warm:
                sess.get(bench.User, uid)
            with split:
                for uid in ids:
                    sess.get(bench.User, uid)
        return
    assert isinstance(variant, bench.AsyncVariant)

    async def measured() -> None:
        async with variant.session() as sess:
            for uid in warm:
                await variant.get(sess, bench.User, uid)
            with split:
                for uid in ids:
                    await variant.get(sess, bench.User, uid)

    variant._run(measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default="postgresql", choices=bench.DATABASES)
    parser.add_argument("--backend", default="asyncio", choices=bench.BACKENDS)
    parser.add_argument("--variant", nargs="+", default=["raw_sync", "threadpool"])
    parser.add_argument("--workload", default="W2", choices=("W1", "W2"))
    parser.add_argument("--requests", type=int, default=600, help="W2 requests (W1: calls)")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N")
    parser.add_argument(
        "--cprofile-cpu", action="store_true", help="profile in thread CPU time (time.thread_time)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        url = bench.server_url(args.database, tmp)
        fixture = bench.Fixture(args.database, url)
        try:
            variants = {}
            for name in args.variant:
                spec = bench.WorkerSpec(args.database, url, args.backend, name, fixture.user_ids)
                variants[name] = bench.VARIANTS[name].factory(spec)
            unit = "request" if args.workload == "W2" else "call"
            print(
                f"{args.workload} on {args.database}/{args.backend}, {args.requests} "
                f"{unit}s x {args.repeats} repeats (interleaved); CPU µs per {unit}, medians"
            )
            rows: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in variants}
            profiles: dict[str, cProfile.Profile] = {}
            for _ in range(args.repeats):
                for name, variant in variants.items():
                    fixture.reset("W23")
                    clock = time.thread_time if args.cprofile_cpu else time.perf_counter
                    prof = cProfile.Profile(clock) if args.cprofile else None
                    split = Split(args.database, prof)
                    if args.workload == "W2":
                        w2(variant, args.requests, args.tasks, split)
                    else:
                        w1(variant, args.requests, split)
                    n = args.requests
                    rows[name].append(
                        (
                            n / split.wall,
                            split.loop / n / 1e3,
                            split.others / n / 1e3,
                            split.server / n / 1e3,
                        )
                    )
                    if prof is not None:
                        profiles[name] = prof
            print(f"| variant | {unit}s/s | loop thread | other threads | server | process |")
            print("|---|---|---|---|---|---|")
            for name, samples in rows.items():
                columns = zip(*samples, strict=True)
                rate, loop, others, server = (statistics.median(c) for c in columns)
                print(
                    f"| {name} | {rate:.0f} | {loop:.0f} | {others:.0f} | {server:.0f} "
                    f"| {loop + others:.0f} |"
                )
            for name, prof in profiles.items():
                out = io.StringIO()
                stats = pstats.Stats(prof, stream=out)
                stats.sort_stats("tottime").print_stats(args.cprofile)
                print(f"\n### {name}: loop thread, own time (last repeat)\n")
                print(out.getvalue())
            for variant in variants.values():
                variant.close()
        finally:
            fixture.close()


if __name__ == "__main__":
    main()
