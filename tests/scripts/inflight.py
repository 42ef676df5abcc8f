"""A program with a 30 s statement in flight when its main returns or it gets SIGINT.

Usage: ``python inflight.py URL asyncio|trio return|sigint|shutdown``

It prints ``RUNNING <backend id>`` once the statement is about to start, then:

- ``return``: main returns with the statement in flight. On asyncio the statement runs in a
  task of its own that ``asyncio.run`` cancels on the way out; on trio ``main`` cancels its
  nursery and returns;
- ``sigint``: main awaits the statement until the parent sends SIGINT;
- ``shutdown``: main calls ``shutdown(maker)`` from another task (an ASGI lifespan's exit).

Used by ``tests/test_shutdown.py``, which checks the process exits well before the statement
would end and leaves no backend behind on the server.
"""

from __future__ import annotations

import sys
import threading

import anyio
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from sqlalchemy_threadpool import (
    TransactionInterruptedError,
    shutdown,
    threadpool_session,
    threadpool_sessionmaker,
)

URL, LOOP, MODE = sys.argv[1:4]
engine = create_engine(URL, pool_size=2, max_overflow=0)
maker = threadpool_sessionmaker(engine)
started = threading.Event()
left_behind: list[object] = []  # a reference, so the task is not garbage-collected


def work(session: Session) -> None:
    if engine.dialect.name == "postgresql":
        backend = session.scalar(text("SELECT pg_backend_pid()"))
        sleep = "SELECT pg_sleep(30)"
    else:
        backend = session.scalar(text("SELECT CONNECTION_ID()"))
        sleep = "SELECT SLEEP(30)"
    print(f"RUNNING {backend}", flush=True)
    started.set()
    session.execute(text(sleep))
    print("FINISHED", flush=True)  # only if nothing stopped it


async def query() -> None:
    try:
        async with threadpool_session(maker) as sess:
            await sess.run(work)
    except TransactionInterruptedError:  # what shutdown() makes the awaiting task see
        print("STOPPED BY SHUTDOWN", flush=True)


async def until_running() -> None:
    while not started.is_set():  # noqa: ASYNC110 - the flag is set by a worker thread
        await anyio.sleep(0.01)
    await anyio.sleep(0.3)  # the statement is on the server by now


async def main() -> None:
    if MODE == "sigint":
        await query()
    elif MODE == "shutdown":
        async with anyio.create_task_group() as group:
            group.start_soon(query)
            await until_running()
            await shutdown(maker, timeout=10)
    elif LOOP == "asyncio":  # return: leave the task behind for asyncio.run to cancel
        import asyncio

        left_behind.append(asyncio.get_running_loop().create_task(query()))
        await until_running()
    else:  # return, trio: a nursery cannot outlive main, so main cancels it
        async with anyio.create_task_group() as group:
            group.start_soon(query)
            await until_running()
            group.cancel_scope.cancel()


if __name__ == "__main__":
    try:
        anyio.run(main, backend=LOOP)
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
        sys.exit(130)
    print("EXITING", flush=True)
