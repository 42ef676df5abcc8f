"""Type checks of ``threadpool_sessionmaker`` (see README.md beside this module)."""

from __future__ import annotations

import anyio
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from typing_extensions import assert_type

from sqlalchemy_threadpool import ThreadpoolSession, threadpool_sessionmaker


async def check_maker(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine, limiter=2, guard="warn", expire_on_commit=True)
    assert_type(maker(), ThreadpoolSession)
    assert_type(maker(autoflush=False), ThreadpoolSession)
    async with maker() as sess:
        assert_type(sess, ThreadpoolSession)
    async with maker.begin() as sess:
        assert_type(sess, ThreadpoolSession)
    assert_type(maker.sync_maker, sessionmaker[Session])
    assert_type(maker.limiter, anyio.CapacityLimiter)
    assert_type(maker.configure(autoflush=False), None)
    assert_type(threadpool_sessionmaker(limiter=anyio.CapacityLimiter(3)), threadpool_sessionmaker)
    threadpool_sessionmaker(engine, guard="loud")  # type: ignore[arg-type]
    threadpool_sessionmaker(engine, offload="process")  # type: ignore[arg-type]
    threadpool_sessionmaker(engine, limiter="2")  # type: ignore[arg-type]
    threadpool_sessionmaker(engine, 2)  # type: ignore[call-arg]
