"""Static checks of the result classes' new members and the scoped session, on 2.0 and 2.1.

``ThreadpoolResult`` and its views under their ``AsyncResult`` names: ``tuples()`` / ``t``
give a ``ThreadpoolTupleResult``; ``freeze()`` gives the ``FrozenResult`` that
``AsyncResult.freeze()`` gives; ``yield_per()`` keeps the type; ``keys()`` is SQLAlchemy's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
from sqlalchemy import select, text
from sqlalchemy.engine import RowMapping
from sqlalchemy.engine.result import RMKeyView
from sqlalchemy.ext.asyncio import AsyncSession
from typing_extensions import Unpack, assert_type

from models import User
from sqlalchemy_threadpool import (
    ThreadpoolMappingResult,
    ThreadpoolResult,
    ThreadpoolScalarResult,
    ThreadpoolSession,
    ThreadpoolStreamResult,
    ThreadpoolTupleResult,
    threadpool_scoped_session,
    threadpool_sessionmaker,
)

from ._helpers import same_as_async_session


async def tuple_views(sess: ThreadpoolSession) -> None:
    result = await sess.stream(select(User.id, User.name))
    assert_type(result.t, ThreadpoolTupleResult[tuple[int, str]])
    assert_type(result.tuples(), ThreadpoolTupleResult[tuple[int, str]])
    assert_type(await result.t.fetchone(), tuple[int, str] | None)
    assert_type(await result.t.all(), Sequence[tuple[int, str]])
    async for id_, name in result.t:
        assert_type(id_, int)
        assert_type(name, str)
    async for part in result.t.partitions(10):
        assert_type(part, Sequence[tuple[int, str]])

    one_column = await sess.stream(select(User.id))
    assert_type(await one_column.t.scalar_one(), int)
    assert_type(await one_column.t.scalar(), int | None)
    assert_type(await one_column.t.scalar_one_or_none(), int | None)
    assert_type(await result.t.scalar_one(), Any)  # several columns: as AsyncTupleResult


async def freeze(sess: ThreadpoolSession, async_sess: AsyncSession) -> None:
    stmt = select(User.id, User.name)
    ours = await (await sess.stream(stmt)).freeze()
    theirs = await (await async_sess.stream(stmt)).freeze()
    same_as_async_session([ours], [theirs])
    same_as_async_session([ours().all()], [theirs().all()])

    entities = await (await sess.stream(select(User))).freeze()
    same_as_async_session([entities], [await (await async_sess.stream(select(User))).freeze()])


async def yield_per_and_keys(sess: ThreadpoolSession) -> None:
    result = await sess.stream(select(User.id, User.name))
    same_as_async_session([result.yield_per(100)], [result])  # in place, same type
    assert_type(result.keys(), RMKeyView)
    assert_type(result.mappings().keys(), RMKeyView)
    assert_type(result.mappings().yield_per(5), ThreadpoolMappingResult)
    assert_type(await result.mappings().fetchmany(), Sequence[RowMapping])
    scalars = await sess.stream_scalars(select(User))
    assert_type(scalars.yield_per(5), ThreadpoolScalarResult[User])
    assert_type(scalars.closed, bool)


async def aliases(sess: ThreadpoolSession) -> None:
    untyped = await sess.stream(text("select 1"))
    assert_type(untyped, ThreadpoolResult[Unpack[tuple[Any, ...]]])
    old_name: ThreadpoolStreamResult[Unpack[tuple[Any, ...]]] = (
        untyped  # the earlier name is the same class
    )
    assert_type(old_name, ThreadpoolResult[Unpack[tuple[Any, ...]]])


async def scoped_sessions(maker: threadpool_sessionmaker, sess: ThreadpoolSession) -> None:
    scoped = threadpool_scoped_session(maker, scopefunc=lambda: anyio.get_current_task().id)
    assert_type(scoped, threadpool_scoped_session[ThreadpoolSession])
    assert_type(scoped(), ThreadpoolSession)
    assert_type(scoped(autoflush=False), ThreadpoolSession)
    assert_type(await scoped.remove(), None)
    assert_type(scoped.session_factory, threadpool_sessionmaker[ThreadpoolSession])
    stmt = select(User.id)
    same_as_async_session([await scoped().scalar(stmt)], [await sess.scalar(stmt)])
    assert_type(await scoped.scalar(select(User.id)), Any)  # proxies: Any
