"""Type checks of the AsyncSession members and the generic maker (see README.md beside this).

Sessions made directly, ``class_=`` subclasses typed through the maker, and the members that
port from ``AsyncSession`` by renaming.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session
from typing_extensions import assert_type

from models import User
from sqlalchemy_threadpool import (
    ThreadpoolSession,
    ThreadpoolSessionTransaction,
    threadpool_sessionmaker,
)


class AppSession(ThreadpoolSession):
    pass


async def check_generic_maker(engine: Engine) -> None:
    default = threadpool_sessionmaker(engine)
    assert_type(default, threadpool_sessionmaker[ThreadpoolSession])
    annotated: threadpool_sessionmaker[ThreadpoolSession] = default
    bare: threadpool_sessionmaker = default  # the class parameter defaults to ThreadpoolSession
    assert_type(bare(), ThreadpoolSession)
    app = threadpool_sessionmaker(engine, class_=AppSession)
    assert_type(app, threadpool_sessionmaker[AppSession])
    assert_type(app(), AppSession)
    assert_type(app.class_, type[AppSession])
    async with app() as sess:
        assert_type(sess, AppSession)
    async with app.begin() as begun:
        assert_type(begun, AppSession)
    wrong: threadpool_sessionmaker[AppSession] = default  # type: ignore[assignment]
    threadpool_sessionmaker(engine, class_=Session)  # type: ignore[type-var]
    threadpool_sessionmaker(engine, sync_session_class=Session)
    del annotated, wrong


async def check_direct_session(engine: Engine, conn: Connection) -> None:
    assert_type(ThreadpoolSession(engine), ThreadpoolSession)
    assert_type(ThreadpoolSession(bind=conn, autoflush=False), ThreadpoolSession)
    assert_type(ThreadpoolSession(engine, sync_session_class=Session), ThreadpoolSession)
    assert_type(AppSession(engine), AppSession)
    ThreadpoolSession(engine, sync_session_class=User)  # type: ignore[arg-type]


async def check_members(sess: ThreadpoolSession, user: User) -> None:
    assert_type(sess.get_bind(), Engine | Connection)
    assert_type(sess.get_transaction(), ThreadpoolSessionTransaction | None)
    assert_type(sess.get_nested_transaction(), ThreadpoolSessionTransaction | None)
    assert_type(sess.in_nested_transaction(), bool)
    assert_type(sess.is_active, bool)
    assert_type(sess.sync_session_class, type[Session])
    assert_type(ThreadpoolSession.object_session(user), Session | None)
    assert_type(sess.identity_key(User, 1), tuple[type[Any], tuple[Any, ...], Any | None])
    assert_type(sess.__iter__(), Iterator[object])
    assert_type(user in sess, bool)
    sess.autoflush = False
    sess.is_active = False  # type: ignore[misc]
    assert_type(await sess.invalidate(), None)
    assert_type(await sess.reset(), None)
    assert_type(await sess.refresh(user), None)
    sess.expire(user, ["name"])
    sess.expunge(user)
    assert_type(await sess.run_sync(lambda s, n: n + 1, 1), int)
    with sess.no_autoflush:
        pass
