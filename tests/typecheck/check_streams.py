"""Static checks of the stream types, run by mypy on SQLAlchemy 2.0 and 2.1 (never executed).

``mypy`` checks this module with the project's config; on the SQLAlchemy 2.0 line run it from
a venv with ``sqlalchemy==2.0.*``. Each ``assert_type`` holds on both lines; where the lines
differ (2.0 types the first column of a multi-column stream as ``Any``, as ``AsyncResult``
does there), the check is an assignment, which holds for the exact type and for ``Any``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.engine import RowMapping
from typing_extensions import Unpack, assert_type

from models import User
from sqlalchemy_threadpool import (
    ThreadpoolSession,
    ThreadpoolStreamMappingResult,
    ThreadpoolStreamResult,
    ThreadpoolStreamScalarResult,
    ThreadpoolTupleResult,
)


async def stream_scalars(sess: ThreadpoolSession) -> None:
    users = await sess.stream_scalars(select(User))
    assert_type(users, ThreadpoolStreamScalarResult[User])
    async for user in users:
        assert_type(user, User)
    assert_type(await users.first(), User | None)
    assert_type(await users.fetchmany(2), Sequence[User])
    async for part in users.partitions(10):
        assert_type(part, Sequence[User])
    assert_type(users.unique(), ThreadpoolStreamScalarResult[User])

    ids = await sess.stream_scalars(select(User.id))
    assert_type(ids, ThreadpoolStreamScalarResult[int])
    assert_type(await ids.one(), int)

    first_column = await sess.stream_scalars(select(User.id, User.name))
    first: int = await first_column.one()  # int on 2.1, Any on 2.0
    assert first

    untyped = await sess.stream_scalars(text("select 1"))
    assert_type(untyped, ThreadpoolStreamScalarResult[Any])


async def stream_rows(sess: ThreadpoolSession) -> None:
    result = await sess.stream(select(User.id, User.name))
    assert_type(result.tuples(), ThreadpoolTupleResult[tuple[int, str]])
    async for id_, name in result.tuples():
        assert_type(id_, int)
        assert_type(name, str)
    row = await result.fetchone()
    assert row is not None
    assert_type(row._tuple(), tuple[int, str])
    assert_type(result.mappings(), ThreadpoolStreamMappingResult)
    assert_type(await result.mappings().all(), Sequence[RowMapping])
    result = result.unique().columns("name")  # in place, and the same type
    scalar_id: int = await result.scalars().one()  # int on 2.1, Any on 2.0
    assert scalar_id
    also_id: int | None = await result.scalar()
    assert also_id

    one_column = await sess.stream(select(User.id))
    assert_type(one_column.scalars(), ThreadpoolStreamScalarResult[int])
    assert_type(await one_column.scalar_one(), int)
    assert_type(one_column.tuples(), ThreadpoolTupleResult[tuple[int]])
    assert_type(one_column.scalars(1), ThreadpoolStreamScalarResult[Any])

    entities = await sess.stream(select(User))
    assert_type(entities.scalars(), ThreadpoolStreamScalarResult[User])
    assert_type(await entities.scalar_one_or_none(), User | None)
    async for (user,) in entities.tuples():
        assert_type(user, User)

    untyped = await sess.stream(text("select 1"))
    assert_type(untyped, ThreadpoolStreamResult[Unpack[tuple[Any, ...]]])
    assert_type(untyped.scalars(), ThreadpoolStreamScalarResult[Any])
    async with untyped as opened:
        assert_type(opened, ThreadpoolStreamResult[Unpack[tuple[Any, ...]]])
