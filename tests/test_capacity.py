"""One capacity per engine: every maker, session and engine facade on an engine shares it.

The capacity is sized from the pool (``pool_size + max_overflow``), so however many makers and
:class:`ThreadpoolEngine` facades an engine has, no more sessions are admitted than it has
connections: nobody waits in pool checkout (which would hold a thread and end in the pool's
``TimeoutError``), everybody waits for admission on the loop. A maker's ``limiter=`` is a cap
on its own share; a session on several engines takes the capacity of each, in one order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anyio
import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import Session

from helpers import Overlap, assert_clean, checked_out, user_names
from models import Base, Post, User
from sqlalchemy_threadpool import (
    AdmissionTimeoutError,
    ThreadpoolEngine,
    engine_stats,
    threadpool_session,
    threadpool_sessionmaker,
)

#: The pools' own checkout timeout: a thread waiting in checkout fails after it.
POOL_TIMEOUT = 3


def _engine(db_url: str, size: int) -> Engine:
    return create_engine(db_url, pool_size=size, max_overflow=0, pool_timeout=POOL_TIMEOUT)


@pytest.fixture
def pool_of_two(db_url: str, engine: Engine) -> Iterator[Engine]:
    """An engine with two connections (``engine`` created the tables)."""
    two = _engine(db_url, 2)
    try:
        yield two
    finally:
        two.dispose()


@pytest.fixture
def pools_of_one(db_url: str, engine: Engine) -> Iterator[tuple[Engine, Engine]]:
    """Two independent engines of one connection each, on the test database."""
    first, second = _engine(db_url, 1), _engine(db_url, 1)
    try:
        yield first, second
    finally:
        first.dispose()
        second.dispose()


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition()`` on the loop until it holds (a deadline, not a threshold)."""
    with anyio.fail_after(2 * POOL_TIMEOUT):
        for _ in range(100_000):
            if condition():
                return
            await anyio.sleep(0.005)
    pytest.fail(f"never happened: {what}")


@pytest.mark.anyio
async def test_two_makers_on_one_engine_admit_no_more_than_its_pool(
    pool_of_two: Engine, other_engine: Engine
) -> None:
    """Four sessions of two makers on a pool of two: two admitted, two waiting on the loop."""
    requests = threadpool_sessionmaker(pool_of_two, admission_timeout=None)
    jobs = threadpool_sessionmaker(pool_of_two, admission_timeout=None)
    assert requests.limiter is jobs.limiter  # the engine's one capacity
    overlap = Overlap()
    go = anyio.Event()
    holding: list[str] = []

    def count(session: Session) -> int:
        with overlap.inside():  # a thread waiting in pool checkout would be counted here
            return session.scalar(select(func.count()).select_from(User)) or 0

    async def work(maker: threadpool_sessionmaker, name: str) -> None:
        async with threadpool_session(maker, new=True) as sess:
            assert await sess.run(count) == 0  # (reads: SQLite lets one writer at a time)
            holding.append(name)
            await go.wait()  # holds its connection until the four have been counted

    with anyio.fail_after(POOL_TIMEOUT):  # before any pool checkout could time out
        async with anyio.create_task_group() as group:
            for i, maker in enumerate([requests, jobs, requests, jobs]):
                group.start_soon(work, maker, f"u{i}")
            await _until(
                lambda: len(holding) == 2 and engine_stats(pool_of_two).waiting == 2,
                "two sessions hold a connection, two wait",
            )
            stats = engine_stats(pool_of_two)
            assert (stats.capacity, stats.in_use, stats.waiting) == (2, 2, 2)
            assert requests.stats().waiting + jobs.stats().waiting == 2
            assert checked_out(pool_of_two) == 2
            go.set()
    assert overlap.peak <= 2
    assert overlap.calls == 4
    assert sorted(holding) == [f"u{i}" for i in range(4)]
    assert engine_stats(pool_of_two).in_use == 0
    assert_clean(pool_of_two, other_engine)


@pytest.mark.anyio
async def test_an_engine_facade_and_a_maker_share_the_capacity(
    pools_of_one: tuple[Engine, Engine], other_engine: Engine
) -> None:
    one = pools_of_one[0]
    facade = ThreadpoolEngine(one)
    maker = threadpool_sessionmaker(facade, admission_timeout=None)
    timing_out = threadpool_sessionmaker(one, admission_timeout=0.2)
    assert maker.limiter is timing_out.limiter is facade._maker.limiter
    done: list[int] = []

    async def waiter() -> None:
        async with threadpool_session(maker, new=True) as sess:
            done.append(await sess.scalar(text("SELECT 2")))

    async with anyio.create_task_group() as group, facade.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar() == 1  # holds the connection
        assert facade.stats().in_use == 1
        with anyio.fail_after(POOL_TIMEOUT), pytest.raises(AdmissionTimeoutError):
            async with threadpool_session(timing_out, new=True) as sess:
                await sess.execute(text("SELECT 1"))  # not the pool's TimeoutError
        group.start_soon(waiter)
        await _until(lambda: facade.stats().waiting == 1, "the maker's session waits")
        stats = facade.stats()
        assert (stats.capacity, stats.in_use, stats.waiting) == (1, 1, 1)
        same = engine_stats(one)
        assert (same.capacity, same.in_use, same.waiting) == (1, 1, 1)
        assert maker.stats().waiting == 1
        assert done == []
    assert done == [2]
    assert facade.stats().in_use == 0
    assert_clean(one, other_engine)


@pytest.mark.anyio
async def test_a_cap_limits_one_maker_within_the_engines_capacity(
    pool_of_two: Engine, other_engine: Engine
) -> None:
    """``limiter=1`` on a jobs maker: one job at a time, the other connection for requests."""
    jobs = threadpool_sessionmaker(pool_of_two, limiter=1, admission_timeout=None)
    requests = threadpool_sessionmaker(pool_of_two, admission_timeout=0.5)
    go = anyio.Event()

    async def job(name: str) -> None:
        async with threadpool_session(jobs, new=True) as sess:
            sess.add(User(name=name))
            await sess.flush()
            await go.wait()

    async with anyio.create_task_group() as group:
        group.start_soon(job, "j1")
        group.start_soon(job, "j2")
        await _until(lambda: jobs.stats().waiting == 1, "the second job waits for the cap")
        assert (jobs.stats().capacity, jobs.stats().in_use) == (1, 1)
        assert engine_stats(pool_of_two).in_use == 1  # the waiting job holds nothing
        async with threadpool_session(requests) as sess:  # admitted at once
            assert await sess.scalar(text("SELECT 1")) == 1
            assert engine_stats(pool_of_two).in_use == 2
        go.set()
    assert user_names(other_engine) == {"j1", "j2"}
    assert (jobs.limiter.borrowed_tokens, engine_stats(pool_of_two).in_use) == (0, 0)
    assert_clean(pool_of_two, other_engine)


@pytest.mark.anyio
async def test_a_session_on_two_engines_takes_the_capacity_of_each(
    pools_of_one: tuple[Engine, Engine], other_engine: Engine
) -> None:
    """A multi-bind session holds both engines: a maker on one of them waits for admission."""
    first, second = pools_of_one
    both = threadpool_sessionmaker(first, binds={User: first, Post: second})
    only_second = threadpool_sessionmaker(second, admission_timeout=0.2)
    async with threadpool_session(both) as sess:
        assert await sess.scalar(select(func.count()).select_from(User)) == 0
        assert (engine_stats(first).in_use, engine_stats(second).in_use) == (1, 1)
        with anyio.fail_after(POOL_TIMEOUT), pytest.raises(AdmissionTimeoutError) as caught:
            async with threadpool_session(only_second, new=True) as other:
                await other.execute(text("SELECT 1"))
        assert "1-session capacity of" in str(caught.value)
    assert (engine_stats(first).in_use, engine_stats(second).in_use) == (0, 0)
    assert_clean(first, other_engine)
    assert_clean(second, other_engine)


@pytest.mark.anyio
@pytest.mark.parametrize("admission_timeout", [None, 30.0], ids=["no-timeout", "timeout"])
async def test_cancelled_while_waiting_for_the_second_engine_gives_back_the_first(
    pools_of_one: tuple[Engine, Engine], other_engine: Engine, admission_timeout: float | None
) -> None:
    """A session admitted on one engine of two and cancelled while it waits for the other
    gives the first token back: nothing taken is kept, with or without a timeout scope."""
    first, second = pools_of_one
    engine_stats(first), engine_stats(second)  # their capacities, in this order: first first
    both = threadpool_sessionmaker(
        first, binds={User: first, Post: second}, admission_timeout=admission_timeout
    )
    only_second = threadpool_sessionmaker(second)
    ran: list[bool] = []

    async def waiter() -> None:
        async with threadpool_session(both, new=True) as sess:
            await sess.run(lambda s: ran.append(True))

    async with threadpool_session(only_second) as holder:
        await holder.execute(text("SELECT 1"))
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(waiter)
                await _until(
                    lambda: engine_stats(second).waiting == engine_stats(first).in_use == 1,
                    "the waiter holds the first engine and waits for the second",
                )
                scope.cancel()
        assert scope.cancelled_caught
        assert ran == []
        assert (engine_stats(first).in_use, engine_stats(first).waiting) == (0, 0)
        assert (engine_stats(second).in_use, engine_stats(second).waiting) == (1, 0)
    assert (engine_stats(first).in_use, engine_stats(second).in_use) == (0, 0)
    async with threadpool_session(both, new=True) as sess:  # both engines free again
        assert await sess.scalar(select(func.count()).select_from(Post)) == 0
    assert_clean(first, other_engine)
    assert_clean(second, other_engine)


@pytest.mark.anyio
async def test_two_sessions_taking_two_engines_in_opposite_orders_never_hang(
    pools_of_one: tuple[Engine, Engine], other_engine: Engine
) -> None:
    """Admission takes the engines' capacities in one order, whatever order the SQL uses."""
    first, second = pools_of_one
    maker = threadpool_sessionmaker(first, binds={User: first, Post: second})

    async def use(order: list[type[Base]]) -> None:
        async with threadpool_session(maker, new=True) as sess:
            for model in order:
                await sess.scalar(select(func.count()).select_from(model))
                await anyio.sleep(0.02)  # the other session is started meanwhile

    with anyio.fail_after(POOL_TIMEOUT):  # a deadlock would hang; pool checkout would time out
        async with anyio.create_task_group() as group:
            group.start_soon(use, [User, Post])
            group.start_soon(use, [Post, User])
    assert (engine_stats(first).in_use, engine_stats(second).in_use) == (0, 0)
    assert_clean(first, other_engine)
    assert_clean(second, other_engine)


@pytest.mark.anyio
async def test_a_session_given_its_own_bind_is_admitted_on_that_engine(
    pools_of_one: tuple[Engine, Engine], other_engine: Engine
) -> None:
    first, second = pools_of_one
    maker = threadpool_sessionmaker(first)
    async with maker(bind=second) as sess:
        await sess.execute(text("SELECT 1"))
        assert (engine_stats(first).in_use, engine_stats(second).in_use) == (0, 1)
    assert_clean(second, other_engine)


def test_engines_derived_with_execution_options_share_the_capacity(db_url: str) -> None:
    engine = _engine(db_url, 2)
    try:
        autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        assert (
            threadpool_sessionmaker(autocommit).limiter is threadpool_sessionmaker(engine).limiter
        )
        assert engine_stats(autocommit).capacity == 2
    finally:
        engine.dispose()


def test_configure_bind_moves_the_maker_to_the_new_engines_capacity(
    pool_of_two: Engine, pools_of_one: tuple[Engine, Engine]
) -> None:
    maker = threadpool_sessionmaker(pool_of_two)
    maker.configure(bind=pools_of_one[0])
    assert maker.limiter is threadpool_sessionmaker(pools_of_one[0]).limiter
    assert maker.limiter.total_tokens == 1


def test_another_makers_limiter_as_limiter_means_no_cap(pool_of_two: Engine) -> None:
    """The old way to share a limiter between makers still works (the engine's own)."""
    first = threadpool_sessionmaker(pool_of_two)
    second = threadpool_sessionmaker(pool_of_two, limiter=first.limiter)
    assert second.limiter is first.limiter
    assert second._settings.gate.cap is None


def test_stats_start_empty(pool_of_two: Engine) -> None:
    stats = engine_stats(pool_of_two)
    assert (stats.capacity, stats.in_use, stats.waiting, stats.longest_wait) == (2, 0, 0, 0.0)
    assert stats.in_flight == 0
