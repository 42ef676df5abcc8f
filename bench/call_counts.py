"""Deterministic counts of the loop thread's work per awaited call (issue 14, "the hop").

    python bench/call_counts.py                        # asyncio and trio, PostgreSQL
    python bench/call_counts.py --url sqlite:///tmp/counts.db --backends asyncio --show 30

Wall-clock and CPU time move with the machine's load; these counts do not. For each backend:

- **per awaited call**: sequential ``await sess.run(noop)`` inside one transaction (the session
  admitted, its worker lent): the Python function calls cProfile sees on the loop thread (it
  profiles only the thread it runs in), and the event-loop iterations (asyncio's
  ``BaseEventLoop._run_once``, trio's I/O manager's ``get_events``), per call;
- **per whole scope**: ``async with threadpool_session(m) as s: await s.run(body)``, ``body``
  one ``SELECT 1``: opening, admission, the call, commit + close, release;
- **concurrently**: ``--tasks`` tasks, each its own session, ``--per-task`` calls each, at once
  (how many calls one iteration resumes depends on timing, so this line is not exact).

``--show N`` prints the N most-called functions of the first measurement.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
from typing import Any

import anyio
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from sqlalchemy_threadpool import threadpool_session, threadpool_sessionmaker

DEFAULT_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def noop(_session: Session) -> None:
    return None


def select_one(session: Session) -> Any:
    return session.execute(text("SELECT 1")).scalar()


def counted(profile: cProfile.Profile, per: int) -> tuple[float, float]:
    """Function calls and loop iterations per unit in ``profile``."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    calls = iterations = 0
    for (filename, _line, name), (_cc, ncalls, *_rest) in stats.items():
        calls += ncalls
        if name == "_run_once" or (name == "get_events" and "trio" in filename):
            iterations += ncalls
    return calls / per, iterations / per


async def measure(args: argparse.Namespace, maker: Any) -> None:
    n, backend = args.calls, args.backend
    async with threadpool_session(maker) as sess:
        await sess.run(select_one)
        for _ in range(200):
            await sess.run(noop)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(n):
            await sess.run(noop)
        profile.disable()
    calls, iterations = counted(profile, n)
    print(
        f"{backend:8} per awaited call (in a transaction): {calls:6.1f} calls, "
        f"{iterations:.2f} loop iterations"
    )
    if args.show:
        pstats.Stats(profile).sort_stats("ncalls").print_stats(args.show)

    for _ in range(200):
        async with threadpool_session(maker) as sess:
            await sess.run(select_one)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(n):
        async with threadpool_session(maker) as sess:
            await sess.run(select_one)
    profile.disable()
    calls, iterations = counted(profile, n)
    print(
        f"{backend:8} per whole scope (2 hops):            {calls:6.1f} calls, "
        f"{iterations:.2f} loop iterations"
    )

    async def one_task() -> None:
        async with threadpool_session(maker, new=True) as sess:
            await sess.run(select_one)
            for _ in range(args.per_task):
                await sess.run(noop)

    profile = cProfile.Profile()
    profile.enable()
    async with anyio.create_task_group() as group:
        for _ in range(args.tasks):
            group.start_soon(one_task)
    profile.disable()
    calls, iterations = counted(profile, args.tasks * args.per_task)
    print(
        f"{backend:8} {args.tasks} tasks at once, per awaited call: {calls:6.1f} calls, "
        f"{iterations:.2f} loop iterations (timing-dependent)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--per-task", type=int, default=300)
    parser.add_argument("--show", type=int, default=0, metavar="N")
    args = parser.parse_args()
    engine = create_engine(args.url, pool_size=10, max_overflow=0)
    try:
        for backend in args.backends.split(","):
            args.backend = backend
            maker = threadpool_sessionmaker(engine)  # (its limiter belongs to one event loop)
            anyio.run(measure, args, maker, backend=backend)
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
