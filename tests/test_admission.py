"""Admission: sessions wait for connection capacity on the event loop, never in a thread.

A session takes one token of its maker's limiter (sized to the pool) before its first call and
gives it back when its transaction ends, so only sessions that may hold a connection run worker
threads: no thread ever waits in pool checkout, and waiting for capacity is a plain await that
a cancellation or the admission timeout ends at once.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from helpers import Overlap, assert_clean, checked_out, user_names
from models import User
from sqlalchemy_threadpool import (
    AdmissionTimeoutError,
    ConfigurationError,
    threadpool_session,
    threadpool_sessionmaker,
)

#: The pool's own checkout timeout in these tests: a thread waiting in checkout fails after it.
POOL_TIMEOUT = 3

#: Admission and pool checkout happen in the client, the same for every database; the one
#: test that runs statements from many sessions runs on all of them.
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def pool_of_one(db_url: str, engine: Engine) -> Iterator[Engine]:
    """An engine with one connection (``engine`` created the tables)."""
    one = create_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=POOL_TIMEOUT)
    try:
        yield one
    finally:
        one.dispose()


async def _wait_for_waiters(limiter: anyio.CapacityLimiter, count: int) -> None:
    with anyio.fail_after(5):
        for _ in range(1000):
            if limiter.statistics().tasks_waiting >= count:
                return
            await anyio.sleep(0.005)


@pytest.mark.anyio
async def test_twenty_scopes_share_one_connection_without_deadlock(
    pool_of_one: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(pool_of_one)
    overlap = Overlap()

    def add(session: Session, name: str) -> None:
        with overlap.inside():  # a thread waiting in pool checkout would be counted here
            session.add(User(name=name))
            session.flush()

    def count(session: Session) -> int:
        with overlap.inside():
            return session.scalar(select(func.count()).select_from(User)) or 0

    async def request(i: int) -> None:
        async with threadpool_session(maker) as sess:
            await sess.run(add, f"u{i}")
            await anyio.sleep(0.01)  # awaits between two calls, holding the connection
            assert await sess.run(count) >= 1

    with anyio.fail_after(2 * POOL_TIMEOUT):
        async with anyio.create_task_group() as group:
            for i in range(20):
                group.start_soon(request, i)
    assert overlap.calls == 40
    assert overlap.peak == 1  # only the admitted session ever ran a thread
    assert user_names(other_engine) == {f"u{i}" for i in range(20)}
    assert maker.limiter.borrowed_tokens == 0
    assert_clean(pool_of_one, other_engine)


@pytest.mark.anyio
@sqlite_only
async def test_admission_timeout_raises_our_error_not_the_pools(
    pool_of_one: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(pool_of_one, admission_timeout=0.2)
    async with threadpool_session(maker) as holder:
        await holder.execute(text("SELECT 1"))  # holds the only connection until the block ends
        start = anyio.current_time()
        with pytest.raises(AdmissionTimeoutError, match="admission_timeout") as caught:
            async with threadpool_session(maker, new=True) as waiter:
                await waiter.execute(text("SELECT 1"))
        assert anyio.current_time() - start < POOL_TIMEOUT
        assert isinstance(caught.value, TimeoutError)
        assert not isinstance(caught.value, PoolTimeoutError)
        assert maker.limiter.borrowed_tokens == 1  # the holder's: the waiter took nothing
        assert await holder.scalar(text("SELECT 2")) == 2  # the holder is unaffected
    assert maker.limiter.borrowed_tokens == 0
    assert_clean(pool_of_one, other_engine)


def test_admission_timeout_defaults_to_the_pools(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/t.db", pool_size=1, pool_timeout=7)
    assert threadpool_sessionmaker(engine).admission_timeout == 7
    assert threadpool_sessionmaker(engine, admission_timeout=None).admission_timeout is None


@pytest.mark.anyio
@sqlite_only
async def test_cancel_while_waiting_for_admission_raises_at_once(
    pool_of_one: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(pool_of_one, admission_timeout=None)
    ran: list[bool] = []

    async def waiter() -> None:
        async with threadpool_session(maker, new=True) as sess:
            await sess.run(lambda s: ran.append(True))

    async with threadpool_session(maker) as holder:
        await holder.execute(text("SELECT 1"))
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(waiter)
                await _wait_for_waiters(maker.limiter, 1)
                start = anyio.current_time()
                scope.cancel()
        assert anyio.current_time() - start < 1  # no thread to wait for: well under the pool's
        assert ran == []
        assert maker.limiter.borrowed_tokens == 1  # no capacity lost, none leaked
        assert maker.limiter.statistics().tasks_waiting == 0
    assert maker.limiter.borrowed_tokens == 0
    with anyio.fail_after(1):  # the one connection is free for the next session at once
        async with threadpool_session(maker) as sess:
            assert await sess.scalar(text("SELECT 3")) == 3
    assert_clean(pool_of_one, other_engine)


@pytest.mark.anyio
@sqlite_only
async def test_a_session_without_a_transaction_gives_its_capacity_back(
    pool_of_one: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(pool_of_one, admission_timeout=1)
    async with maker() as idle:
        idle.add(User(name="ada"))
        await idle.commit()  # open, but holding no transaction and no connection
        async with threadpool_session(maker, new=True) as other:
            assert await other.scalar(select(User.name)) == "ada"
        assert await idle.scalar(select(func.count()).select_from(User)) == 1
    assert_clean(pool_of_one, other_engine)


@pytest.mark.anyio
@sqlite_only
async def test_a_waiting_session_holds_no_thread(
    pool_of_one: Engine, other_engine: Engine
) -> None:
    """Ten sessions wait for the one connection; the holder's calls still get a thread."""
    maker = threadpool_sessionmaker(pool_of_one, admission_timeout=None)
    started = time.monotonic()

    async def waiter(i: int) -> None:
        async with threadpool_session(maker, new=True) as sess:
            sess.add(User(name=f"w{i}"))

    async with anyio.create_task_group() as group, threadpool_session(maker) as holder:
        await holder.execute(text("SELECT 1"))
        for i in range(10):
            group.start_soon(waiter, i)
        await _wait_for_waiters(maker.limiter, 10)
        for _ in range(3):
            assert await holder.scalar(text("SELECT 1")) == 1
        holder.add(User(name="holder"))
    assert time.monotonic() - started < POOL_TIMEOUT  # nobody waited in pool checkout
    assert user_names(other_engine) == {"holder"} | {f"w{i}" for i in range(10)}
    assert_clean(pool_of_one, other_engine)


# -- configuration: the limiter against the pool ----------------------------------------------


@pytest.mark.parametrize(
    ("pool", "limiter"),
    [
        ({"pool_size": 1, "max_overflow": 0}, 2),
        ({"pool_size": 2, "max_overflow": 3}, 6),
        ({"pool_size": 2, "max_overflow": 3}, anyio.CapacityLimiter(6)),
    ],
    ids=["one", "overflow", "limiter_object"],
)
def test_a_limiter_larger_than_the_pool_is_refused(
    tmp_path: Path, pool: dict[str, int], limiter: int | anyio.CapacityLimiter
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/t.db", **pool)
    capacity = pool["pool_size"] + pool["max_overflow"]
    with pytest.raises(ConfigurationError, match=rf"\({capacity} connections"):
        threadpool_sessionmaker(engine, limiter=limiter)


def test_a_limiter_smaller_than_the_pool_is_a_cap_within_the_engines_capacity(
    tmp_path: Path,
) -> None:
    """No warning (warnings are errors here): the rest of the pool serves other makers."""
    engine = create_engine(f"sqlite:///{tmp_path}/t.db", pool_size=2, max_overflow=3)
    jobs = threadpool_sessionmaker(engine, limiter=4)
    assert jobs.limiter.total_tokens == 4
    assert threadpool_sessionmaker(engine).limiter.total_tokens == 5  # the engine's capacity
    assert threadpool_sessionmaker(engine, limiter=5).limiter.total_tokens == 5


async def _begin_and_drop(
    maker: threadpool_sessionmaker, name: str, *, in_a_cycle: bool = False
) -> None:
    sess = maker()  # never closed: the caller forgot `async with`
    if in_a_cycle:  # only the cycle collector can free it
        sess.info["itself"] = sess
    sess.add(User(name=name))
    await sess.flush()  # holds a transaction, a connection and a token
    assert maker.limiter.borrowed_tokens == 1


@pytest.mark.anyio
@pytest.mark.parametrize("in_a_cycle", [False, True], ids=["refcount", "cycle"])
async def test_a_session_dropped_without_closing_gives_its_capacity_back(
    pool_of_one: Engine,
    other_engine: Engine,
    caplog: pytest.LogCaptureFixture,
    in_a_cycle: bool,
) -> None:
    """Like a sync Session, a lost one returns its connection when collected; and its token."""
    maker = threadpool_sessionmaker(pool_of_one, admission_timeout=2)
    await _begin_and_drop(maker, "lost", in_a_cycle=in_a_cycle)
    with anyio.fail_after(10):  # collected, then the token is given back on the loop
        while maker.limiter.borrowed_tokens or checked_out(pool_of_one):
            gc.collect()
            await anyio.sleep(0.01)
    assert "garbage-collected while it held a transaction" in caplog.text
    async with threadpool_session(maker) as sess:  # the one connection is usable again
        sess.add(User(name="kept"))
    assert user_names(other_engine) == {"kept"}  # the lost transaction was rolled back
    assert_clean(pool_of_one, other_engine)
