"""Seeing the library at work: ``maker.stats()``, ``engine_stats()`` and the admission log.

A saturated pool must show in the stats (everything in use, sessions waiting, the oldest
wait growing) and in the logs (one warning per long wait, with the wait and the capacity)
before it shows as :class:`AdmissionTimeoutError`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Iterator

import anyio
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from helpers import assert_clean
from sqlalchemy_threadpool import (
    AdmissionTimeoutError,
    ConfigurationError,
    ThreadpoolStats,
    WorkerPool,
    engine_stats,
    threadpool_session,
    threadpool_sessionmaker,
)

POOL_TIMEOUT = 3
LOGGER = "sqlalchemy_threadpool._admission"


@pytest.fixture
def pool_of_one(db_url: str, engine: Engine) -> Iterator[Engine]:
    one = create_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=POOL_TIMEOUT)
    try:
        yield one
    finally:
        one.dispose()


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(2 * POOL_TIMEOUT):
        for _ in range(100_000):
            if condition():
                return
            await anyio.sleep(0.005)


@pytest.mark.anyio
@pytest.mark.parametrize("offload", ["worker", "anyio"])
async def test_a_saturated_pool_shows_in_the_stats(
    pool_of_one: Engine, other_engine: Engine, offload: str
) -> None:
    workers = WorkerPool() if offload == "worker" else None
    maker = threadpool_sessionmaker(
        pool_of_one,
        admission_timeout=None,
        offload=offload,  # type: ignore[arg-type]
        workers=workers,
    )
    inside, leave = threading.Event(), threading.Event()

    def hold(session: Session) -> int:
        session.execute(text("SELECT 1"))
        inside.set()
        leave.wait(2 * POOL_TIMEOUT)
        return 1

    async def waiter() -> None:
        async with threadpool_session(maker, new=True) as sess:
            await sess.execute(text("SELECT 1"))

    async with anyio.create_task_group() as group, threadpool_session(maker) as holder:
        await holder.execute(text("SELECT 1"))  # admitted, holds the only connection
        for _ in range(3):
            group.start_soon(waiter)
        await _until(lambda: maker.stats().waiting == 3)
        idle = maker.stats()
        assert (idle.capacity, idle.in_use, idle.waiting, idle.in_flight) == (1, 1, 3, 0)
        assert idle.threads == (1 if offload == "worker" else 0)  # the holder's thread
        await anyio.sleep(0.01)
        assert maker.stats().longest_wait > idle.longest_wait > 0  # the oldest wait grows
        group.start_soon(holder.run, hold)
        await anyio.to_thread.run_sync(inside.wait, 2 * POOL_TIMEOUT)
        busy = maker.stats()
        assert (busy.in_use, busy.waiting, busy.in_flight) == (1, 3, 1)
        assert engine_stats(pool_of_one).in_flight == 1
        assert re.fullmatch(
            r"ThreadpoolStats\(in_use=1/1, waiting=3, longest_wait=\d+\.\d{3}s, "
            r"in_flight=1, threads=[01]\)",
            repr(busy),
        )
        leave.set()
    after = maker.stats()
    assert (after.in_use, after.waiting, after.longest_wait, after.in_flight) == (0, 0, 0.0, 0)
    assert_clean(pool_of_one, other_engine)


@pytest.mark.anyio
async def test_stats_count_the_threads_of_the_worker_pool(
    pool_of_one: Engine, other_engine: Engine
) -> None:
    workers = WorkerPool()
    maker = threadpool_sessionmaker(pool_of_one, workers=workers)
    assert (maker.stats().threads, workers.threads) == (0, 0)
    async with threadpool_session(maker) as sess:
        await sess.execute(text("SELECT 1"))
        assert workers.threads == 1
    assert maker.stats().threads == 1  # idle in the pool now, still alive
    assert engine_stats(pool_of_one).threads >= 1  # (the default pool may have threads too)
    assert workers.stop_idle() == 1
    await _until(lambda: workers.threads == 0)  # the stopped thread retires
    assert maker.stats().threads == 0
    assert_clean(pool_of_one, other_engine)


def test_stats_are_a_frozen_snapshot(pool_of_one: Engine) -> None:
    stats = threadpool_sessionmaker(pool_of_one).stats()
    assert isinstance(stats, ThreadpoolStats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.in_use = 3  # type: ignore[misc]
    assert stats == engine_stats(pool_of_one)  # nothing waits: longest_wait is 0.0 in both


def test_engine_stats_refuses_what_is_not_an_engine(pool_of_one: Engine) -> None:
    maker = threadpool_sessionmaker(pool_of_one)
    with pytest.raises(TypeError, match=r"maker\.stats\(\)"):
        engine_stats(maker)  # type: ignore[arg-type]


# -- the admission log ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_long_admission_wait_is_logged_with_the_capacity(
    pool_of_one: Engine, other_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    maker = threadpool_sessionmaker(pool_of_one, admission_timeout=None, admission_log_threshold=0)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    async with anyio.create_task_group() as group, threadpool_session(maker) as holder:
        await holder.execute(text("SELECT 1"))
        assert caplog.records == []  # admitted at once: never logged

        async def waiter() -> None:
            async with threadpool_session(maker, new=True) as sess:
                await sess.execute(text("SELECT 1"))

        group.start_soon(waiter)
        await _until(lambda: maker.stats().waiting == 1)
        assert caplog.records == []  # logged when the wait ends
    [record] = caplog.records
    assert record.name == LOGGER
    assert record.levelno == logging.WARNING
    assert re.search(
        r"waited \d+\.\d{3} s for a database connection and was admitted: "
        r"the 1-session capacity of \S+, \d+ in use, 0 waiting",
        record.getMessage(),
    )
    assert record.capacity == 1  # type: ignore[attr-defined]
    assert record.admission_wait >= 0  # type: ignore[attr-defined]
    assert_clean(pool_of_one, other_engine)


@pytest.mark.anyio
async def test_an_admission_timeout_is_logged_and_a_short_wait_is_not(
    pool_of_one: Engine, other_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    timing_out = threadpool_sessionmaker(
        pool_of_one, admission_timeout=0.05, admission_log_threshold=0
    )
    quiet = threadpool_sessionmaker(
        pool_of_one, admission_timeout=0.05, admission_log_threshold=None
    )
    caplog.set_level(logging.WARNING, logger=LOGGER)
    async with threadpool_session(timing_out) as holder:
        await holder.execute(text("SELECT 1"))
        for maker in (quiet, timing_out):
            with pytest.raises(AdmissionTimeoutError):
                async with threadpool_session(maker, new=True) as sess:
                    await sess.execute(text("SELECT 1"))
    [record] = caplog.records  # only ``timing_out``'s
    assert "gave up (admission_timeout)" in record.getMessage()
    assert_clean(pool_of_one, other_engine)


def test_the_default_threshold_is_a_tenth_of_the_admission_timeout_at_most_a_second(
    pool_of_one: Engine,
) -> None:
    def threshold(**kw: object) -> float | None:
        return threadpool_sessionmaker(pool_of_one, **kw).admission_log_threshold  # type: ignore[arg-type]

    assert threshold() == 0.3  # pool_timeout=3 in these tests
    assert threshold(admission_timeout=0.05) == pytest.approx(0.005)
    assert threshold(admission_timeout=60) == 1.0
    assert threshold(admission_timeout=None) == 1.0
    assert threshold(admission_timeout=None, admission_log_threshold=0.25) == 0.25


@pytest.mark.parametrize("bad", [-1, "0.1", True])
def test_bad_admission_log_thresholds(pool_of_one: Engine, bad: object) -> None:
    with pytest.raises(ConfigurationError, match="admission_log_threshold"):
        threadpool_sessionmaker(pool_of_one, admission_log_threshold=bad)  # type: ignore[arg-type]


def test_configure_changes_the_threshold_and_keeps_the_cap(pool_of_one: Engine) -> None:
    maker = threadpool_sessionmaker(pool_of_one, limiter=1)
    cap = maker.limiter
    maker.configure(admission_log_threshold=2.5)
    assert maker.admission_log_threshold == 2.5
    assert maker.limiter is cap  # sessions holding its tokens still count
