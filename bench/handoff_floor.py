"""The floor of W1 for any design that crosses threads once per call.

W1 (one ORM point query by primary key, awaited one at a time) misses issue 5's target of
1.10x raw sync. This script asks whether any thread-based design could meet it: it times the
same ``Session.get`` loop

- ``raw``: on the calling thread (the raw sync baseline);
- ``pingpong``: handed to one other thread per call and waited for, with two raw locks and no
  event loop at all (the cheapest possible cross-thread handoff in CPython);
- ``threadpool``: ``await sess.get(...)`` through a ThreadpoolSession (asyncio, defaults);

interleaved over repeats, and prints medians of process CPU time per call (steadier than wall
time on a shared machine) with ratios to ``raw``.

    python bench/handoff_floor.py --url postgresql+psycopg2://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from models import Base, User
from sqlalchemy_threadpool import threadpool_sessionmaker

ROWS = 100


def raw(engine: Engine, calls: int) -> float:
    with Session(engine) as s:
        start = time.process_time()
        for i in range(calls):
            s.get(User, i % ROWS + 1)
            s.expunge_all()
        return time.process_time() - start


def pingpong(engine: Engine, calls: int) -> float:
    go, done = threading.Lock(), threading.Lock()
    go.acquire()
    done.acquire()
    box: list[Callable[[], object] | None] = [None]

    def worker() -> None:
        while True:
            go.acquire()
            fn = box[0]
            if fn is None:
                return
            fn()
            done.release()

    thread = threading.Thread(target=worker)
    thread.start()
    with Session(engine) as s:
        start = time.process_time()
        for i in range(calls):

            def call(i: int = i) -> object:  # a lambda with a default: mypy cannot infer it
                return s.get(User, i % ROWS + 1)

            box[0] = call
            go.release()
            done.acquire()
            s.expunge_all()
        elapsed = time.process_time() - start
    box[0] = None
    go.release()
    thread.join()
    return elapsed


def threadpool(engine: Engine, calls: int) -> float:
    maker = threadpool_sessionmaker(engine)

    async def main() -> float:
        async with maker() as sess:
            await sess.get(User, 1)  # admitted, a thread and a connection held: steady state
            start = time.process_time()
            for i in range(calls):
                await sess.get(User, i % ROWS + 1)
                sess.expunge_all()
            return time.process_time() - start

    return anyio.run(main)


VARIANTS = {"raw": raw, "pingpong": pingpong, "threadpool": threadpool}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+psycopg2://postgres@127.0.0.1/test")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    engine = create_engine(args.url, pool_size=10)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(name=f"floor{i}") for i in range(ROWS)])
        s.commit()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for repeat in range(args.repeats):
            order = list(VARIANTS)[repeat % 3 :] + list(VARIANTS)[: repeat % 3]  # rotate
            for name in order:
                times[name].append(VARIANTS[name](engine, args.calls) / args.calls * 1e6)
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()
    base = statistics.median(times["raw"])
    print(f"{args.url}: CPU µs per point query, median of {args.repeats} x {args.calls} calls")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:11s} {med:7.1f} µs  {med / base:5.2f}x raw")


if __name__ == "__main__":
    main()
