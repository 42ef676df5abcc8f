"""Stream results are typed by column types, exactly as ``AsyncResult`` on each SQLAlchemy line.

Every check here puts our value beside ``AsyncSession``'s (or ``AsyncConnection``'s) for the
same statement and requires the same type (``same_as_async_session``), so it holds on
SQLAlchemy 2.0 (``ThreadpoolResult[tuple[int, str]]``, rows ``Row[tuple[int, str]]``) and on
2.1 (``ThreadpoolResult[int, str]``, rows ``Row[int, str]``) without spelling either. The
parameters of the result classes themselves are compared through ``columns_of`` /
``async_columns_of`` and the view helpers below, which read them back as a plain type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar, overload

from sqlalchemy import select, text
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncResult,
    AsyncScalarResult,
    AsyncSession,
    AsyncTupleResult,
)
from typing_extensions import TypeVarTuple, Unpack, assert_type

from models import User
from sqlalchemy_threadpool import (
    ThreadpoolConnection,
    ThreadpoolMappingResult,
    ThreadpoolResult,
    ThreadpoolScalarResult,
    ThreadpoolSession,
    ThreadpoolTupleResult,
)

from ._helpers import same_as_async_session as same

T = TypeVar("T")
_TP = TypeVar("_TP", bound=tuple[Any, ...])
_Ts = TypeVarTuple("_Ts")


def columns_of(result: ThreadpoolResult[Unpack[_Ts]]) -> list[tuple[Unpack[_Ts]]]:
    """Our result's parameters as a tuple type (2.0: one tuple; 2.1: the column types)."""
    return []


@overload
def async_columns_of(result: AsyncResult[_TP]) -> list[tuple[_TP]]: ...  # SQLAlchemy 2.0
@overload
def async_columns_of(  # SQLAlchemy 2.1
    result: AsyncResult[Unpack[_Ts]],  # type: ignore[valid-type, type-arg, misc, unused-ignore]
) -> list[tuple[Unpack[_Ts]]]: ...
def async_columns_of(result: Any) -> list[Any]:
    """``AsyncResult``'s parameters as a tuple type, as :func:`columns_of` reads ours."""
    return []


def scalar_of(result: ThreadpoolScalarResult[T]) -> list[T]:
    return []


def async_scalar_of(result: AsyncScalarResult[T]) -> list[T]:
    return []


def tuple_of(result: ThreadpoolTupleResult[T]) -> list[T]:
    return []


def async_tuple_of(result: AsyncTupleResult[T]) -> list[T]:
    return []


async def two_columns(sess: ThreadpoolSession, async_sess: AsyncSession) -> None:
    stmt = select(User.id, User.name)
    ours, theirs = await sess.stream(stmt), await async_sess.stream(stmt)
    same(columns_of(ours), async_columns_of(theirs))
    same([await ours.fetchone()], [await theirs.fetchone()])
    same([await ours.fetchmany(2)], [await theirs.fetchmany(2)])
    same([await ours.fetchall()], [await theirs.fetchall()])
    same([await ours.all()], [await theirs.all()])
    same([await ours.first()], [await theirs.first()])
    same([await ours.one()], [await theirs.one()])
    same([await ours.one_or_none()], [await theirs.one_or_none()])
    same([await ours.scalar()], [await theirs.scalar()])  # several columns: Any
    same([await ours.scalar_one()], [await theirs.scalar_one()])
    same([await ours.scalar_one_or_none()], [await theirs.scalar_one_or_none()])
    same([await ours.freeze()], [await theirs.freeze()])
    async for row in ours:
        async for their_row in theirs:
            same([row], [their_row])
    async for part in ours.partitions(10):
        async for their_part in theirs.partitions(10):
            same([part], [their_part])
    # views: in place (the same class), or a view of the same parameters
    same(columns_of(ours.unique()), async_columns_of(theirs.unique()))
    same(columns_of(ours.columns("id", "name")), async_columns_of(theirs.columns("id", "name")))
    same(columns_of(ours.yield_per(5)), async_columns_of(theirs.yield_per(5)))
    same(scalar_of(ours.scalars()), async_scalar_of(theirs.scalars()))
    same(scalar_of(ours.scalars(1)), async_scalar_of(theirs.scalars(1)))
    same(tuple_of(ours.tuples()), async_tuple_of(theirs.tuples()))
    same(tuple_of(ours.t), async_tuple_of(theirs.t))
    same([await ours.t.fetchone()], [await theirs.t.fetchone()])
    same([await ours.t.scalar_one()], [await theirs.t.scalar_one()])
    assert_type(ours.mappings(), ThreadpoolMappingResult)
    same([await ours.mappings().all()], [await theirs.mappings().all()])
    same([await ours.mappings().fetchone()], [await theirs.mappings().fetchone()])
    async for mapping in ours.mappings():
        assert_type(mapping, RowMapping)


async def one_column(sess: ThreadpoolSession, async_sess: AsyncSession) -> None:
    stmt = select(User.id)
    ours, theirs = await sess.stream(stmt), await async_sess.stream(stmt)
    same(columns_of(ours), async_columns_of(theirs))
    same([await ours.fetchone()], [await theirs.fetchone()])
    same([await ours.one()], [await theirs.one()])
    same([await ours.scalar()], [await theirs.scalar()])
    same([await ours.scalar_one()], [await theirs.scalar_one()])
    same([await ours.scalar_one_or_none()], [await theirs.scalar_one_or_none()])
    assert_type(await ours.scalar_one(), int)  # the same on both lines
    same([await ours.freeze()], [await theirs.freeze()])
    same(scalar_of(ours.scalars()), async_scalar_of(theirs.scalars()))
    same(scalar_of(ours.scalars(0)), async_scalar_of(theirs.scalars(0)))
    assert_type(ours.scalars(), ThreadpoolScalarResult[int])
    same([await ours.scalars().all()], [await theirs.scalars().all()])
    same(tuple_of(ours.t), async_tuple_of(theirs.t))
    same([await ours.t.scalar()], [await theirs.t.scalar()])
    same([await ours.tuples().scalar_one_or_none()], [await theirs.tuples().scalar_one_or_none()])


async def entities(sess: ThreadpoolSession, async_sess: AsyncSession) -> None:
    stmt = select(User)
    ours, theirs = await sess.stream(stmt), await async_sess.stream(stmt)
    same(columns_of(ours), async_columns_of(theirs))
    same([await ours.first()], [await theirs.first()])
    same([await ours.scalar_one()], [await theirs.scalar_one()])
    same(scalar_of(ours.scalars()), async_scalar_of(theirs.scalars()))
    assert_type(await ours.scalars().all(), Sequence[User])
    same(tuple_of(ours.tuples()), async_tuple_of(theirs.tuples()))
    async for row in ours:
        async for their_row in theirs:
            same([row], [their_row])

    users, their_users = await sess.stream_scalars(stmt), await async_sess.stream_scalars(stmt)
    same(scalar_of(users), async_scalar_of(their_users))
    same([await users.fetchmany()], [await their_users.fetchmany()])
    same(scalar_of(users.unique()), async_scalar_of(their_users.unique()))
    async for user in users:
        assert_type(user, User)

    first_column = await sess.stream_scalars(select(User.id, User.name))
    their_first = await async_sess.stream_scalars(select(User.id, User.name))
    same(scalar_of(first_column), async_scalar_of(their_first))


async def untyped(sess: ThreadpoolSession, async_sess: AsyncSession) -> None:
    stmt = text("SELECT 1")
    ours, theirs = await sess.stream(stmt), await async_sess.stream(stmt)
    same([await ours.fetchone()], [await theirs.fetchone()])
    same([await ours.all()], [await theirs.all()])
    same([await ours.scalar()], [await theirs.scalar()])
    same(scalar_of(ours.scalars()), async_scalar_of(theirs.scalars()))
    same(tuple_of(ours.t), async_tuple_of(theirs.t))
    # 2.1 types it ``AsyncResult[*tuple[Any, ...]]``, 2.0 ``AsyncResult[Any]``; ours is the
    # former on both lines, and accepts either annotation, as AsyncResult does
    assert_type(ours, ThreadpoolResult[Unpack[tuple[Any, ...]]])
    annotated: ThreadpoolResult[Any] = ours
    assert annotated


async def connections(conn: ThreadpoolConnection, async_conn: AsyncConnection) -> None:
    stmt = select(User.id, User.name)
    ours, theirs = await conn.stream(stmt), await async_conn.stream(stmt)
    same(columns_of(ours), async_columns_of(theirs))
    same([await ours.fetchone()], [await theirs.fetchone()])
    async with conn.stream(stmt) as opened, async_conn.stream(stmt) as their_opened:
        same(columns_of(opened), async_columns_of(their_opened))
        same([await opened.one()], [await their_opened.one()])
    users = await conn.stream_scalars(select(User))
    their_users = await async_conn.stream_scalars(select(User))
    same(scalar_of(users), async_scalar_of(their_users))
    assert_type(await users.one(), User)
    same([await conn.execute(stmt)], [await async_conn.execute(stmt)])


async def buffered(sess: ThreadpoolSession, async_sess: AsyncSession) -> None:
    """``execute`` returns SQLAlchemy's own buffered ``Result``, typed as AsyncSession's."""
    stmt = select(User.id, User.name)
    result, theirs = await sess.execute(stmt), await async_sess.execute(stmt)
    same([result], [theirs])
    same([result.t], [theirs.t])
    same([result.one()], [theirs.one()])
