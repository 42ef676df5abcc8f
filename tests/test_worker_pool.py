"""Worker pools are objects: the default one, a maker's own (``worker_idle_timeout=``) and one an
application gives to several makers (``workers=``), on real databases and both loops."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import pytest
from sqlalchemy import Engine, select, text

from helpers import assert_clean, user_names
from models import User
from sqlalchemy_threadpool import (
    ConfigurationError,
    TransactionInterruptedError,
    WorkerPool,
    shutdown,
    threadpool_session,
    threadpool_sessionmaker,
)
from sqlalchemy_threadpool._worker_pool import DEFAULT_POOL

pytestmark = pytest.mark.anyio

#: Long enough that a thread is still there between the sessions of a test.
SHORT_IDLE = 0.2
#: An idle timeout no test waits for.
LONG_IDLE = 60.0
#: Generous bound for "eventually" (a thread exits): never reached when it works.
EVENTUALLY = 20.0


def pool_threads(pool: WorkerPool) -> set[int | None]:
    """The idents of the threads waiting in ``pool``."""
    with pool._lock:
        return {worker.thread.ident for worker in pool._idle}


def alive(ident: int) -> bool:
    return any(thread.ident == ident for thread in threading.enumerate())


async def eventually(predicate: Callable[[], bool]) -> bool:
    def poll() -> bool:
        deadline = time.monotonic() + EVENTUALLY
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    return await anyio.to_thread.run_sync(poll)


def meet(gate: threading.Barrier) -> int:
    """Wait in a worker until the other session of the test is in its own; the thread's ident."""
    gate.wait(EVENTUALLY)
    return threading.get_ident()


async def thread_of_a_session(maker: threadpool_sessionmaker, name: str) -> int:
    """Write a row in a session of ``maker``; the ident of the thread its transaction ran on."""
    async with threadpool_session(maker, new=True) as sess:
        sess.add(User(name=name))
        await sess.flush()
        ident: int = await sess.run(lambda s: threading.get_ident())
        assert name in set(await sess.scalars(select(User.name)))
    return ident


async def test_a_maker_given_a_pool_runs_its_sessions_on_the_pools_threads(
    engine: Engine, other_engine: Engine
) -> None:
    pool = WorkerPool(idle_timeout=LONG_IDLE)
    maker = threadpool_sessionmaker(engine, workers=pool)
    assert maker._workers is pool
    first = await thread_of_a_session(maker, "ada")
    assert pool_threads(pool) == {first}  # back in the given pool, not in the default one
    assert first not in pool_threads(DEFAULT_POOL)
    assert await thread_of_a_session(maker, "bob") == first  # and reused from it
    assert user_names(engine) == {"ada", "bob"}
    await shutdown(maker, dispose=False)
    assert_clean(engine, other_engine)


async def test_makers_given_one_pool_share_its_threads(engine: Engine) -> None:
    shared = WorkerPool(idle_timeout=LONG_IDLE)
    orders = threadpool_sessionmaker(engine, workers=shared)
    billing = threadpool_sessionmaker(engine, workers=shared)
    own = threadpool_sessionmaker(engine, worker_idle_timeout=LONG_IDLE)
    ident = await thread_of_a_session(orders, "order")
    assert await thread_of_a_session(billing, "invoice") == ident  # one thread, two makers
    assert await thread_of_a_session(own, "own") != ident  # a pool of its own: another thread
    assert pool_threads(shared) == {ident}
    assert own._workers not in (shared, DEFAULT_POOL)
    # Sessions of both makers at once: each has a thread of the shared pool.
    gate = threading.Barrier(2)
    seen: list[int] = []

    async def hold(maker: threadpool_sessionmaker) -> None:
        async with threadpool_session(maker, new=True) as sess:
            await sess.execute(text("SELECT 1"))
            seen.append(await sess.run(lambda s: meet(gate)))

    async with anyio.create_task_group() as group:
        group.start_soon(hold, orders)
        group.start_soon(hold, billing)
    assert len(set(seen)) == 2
    assert pool_threads(shared) == set(seen)
    assert user_names(engine) == {"order", "invoice", "own"}
    await shutdown(engine, dispose=False)


async def test_makers_given_no_pool_share_the_default_one(engine: Engine) -> None:
    first, second = threadpool_sessionmaker(engine), threadpool_sessionmaker(engine)
    assert first._workers is second._workers is DEFAULT_POOL
    ident = await thread_of_a_session(first, "first")
    assert await thread_of_a_session(second, "second") == ident
    assert threadpool_sessionmaker(engine, offload="anyio")._workers is None


async def test_each_pools_idle_threads_exit_after_its_own_timeout(engine: Engine) -> None:
    short, long = WorkerPool(idle_timeout=SHORT_IDLE), WorkerPool(idle_timeout=LONG_IDLE)
    brief = await thread_of_a_session(threadpool_sessionmaker(engine, workers=short), "brief")
    kept = await thread_of_a_session(threadpool_sessionmaker(engine, workers=long), "kept")
    assert await eventually(lambda: not alive(brief))
    assert short.idle == 0
    assert alive(kept)  # its pool's timeout is a minute away
    assert pool_threads(long) == {kept}
    long.stop_idle()
    assert await eventually(lambda: not alive(kept))


async def test_shutdown_of_a_maker_stops_its_pool_and_the_sessions_it_stopped(
    engine: Engine, other_engine: Engine
) -> None:
    mine, busy, idle = (WorkerPool(idle_timeout=LONG_IDLE) for _ in range(3))
    maker = threadpool_sessionmaker(engine, workers=mine)
    neighbour = threadpool_sessionmaker(engine, workers=busy)  # same engine, in a transaction
    bystander = threadpool_sessionmaker(engine, workers=idle)  # same engine, idle
    gate = threading.Barrier(2)

    async def hold() -> int:
        async with threadpool_session(maker, new=True) as sess:
            await sess.execute(text("SELECT 1"))
            return await sess.run(lambda s: meet(gate))

    mine_idents: list[int] = []

    async def run_hold() -> None:
        mine_idents.append(await hold())

    async with anyio.create_task_group() as group:
        group.start_soon(run_hold)
        group.start_soon(run_hold)
    idle_ident = await thread_of_a_session(bystander, "bystander")
    async with neighbour() as open_session:
        await open_session.execute(text("SELECT 1"))  # holds a thread of ``busy``
        busy_ident = await open_session.run(lambda s: threading.get_ident())
        assert busy.idle == 0
        await shutdown(maker)
        assert await eventually(lambda: not any(map(alive, mine_idents)))
        assert mine.idle == 0
        # The neighbour's transaction was stopped: its thread went back to its pool and left.
        assert await eventually(lambda: not alive(busy_ident))
        with pytest.raises(TransactionInterruptedError):
            await open_session.run(lambda s: None)
        await open_session.rollback()
    assert alive(idle_ident)  # another maker's idle pool keeps its threads
    assert pool_threads(idle) == {idle_ident}
    await shutdown(engine)  # given an engine: every pool's idle threads
    assert await eventually(lambda: not alive(idle_ident))
    assert_clean(engine, other_engine)


async def test_configure_rederives_the_pool(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    assert maker._workers is DEFAULT_POOL
    given = WorkerPool(idle_timeout=LONG_IDLE)
    maker.configure(workers=given)
    ident = await thread_of_a_session(maker, "given")
    assert pool_threads(given) == {ident}
    maker.configure(worker_idle_timeout=LONG_IDLE)  # replaces workers=: a pool of its own
    own = maker._workers
    assert own is not None
    assert own not in (given, DEFAULT_POOL)
    assert own.idle_timeout == LONG_IDLE
    ident = await thread_of_a_session(maker, "own")
    assert pool_threads(own) == {ident}
    maker.configure(bind=engine, expire_on_commit=False)  # the same timeout: the same pool
    assert maker._workers is own
    with pytest.raises(ConfigurationError, match="both given"):
        maker.configure(workers=given, worker_idle_timeout=5.0)
    with pytest.raises(ConfigurationError, match="workers must be a WorkerPool"):
        maker.configure(workers=10)
    assert maker._workers is own  # refused: unchanged
    maker.configure(worker_idle_timeout=SHORT_IDLE)
    assert maker._workers is not own
    maker.configure(workers=None)  # neither option any more: the default pool again
    assert maker._workers is DEFAULT_POOL
    maker.configure(workers=given, offload="anyio")
    assert maker._workers is None
    maker.configure(offload="worker")
    assert maker._workers is given
    assert user_names(engine) == {"given", "own"}


@pytest.mark.parametrize("idle_timeout", [0, -1.0, True])
async def test_a_pool_refuses_a_bad_idle_timeout(idle_timeout: float) -> None:
    with pytest.raises(ConfigurationError, match="idle_timeout must be a positive number"):
        WorkerPool(idle_timeout=idle_timeout)


async def test_a_maker_refuses_both_a_pool_and_an_idle_timeout(engine: Engine) -> None:
    with pytest.raises(ConfigurationError, match="leave worker_idle_timeout= out"):
        threadpool_sessionmaker(engine, workers=WorkerPool(), worker_idle_timeout=5.0)
    with pytest.raises(ConfigurationError, match="worker_idle_timeout must be a positive"):
        threadpool_sessionmaker(engine, offload="anyio", worker_idle_timeout=0)
