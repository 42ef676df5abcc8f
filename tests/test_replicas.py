"""Reads on a hot standby, writes on the primary: ``examples/read_replicas.py`` on real servers.

A throwaway primary and a standby cloned from it with ``pg_basebackup -R`` (``tests/scaleout.py``)
run for this module. The routing session sends a ``SELECT`` to the standby and a write (and the
rest of its transaction) to the primary; the tests check where each statement ran
(``pg_is_in_recovery()`` is true on the standby only), read-your-writes inside a transaction,
a lagging standby (replay paused), a standby that goes away and comes back, and the cancel of a
long statement on the standby.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from types import ModuleType

import anyio
import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from helpers import busy_backends, cancel_once_running, checked_out
from models import Base, User
from scaleout import ThrowawayStandby, start_replica_pair
from servers import ServerError, ThrowawayServer
from sqlalchemy_threadpool import engine_stats, threadpool_session, threadpool_sessionmaker
from webhelpers import load_example

pytestmark = pytest.mark.anyio

#: Seconds the slow statement would run if nothing stopped it, and "well under" that.
LONG = 30
PROMPT = 10
#: Where a statement ran, as the server itself says.
WHERE = select(func.pg_is_in_recovery())


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[ThrowawayServer, ThrowawayStandby]]:
    try:
        primary, standby = start_replica_pair()
    except (ServerError, OSError) as exc:
        message = f"no primary and standby could be started: {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}\nCI never skips these tests.", pytrace=False)
        pytest.skip(message)
    try:
        yield primary, standby
    finally:
        standby.close()
        primary.close()


def caught_up(primary: Engine, replica: Engine) -> None:
    """Wait until the standby has replayed everything the primary has written so far.

    The insert position, not the flushed one: the throwaway primary commits asynchronously.
    """
    with primary.connect() as conn:
        lsn = conn.execute(text("SELECT pg_current_wal_insert_lsn()")).scalar_one()
    query = text("SELECT pg_last_wal_replay_lsn() >= CAST(:lsn AS pg_lsn)")
    for _ in range(1000):
        with replica.connect() as conn:
            if conn.execute(query, {"lsn": lsn}).scalar_one():
                return
        time.sleep(0.01)
    raise AssertionError("the standby did not catch up with the primary")


@pytest.fixture
def engines(
    pair: tuple[ThrowawayServer, ThrowawayStandby],
) -> Iterator[tuple[Engine, Engine]]:
    """(primary, replica) engines on fresh tables, the standby caught up, replay running."""
    primary_server, standby = pair
    if not (standby.data / "postmaster.pid").exists():
        standby.start()  # a failed test may have left it stopped
    admin = create_engine(primary_server.url, poolclass=NullPool)
    observer = create_engine(standby.url, poolclass=NullPool)
    try:
        with admin.begin() as conn:
            Base.metadata.drop_all(conn)
            Base.metadata.create_all(conn)
        with observer.connect() as conn:
            conn.execute(text("SELECT pg_wal_replay_resume()"))
        caught_up(admin, observer)
    finally:
        admin.dispose()
        observer.dispose()
    primary = create_engine(primary_server.url, pool_size=3, max_overflow=0)
    replica = create_engine(standby.url, pool_size=3, max_overflow=0, pool_pre_ping=True)
    try:
        yield primary, replica
    finally:
        primary.dispose()
        replica.dispose()


@pytest.fixture
def routing() -> ModuleType:
    return load_example("read_replicas")


def maker_for(routing: ModuleType, engines: tuple[Engine, Engine]) -> threadpool_sessionmaker:
    maker: threadpool_sessionmaker = routing.routing_sessionmaker(*engines)
    return maker


def assert_nothing_held(*engines: Engine) -> None:
    for engine in engines:
        assert checked_out(engine) == 0
        observer = create_engine(engine.url, poolclass=NullPool)
        try:
            assert busy_backends(observer) == []
        finally:
            observer.dispose()


async def test_reads_go_to_the_replica_and_writes_to_the_primary(
    routing: ModuleType, engines: tuple[Engine, Engine]
) -> None:
    primary, replica = engines
    maker = maker_for(routing, engines)
    async with threadpool_session(maker) as sess:
        assert await sess.scalar(WHERE) is True  # a read: the standby
        assert engine_stats(replica).in_use == 1  # admitted on the standby's capacity
        assert await sess.scalar(WHERE.execution_options(primary=True)) is False
    assert (engine_stats(primary).in_use, engine_stats(replica).in_use) == (0, 0)
    async with threadpool_session(maker) as sess:
        sess.add(User(name="w"))
        await sess.flush()  # a write: the primary...
        assert await sess.scalar(WHERE) is False  # ...and the transaction reads there from now
    caught_up(primary, replica)
    async with threadpool_session(maker) as sess:  # the next transaction: the standby again
        assert await sess.scalar(WHERE) is True
        assert await sess.scalar(select(User.name)) == "w"
    assert_nothing_held(primary, replica)


async def test_read_your_writes_inside_a_transaction(
    routing: ModuleType, engines: tuple[Engine, Engine]
) -> None:
    """Written but not committed: only the primary's transaction can see it, and it does."""
    primary, replica = engines
    maker = maker_for(routing, engines)
    async with threadpool_session(maker) as sess:
        assert (await sess.scalars(select(User.name))).all() == []  # the standby
        sess.add(User(name="mine"))
        await sess.flush()
        assert (await sess.scalars(select(User.name))).all() == ["mine"]
        await sess.rollback()
        assert (await sess.scalars(select(User.name))).all() == []  # the standby again
        assert await sess.scalar(WHERE) is True
    assert_nothing_held(primary, replica)


async def test_a_lagging_replica_serves_old_data_until_it_replays(
    routing: ModuleType, engines: tuple[Engine, Engine]
) -> None:
    primary, replica = engines
    maker = maker_for(routing, engines)
    with replica.connect() as conn:
        conn.execute(text("SELECT pg_wal_replay_pause()"))
    async with threadpool_session(maker) as sess:
        sess.add(User(name="new"))  # committed on the primary at the end of the scope
    async with threadpool_session(maker) as sess:
        assert (await sess.scalars(select(User.name))).all() == []  # the replica lags
        fresh = select(User.name).execution_options(primary=True)
        assert (await sess.scalars(fresh)).all() == ["new"]  # the primary has it
    with replica.connect() as conn:
        conn.execute(text("SELECT pg_wal_replay_resume()"))
    caught_up(primary, replica)
    async with threadpool_session(maker) as sess:
        assert (await sess.scalars(select(User.name))).all() == ["new"]
    assert_nothing_held(primary, replica)


async def test_a_replica_that_goes_away_fails_reads_then_recovers(
    routing: ModuleType,
    engines: tuple[Engine, Engine],
    pair: tuple[ThrowawayServer, ThrowawayStandby],
) -> None:
    primary, replica = engines
    standby = pair[1]
    maker = maker_for(routing, engines)
    async with threadpool_session(maker) as sess:  # a pooled connection to the standby
        assert await sess.scalar(WHERE) is True
    await anyio.to_thread.run_sync(standby.stop)
    try:
        with pytest.raises(OperationalError):  # the driver's own error, unchanged
            async with threadpool_session(maker) as sess:
                await sess.scalar(select(User.name))
        assert checked_out(replica) == 0
        assert checked_out(primary) == 0
        async with threadpool_session(maker) as sess:  # writes do not need the replica
            sess.add(User(name="while-down"))
    finally:
        await anyio.to_thread.run_sync(standby.start)
    caught_up(primary, replica)
    async with threadpool_session(maker) as sess:  # pre-ping replaced the dead connections
        assert (await sess.scalars(select(User.name))).all() == ["while-down"]
    assert_nothing_held(primary, replica)


async def test_cancel_stops_a_long_statement_on_the_replica(
    routing: ModuleType, engines: tuple[Engine, Engine]
) -> None:
    primary, replica = engines
    maker = maker_for(routing, engines)
    started = threading.Event()
    observer = create_engine(replica.url, poolclass=NullPool)

    def long_read(session: Session) -> None:
        started.set()
        session.execute(select(func.pg_sleep(LONG)))  # a SELECT: routed to the standby

    try:

        async def work() -> None:
            async with threadpool_session(maker) as sess:
                await sess.run(long_read)

        start = anyio.current_time()
        scope = await cancel_once_running(work, observer, started, "pg_sleep")
        elapsed = anyio.current_time() - start
        assert scope.cancelled_caught
        assert elapsed < PROMPT, f"the cancelled call took {elapsed:.1f} s"
        assert busy_backends(observer) == []  # stopped on the standby
    finally:
        observer.dispose()
    assert_nothing_held(primary, replica)
