"""Other statements on a stream's connection while it has unread rows: every row once.

MySQL and MariaDB have one unbuffered result per connection: PyMySQL reads and discards the
rest of an open server-side cursor when another statement starts on its connection (with a
``UserWarning``, an error in these tests). A stream of ours fetches its remaining rows into its
own buffer first, in the worker, and goes on from memory. PostgreSQL (named cursors) and SQLite
need nothing: the same tests run there to show the same behaviour. A transaction that ends
while a stream is open (commit, rollback, close) discards what was not read on MySQL, and the
next read that needs those rows raises ``StreamClosedError`` instead of ending early.
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import selectinload

from helpers import checked_out, only_on
from models import Post, User
from sqlalchemy_threadpool import (
    StreamClosedError,
    ThreadpoolEngine,
    ThreadpoolSession,
    threadpool_session,
    threadpool_sessionmaker,
)

pytestmark = pytest.mark.anyio

ROWS = 50
_BY_ID = select(User).order_by(User.id)


async def _seed(engine: Engine) -> list[int]:
    async with threadpool_session(threadpool_sessionmaker(engine)) as sess:
        await sess.execute(insert(User), [{"name": f"user{i:03}"} for i in range(ROWS)])
        return list(await sess.scalars(select(User.id).order_by(User.id)))


async def test_a_query_between_rows_leaves_every_row_to_the_stream(engine: Engine) -> None:
    ids = await _seed(engine)
    seen: list[int] = []
    counts: list[int] = []
    async with ThreadpoolSession(engine) as sess:
        result = await sess.stream(_BY_ID.execution_options(yield_per=2))
        async for user in result.scalars():
            seen.append(user.id)
            count = await sess.execute(select(func.count()).where(User.id <= user.id))
            counts.append(count.scalar_one())
    assert seen == ids
    assert counts == list(range(1, ROWS + 1))
    assert checked_out(engine) == 0


async def test_a_second_stream_between_partitions(engine: Engine) -> None:
    ids = await _seed(engine)
    seen: list[int] = []
    inner: list[list[int]] = []
    async with (
        ThreadpoolSession(engine) as sess,
        await sess.stream(select(User.id).order_by(User.id)) as outer,
    ):
        async for part in outer.scalars().partitions(2):
            seen.extend(part)
            async with await sess.stream(
                select(User.id).where(User.id.in_(part)).order_by(User.id.desc())
            ) as second:
                inner.append(list(await second.scalars().all()))
    assert seen == ids
    assert inner == [sorted(ids[i : i + 2], reverse=True) for i in range(0, ROWS, 2)]
    assert checked_out(engine) == 0


async def test_an_autoflush_between_rows(engine: Engine) -> None:
    ids = await _seed(engine)
    seen: list[int] = []
    async with threadpool_session(threadpool_sessionmaker(engine)) as sess:
        result = await sess.stream_scalars(_BY_ID.execution_options(yield_per=2))
        async for user in result:
            seen.append(user.id)
            user.name = f"renamed{user.id}"
            # autoflush: the UPDATE runs on the stream's connection, then the SELECT
            assert await sess.scalar(select(User.name).where(User.id == user.id)) == user.name
    assert seen == ids
    async with ThreadpoolSession(engine) as sess:
        names = list(await sess.scalars(select(User.name).order_by(User.id)))
    assert names == [f"renamed{i}" for i in ids]


async def test_several_open_streams_read_in_turn(engine: Engine) -> None:
    ids = await _seed(engine)
    async with ThreadpoolSession(engine) as sess:
        streams = [
            await sess.stream_scalars(
                select(User.id).order_by(User.id).execution_options(yield_per=3)
            )
            for _ in range(3)
        ]
        seen: list[list[int]] = [[], [], []]
        for _ in range(ROWS):
            for i, stream in enumerate(streams):
                seen[i].append(await stream.__anext__())
        for stream in streams:
            assert [x async for x in stream] == []
    assert seen == [ids, ids, ids]
    assert checked_out(engine) == 0


async def test_nested_streams_inside_streams(engine: Engine) -> None:
    ids = await _seed(engine)
    triples: list[tuple[int, int, int]] = []
    async with ThreadpoolSession(engine) as sess:
        outer = await sess.stream_scalars(
            select(User.id)
            .where(User.id <= ids[4])
            .order_by(User.id)
            .execution_options(yield_per=1)
        )
        async for a in outer:
            middle = await sess.stream_scalars(
                select(User.id)
                .where(User.id <= ids[2])
                .order_by(User.id)
                .execution_options(yield_per=1)
            )
            async for b in middle:
                total = await sess.stream_scalars(select(func.count()).select_from(User))
                triples.append((a, b, await total.one()))
    assert triples == [(a, b, ROWS) for a in ids[:5] for b in ids[:3]]
    assert checked_out(engine) == 0


async def test_a_connection_stream_with_statements_between_rows(engine: Engine) -> None:
    ids = await _seed(engine)
    seen: list[int] = []
    tp_engine = ThreadpoolEngine(engine)
    async with tp_engine.connect() as conn:
        async with conn.stream(
            select(User.id).order_by(User.id).execution_options(yield_per=2)
        ) as result:
            async for (user_id,) in result:
                seen.append(user_id)
                await conn.execute(
                    update(User).where(User.id == user_id).values(name=f"c{user_id}")
                )
        await conn.commit()
        names = list(await conn.scalars(select(User.name).order_by(User.id)))
    assert seen == ids
    assert names == [f"c{i}" for i in ids]
    assert checked_out(engine) == 0


@only_on("mysql")
async def test_buffering_is_logged_at_debug(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    await _seed(engine)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy_threadpool")
    async with (
        ThreadpoolSession(engine) as sess,
        await sess.stream_scalars(select(User.id).execution_options(yield_per=5)) as ids,
    ):
        await ids.__anext__()
        await sess.execute(select(1))
        assert len([x async for x in ids]) == ROWS - 1
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("another statement" in m and "45 rows" in m for m in messages), messages


@only_on("mysql")
@pytest.mark.parametrize("end", ["commit", "rollback"])
async def test_a_transaction_ending_under_an_open_stream_is_an_error_not_an_early_end(
    engine: Engine, end: str
) -> None:
    """MySQL: the unread rows are discarded with the transaction (as PostgreSQL's named
    cursor is closed); the rows read ahead are still served, then the error."""
    ids = await _seed(engine)
    async with ThreadpoolSession(engine) as sess:
        result = await sess.stream_scalars(
            select(User.id).order_by(User.id).execution_options(yield_per=4)
        )
        assert await result.__anext__() == ids[0]
        await getattr(sess, end)()
        assert [await result.__anext__() for _ in range(3)] == ids[1:4]
        with pytest.raises(StreamClosedError, match=rf"{end}"):
            await result.__anext__()
        await result.close()
    assert checked_out(engine) == 0


@only_on("mysql")
async def test_partitions_after_a_commit_give_the_rows_read_ahead_then_the_error(
    engine: Engine,
) -> None:
    ids = await _seed(engine)
    async with ThreadpoolSession(engine) as sess:
        result = await sess.stream_scalars(
            select(User.id).order_by(User.id).execution_options(yield_per=4)
        )
        assert await result.__anext__() == ids[0]
        await sess.commit()
        parts = result.partitions(2)
        assert [await parts.__anext__(), await parts.__anext__()] == [ids[1:3], ids[3:4]]
        with pytest.raises(StreamClosedError):
            await parts.__anext__()
        await result.close()
    assert checked_out(engine) == 0


@only_on("postgresql")
async def test_postgresql_closes_a_named_cursor_at_commit(engine: Engine) -> None:
    """For comparison: the database's own error there, as the rows are gone."""
    await _seed(engine)
    async with ThreadpoolSession(engine) as sess:
        result = await sess.stream_scalars(select(User.id).execution_options(yield_per=4))
        await result.__anext__()
        await sess.commit()
        with pytest.raises(DBAPIError):
            await result.all()


async def test_a_stream_left_with_break_at_the_end_of_a_scope(engine: Engine) -> None:
    """The scope commits with the stream still open: no warning, nothing held in memory,
    the commit done."""
    ids = await _seed(engine)
    async with threadpool_session(threadpool_sessionmaker(engine)) as sess:
        result = await sess.stream_scalars(
            select(User.id).order_by(User.id).execution_options(yield_per=2)
        )
        async for user_id in result:
            if user_id == ids[2]:
                break
        await sess.execute(update(User).where(User.id == ids[0]).values(name="kept"))
        result = await sess.stream_scalars(
            select(User.id).order_by(User.id).execution_options(yield_per=2)
        )
        assert await result.__anext__() == ids[0]
    async with ThreadpoolSession(engine) as sess:
        assert await sess.scalar(select(User.name).where(User.id == ids[0])) == "kept"
    assert checked_out(engine) == 0


async def test_selectinload_between_chunks_of_an_orm_stream(engine: Engine) -> None:
    """The ORM's own per-chunk ``selectinload`` query runs on the stream's connection."""
    ids = await _seed(engine)
    async with ThreadpoolSession(engine) as sess:
        for user_id in ids[:10]:
            sess.add(Post(title=f"p{user_id}", author_id=user_id))
        await sess.commit()
    seen: list[tuple[int, list[str]]] = []
    async with ThreadpoolSession(engine) as sess:
        statement = _BY_ID.options(selectinload(User.posts))
        async with await sess.stream_scalars(statement) as users:
            users.yield_per(3)  # the ORM loads 3 rows, then runs their selectinload query
            async for user in users:
                seen.append((user.id, [post.title for post in user.posts]))
    assert seen == [(i, [f"p{i}"] if i in ids[:10] else []) for i in ids]
    assert checked_out(engine) == 0
