"""Deterministic counts of the worker threads' work per W2 request (issue 14, "the worker side").

    python bench/worker_counts.py                                 # PostgreSQL, asyncio
    python bench/worker_counts.py --backend trio --variant threadpool_whole --show 30

``bench/call_counts.py`` counts the event-loop thread; this counts every *other* thread: each
thread the threading module starts gets its own ``cProfile`` profile (``threading.setprofile``),
and the Python function calls of all of them are added up. Variants, each sequential (one
request at a time, so the count does not depend on timing):

- ``one_hop``: W2's request as one sync function in one ``anyio.to_thread.run_sync`` (a plain
  ``sessionmaker``, ``expire_on_commit=False``): the reference;
- ``one_hop_listener``: the same, on an engine that carries one no-op ``before_cursor_execute``
  listener: what SQLAlchemy adds per request once an engine has any listener at all;
- ``threadpool_whole``: ``async with threadpool_session(m) as s: await s.run(request)``;
- ``threadpool_whole_guard_off``: the same with ``guard="off"``.

Each variant runs in its own process, twice (``--small`` and ``--large`` requests, the bench
tables reset first): calls per request = the difference / the difference in requests, so the
start-up, imports and first-use caches cancel out. The bench tables are created in the
database of ``--url`` (a database of its own: they are dropped and made again).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import threading
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import create_engine, delete, event, select
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench

DEFAULT_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
VARIANTS = ("one_hop", "one_hop_listener", "threadpool_whole", "threadpool_whole_guard_off")


def child(args: argparse.Namespace) -> None:
    """Run ``args.requests`` requests of ``args.variant``; print the workers' call count."""
    engine = create_engine(args.url, pool_size=10, max_overflow=0)
    with engine.begin() as conn:
        seeded = bench.SEED_USERS * bench.SEED_POSTS_PER_USER
        conn.execute(delete(bench.Post).where(bench.Post.id > seeded))
        uids = list(conn.scalars(select(bench.User.id).order_by(bench.User.id)))
    if args.variant == "one_hop_listener":
        event.listen(engine, "before_cursor_execute", lambda *a: (a[2], a[3]), retval=True)
    profiles: list[cProfile.Profile] = []

    def start_profile(*_args: Any) -> None:  # a new thread's first event: profile it
        sys.setprofile(None)
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()

    threading.setprofile(start_profile)

    async def requests() -> None:
        if args.variant.startswith("one_hop"):
            maker = sessionmaker(engine, expire_on_commit=False)

            def request(i: int) -> None:
                with maker() as sess:
                    bench.request_body(sess, uids[i % len(uids)], i)
                    sess.commit()

            for i in range(args.requests):
                await anyio.to_thread.run_sync(request, i)
            return
        from sqlalchemy_threadpool import shutdown, threadpool_session, threadpool_sessionmaker

        guard = "off" if args.variant.endswith("guard_off") else "raise"
        tp_maker = threadpool_sessionmaker(engine, guard=guard)
        for i in range(args.requests):
            async with threadpool_session(tp_maker) as tp_sess:
                await tp_sess.run(bench.request_body, uids[i % len(uids)], i)
        await shutdown(tp_maker)

    anyio.run(requests, backend=args.backend)
    threading.setprofile(None)  # type: ignore[arg-type]
    stats: dict[str, int] = {}
    for profile in profiles:
        profile.disable()
        profile.create_stats()
        for (filename, line, name), (_cc, ncalls, *_rest) in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
            key = f"{filename}:{line}({name})"
            stats[key] = stats.get(key, 0) + ncalls
    engine.dispose()
    print(json.dumps(stats))


def count(args: argparse.Namespace, variant: str, requests: int) -> dict[str, int]:
    command = [sys.executable, __file__, "--child", variant, "--requests", str(requests)]
    command += ["--url", args.url, "--backend", args.backend]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=600)
    parser.add_argument("--show", type=int, default=0, metavar="N")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.variant = args.child
        child(args)
        return
    fixture = bench.Fixture(make_database(args.url), args.url)
    try:
        per = args.large - args.small
        print(f"W2 requests, sequential, {args.backend}: Python function calls in worker threads")
        for variant in args.variant:
            small, large = count(args, variant, args.small), count(args, variant, args.large)
            delta = {k: (large.get(k, 0) - small.get(k, 0)) / per for k in {*small, *large}}
            print(f"{variant:28} {sum(delta.values()):7.1f} per request")
            for key, calls in sorted(delta.items(), key=lambda kv: -kv[1])[: args.show]:
                print(f"    {calls:7.2f}  {key}")
    finally:
        fixture.close()


def make_database(url: str) -> str:
    """The bench's name of the database kind of ``url``."""
    name = url.split(":", 1)[0].split("+", 1)[0]
    return "mysql" if name == "mariadb" else name


if __name__ == "__main__":
    main()
