"""Type checks of ``ThreadpoolEngine`` / ``ThreadpoolConnection`` (see README.md beside this
module): the overloaded members have exactly ``AsyncConnection``'s types on each line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, ScalarResult, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection
from typing_extensions import Unpack, assert_type

from models import User
from sqlalchemy_threadpool import (
    ThreadpoolConnection,
    ThreadpoolEngine,
    ThreadpoolStreamResult,
    ThreadpoolStreamScalarResult,
    ThreadpoolTransaction,
    create_threadpool_engine,
    threadpool_sessionmaker,
)

from ._helpers import same_as_async_session


async def check_execute(conn: ThreadpoolConnection, async_conn: AsyncConnection) -> None:
    rows = await conn.execute(select(User.id, User.name))
    same_as_async_session([rows], [await async_conn.execute(select(User.id, User.name))])
    assert_type(rows.tuples().one(), tuple[int, str])
    assert_type((await conn.execute(select(User.id))).scalar(), int | None)
    same_as_async_session(
        [await conn.execute(text("SELECT 1"))], [await async_conn.execute(text("SELECT 1"))]
    )
    same_as_async_session(
        [await conn.execute(insert(User), [{"name": "a"}])],
        [await async_conn.execute(insert(User), [{"name": "a"}])],
    )
    await conn.execute("SELECT 1")  # type: ignore[call-overload]
    same_as_async_session(
        [await conn.exec_driver_sql("SELECT 1")], [await async_conn.exec_driver_sql("SELECT 1")]
    )


async def check_scalar_and_scalars(
    conn: ThreadpoolConnection, async_conn: AsyncConnection
) -> None:
    same_as_async_session(
        [await conn.scalar(select(User.id))], [await async_conn.scalar(select(User.id))]
    )
    assert_type(await conn.scalars(select(User.id)), ScalarResult[int])
    assert_type((await conn.scalars(select(User.name))).all(), Sequence[str])
    assert_type(await conn.scalars(text("SELECT 1")), ScalarResult[Any])


async def check_the_rest(engine: ThreadpoolEngine) -> None:
    assert_type(create_threadpool_engine("sqlite://"), ThreadpoolEngine)
    assert_type(engine.execution_options(isolation_level="AUTOCOMMIT"), ThreadpoolEngine)
    threadpool_sessionmaker(engine)
    async with engine.begin() as conn:
        assert_type(conn, ThreadpoolConnection)
        assert_type(await conn.run_sync(lambda c, n: n, 1), int)
        assert_type(conn.sync_connection, Connection | None)
    async with engine.connect() as conn, conn.begin() as transaction:
        assert_type(transaction, ThreadpoolTransaction)
        assert_type(await conn.begin_nested(), ThreadpoolTransaction)
        async with conn.stream(select(User.id)) as result:
            assert_type(result.scalars(), ThreadpoolStreamScalarResult[int])
        assert_type(await conn.stream(text("x")), ThreadpoolStreamResult[Unpack[tuple[Any, ...]]])
        assert_type(await conn.stream_scalars(text("x")), ThreadpoolStreamScalarResult[Any])
    conn = await engine.connect()
    assert_type(conn, ThreadpoolConnection)
    await conn.close()
