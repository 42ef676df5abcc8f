"""Type checks of the contextual scope: ``threadpool_session``, ``current_session`` and
``bind_session`` (see README.md beside this module)."""

from __future__ import annotations

from typing_extensions import assert_type

from models import User
from sqlalchemy_threadpool import (
    ThreadpoolSession,
    allow_blocking,
    bind_session,
    current_session,
    get_default_sessionmaker,
    set_default_sessionmaker,
    threadpool_session,
    threadpool_sessionmaker,
)


async def check_scope(maker: threadpool_sessionmaker) -> None:
    async with threadpool_session(maker) as sess:
        assert_type(sess, ThreadpoolSession)
    async with threadpool_session(maker, new=True) as sess:
        assert_type(sess, ThreadpoolSession)
    async with threadpool_session() as sess:  # the default maker
        assert_type(sess, ThreadpoolSession)
    threadpool_session(maker, True)  # type: ignore[call-arg]


async def check_current_session(maker: threadpool_sessionmaker) -> None:
    assert_type(current_session(), ThreadpoolSession)
    assert_type(await current_session().get_one(User, 1), User)
    with bind_session(maker()) as sess:
        assert_type(sess, ThreadpoolSession)
    assert_type(set_default_sessionmaker(maker), None)
    assert_type(get_default_sessionmaker(), threadpool_sessionmaker | None)
    bind_session(maker)  # type: ignore[arg-type]


async def check_allow_blocking() -> None:
    with allow_blocking():
        pass
    async with allow_blocking():
        pass
