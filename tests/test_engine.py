"""The engine facade: code written for AsyncEngine/AsyncConnection runs after the renames.

Every test makes its facade with ``create_threadpool_engine(db_url, <the conftest's pool
kwargs>)``; the conftest's ``engine`` fixture re-creates the tables and serves as the observer
("visible from another engine").
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import cast

import anyio
import pytest
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError, ResourceClosedError

from conftest import _engine_kwargs
from helpers import busy_backends, cancel_once_running, checked_out, slow_statement, user_names
from models import User
from sqlalchemy_threadpool import (
    BlockingOnEventLoopError,
    ThreadpoolEngine,
    create_threadpool_engine,
    threadpool_engine_from_config,
    threadpool_session,
    threadpool_sessionmaker,
)

pytestmark = pytest.mark.anyio

users = cast("Table", User.__table__)


@pytest.fixture
async def tp_engine(db_url: str, engine: Engine) -> AsyncIterator[ThreadpoolEngine]:
    """The facade under test (``engine``, a separate sync engine, observes it)."""
    facade = create_threadpool_engine(db_url, **_engine_kwargs(db_url))
    try:
        yield facade
    finally:
        await facade.dispose()


async def test_the_asyncengine_snippet_runs_after_the_renames(db_url: str, engine: Engine) -> None:
    metadata = MetaData()
    table = Table(
        "satp_snippet",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(20)),
    )
    table.drop(engine, checkfirst=True)
    tp = create_threadpool_engine(db_url, **_engine_kwargs(db_url))
    try:
        async with tp.begin() as conn:
            await conn.run_sync(metadata.create_all)
        async with tp.connect() as conn:
            await conn.execute(insert(table), [{"name": "kept"}])
            result = await conn.execute(select(table.c.name))
            assert [tuple(row) for row in result.fetchall()] == [("kept",)]
            await conn.commit()
            await conn.execute(insert(table), [{"name": "dropped"}])
            await conn.rollback()
        assert checked_out(tp.sync_engine) == 0
        await tp.dispose()
        with engine.connect() as observer:  # another engine sees the commit, not the rollback
            assert observer.scalars(select(table.c.name)).all() == ["kept"]
    finally:
        table.drop(engine, checkfirst=True)


async def test_begin_commits_at_the_end(tp_engine: ThreadpoolEngine, engine: Engine) -> None:
    async with tp_engine.begin() as conn:
        await conn.execute(insert(users).values(name="a"))
        assert conn.in_transaction()
        assert user_names(engine) == set()
    assert user_names(engine) == {"a"}
    assert conn.closed
    assert checked_out(tp_engine.sync_engine) == 0


async def test_begin_rolls_back_on_an_exception(
    tp_engine: ThreadpoolEngine, engine: Engine
) -> None:
    with pytest.raises(ZeroDivisionError):
        async with tp_engine.begin() as conn:
            await conn.execute(insert(users).values(name="a"))
            1 / 0  # noqa: B018
    assert user_names(engine) == set()
    assert checked_out(tp_engine.sync_engine) == 0


async def test_begin_rolls_back_on_cancellation_and_stops_the_statement(
    tp_engine: ThreadpoolEngine, engine: Engine
) -> None:
    started = threading.Event()

    def slow(conn: Connection) -> None:
        started.set()
        conn.execute(slow_statement(conn.dialect.name, 30))

    async def work() -> None:
        async with tp_engine.begin() as conn:
            await conn.execute(insert(users).values(name="a"))
            await conn.run_sync(slow)

    with anyio.fail_after(20):
        scope = await cancel_once_running(work, engine, started)
    assert scope.cancelled_caught
    assert busy_backends(engine) == []  # stopped on the server, rolled back
    assert user_names(engine) == set()
    assert checked_out(tp_engine.sync_engine) == 0


async def test_explicit_begin_after_connect(tp_engine: ThreadpoolEngine, engine: Engine) -> None:
    async with tp_engine.connect() as conn:
        assert not conn.in_transaction()
        assert conn.sync_connection is None
        async with conn.begin() as transaction:
            assert transaction.is_active
            assert conn.get_transaction() is not None
            assert isinstance(conn.sync_connection, Connection)
            await conn.execute(insert(users).values(name="a"))
        assert user_names(engine) == {"a"}
        transaction = await conn.begin()
        await conn.execute(insert(users).values(name="b"))
        await transaction.rollback()
        assert not conn.in_transaction()
    assert user_names(engine) == {"a"}


async def test_begin_while_a_statement_began_a_transaction_raises(
    tp_engine: ThreadpoolEngine,
) -> None:
    async with tp_engine.connect() as conn:
        await conn.execute(select(1))
        with pytest.raises(Exception, match="already has a transaction"):
            await conn.begin()


async def test_begin_nested(tp_engine: ThreadpoolEngine, engine: Engine) -> None:
    async with tp_engine.begin() as conn:
        await conn.execute(insert(users).values(name="outer"))
        with pytest.raises(ZeroDivisionError):
            async with conn.begin_nested():
                assert conn.in_nested_transaction()
                await conn.execute(insert(users).values(name="inner"))
                1 / 0  # noqa: B018
        savepoint = await conn.begin_nested()
        await conn.execute(insert(users).values(name="kept"))
        await savepoint.commit()
    assert user_names(engine) == {"outer", "kept"}


async def test_stream_over_many_rows(tp_engine: ThreadpoolEngine) -> None:
    async with tp_engine.begin() as conn:
        await conn.execute(insert(users), [{"name": f"u{i:05}"} for i in range(2500)])
    async with tp_engine.connect() as conn:
        async with conn.stream(select(users.c.name).order_by(users.c.name)) as result:
            names = [row.name async for row in result]
        assert names == [f"u{i:05}" for i in range(2500)]
        scalars = await conn.stream_scalars(select(users.c.id).order_by(users.c.id))
        ids = [i async for i in scalars]
        assert len(ids) == 2500
    assert checked_out(tp_engine.sync_engine) == 0


async def test_exec_driver_sql_and_scalars(tp_engine: ThreadpoolEngine) -> None:
    async with tp_engine.begin() as conn:
        await conn.execute(insert(users), [{"name": "a"}, {"name": "b"}])
        result = await conn.exec_driver_sql("SELECT count(*) FROM satp_user")
        assert result.scalar() == 2
        assert (await conn.scalars(select(users.c.name).order_by(users.c.name))).all() == [
            "a",
            "b",
        ]
        assert await conn.scalar(select(func.count()).select_from(users)) == 2


async def test_results_are_buffered_and_the_sync_connection_is_guarded(
    tp_engine: ThreadpoolEngine,
) -> None:
    async with tp_engine.connect() as conn:
        result = await conn.execute(select(users.c.name))
        assert result.fetchall() == []  # read on the loop: already buffered, no IO
        sync_connection = conn.sync_connection
        assert sync_connection is not None
        with pytest.raises(BlockingOnEventLoopError):
            sync_connection.execute(text("SELECT 1"))


async def test_dispose_closes_the_pooled_connections(tp_engine: ThreadpoolEngine) -> None:
    async with tp_engine.connect() as conn:
        await conn.execute(select(1))
    pool = tp_engine.sync_engine.pool
    await tp_engine.dispose()
    assert tp_engine.sync_engine.pool is not pool
    async with tp_engine.connect() as conn:  # still usable, on a new pool
        assert await conn.scalar(select(1)) == 1


async def test_autocommit_execution_options(tp_engine: ThreadpoolEngine, engine: Engine) -> None:
    autocommit = tp_engine.execution_options(isolation_level="AUTOCOMMIT")
    assert autocommit.sync_engine.pool is tp_engine.sync_engine.pool
    async with autocommit.connect() as conn:
        await conn.execute(insert(users).values(name="a"))
        assert user_names(engine) == {"a"}  # committed without commit()
        await conn.rollback()
    assert user_names(engine) == {"a"}


async def test_connection_execution_options_apply_to_each_transaction(
    tp_engine: ThreadpoolEngine, engine: Engine
) -> None:
    async with tp_engine.connect() as conn:
        assert await conn.execution_options(isolation_level="AUTOCOMMIT") is conn
        for name in ("a", "b"):  # a second transaction may get another pooled connection
            await conn.execute(insert(users).values(name=name))
            assert name in user_names(engine)
            await conn.rollback()


async def test_a_maker_accepts_the_engine_facade(
    tp_engine: ThreadpoolEngine, engine: Engine
) -> None:
    maker = threadpool_sessionmaker(tp_engine)
    assert maker.sync_maker.kw["bind"] is tp_engine.sync_engine
    async with threadpool_session(maker) as sess:
        sess.add(User(name="a"))
    assert user_names(engine) == {"a"}
    other = threadpool_sessionmaker()
    other.configure(bind=tp_engine)
    assert other.sync_maker.kw["bind"] is tp_engine.sync_engine


async def test_a_closed_connection_raises_a_clear_error(tp_engine: ThreadpoolEngine) -> None:
    async with tp_engine.connect() as conn:
        pass
    with pytest.raises(ResourceClosedError, match=r"engine\.connect"):
        await conn.execute(select(1))
    with pytest.raises(ResourceClosedError):
        await conn.begin()
    await conn.close()  # idempotent


async def test_database_errors_pass_through_unchanged(
    tp_engine: ThreadpoolEngine, engine: Engine
) -> None:
    async with tp_engine.connect() as conn:
        await conn.execute(insert(users).values(name="a"))
        with pytest.raises(IntegrityError):
            await conn.execute(insert(users).values(name="a"))
        await conn.rollback()
        await conn.execute(insert(users).values(name="b"))
        await conn.commit()
    assert user_names(engine) == {"b"}


async def test_invalidate_discards_the_connection(tp_engine: ThreadpoolEngine) -> None:
    invalidated: list[object] = []
    event.listen(tp_engine.sync_engine, "invalidate", lambda dbapi, *_: invalidated.append(dbapi))
    async with tp_engine.connect() as conn:
        await conn.execute(select(1))
        sync_connection = conn.sync_connection
        assert sync_connection is not None
        dbapi_connection = sync_connection.connection.dbapi_connection
        await conn.invalidate()
        assert conn.invalidated
        assert invalidated == [dbapi_connection]
        assert await conn.scalar(select(1)) == 1  # a fresh connection
        assert not conn.invalidated
    assert checked_out(tp_engine.sync_engine) == 0


async def test_engine_attributes_and_refusals(db_url: str) -> None:
    tp = threadpool_engine_from_config(
        {
            "sqlalchemy.url": db_url,
            **{f"sqlalchemy.{k}": v for k, v in _engine_kwargs(db_url).items()},
        }
    )
    assert tp.url == tp.sync_engine.url
    assert tp.name == tp.dialect.name == tp.sync_engine.dialect.name
    assert tp.driver == tp.sync_engine.driver
    assert tp.pool is tp.sync_engine.pool
    assert tp.engine is tp.sync_engine
    tp.update_execution_options(logging_token="x")
    assert tp.get_execution_options()["logging_token"] == "x"
    tp.clear_compiled_cache()
    await tp.dispose()
    with pytest.raises(TypeError, match="sync sqlalchemy Engine"):
        ThreadpoolEngine(tp)  # type: ignore[arg-type]


async def test_an_asyncio_driver_is_refused(tmp_path: object) -> None:
    pytest.importorskip("aiosqlite")  # the bench group installs it; the lowest-versions venv not
    with pytest.raises(ValueError, match=r"sqlite:///app\.db"):
        create_threadpool_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db")


async def test_run_sync_with_arguments_runs_in_a_worker(tp_engine: ThreadpoolEngine) -> None:
    def tables(conn: Connection, schema: str | None) -> tuple[list[str], bool]:
        on_loop = threading.current_thread() is threading.main_thread()
        return inspect(conn).get_table_names(schema=schema), on_loop

    async with tp_engine.connect() as conn:
        names, on_loop = await conn.run_sync(tables, None)
    assert "satp_user" in names
    assert not on_loop
