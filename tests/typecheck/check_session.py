"""Type checks of ``ThreadpoolSession``'s members (see README.md beside this module)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, ScalarResult, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from typing_extensions import assert_type

from models import User
from sqlalchemy_threadpool import ThreadpoolSession, ThreadpoolSessionTransaction

from ._helpers import same_as_async_session


async def check_scalars(sess: ThreadpoolSession) -> None:
    assert_type(await sess.scalars(select(User)), ScalarResult[User])
    assert_type(await sess.scalars(select(User.id)), ScalarResult[int])
    assert_type((await sess.scalars(select(User))).all(), Sequence[User])
    assert_type((await sess.scalars(select(User.name))).one(), str)
    assert_type(await sess.scalars(text("SELECT 1")), ScalarResult[Any])
    await sess.scalars(select(User), {"x": 1}, execution_options={"populate_existing": True})
    await sess.scalars("SELECT 1")  # type: ignore[call-overload]


async def check_scalar(sess: ThreadpoolSession, async_sess: AsyncSession) -> None:
    # 2.0: int | None. 2.1 (with current mypy): Any | None, as AsyncSession.scalar itself.
    same_as_async_session(
        [await sess.scalar(select(User.id))], [await async_sess.scalar(select(User.id))]
    )
    user_id: int | None = await sess.scalar(select(User.id))
    name: str = await sess.scalar(select(User.id))  # type: ignore[assignment]
    assert_type(await sess.scalar(text("SELECT 1")), Any)
    del user_id, name


async def check_execute(sess: ThreadpoolSession, async_sess: AsyncSession) -> None:
    rows = await sess.execute(select(User.id, User.name))
    same_as_async_session([rows], [await async_sess.execute(select(User.id, User.name))])
    assert_type(rows.tuples().one(), tuple[int, str])
    assert_type((await sess.execute(select(User))).scalar_one(), User)
    assert_type((await sess.execute(select(User))).scalars().all(), Sequence[User])
    assert_type((await sess.execute(select(User.id))).scalar(), int | None)
    same_as_async_session(
        [await sess.execute(update(User).values(name="x"))],
        [await async_sess.execute(update(User).values(name="x"))],
    )
    same_as_async_session(
        [await sess.execute(insert(User), [{"name": "a"}, {"name": "b"}])],
        [await async_sess.execute(insert(User), [{"name": "a"}, {"name": "b"}])],
    )
    same_as_async_session(
        [await sess.execute(text("SELECT 1"))], [await async_sess.execute(text("SELECT 1"))]
    )
    await sess.execute(select(User), bind_arguments={"mapper": User})
    await sess.execute(42)  # type: ignore[call-overload]


async def check_orm_io(sess: ThreadpoolSession) -> None:
    assert_type(await sess.get(User, 1), User | None)
    assert_type(await sess.get(User, (1,), populate_existing=True), User | None)
    assert_type(await sess.get_one(User, 1), User)
    user = User(name="ada")
    assert_type(await sess.merge(user), User)
    assert_type(await sess.merge(user, load=False), User)
    assert_type(await sess.refresh(user, ["name"]), None)
    assert_type(await sess.delete(user), None)
    assert_type(await sess.flush(), None)
    assert_type(await sess.commit(), None)
    assert_type(await sess.rollback(), None)
    assert_type(await sess.close(), None)
    assert_type(await sess.reset(), None)
    assert_type(await sess.invalidate(), None)
    assert_type(await sess.aclose(), None)
    assert_type(await sess.connection(), Connection)
    assert_type(await sess.load(user, "posts"), Any)
    await sess.get(User, 1, bogus=True)  # type: ignore[call-arg]
    await sess.refresh(user, [1])  # type: ignore[list-item]


def check_plain_members(sess: ThreadpoolSession) -> None:
    user = User(name="ada")
    assert_type(sess.add(user), None)
    assert_type(sess.add_all([user]), None)
    assert_type(sess.expunge(user), None)
    assert_type(sess.expire(user, ["name"]), None)
    assert_type(sess.in_transaction(), bool)
    assert_type(sess.is_modified(user), bool)
    assert_type(sess.is_active, bool)
    assert_type(sess.sync_session, Session)
    assert_type(user in sess, bool)
    sess.add()  # type: ignore[call-arg]


def _name_of(session: Session, user_id: int, *, upper: bool = False) -> str:
    name = session.get_one(User, user_id).name
    return name.upper() if upper else name


async def check_run(sess: ThreadpoolSession) -> None:
    assert_type(await sess.run(_name_of, 1), str)
    assert_type(await sess.run(_name_of, 1, upper=True), str)
    assert_type(await sess.run_sync(_name_of, 1), str)
    assert_type(await sess.run(lambda s: s.get(User, 1)), User | None)
    assert_type(await sess.run(lambda s: s.scalars(select(User))), ScalarResult[User])
    await sess.run(_name_of, "1")  # type: ignore[arg-type]
    await sess.run(_name_of, 1, lower=True)  # type: ignore[call-arg]
    await sess.run(_name_of)  # type: ignore[call-arg]
    await sess.run(lambda: None)  # type: ignore[arg-type,misc]


async def check_transactions(sess: ThreadpoolSession) -> None:
    assert_type(sess.begin(), ThreadpoolSessionTransaction)
    assert_type(await sess.begin(), ThreadpoolSessionTransaction)
    async with sess.begin_nested() as savepoint:
        assert_type(savepoint, ThreadpoolSessionTransaction)
        assert_type(savepoint.is_active, bool)
    async with sess as same:
        assert_type(same, ThreadpoolSession)
