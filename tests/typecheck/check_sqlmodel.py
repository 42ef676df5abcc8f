"""Type checks of the SQLModel integration (see README.md beside this module)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine, ScalarResult
from sqlmodel import Field, SQLModel, col, select, update
from sqlmodel.ext.asyncio.session import AsyncSession
from typing_extensions import assert_type

from sqlalchemy_threadpool import ThreadpoolSession, threadpool_sessionmaker
from sqlalchemy_threadpool.integrations.sqlmodel import (
    ThreadpoolSQLModelSession,
    sqlmodel_sessionmaker,
)

from ._helpers import same_as_async_session


class Hero(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str
    age: int | None = None


async def check_exec(engine: Engine, async_sess: AsyncSession) -> None:
    maker = sqlmodel_sessionmaker(engine, limiter=2, expire_on_commit=True)
    assert isinstance(maker, threadpool_sessionmaker)
    assert_type(maker(), ThreadpoolSQLModelSession)
    async with maker() as sess:
        assert_type(sess, ThreadpoolSQLModelSession)
        assert isinstance(sess, ThreadpoolSession)
        assert_type(await sess.exec(select(Hero)), ScalarResult[Hero])
        assert_type((await sess.exec(select(Hero))).all(), Sequence[Hero])
        assert_type((await sess.exec(select(Hero.name))).one(), str)
        same_as_async_session(
            [await sess.exec(select(Hero.name, Hero.age))],
            [await async_sess.exec(select(Hero.name, Hero.age))],
        )
        same_as_async_session(
            [await sess.exec(update(Hero).where(col(Hero.id) == 1).values(name="x"))],
            [await async_sess.exec(update(Hero).where(col(Hero.id) == 1).values(name="x"))],
        )
        assert_type(await sess.get(Hero, 1), Hero | None)
        await sess.exec("SELECT 1")  # type: ignore[call-overload]
