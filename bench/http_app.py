"""The FastAPI app ``bench/http_bench.py`` serves: W2's request written four ways, one route each.

Every route does the same work as ``bench.py``'s W2 request (get a user by primary key,
select the user's posts, insert a post, commit) and returns the post count as JSON:

- ``/def``: a ``def`` endpoint with a plain sync ``Session`` (FastAPI runs it in anyio's
  40-thread pool: one thread hop for the whole request). The reference.
- ``/async``: an ``async def`` endpoint on our session (``session_dependency``), one awaited
  call per operation: ``get``, ``scalars``, then the dependency's commit and close.
- ``/whole``: an ``async def`` endpoint on our session with the whole request in one
  ``await sess.run(...)``; the dependency commits and closes.
- ``/asyncsession``: ``AsyncSession`` on the async driver (asyncpg, aiomysql, aiosqlite),
  when ``SATP_HTTP_ASYNC_URL`` is set and the server runs on asyncio.

Configured by environment variables (``bench/http_bench.py`` sets them): ``SATP_HTTP_URL`` (the
sync URL), ``SATP_HTTP_ASYNC_URL``, ``SATP_HTTP_POOL`` (pool size, default 10).
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import Post, User, request_body

from sqlalchemy_threadpool import (
    ThreadpoolSession,
    shutdown,
    threadpool_sessionmaker,
)
from sqlalchemy_threadpool.integrations.fastapi import session_dependency

URL = os.environ["SATP_HTTP_URL"]
ASYNC_URL = os.environ.get("SATP_HTTP_ASYNC_URL")
POOL = int(os.environ.get("SATP_HTTP_POOL", "10"))

engine = create_engine(URL, pool_size=POOL, max_overflow=0)
sync_maker = sessionmaker(engine, expire_on_commit=False)
maker = threadpool_sessionmaker(engine)
with engine.connect() as _conn:
    USER_IDS = list(_conn.scalars(select(User.id)))

async_maker: Any = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global async_maker
    async_engine = None
    if ASYNC_URL:
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

        async_engine = create_async_engine(ASYNC_URL, pool_size=POOL, max_overflow=0)
        async_maker = async_sessionmaker(async_engine, expire_on_commit=False)
    try:
        yield
    finally:
        await shutdown(maker)
        if async_engine is not None:
            await async_engine.dispose()
        engine.dispose()


app = FastAPI(lifespan=lifespan)
DB = Annotated[ThreadpoolSession, session_dependency(maker)]


def _ids() -> tuple[int, int]:
    return random.choice(USER_IDS), random.getrandbits(30)


@app.get("/def")
def by_def() -> dict[str, int]:
    uid, i = _ids()
    with sync_maker() as sess:
        request_body(sess, uid, i)
        sess.commit()
    return {"ok": 1}


@app.get("/async")
async def by_async(sess: DB) -> dict[str, int]:
    uid, i = _ids()
    user = await sess.get(User, uid)
    posts = (await sess.scalars(select(Post).where(Post.author_id == uid))).all()
    if user is None:
        raise AssertionError(f"user {uid} not found")
    sess.add(Post(author_id=user.id, title=f"request {i}, after {len(posts)} posts"))
    return {"ok": 1}


def _whole(sess: Session, uid: int, i: int) -> None:
    request_body(sess, uid, i)


@app.get("/whole")
async def by_whole(sess: DB) -> dict[str, int]:
    uid, i = _ids()
    await sess.run(_whole, uid, i)
    return {"ok": 1}


@app.get("/asyncsession")
async def by_asyncsession() -> dict[str, int]:
    if async_maker is None:
        raise RuntimeError("SATP_HTTP_ASYNC_URL is not set")
    uid, i = _ids()
    async with async_maker() as sess:
        user = await sess.get(User, uid)
        posts = (await sess.scalars(select(Post).where(Post.author_id == uid))).all()
        if user is None:
            raise AssertionError(f"user {uid} not found")
        sess.add(Post(author_id=user.id, title=f"request {i}, after {len(posts)} posts"))
        await sess.commit()
    return {"ok": 1}


@app.get("/health")
async def health() -> dict[str, int]:
    return {"ok": 1}
