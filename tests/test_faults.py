"""Database failures: a restarted server, a connection killed mid-statement, a server that is down.

In each case the caller gets the driver's own error once (SQLAlchemy's wrapper, with the DBAPI
exception as ``.orig``), no ``PendingRollbackError`` escapes a scope, the next scope works, and
nothing is left behind: no connection checked out, no capacity token held, no idle transaction
on the server.

Restart and down-at-entry tests use throwaway servers started for this session on free ports
(``tests/servers.py``); the shared test servers are never restarted. Killing one connection uses
the shared servers. When a throwaway server cannot be started the tests fail under ``CI``.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError, PendingRollbackError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from helpers import checked_out, slow_statement, user_names
from models import User
from servers import ServerError, ThrowawayServer, free_port, start_server
from sqlalchemy_threadpool import threadpool_session, threadpool_sessionmaker
from sqlalchemy_threadpool._admission import admitted_offloaders

pytestmark = pytest.mark.anyio

_SELECTED = [
    name.strip() for name in os.environ.get("SATP_TEST_DATABASES", "").split(",") if name.strip()
]
SERVER_KINDS = [k for k in ("postgresql", "mysql") if not _SELECTED or k in _SELECTED]
#: Seconds a killed or failed call may take to reach the caller: far below the 30 s statement.
PROMPT_S = 10.0


# -- leak checks -------------------------------------------------------------------------


def idle_in_transaction(url: str) -> int:
    """Connections to ``url``'s database that sit in an open transaction, doing nothing."""
    if url.startswith("sqlite"):
        return 0  # no server: the pool checks above are all there is
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                query = (
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
                )
            elif conn.dialect.name == "mysql":
                query = (
                    "SELECT count(*) FROM information_schema.innodb_trx t "
                    "JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
                    "WHERE p.db = DATABASE() AND p.id <> CONNECTION_ID() AND p.command = 'Sleep'"
                )
            else:
                return 0
            return int(conn.scalar(text(query)) or 0)
    finally:
        engine.dispose()


def threads_inside_a_session() -> list[str]:
    """Threads (other than this one) running a session's call right now."""
    inside = []
    for ident, frame in sys._current_frames().items():
        stack = frame if ident != threading.get_ident() else None
        while stack is not None:
            code = stack.f_code
            if code.co_name == "run" and code.co_filename.endswith("_call.py"):
                inside.append(str(ident))
                break
            stack = stack.f_back
    return inside


def assert_clean(engine: Engine, maker: threadpool_sessionmaker) -> None:
    gc.collect()  # a connection garbage-collected unreturned would warn (an error) here
    assert threads_inside_a_session() == []
    assert checked_out(engine) == 0
    assert maker.limiter.borrowed_tokens == 0
    assert admitted_offloaders(engine) == []
    assert idle_in_transaction(engine.url.render_as_string(False)) == 0


def assert_driver_error(exc: BaseException, engine: Engine) -> None:
    """The driver's own error, wrapped by SQLAlchemy as usual, and nothing of ours around it."""
    assert isinstance(exc, OperationalError), repr(exc)
    assert isinstance(exc.orig, engine.dialect.loaded_dbapi.OperationalError), repr(exc.orig)
    seen: BaseException | None = exc
    while seen is not None:  # no PendingRollbackError anywhere in the chain
        assert not isinstance(seen, PendingRollbackError), repr(seen)
        seen = seen.__cause__ or seen.__context__


# -- throwaway servers -------------------------------------------------------------------


@pytest.fixture(scope="session")
def throwaway_servers() -> Iterator[dict[str, ThrowawayServer | str]]:
    """kind -> a running throwaway server, or why it could not be started; both in parallel."""
    results: dict[str, ThrowawayServer | str] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {kind: pool.submit(start_server, kind) for kind in SERVER_KINDS}
        for kind, future in futures.items():
            try:
                results[kind] = future.result()
            except (ServerError, OSError) as exc:
                results[kind] = f"{type(exc).__name__}: {exc}"
    try:
        yield results
    finally:
        for server in results.values():
            if isinstance(server, ThrowawayServer):
                server.close()


@pytest.fixture(params=SERVER_KINDS)
def server(
    request: pytest.FixtureRequest, throwaway_servers: dict[str, ThrowawayServer | str]
) -> Iterator[ThrowawayServer]:
    """A running throwaway server with an empty ``faults`` table; running again afterwards."""
    found = throwaway_servers[request.param]
    if isinstance(found, str):
        message = f"a throwaway {request.param} server could not be started: {found}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}\nCI never skips these tests.", pytrace=False)
        pytest.skip(message)
    if not _is_up(found):
        found.start()
    admin = create_engine(found.url, poolclass=NullPool)
    try:
        with admin.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS faults"))
            conn.execute(text("CREATE TABLE faults (tag VARCHAR(64) PRIMARY KEY)"))
    finally:
        admin.dispose()
    yield found
    if not _is_up(found):
        found.start()  # a failed test may have left it stopped


def _is_up(server: ThrowawayServer) -> bool:
    engine = create_engine(server.url, poolclass=NullPool, connect_args={"connect_timeout": 2})
    try:
        with engine.connect():
            return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


def tags(url: str) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return set(conn.scalars(text("SELECT tag FROM faults")))
    finally:
        engine.dispose()


async def insert(maker: threadpool_sessionmaker, tag: str) -> None:
    async with threadpool_session(maker) as sess:
        await sess.execute(text("INSERT INTO faults (tag) VALUES (:tag)"), {"tag": tag})


# -- server restarted between requests ----------------------------------------------------


async def test_restart_without_pre_ping_fails_one_scope_once_then_recovers(
    server: ThrowawayServer,
) -> None:
    engine = create_engine(server.url, pool_size=2, max_overflow=0)
    maker = threadpool_sessionmaker(engine)
    try:
        await insert(maker, "before")
        assert checked_out(engine) == 0  # the connection waits in the pool, then goes stale
        await anyio.to_thread.run_sync(server.restart)

        with pytest.raises(OperationalError) as caught:
            await insert(maker, "lost")
        assert_driver_error(caught.value, engine)
        assert caught.value.connection_invalidated
        assert_clean(engine, maker)

        await insert(maker, "after")  # the next scope works on a fresh connection
        assert tags(server.url) == {"before", "after"}
        assert_clean(engine, maker)
    finally:
        engine.dispose()


async def test_restart_with_pre_ping_is_invisible(server: ThrowawayServer) -> None:
    engine = create_engine(server.url, pool_size=2, max_overflow=0, pool_pre_ping=True)
    maker = threadpool_sessionmaker(engine)
    try:
        await insert(maker, "before")
        await anyio.to_thread.run_sync(server.restart)
        await insert(maker, "after")  # the ping finds the stale connection and replaces it
        assert tags(server.url) == {"before", "after"}
        assert_clean(engine, maker)
    finally:
        engine.dispose()


# -- database down at scope entry ---------------------------------------------------------


async def test_server_down_at_scope_entry_raises_the_driver_error_then_recovers(
    server: ThrowawayServer,
) -> None:
    engine = create_engine(server.url, pool_size=2, max_overflow=0)
    maker = threadpool_sessionmaker(engine)
    try:
        await anyio.to_thread.run_sync(server.stop)
        with pytest.raises(OperationalError) as caught:
            await insert(maker, "down")
        assert_driver_error(caught.value, engine)
        assert checked_out(engine) == 0
        assert maker.limiter.borrowed_tokens == 0
        assert admitted_offloaders(engine) == []

        await anyio.to_thread.run_sync(server.start)
        await insert(maker, "up")
        assert tags(server.url) == {"up"}
        assert_clean(engine, maker)
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_nobody_listening_raises_the_driver_error_and_holds_nothing(kind: str) -> None:
    port = free_port()
    url = (
        f"postgresql+psycopg2://postgres@127.0.0.1:{port}/test"
        if kind == "postgresql"
        else f"mysql+pymysql://root@127.0.0.1:{port}/test"
    )
    engine = create_engine(url, pool_size=1, max_overflow=0)
    maker = threadpool_sessionmaker(engine)
    try:
        for _ in range(2):  # twice: the first failure left no capacity taken
            with pytest.raises(OperationalError) as caught:
                async with threadpool_session(maker) as sess:
                    await sess.execute(text("SELECT 1"))
            assert_driver_error(caught.value, engine)
            assert checked_out(engine) == 0
            assert maker.limiter.borrowed_tokens == 0
    finally:
        engine.dispose()


async def test_sqlite_file_that_cannot_be_opened_then_can(tmp_path: Path) -> None:
    directory = tmp_path / "gone"
    engine = create_engine(f"sqlite:///{directory}/app.db")
    maker = threadpool_sessionmaker(engine)
    try:
        with pytest.raises(OperationalError) as caught:  # its directory does not exist
            async with threadpool_session(maker) as sess:
                await sess.execute(text("CREATE TABLE faults (tag VARCHAR(64) PRIMARY KEY)"))
        assert_driver_error(caught.value, engine)
        assert_clean(engine, maker)

        directory.mkdir()
        async with threadpool_session(maker) as sess:
            await sess.execute(text("CREATE TABLE faults (tag VARCHAR(64) PRIMARY KEY)"))
            await sess.execute(text("INSERT INTO faults (tag) VALUES ('up')"))
        assert tags(f"sqlite:///{directory}/app.db") == {"up"}
        assert_clean(engine, maker)
    finally:
        engine.dispose()
        shutil.rmtree(directory, ignore_errors=True)


# -- connection terminated mid-statement (shared servers) ---------------------------------


def _backend_id_sql(dialect: str) -> str:
    return "SELECT pg_backend_pid()" if dialect == "postgresql" else "SELECT CONNECTION_ID()"


def _kill_when_running(url: str, backends: list[int], deadline: float) -> None:
    """Wait (in a thread) until the backend runs its sleep, then kill its connection."""
    while not backends:
        if time.monotonic() > deadline:
            raise AssertionError("the worker never reported its backend")
        time.sleep(0.01)
    backend = backends[0]
    admin = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if conn.dialect.name == "postgresql":
                probe = "SELECT query FROM pg_stat_activity WHERE pid = :id AND state = 'active'"
                kill = f"SELECT pg_terminate_backend({backend})"
            else:
                probe = (
                    "SELECT info FROM information_schema.processlist "
                    "WHERE id = :id AND command = 'Query'"
                )
                kill = f"KILL CONNECTION {backend}"
            while True:
                running = conn.scalar(text(probe), {"id": backend})
                if running is not None and "sleep" in str(running).lower():
                    break
                if time.monotonic() > deadline:
                    raise AssertionError("the statement never showed up on the server")
                time.sleep(0.02)
            conn.execute(text(kill))
    finally:
        admin.dispose()


@pytest.mark.parametrize("db_url", SERVER_KINDS, indirect=True)
async def test_connection_killed_mid_statement(
    engine: Engine, other_engine: Engine, dialect_name: str
) -> None:
    maker = threadpool_sessionmaker(engine)
    backend: list[int] = []
    url = engine.url.render_as_string(False)

    def work(session: Session) -> None:
        backend.append(int(session.scalar(text(_backend_id_sql(dialect_name))) or 0))
        session.execute(slow_statement(dialect_name, 30))

    async def killer() -> None:
        deadline = time.monotonic() + PROMPT_S
        await anyio.to_thread.run_sync(_kill_when_running, url, backend, deadline)

    start = anyio.current_time()
    async with anyio.create_task_group() as group:
        group.start_soon(killer)
        with pytest.raises(OperationalError) as caught:
            async with threadpool_session(maker) as sess:
                sess.add(User(name="written-before-the-kill"))
                await sess.flush()
                await sess.run(work)
    assert anyio.current_time() - start < PROMPT_S
    assert_driver_error(caught.value, engine)
    assert caught.value.connection_invalidated
    assert_clean(engine, maker)
    assert user_names(other_engine) == set()  # its transaction died with the connection

    async with threadpool_session(maker) as sess:  # the next scope works
        sess.add(User(name="after"))
    assert user_names(other_engine) == {"after"}
    assert_clean(engine, maker)


@pytest.mark.parametrize("db_url", SERVER_KINDS, indirect=True)
async def test_connection_lost_inside_a_block_then_rollback_continues_it(
    engine: Engine, other_engine: Engine, dialect_name: str
) -> None:
    maker = threadpool_sessionmaker(engine)
    url = engine.url.render_as_string(False)
    async with threadpool_session(maker) as sess:
        backend = int(await sess.scalar(text(_backend_id_sql(dialect_name))) or 0)
        await anyio.to_thread.run_sync(_kill_idle, url, backend)
        with pytest.raises(OperationalError) as caught:
            await sess.execute(text("SELECT 1"))
        assert_driver_error(caught.value, engine)
        await sess.rollback()  # acknowledges the lost transaction; a fresh one follows
        sess.add(User(name="after-rollback"))
    assert user_names(other_engine) == {"after-rollback"}
    assert_clean(engine, maker)


def _kill_idle(url: str, backend: int) -> None:
    admin = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text(f"SELECT pg_terminate_backend({backend})"))
            else:
                conn.execute(text(f"KILL CONNECTION {backend}"))
    finally:
        admin.dispose()


# -- a late cancel never reaches the next user of the connection ---------------------------


@pytest.mark.parametrize("db_url", [k for k in SERVER_KINDS if k == "mysql"], indirect=True)
async def test_a_late_cancel_never_hits_the_next_user_of_the_connection(
    db_url: str, engine: Engine
) -> None:
    """The call is interrupted, its cancel is slow to arrive (a slow side connection, made
    slower here), and meanwhile the worker ends its commit and gives the connection back; the
    session that takes the connection next must not have its statement killed.
    """
    small = create_engine(db_url, pool_size=2, max_overflow=0)
    maker = threadpool_sessionmaker(small)
    slow_connect = threading.Event()

    @event.listens_for(small, "do_connect")
    def slow_side_connection(*args: Any) -> None:
        if slow_connect.is_set():  # only the canceller connects after the warm-up
            time.sleep(0.5)

    def sleep_then_commit(session: Session) -> None:
        time.sleep(0.3)  # interrupted in here; the cancel is on its way
        session.commit()  # no cursor statement: the abandoned call may finish its COMMIT

    bystander_error: list[BaseException] = []

    async def bystander() -> None:
        try:
            async with threadpool_session(maker, new=True) as other:  # gets the committer's conn
                await other.execute(slow_statement("mysql", 1))
        except Exception as exc:
            bystander_error.append(exc)

    try:
        with small.connect(), small.connect():  # warm up: the pool's two connections
            pass
        slow_connect.set()
        async with threadpool_session(maker) as sess:
            sess.add(User(name="committed-while-interrupted"))
            await sess.flush()  # the committer holds one connection ...
            with small.connect():  # ... and this the other: the bystander gets the first
                async with anyio.create_task_group() as group:
                    group.start_soon(bystander)
                    with anyio.move_on_after(0.1):
                        await sess.run(sleep_then_commit)
            await sess.rollback()  # acknowledge the interruption
        assert bystander_error == []
        assert user_names(small) == {"committed-while-interrupted"}  # the COMMIT went through
        assert_clean(small, maker)
    finally:
        small.dispose()
