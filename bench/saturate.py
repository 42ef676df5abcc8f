"""A saturated pool, as the stats and the logs show it (a demonstration, not a benchmark).

Starts three times as many tasks as the engine has connections; each holds a session for
``--hold`` seconds (a statement, a slow call in its worker, then an await with its transaction
still open), through two makers on
the one engine (requests and jobs, the jobs capped with ``limiter=``). Every ``--every``
seconds it prints ``engine_stats(engine)`` and each maker's ``stats()``; the admission log
(``sqlalchemy_threadpool._admission``) goes to the same output. Run::

    python bench/saturate.py                       # PostgreSQL, asyncio
    python bench/saturate.py --url sqlite:///sat.db --backend trio

The URL defaults to ``SATP_BENCH_POSTGRESQL_URL`` or the loopback test server.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import anyio
from sqlalchemy import create_engine, text

from sqlalchemy_threadpool import engine_stats, threadpool_session, threadpool_sessionmaker

DEFAULT_URL = os.environ.get(
    "SATP_BENCH_POSTGRESQL_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--hold", type=float, default=0.5, help="seconds each session holds")
    parser.add_argument("--every", type=float, default=0.2, help="seconds between stats")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
    anyio.run(_run, args, backend=args.backend)


async def _run(args: argparse.Namespace) -> None:
    engine = create_engine(args.url, pool_size=args.pool_size, max_overflow=0)
    requests = threadpool_sessionmaker(engine, admission_log_threshold=0.1)
    jobs = threadpool_sessionmaker(
        engine, limiter=max(1, args.pool_size // 2), admission_log_threshold=0.1
    )
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"{(time.monotonic() - started) * 1000:6.0f} ms {line}", flush=True)

    def stamp(record: logging.LogRecord) -> bool:  # the log lines on the same clock
        record.msg = f"{(time.monotonic() - started) * 1000:6.0f} ms LOG {record.msg}"
        return True

    logging.getLogger("sqlalchemy_threadpool._admission").addFilter(stamp)

    async def hold(maker: threadpool_sessionmaker) -> None:
        async with threadpool_session(maker, new=True) as sess:
            await sess.execute(text("SELECT 1"))
            await sess.run(lambda s: time.sleep(args.hold / 2))  # a slow call: in flight
            await anyio.sleep(args.hold / 2)  # the transaction stays open: still in use

    async def watch() -> None:
        while True:
            say(f"engine   {engine_stats(engine)!r}")
            say(f"requests {requests.stats()!r}")
            say(f"jobs     {jobs.stats()!r}")
            await anyio.sleep(args.every)

    tasks = 3 * args.pool_size
    say(f"{tasks} tasks, pool of {args.pool_size}, each holding a session {args.hold:g} s")
    async with anyio.create_task_group() as watcher:
        watcher.start_soon(watch)
        async with anyio.create_task_group() as group:
            for i in range(tasks):
                group.start_soon(hold, jobs if i % 3 == 2 else requests)
        say("all done")
        say(f"engine   {engine_stats(engine)!r}")
        watcher.cancel_scope.cancel()
    engine.dispose()


if __name__ == "__main__":
    main()
