"""What programs written for ``sqlalchemy.ext.asyncio`` do, and must keep doing after the renames.

Each behaviour here was met while running real client code (SQLAlchemy's asyncio examples,
an adapter's test suite, SQLModel's FastAPI tutorial) ported with ``tools/port_asyncio.py``;
the tests are ours. Also the rename script itself: it renames exactly the table.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import typing
import weakref
from pathlib import Path

import anyio
import pytest
from sqlalchemy import Engine, create_engine, event, func, insert, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from helpers import checked_out, user_count, user_names
from models import Base, User
from sqlalchemy_threadpool import (
    ConfigurationError,
    ThreadpoolEngine,
    ThreadpoolSession,
    create_threadpool_engine,
    threadpool_engine_from_config,
    threadpool_sessionmaker,
)

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from port_asyncio import port_text  # noqa: E402


def begin_only(session: Session) -> None:
    """Begin a transaction that runs no SQL (as ``merge(..., load=False)`` does)."""
    session.begin()


# -- a transaction that never connected --------------------------------------------------


@pytest.fixture
def pool_of_one(db_url: str, engine: Engine) -> ThreadpoolEngine:
    """A facade over an engine with one connection (``engine`` created the tables)."""
    return create_threadpool_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=10)


async def test_a_transaction_that_never_ran_sql_holds_no_capacity(
    pool_of_one: ThreadpoolEngine,
) -> None:
    first, second = ThreadpoolSession(pool_of_one), ThreadpoolSession(pool_of_one)
    limiter = first.maker.limiter
    try:
        with anyio.fail_after(10):
            await first.run(begin_only)
            assert first.in_transaction()
            assert limiter.borrowed_tokens == 0  # no connection, so no token
            async with second:  # the only connection is free: it does not wait for `first`
                assert await second.scalar(text("SELECT 2")) == 2
            assert await first.scalar(text("SELECT 1")) == 1  # now it holds the connection
            assert limiter.borrowed_tokens == 1
            await first.commit()
            assert limiter.borrowed_tokens == 0
    finally:
        await first.close()
        await pool_of_one.dispose()


async def test_dropping_a_session_whose_transaction_never_ran_sql_is_quiet(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    session = ThreadpoolSession(engine)
    limiter = session.maker.limiter
    await session.run(begin_only)
    alive = weakref.ref(session)
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_threadpool"):
        del session
        gc.collect()
        await anyio.sleep(0.01)  # a release handed to the loop runs
    assert alive() is None
    assert limiter.borrowed_tokens == 0
    assert [r.getMessage() for r in caplog.records] == []


async def test_a_session_on_the_engine_facade_shares_the_sync_engines_admission(
    pool_of_one: ThreadpoolEngine,
) -> None:
    """``AsyncSession(engine)`` ported: the facade and its sync engine are one bind."""
    on_facade = ThreadpoolSession(pool_of_one)
    on_sync = ThreadpoolSession(pool_of_one.sync_engine)
    assert on_facade.maker.limiter is on_sync.maker.limiter
    assert on_facade.get_bind() is pool_of_one.sync_engine
    async with on_facade:
        assert await on_facade.scalar(text("SELECT 1")) == 1
    await pool_of_one.dispose()


# -- SQLite in memory --------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["sqlite://", "sqlite+pysqlite:///:memory:"])
async def test_in_memory_sqlite_is_one_database_shared_by_every_session(url: str) -> None:
    engine = create_threadpool_engine(url)
    assert isinstance(engine.pool, StaticPool)
    maker = threadpool_sessionmaker(engine)
    assert maker.limiter.total_tokens == 1
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        for i in range(20):  # many sessions, many worker threads: always the same database
            async with maker.begin() as sess:
                sess.add(User(name=f"u{i}"))
        async with ThreadpoolSession(engine) as sess:
            assert await sess.scalar(select(func.count()).select_from(User)) == 20
        async with engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(User)) == 20
    finally:
        await engine.dispose()


async def test_in_memory_sqlite_keeps_the_users_choices() -> None:
    engine = create_threadpool_engine(
        "sqlite://", connect_args={"timeout": 7}, poolclass=StaticPool, echo=False
    )
    assert isinstance(engine.pool, StaticPool)
    configured = threadpool_engine_from_config({"sqlalchemy.url": "sqlite://"})
    assert isinstance(configured.pool, StaticPool)
    async with configured.connect() as conn:
        assert await conn.scalar(text("SELECT 1")) == 1
    await configured.dispose()
    await engine.dispose()


async def test_a_file_database_keeps_its_own_pool(tmp_path: Path) -> None:
    engine = create_threadpool_engine(f"sqlite:///{tmp_path}/app.db")
    assert not isinstance(engine.pool, StaticPool)
    await engine.dispose()


def test_in_memory_sqlite_with_one_connection_per_thread_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigurationError, match=r"create_threadpool_engine\('sqlite://'\)"):
        ThreadpoolEngine(create_engine("sqlite://"))
    with pytest.raises(ConfigurationError, match="StaticPool"):
        create_threadpool_engine("sqlite://", poolclass=SingletonThreadPool)


# -- the interpreter exits -----------------------------------------------------------------

EXIT_PROGRAM = textwrap.dedent(
    """
    import asyncio, sys
    import trio
    from sqlalchemy import text
    from sqlalchemy_threadpool import (
        ThreadpoolSession, create_threadpool_engine, threadpool_sessionmaker,
    )

    engine = create_threadpool_engine(sys.argv[1])  # made at import time, never disposed
    maker = threadpool_sessionmaker(engine)
    # made at import time too, outside any loop: one per event loop the program runs
    module_sessions = {"asyncio": ThreadpoolSession(engine), "trio": ThreadpoolSession(engine)}

    async def main(loop: str) -> None:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT 1")) == 1
        async with ThreadpoolSession(engine) as sess:
            assert await sess.scalar(text("SELECT 2")) == 2
        async with maker() as sess:
            assert await sess.scalar(text("SELECT 3")) == 3
        module_session = module_sessions[loop]
        for _ in range(2):  # closed at the end of the block, and used again
            async with module_session:
                assert await module_session.scalar(text("SELECT 4")) == 4

    asyncio.run(main("asyncio"))
    trio.run(main, "trio")
    print("done")
    """
)


def test_idle_workers_do_not_keep_the_interpreter_alive(db_url: str) -> None:
    """Engine, maker and a session made at import time; used on asyncio, then on trio; the
    program never disposes or shuts anything down, and still exits."""
    process = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", EXIT_PROGRAM, db_url],
        capture_output=True,
        text=True,
        timeout=60,  # a hang fails here
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert (process.returncode, process.stdout, process.stderr) == (0, "done\n", "")


# -- what client code does with sessions and events ------------------------------------------


async def test_thirty_sessions_on_a_pool_of_fifteen_queue(db_url: str, engine: Engine) -> None:
    """Each holds a connection in a transaction; the other fifteen wait on the loop, then run."""
    tp_engine = create_threadpool_engine(db_url, pool_size=15, max_overflow=0, pool_timeout=10)
    maker = threadpool_sessionmaker(tp_engine)
    assert maker.limiter.total_tokens == 15
    held: list[int] = []
    most = 0
    release = anyio.Event()

    async def one(i: int) -> None:
        nonlocal most
        async with maker.begin() as sess:
            assert await sess.scalar(text("SELECT 1")) == 1  # holds a connection now
            held.append(i)
            most = max(most, checked_out(tp_engine.sync_engine))
            await release.wait()
            sess.add(User(name=f"queued{i:02}"))

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for i in range(30):
                    group.start_soon(one, i)
                while len(held) < 15 or maker.limiter.statistics().tasks_waiting < 15:  # noqa: ASYNC110
                    await anyio.sleep(0.01)  # bounded by fail_after
                assert len(held) == 15  # the rest queue for admission, holding no thread
                assert checked_out(tp_engine.sync_engine) == 15
                release.set()
        assert sorted(held) == list(range(30))
        assert most == 15
        assert user_count(engine) == 30
        assert checked_out(tp_engine.sync_engine) == 0
    finally:
        await tp_engine.dispose()


async def test_a_second_stream_inside_another_streams_async_for(engine: Engine) -> None:
    """The outer cursor is read two rows at a time between the inner streams, on MySQL too
    (one unbuffered result per connection: the outer stream's unread rows move to memory as
    the inner one starts)."""
    async with ThreadpoolSession(engine) as sess:
        sess.add_all([User(name=f"s{i}") for i in range(5)])
        await sess.commit()
    pairs: list[tuple[str, int]] = []
    async with ThreadpoolSession(engine) as sess:
        outer = await sess.stream(select(User.name).order_by(User.name))
        outer.yield_per(2)  # two rows per read: reads of the outer cursor interleave
        async with outer:
            async for (name,) in outer:
                inner = await sess.stream(select(func.count()).select_from(User))
                async with inner:
                    pairs.append((name, await inner.scalar_one()))
    assert pairs == [(f"s{i}", 5) for i in range(5)]
    assert checked_out(engine) == 0


async def test_events_on_the_sync_engine_and_session_run_in_the_worker(engine: Engine) -> None:
    """A ``before_commit`` handler that runs SQL, as client code registers it on
    ``session.sync_session``; an engine event registered on ``engine.sync_engine``."""
    tp_engine = ThreadpoolEngine(engine)
    statement_threads: list[bool] = []

    def on_statement(*args: object) -> None:
        statement_threads.append(threading.current_thread() is threading.main_thread())

    def audit(session: Session) -> None:  # runs SQL inside the commit
        session.execute(insert(User).values(name="audited"))

    event.listen(tp_engine.sync_engine, "before_cursor_execute", on_statement)
    try:
        async with ThreadpoolSession(tp_engine) as sess:
            event.listen(sess.sync_session, "before_commit", audit)
            sess.add(User(name="committed"))
            await sess.commit()  # the guard would raise if the handler's SQL ran on the loop
    finally:
        event.remove(tp_engine.sync_engine, "before_cursor_execute", on_statement)
    assert user_names(engine) == {"committed", "audited"}
    assert statement_threads
    assert not any(statement_threads)  # every statement ran in a worker
    assert checked_out(engine) == 0


def test_the_maker_is_generic_at_run_time_too() -> None:
    """``threadpool_sessionmaker[ThreadpoolSession]`` in an annotation evaluated at run time
    (FastAPI, pydantic and dataclasses evaluate theirs), as ``async_sessionmaker[...]``."""

    def handler(maker: threadpool_sessionmaker[ThreadpoolSession]) -> None: ...

    hints = typing.get_type_hints(handler)
    assert typing.get_origin(hints["maker"]) is threadpool_sessionmaker
    assert typing.get_args(hints["maker"]) == (ThreadpoolSession,)


# -- the rename script ---------------------------------------------------------------------


def test_the_rename_script_renames_the_table_and_nothing_else() -> None:
    before = textwrap.dedent(
        """
        from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, async_session
        from sqlalchemy.ext.asyncio.engine import AsyncEngine, create_async_engine

        engine: AsyncEngine = create_async_engine("postgresql+asyncpg://u@h/db")
        async_session_factory = async_sessionmaker(engine, class_=AsyncSession)
        AsyncSessionTransactionLike = "AsyncSessionTransaction"
        other = async_session(sync)
        """
    )
    assert port_text(before) == textwrap.dedent(
        """
        from sqlalchemy_threadpool import ThreadpoolSession, threadpool_sessionmaker, threadpool_session_of
        from sqlalchemy_threadpool import ThreadpoolEngine, create_threadpool_engine

        engine: ThreadpoolEngine = create_threadpool_engine("postgresql+psycopg2://u@h/db")
        async_session_factory = threadpool_sessionmaker(engine, class_=ThreadpoolSession)
        AsyncSessionTransactionLike = "ThreadpoolSessionTransaction"
        other = threadpool_session_of(sync)
        """  # noqa: E501
    )


def test_the_rename_script_leaves_a_variable_named_async_session() -> None:
    before = (
        "from sqlalchemy.ext.asyncio import async_sessionmaker\n"
        'async_session = async_sessionmaker(create_async_engine("sqlite+aiosqlite://"))\n'
    )
    assert port_text(before, url="sqlite:///x.db") == (
        "from sqlalchemy_threadpool import threadpool_sessionmaker\n"
        'async_session = threadpool_sessionmaker(create_threadpool_engine("sqlite:///x.db"))\n'
    )
    sqlmodel = "from sqlmodel.ext.asyncio.session import AsyncSession\ns: AsyncSession\n"
    assert port_text(sqlmodel) == (
        "from sqlalchemy_threadpool.integrations.sqlmodel import ThreadpoolSQLModelSession\n"
        "s: ThreadpoolSQLModelSession\n"
    )
