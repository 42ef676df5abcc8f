"""``run_transaction()``: units of work retried on serialization failures, deadlocks, busy files.

Every retry here is caused by the real database: concurrent increments under SERIALIZABLE,
two transactions locking two rows in opposite orders, a SQLite file held by another
connection, a lock wait timeout. Tasks are lined up with barriers and events, never with
sleeps, so each conflict happens on every run.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    Table,
    create_engine,
    event,
    insert,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from helpers import (
    assert_clean,
    cancel_once_running,
    checked_out,
    only_on,
    slow_statement,
    user_names,
)
from models import User
from sqlalchemy_threadpool import (
    ThreadpoolSession,
    current_session,
    is_retryable,
    run_transaction,
    threadpool_sessionmaker,
)
from sqlalchemy_threadpool._call import running

pytestmark = pytest.mark.anyio

#: Concurrent tasks in the counter tests.
N = 8
#: Bound of every wait for the other tasks (a broken test fails, it never hangs).
WAIT_S = 30

_meta = MetaData()
counter = Table(
    "satp_retry_counter",
    _meta,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("value", Integer, nullable=False),
)


@pytest.fixture
def counters(engine: Engine) -> Engine:
    """Two counter rows (ids 1 and 2, value 0) next to the usual tables."""
    with engine.begin() as conn:
        _meta.drop_all(conn)
        _meta.create_all(conn)
        conn.execute(insert(counter), [{"id": 1, "value": 0}, {"id": 2, "value": 0}])
    return engine


def values(engine: Engine) -> dict[int, int]:
    with engine.connect() as conn:
        return {row.id: row.value for row in conn.execute(select(counter))}


@pytest.fixture
def serializable(db_url: str, counters: Engine) -> Iterator[Engine]:
    """An engine whose transactions are SERIALIZABLE, with a connection for each task."""
    eng = create_engine(db_url, pool_size=N, max_overflow=0, isolation_level="SERIALIZABLE")
    try:
        yield eng
    finally:
        eng.dispose()


def one_hop_clean(engine: Engine, maker: threadpool_sessionmaker) -> None:
    assert checked_out(engine) == 0
    assert maker.limiter.borrowed_tokens == 0


# -- contention retried until every unit of work commits -----------------------------------


@only_on("postgresql", "mysql")
async def test_concurrent_increments_under_serializable_all_commit(
    serializable: Engine, counters: Engine
) -> None:
    """PostgreSQL: 40001 "could not serialize access"; MariaDB: 1213 deadlocks."""
    maker = threadpool_sessionmaker(serializable)
    barrier = threading.Barrier(N, timeout=WAIT_S)
    calls = 0
    lock = threading.Lock()

    def increment(session: Session) -> int:
        nonlocal calls
        with lock:
            calls += 1
            first = calls <= N  # the first N calls are the tasks' first attempts
        value = session.scalar(select(counter.c.value).where(counter.c.id == 1)) or 0
        if first:
            barrier.wait()  # every task has read the same value before anyone writes
        session.execute(update(counter).where(counter.c.id == 1).values(value=value + 1))
        return value + 1

    results: list[int] = []

    async def task() -> None:
        results.append(await run_transaction(maker, increment, attempts=N + 2, backoff=0.01))

    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as group:
            for _ in range(N):
                group.start_soon(task)
    assert values(counters)[1] == N
    assert sorted(results) == list(range(1, N + 1))
    assert calls > N  # at least one attempt was retried
    one_hop_clean(serializable, maker)


@only_on("postgresql", "mysql")
async def test_concurrent_increments_with_an_async_fn_all_commit(
    serializable: Engine, counters: Engine
) -> None:
    maker = threadpool_sessionmaker(serializable)
    calls = arrived = 0
    everyone_read = anyio.Event()

    async def increment(sess: ThreadpoolSession) -> int:
        nonlocal calls, arrived
        calls += 1
        first = calls <= N
        assert current_session() is sess  # each attempt is a bound scope of its own
        value = await sess.scalar(select(counter.c.value).where(counter.c.id == 1)) or 0
        if first:
            arrived += 1
            if arrived == N:
                everyone_read.set()
            await everyone_read.wait()
        await sess.execute(update(counter).where(counter.c.id == 1).values(value=value + 1))
        return value + 1

    results: list[int] = []

    async def task() -> None:
        results.append(await run_transaction(maker, increment, attempts=N + 2, backoff=0.01))

    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as group:
            for _ in range(N):
                group.start_soon(task)
    assert values(counters)[1] == N
    assert sorted(results) == list(range(1, N + 1))
    assert calls > N
    one_hop_clean(serializable, maker)


@only_on("postgresql", "mysql")
async def test_rows_locked_in_opposite_orders_deadlock_then_both_commit(counters: Engine) -> None:
    """MariaDB reports 1213 at once, PostgreSQL 40P01 after its deadlock_timeout."""
    maker = threadpool_sessionmaker(counters)
    calls = {"a": 0, "b": 0}
    locked = {"a": anyio.Event(), "b": anyio.Event()}

    def transfer(name: str, first: int, second: int, other: str) -> Any:
        async def fn(sess: ThreadpoolSession) -> None:
            calls[name] += 1
            bump = counter.c.value + 1
            await sess.execute(update(counter).where(counter.c.id == first).values(value=bump))
            if calls[name] == 1:
                locked[name].set()
                await locked[other].wait()  # both hold one row: each now wants the other's
            await sess.execute(update(counter).where(counter.c.id == second).values(value=bump))

        return fn

    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as group:
            group.start_soon(run_transaction, maker, transfer("a", 1, 2, "b"))
            group.start_soon(run_transaction, maker, transfer("b", 2, 1, "a"))
    assert values(counters) == {1: 2, 2: 2}
    assert sorted(calls.values()) == [1, 2]  # the deadlock victim ran again, once
    one_hop_clean(counters, maker)


@only_on("sqlite")
async def test_sqlite_busy_is_retried(
    db_url: str, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    short = create_engine(db_url, connect_args={"timeout": 0.05})  # busy after 50 ms
    maker = threadpool_sessionmaker(short)
    holder = sqlite3.connect(make_url(db_url).database or "", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
    seen: list[BaseException] = []

    def retry_if(exc: BaseException) -> bool:
        seen.append(exc)
        if len(seen) == 1:
            holder.execute("ROLLBACK")  # the lock is gone before the retry
        return is_retryable(exc)

    calls = 0

    def add(session: Session) -> None:
        nonlocal calls
        calls += 1
        session.add(User(name="after-busy"))

    try:
        with caplog.at_level(logging.INFO, logger="sqlalchemy_threadpool"):
            await run_transaction(maker, add, retry_if=retry_if, backoff=0.01)
    finally:
        holder.close()
    assert calls == 2
    assert len(seen) == 1
    assert isinstance(seen[0], OperationalError)
    assert user_names(engine) == {"after-busy"}
    [record] = [r for r in caplog.records if r.name == "sqlalchemy_threadpool._retry"]
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert "attempt 1 of 5 failed (OperationalError: database is locked); retrying in" in message
    assert "\n" not in message
    one_hop_clean(short, maker)
    short.dispose()


@only_on("mysql")
async def test_mysql_lock_wait_timeout_rolls_back_the_whole_attempt_then_retries(
    db_url: str, counters: Engine
) -> None:
    """1205 rolls back only the statement: the attempt's earlier INSERT must not survive."""
    impatient = create_engine(
        db_url, connect_args={"init_command": "SET SESSION innodb_lock_wait_timeout = 1"}
    )
    maker = threadpool_sessionmaker(impatient)
    holder = counters.connect()
    holder.execute(select(counter).where(counter.c.id == 1).with_for_update())
    seen: list[BaseException] = []

    def retry_if(exc: BaseException) -> bool:
        seen.append(exc)
        holder.rollback()  # releases the row lock before the retry
        return is_retryable(exc)

    def add_and_bump(session: Session) -> None:
        session.add(User(name="once"))
        session.flush()
        session.execute(update(counter).where(counter.c.id == 1).values(value=1))

    try:
        with anyio.fail_after(WAIT_S):
            await run_transaction(maker, add_and_bump, retry_if=retry_if, backoff=0.01)
    finally:
        holder.close()
    [error] = seen
    assert isinstance(error, OperationalError)
    assert error.orig is not None
    assert error.orig.args[0] == 1205
    assert user_names(counters) == {"once"}  # unique name: the first INSERT was rolled back
    assert values(counters)[1] == 1
    one_hop_clean(impatient, maker)
    impatient.dispose()


@only_on("postgresql")
async def test_a_serialization_failure_at_commit_is_retried(counters: Engine) -> None:
    """The database said the COMMIT failed and rolled back: a known outcome, safe to retry."""
    with counters.begin() as conn:
        conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION satp_fail_commit() RETURNS trigger "
                "LANGUAGE plpgsql AS $$ BEGIN "
                "IF current_setting('satp.fail_commit', true) = 'on' THEN "
                "RAISE EXCEPTION 'commit refused' USING ERRCODE = '40001'; END IF; "
                "RETURN NULL; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE CONSTRAINT TRIGGER satp_fail_commit AFTER UPDATE ON satp_retry_counter "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION satp_fail_commit()"
            )
        )
    maker = threadpool_sessionmaker(counters)
    calls = 0

    def bump(session: Session) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # the deferred trigger raises 40001 while COMMIT runs
            session.execute(text("SET LOCAL satp.fail_commit = 'on'"))
        session.execute(update(counter).where(counter.c.id == 1).values(value=counter.c.value + 1))

    await run_transaction(maker, bump, backoff=0)
    assert calls == 2
    assert values(counters)[1] == 1
    one_hop_clean(counters, maker)


# -- what is not retried ---------------------------------------------------------------


@pytest.mark.parametrize("form", ["sync", "async"])
async def test_a_non_retryable_error_runs_once_and_propagates_unchanged(
    engine: Engine, form: str
) -> None:
    maker = threadpool_sessionmaker(engine)
    await run_transaction(maker, lambda s: s.add(User(name="taken")))
    calls = 0

    def add(session: Session) -> None:
        nonlocal calls
        calls += 1
        session.add(User(name="taken"))

    async def add_async(sess: ThreadpoolSession) -> None:
        nonlocal calls
        calls += 1
        sess.add(User(name="taken"))

    with pytest.raises(IntegrityError) as caught:
        if form == "sync":
            await run_transaction(maker, add)
        else:
            await run_transaction(maker, add_async)
    assert calls == 1
    assert not hasattr(caught.value, "attempts")
    assert getattr(caught.value, "__notes__", []) == []
    assert user_names(engine) == {"taken"}
    one_hop_clean(engine, maker)


@pytest.mark.parametrize("form", ["sync", "async"])
async def test_when_attempts_run_out_the_last_error_propagates_with_the_count(
    engine: Engine, form: str
) -> None:
    maker = threadpool_sessionmaker(engine)
    seen: list[BaseException] = []

    def retry_if(exc: BaseException) -> bool:
        seen.append(exc)
        return isinstance(exc, DBAPIError)  # widened: any database error

    missing = text("SELECT * FROM satp_no_such_table")

    def query(session: Session) -> None:
        session.add(User(name="never"))
        session.execute(missing)

    async def query_async(sess: ThreadpoolSession) -> None:
        sess.add(User(name="never"))
        await sess.execute(missing)

    with pytest.raises(DBAPIError) as caught:
        if form == "sync":
            await run_transaction(maker, query, attempts=3, retry_if=retry_if, backoff=0)
        else:
            await run_transaction(maker, query_async, attempts=3, retry_if=retry_if, backoff=0)
    assert len(seen) == 3
    assert len({id(exc) for exc in seen}) == 3  # a fresh error from each attempt
    assert caught.value is seen[-1]
    assert caught.value.attempts == 3  # type: ignore[attr-defined]
    if sys.version_info >= (3, 11):
        assert caught.value.__notes__ == [
            "run_transaction(): failed after 3 attempts (attempts ran out)"
        ]
    assert user_names(engine) == set()
    one_hop_clean(engine, maker)


@only_on("postgresql", "mysql")
async def test_a_commit_whose_outcome_is_unknown_is_never_retried(
    db_url: str, engine: Engine, dialect_name: str
) -> None:
    """The connection dies as COMMIT is sent: retrying could apply the transaction twice."""
    maker = threadpool_sessionmaker(engine)
    backend: list[int] = []

    def kill_before_commit(conn: Any) -> None:  # fires in the worker, just before COMMIT
        if len(backend) == 1:
            _kill_and_wait(db_url, backend[0])
            backend.append(-1)

    event.listen(engine, "commit", kill_before_commit)
    calls = 0

    def add(session: Session) -> None:
        nonlocal calls
        calls += 1
        backend_sql = (
            "SELECT pg_backend_pid()"
            if dialect_name == "postgresql"
            else ("SELECT CONNECTION_ID()")
        )
        backend.append(int(session.scalar(text(backend_sql)) or 0))
        session.add(User(name="maybe"))

    with pytest.raises(OperationalError) as caught:
        await run_transaction(maker, add, retry_if=lambda exc: True, backoff=0)
    assert calls == 1
    assert caught.value.connection_invalidated
    if sys.version_info >= (3, 11):
        [note] = caught.value.__notes__
        assert "raised while committing" in note
    assert user_names(engine) == set()  # here it did not commit; run_transaction cannot know
    one_hop_clean(engine, maker)


def _kill_and_wait(url: str, backend: int) -> None:
    admin = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if conn.dialect.name == "postgresql":
                assert conn.scalar(text(f"SELECT pg_terminate_backend({backend}, 10000)"))
                return
            conn.execute(text(f"KILL CONNECTION {backend}"))
            alive = "SELECT count(*) FROM information_schema.processlist WHERE id = :id"
            for _ in range(1000):
                if not conn.scalar(text(alive), {"id": backend}):
                    return
                threading.Event().wait(0.01)
            raise AssertionError(f"connection {backend} outlived KILL CONNECTION")
    finally:
        admin.dispose()


# -- cancellation ------------------------------------------------------------------------


async def test_cancellation_during_the_backoff_is_prompt_and_leaks_nothing(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    backing_off = anyio.Event()
    calls = 0

    def retry_if(exc: BaseException) -> bool:
        backing_off.set()
        return True

    def fail(session: Session) -> None:
        nonlocal calls
        calls += 1
        session.add(User(name="never"))
        session.execute(text("SELECT * FROM satp_no_such_table"))

    scope = anyio.CancelScope()

    async def cancel_when_backing_off() -> None:
        await backing_off.wait()
        scope.cancel()

    with anyio.fail_after(WAIT_S):  # a backoff that ignored the cancel would wait an hour
        async with anyio.create_task_group() as group:
            group.start_soon(cancel_when_backing_off)
            with scope:
                await run_transaction(
                    maker, fail, attempts=100, retry_if=retry_if, backoff=3600, max_backoff=3600
                )
    assert scope.cancelled_caught
    assert calls == 1
    assert user_names(engine) == set()
    assert_clean(engine, other_engine)
    assert maker.limiter.borrowed_tokens == 0


async def test_cancellation_during_an_attempt_rolls_it_back_and_is_not_retried(
    engine: Engine, other_engine: Engine, dialect_name: str
) -> None:
    maker = threadpool_sessionmaker(engine)
    started = threading.Event()
    calls = 0

    def slow(session: Session) -> None:
        nonlocal calls
        calls += 1
        session.add(User(name="never"))
        session.flush()
        started.set()
        session.execute(slow_statement(dialect_name, WAIT_S))

    with anyio.fail_after(WAIT_S):
        scope = await cancel_once_running(
            lambda: run_transaction(maker, slow, retry_if=lambda exc: True), other_engine, started
        )
    assert scope.cancelled_caught
    assert calls == 1
    assert user_names(engine) == set()
    assert_clean(engine, other_engine)
    assert maker.limiter.borrowed_tokens == 0


# -- the sync form is one worker call -----------------------------------------------------


async def test_a_sync_fn_its_flush_and_its_commit_run_in_one_worker_call(engine: Engine) -> None:
    """Every SQLAlchemy event of the unit of work fires inside the same call to a worker.

    ``running.call`` is the call the current worker thread is running (``None`` on the loop),
    so a second hop (say, for the commit) would show up as a second call object.
    """
    maker = threadpool_sessionmaker(engine)
    seen: list[tuple[str, object]] = []

    def record(name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: seen.append((name, getattr(running, "call", None)))

    listeners = [
        (engine, "begin"),
        (engine, "before_cursor_execute"),
        (engine, "commit"),
        (engine, "rollback"),
        (engine.pool, "checkout"),
        (engine.pool, "checkin"),
    ]
    for target, name in listeners:
        event.listen(target, name, record(name))

    def add(session: Session) -> str:
        seen.append(("fn", getattr(running, "call", None)))
        session.add(User(name="one-hop"))
        return "done"

    assert await run_transaction(maker, add) == "done"
    names = [name for name, _ in seen]
    assert names[0] == "fn"
    assert {"before_cursor_execute", "commit", "checkin"} <= set(names)
    assert "rollback" not in names
    calls = {id(call) for _, call in seen}
    assert len(calls) == 1, seen
    assert seen[0][1] is not None
    assert user_names(engine) == {"one-hop"}
    one_hop_clean(engine, maker)


# -- what is_retryable() accepts, from each driver --------------------------------------

#: Per backend: (driver, statement raising an error the server makes, retryable?). The
#: server raises the error itself (RAISE / SIGNAL), as it would after a real conflict.
_RAISE_PG = "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '{}'; END $$"
_SIGNAL = "SIGNAL SQLSTATE '{}' SET MYSQL_ERRNO = {}, MESSAGE_TEXT = 'conflict'"
_SERVER_ERRORS = {
    "postgresql": [
        (driver, _RAISE_PG.format(code), retryable)
        for driver in ("psycopg2", "psycopg", "pg8000")
        for code, retryable in (("40001", True), ("40P01", True), ("23505", False))
    ],
    "mysql": [
        (driver, _SIGNAL.format(state, errno), retryable)
        for driver in ("pymysql", "mysqlconnector")
        for state, errno, retryable in (
            ("40001", 1213, True),
            ("HY000", 1205, True),
            ("23000", 1062, False),
            ("HY000", 1317, False),  # query execution was interrupted
        )
    ],
}


@only_on("postgresql", "mysql")
def test_is_retryable_reads_the_code_of_each_driver(db_url: str) -> None:
    backend = make_url(db_url).get_backend_name()
    for driver, statement, retryable in _SERVER_ERRORS[backend]:
        url = make_url(db_url).set(drivername=f"{backend}+{driver}")
        eng = create_engine(url, poolclass=NullPool)
        try:
            with pytest.raises(DBAPIError) as caught, eng.connect() as conn:
                conn.execute(text(statement))
        finally:
            eng.dispose()
        assert is_retryable(caught.value) is retryable, (driver, statement)
        assert caught.value.orig is not None
        assert is_retryable(caught.value.orig) is retryable, (driver, statement)  # unwrapped


def test_is_retryable_refuses_what_is_not_a_database_conflict() -> None:
    assert not is_retryable(ValueError("40001"))
    assert not is_retryable(ValueError(1213))
    assert not is_retryable(sqlite3.OperationalError("no such table: t"))
    assert is_retryable(sqlite3.OperationalError("database is locked"))  # Python 3.10's form
    assert not is_retryable(KeyboardInterrupt())
