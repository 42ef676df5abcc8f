"""One maker, engine or session, many event loops: successive runs, of asyncio and trio.

Real programs run several event loops, one after the other, in one process: pytest runs each
test in a loop of its own while the makers are module-level, scripts call ``anyio.run`` twice,
and one engine serves the asyncio and the trio tests of a suite. Everything made once must work
in each of them, including when sessions queue for capacity. These tests run their loops
themselves (``anyio.run``), the first on the backend of the ``anyio_backend`` parameter, the
next ones on each library after itself and after the other. Two loops using one capacity or
one session *at the same time* is refused with :class:`EventLoopConflictError`.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Awaitable, Callable, Iterator

import anyio
import pytest
from sqlalchemy import Engine, create_engine, func, insert, select, text

from helpers import assert_clean, checked_out, user_names
from models import User
from sqlalchemy_threadpool import (
    EventLoopConflictError,
    ThreadpoolEngine,
    threadpool_session,
    threadpool_sessionmaker,
)

#: Admission happens in the client, the same for every database: the tests that only queue
#: sessions run on SQLite; those that run statements from many sessions on all databases.
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

OTHER = {"asyncio": "trio", "trio": "asyncio"}


def in_turn(first: str) -> list[str]:
    """Five runs' backends: each library after itself and after the other one."""
    other = OTHER[first]
    return [first, first, other, other, first]


def run(fn: Callable[..., Awaitable[object]], backend: str, *args: object) -> None:
    anyio.run(fn, *args, backend=backend)


@pytest.fixture
def pool_of_two(db_url: str, engine: Engine) -> Iterator[Engine]:
    """An engine with two connections (``engine`` created the tables)."""
    two = create_engine(db_url, pool_size=2, max_overflow=0, pool_timeout=5)
    try:
        yield two
    finally:
        two.dispose()


async def more_sessions_than_capacity(maker: threadpool_sessionmaker, tag: str) -> None:
    """Capacity + 2 sessions at once, each writing a row: some of them queue for admission."""

    async def one(index: int) -> None:
        async with threadpool_session(maker, new=True) as sess:
            sess.add(User(name=f"{tag} {index}"))
            await sess.flush()
            await anyio.sleep(0.01)  # holds its capacity while the others queue

    async with anyio.create_task_group() as group:
        for index in range(int(maker.limiter.total_tokens) + 2):
            group.start_soon(one, index)
    assert maker.stats().in_use == 0


def test_a_maker_serves_successive_event_loops_of_either_backend(
    pool_of_two: Engine, other_engine: Engine, anyio_backend: str
) -> None:
    """A module-level maker, used by loop after loop (a second asyncio.run() or trio.run(), and
    the other library after each), with sessions queueing for capacity in each: every one of
    them is admitted and commits."""
    maker = threadpool_sessionmaker(pool_of_two, admission_timeout=30)
    for index, backend in enumerate(in_turn(anyio_backend)):
        run(more_sessions_than_capacity, backend, maker, f"run {index}")
    assert len(user_names(other_engine)) == 5 * 4
    assert_clean(pool_of_two, other_engine)


def test_a_maker_made_inside_a_loop_serves_the_next_loops(
    pool_of_two: Engine, other_engine: Engine, anyio_backend: str
) -> None:
    """A maker (and the engine's capacity) made while a loop runs serves the next loops."""
    made: list[threadpool_sessionmaker] = []

    async def make_and_use() -> None:
        made.append(threadpool_sessionmaker(pool_of_two, admission_timeout=30))
        await more_sessions_than_capacity(made[0], "run 0")

    backends = in_turn(anyio_backend)
    run(make_and_use, backends[0])
    for index, backend in enumerate(backends[1:], 1):
        run(more_sessions_than_capacity, backend, made[0], f"run {index}")
    assert len(user_names(other_engine)) == 5 * 4
    assert_clean(pool_of_two, other_engine)


def test_an_engine_facade_serves_successive_event_loops(
    pool_of_two: Engine, other_engine: Engine, anyio_backend: str
) -> None:
    """A ``ThreadpoolEngine`` made once, with more connections at once than its pool has."""
    facade = ThreadpoolEngine(pool_of_two)

    async def connections(tag: str) -> None:
        async def one(index: int) -> None:
            async with facade.begin() as conn:
                await conn.execute(insert(User), {"name": f"{tag} {index}"})
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as group:
            for index in range(4):
                group.start_soon(one, index)

    for index, backend in enumerate(in_turn(anyio_backend)):
        run(connections, backend, f"run {index}")
    assert len(user_names(other_engine)) == 5 * 4
    assert_clean(pool_of_two, other_engine)


@pytest.mark.parametrize("offload", ["worker", "anyio"])
def test_an_idle_session_is_used_again_in_the_next_loops(
    engine: Engine, other_engine: Engine, anyio_backend: str, offload: str
) -> None:
    """A session made once and left idle (no transaction) between loops works in each loop."""
    maker = threadpool_sessionmaker(engine, offload=offload)  # type: ignore[arg-type]
    sess = maker()

    async def write(name: str) -> None:
        async with anyio.create_task_group() as group:  # two calls first, at once
            for _ in range(2):
                group.start_soon(sess.scalar, select(func.count()).select_from(User))
        sess.add(User(name=name))
        await sess.commit()
        assert await sess.scalar(select(func.count()).select_from(User)) == int(name[-1]) + 1
        await sess.close()  # ... or not: no transaction is left either way

    for index, backend in enumerate(in_turn(anyio_backend)):
        run(write, backend, f"run {index}")
    assert user_names(other_engine) == {f"run {index}" for index in range(5)}
    assert_clean(engine, other_engine)


def test_a_session_holding_a_transaction_when_its_loop_ended_goes_on_in_the_next(
    engine: Engine, other_engine: Engine, anyio_backend: str
) -> None:
    """A loop ends while a session holds a transaction (its connection, its capacity): the
    transaction is still the session's in the next loops, of either library, as a sync
    Session's would be; the last one commits it."""
    maker = threadpool_sessionmaker(engine)
    sess = maker()

    async def begin() -> None:
        sess.add(User(name="begun"))
        await sess.flush()

    async def go_on() -> None:
        assert sess.in_transaction()
        sess.add(User(name="went on"))
        await sess.flush()

    async def finish() -> None:
        assert sess.in_transaction()
        sess.add(User(name="finished"))
        await sess.commit()

    run(begin, anyio_backend)
    assert checked_out(engine) == 1  # it holds its connection still ...
    assert maker.stats().in_use == 1  # ... and its capacity
    run(go_on, anyio_backend)  # the same library's next loop
    assert user_names(other_engine) == set()  # (not committed yet)
    run(finish, OTHER[anyio_backend])  # the other library's
    assert user_names(other_engine) == {"begun", "went on", "finished"}
    assert maker.stats().in_use == 0
    assert_clean(engine, other_engine)


def test_a_session_lost_after_its_loop_ended_gives_its_capacity_back(
    pool_of_two: Engine, other_engine: Engine, anyio_backend: str
) -> None:
    """A session dropped while it held a transaction and collected only after its loop had
    ended gives its capacity back: the next loop admits as many sessions as the pool has."""
    maker = threadpool_sessionmaker(pool_of_two, admission_timeout=5)
    kept: list[object] = []

    async def begin_and_keep() -> None:
        sess = maker()
        sess.add(User(name="lost"))
        await sess.flush()  # holds a transaction, a connection and a token
        kept.append(sess)

    run(begin_and_keep, anyio_backend)
    assert maker.stats().in_use == 1
    kept.clear()
    gc.collect()  # collected now, with no loop left to give the token back on
    assert maker.stats().in_use == 0
    assert checked_out(pool_of_two) == 0

    async def whole_capacity() -> None:
        async def hold(ready: anyio.Event, go: anyio.Event) -> None:
            async with threadpool_session(maker, new=True) as sess:
                await sess.execute(text("SELECT 1"))
                ready.set()
                await go.wait()

        go = anyio.Event()
        readies = [anyio.Event(), anyio.Event()]
        async with anyio.create_task_group() as group:
            for ready in readies:
                group.start_soon(hold, ready, go)
            for ready in readies:
                await ready.wait()  # every token of the capacity is in use at once
            assert maker.stats().in_use == 2
            go.set()

    for backend in in_turn(anyio_backend):
        run(whole_capacity, backend)
    assert user_names(other_engine) == set()
    assert_clean(pool_of_two, other_engine)


@sqlite_only
def test_two_loops_at_once_on_one_capacity_is_a_clear_error(
    pool_of_two: Engine, anyio_backend: str
) -> None:
    """Another thread's loop has sessions queued for the engine's capacity when this thread's
    loop needs it too: refused with EventLoopConflictError (one capacity serves one event loop
    at a time), and the other loop is unharmed."""
    maker = threadpool_sessionmaker(pool_of_two, admission_timeout=10)
    queued, release = threading.Event(), threading.Event()
    outcome: list[str] = []

    async def other_loop() -> None:
        async def hold() -> None:
            async with threadpool_session(maker, new=True) as sess:
                await sess.execute(text("SELECT 1"))
                await anyio.to_thread.run_sync(release.wait, 30)

        async with anyio.create_task_group() as group:
            for _ in range(3):  # one more than the capacity: it queues
                group.start_soon(hold)
            with anyio.fail_after(10):
                for _ in range(1000):
                    if maker.stats().waiting:
                        break
                    await anyio.sleep(0.01)
            queued.set()
        outcome.append("done")

    thread = threading.Thread(target=run, args=(other_loop, "asyncio"))
    thread.start()
    try:
        assert queued.wait(10)

        async def this_loop() -> None:
            async with threadpool_session(maker, new=True) as sess:
                await sess.execute(text("SELECT 1"))

        with pytest.raises(EventLoopConflictError, match="one event loop at a time"):
            run(this_loop, anyio_backend)
    finally:
        release.set()
        thread.join(30)
    assert outcome == ["done"]
    assert maker.stats().in_use == 0


@sqlite_only
def test_a_session_in_a_call_of_a_loop_of_the_other_library_is_a_clear_error(
    engine: Engine, anyio_backend: str
) -> None:
    """A session is in the middle of a call in another thread's loop when a loop of the other
    library uses it: EventLoopConflictError at once (a session serves one loop at a time), and
    the call of the first loop is unharmed."""
    maker = threadpool_sessionmaker(engine)
    sess = maker()
    inside, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def wait_inside(session: object) -> int:
        inside.set()
        release.wait(30)
        return 1

    async def first_loop() -> None:
        outcome.append(await sess.run(wait_inside))
        await sess.close()

    thread = threading.Thread(target=run, args=(first_loop, anyio_backend))
    thread.start()
    try:
        assert inside.wait(10)

        async def other_loop() -> None:
            await sess.execute(text("SELECT 1"))

        with pytest.raises(EventLoopConflictError, match="one event loop at a time"):
            run(other_loop, OTHER[anyio_backend])
    finally:
        release.set()
        thread.join(30)
    assert outcome == [1]
    assert maker.stats().in_use == 0
