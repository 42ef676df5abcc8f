"""Threadpool sessions through PgBouncer in transaction pooling mode.

PgBouncer (``pgbouncer`` fixture: this test session's own, on a free port, in front of the
PostgreSQL test server, ``default_pool_size = 4``) links a server connection to a client for
one transaction, then gives it to the next client. What that means for us:

- the session lifecycle: a committed, rolled-back or closed session leaves no server connection
  linked to its client (PgBouncer's ``SHOW POOLS``: ``sv_active``), nothing idle in a
  transaction on the server, nothing checked out of the engine's pool;
- streaming: ``stream()`` uses a server-side cursor (psycopg2's named cursor: ``DECLARE``
  inside the transaction), which lives as long as the transaction, so it works through
  PgBouncer; a cursor that outlives its transaction (``WITH HOLD``, a named cursor on an
  ``AUTOCOMMIT`` connection) does not, and psycopg2 refuses the latter with its own error;
- server-side cancel: psycopg2's ``cancel()`` sends the cancel request to PgBouncer, which
  forwards it to the server connection running the statement: the ``pg_sleep`` stops there.

The server is observed directly (``observer``: the PostgreSQL test server, not PgBouncer).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import nullcontext

import anyio
import pytest
from sqlalchemy import Engine, create_engine, insert, make_url, select, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from helpers import busy_backends, cancel_once_running, checked_out, user_names
from models import Base, User
from scaleout import ThrowawayPgBouncer
from sqlalchemy_threadpool import threadpool_session, threadpool_sessionmaker

pytestmark = pytest.mark.anyio

#: Seconds the slow statement would run if nothing stopped it.
LONG = 30
#: "Well under" LONG: a cancelled call that returns later than this was not cancelled.
PROMPT = 10


@pytest.fixture
def observer(pgbouncer: ThrowawayPgBouncer) -> Iterator[Engine]:
    """PgBouncer's database seen directly (not through PgBouncer), with fresh tables."""
    eng = create_engine(pgbouncer.direct_url, poolclass=NullPool)
    with eng.begin() as conn:
        Base.metadata.drop_all(conn)
        Base.metadata.create_all(conn)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def bounced(pgbouncer: ThrowawayPgBouncer, observer: Engine) -> Iterator[Engine]:
    """An engine on the test database through PgBouncer."""
    eng = create_engine(pgbouncer.url(), pool_size=3, max_overflow=0, pool_timeout=10)
    try:
        yield eng
    finally:
        eng.dispose()


def database_of(engine: Engine) -> str:
    name = make_url(engine.url).database
    assert name is not None
    return name


def assert_released(bouncer: ThrowawayPgBouncer, engine: Engine, observer: Engine) -> None:
    """No server connection linked to our clients, none busy on the server, none checked out."""
    assert bouncer.servers_in_use(database_of(engine)) == 0
    assert busy_backends(observer) == []
    assert checked_out(engine) == 0


@pytest.mark.parametrize("ending", ["commit", "rollback", "close", "raise"])
async def test_the_session_holds_a_server_connection_for_its_transaction_only(
    pgbouncer: ThrowawayPgBouncer, bounced: Engine, observer: Engine, ending: str
) -> None:
    maker = threadpool_sessionmaker(bounced)
    database = database_of(bounced)
    with pytest.raises(KeyError) if ending == "raise" else nullcontext():
        async with maker() as sess:
            sess.add(User(name=ending))
            await sess.flush()
            assert pgbouncer.servers_in_use(database) == 1  # linked for the transaction
            if ending == "commit":
                await sess.commit()
            elif ending == "rollback":
                await sess.rollback()
            elif ending == "close":
                await sess.close()
            else:
                raise KeyError(ending)
            assert pgbouncer.servers_in_use(database) == 0  # given back at once
    assert_released(pgbouncer, bounced, observer)
    assert user_names(observer) == ({"commit"} if ending == "commit" else set())


async def test_many_concurrent_scopes_share_the_pgbouncer_pool(
    pgbouncer: ThrowawayPgBouncer, bounced: Engine, observer: Engine
) -> None:
    """Twice as many sessions as the engine's pool: each commits, nothing is left linked."""
    maker = threadpool_sessionmaker(bounced)

    async def one(i: int) -> None:
        async with threadpool_session(maker) as sess:
            sess.add(User(name=f"u{i}"))
            await sess.flush()
            await sess.scalar(select(User.id).where(User.name == f"u{i}"))

    async with anyio.create_task_group() as tg:
        for i in range(2 * 3):
            tg.start_soon(one, i)
    assert user_names(observer) == {f"u{i}" for i in range(6)}
    assert_released(pgbouncer, bounced, observer)


async def test_stream_inside_the_transaction_works_through_pgbouncer(
    pgbouncer: ThrowawayPgBouncer, bounced: Engine, observer: Engine
) -> None:
    """The server-side cursor lives in the transaction, on the one linked server connection."""
    with observer.begin() as conn:
        conn.execute(insert(User), [{"name": f"n{i:04d}"} for i in range(250)])
    maker = threadpool_sessionmaker(bounced)
    seen: list[str] = []
    async with maker() as sess:
        stmt = select(User.name).order_by(User.name).execution_options(yield_per=40)
        async with await sess.stream_scalars(stmt) as names:
            async for name in names:
                seen.append(name)
                if len(seen) == 100:  # mid-stream: the cursor is open on the server
                    assert pgbouncer.servers_in_use(database_of(bounced)) == 1
    assert seen == [f"n{i:04d}" for i in range(250)]
    assert_released(pgbouncer, bounced, observer)


async def test_a_cursor_outside_a_transaction_is_refused_by_psycopg2(
    pgbouncer: ThrowawayPgBouncer, observer: Engine
) -> None:
    """AUTOCOMMIT: no transaction to keep the cursor in, so no stream (the documented limit).

    Through PgBouncer a cursor must not outlive its transaction (the next FETCH may run on
    another server connection); psycopg2 refuses a named cursor in autocommit mode with its own
    error, which reaches the caller unchanged and leaves nothing behind.
    """
    engine = create_engine(pgbouncer.url(), isolation_level="AUTOCOMMIT", pool_size=1)
    try:
        maker = threadpool_sessionmaker(engine)
        async with maker() as sess:
            with pytest.raises(ProgrammingError, match="named cursor"):
                await sess.stream(select(User.name))
        assert_released(pgbouncer, engine, observer)
    finally:
        engine.dispose()


async def test_cancel_through_pgbouncer_stops_the_statement_on_the_server(
    pgbouncer: ThrowawayPgBouncer, bounced: Engine, observer: Engine
) -> None:
    maker = threadpool_sessionmaker(bounced)
    started = threading.Event()

    def sleep(session: Session) -> None:
        started.set()
        session.execute(text(f"SELECT pg_sleep({LONG})"))

    async def work() -> None:
        async with threadpool_session(maker) as sess:
            await sess.run(sleep)

    start = anyio.current_time()
    scope = await cancel_once_running(work, observer, started, "pg_sleep")
    elapsed = anyio.current_time() - start
    assert scope.cancelled_caught
    assert elapsed < PROMPT, f"the cancelled call took {elapsed:.1f} s"
    assert_released(pgbouncer, bounced, observer)  # the pg_sleep is gone from the server
    async with threadpool_session(maker) as sess:  # and the pool works on
        assert await sess.scalar(text("SELECT 1")) == 1
