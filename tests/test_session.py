"""The facade: IO members in workers, plain members plain, results buffered, bad input refused."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import Engine, insert, select, text
from sqlalchemy.engine import Result
from sqlalchemy.exc import MultipleResultsFound, NoResultFound, ResourceClosedError
from sqlalchemy.orm import Session, selectinload

from helpers import Overlap, checked_out
from models import Post, User
from sqlalchemy_threadpool import (
    SessionClosedError,
    ThreadpoolSession,
    threadpool_session,
    threadpool_sessionmaker,
)

pytestmark = pytest.mark.anyio


async def _seed(maker: threadpool_sessionmaker, *names: str) -> None:
    async with threadpool_session(maker) as sess:
        sess.add_all(User(name=name, posts=[Post(title=f"{name}'s post")]) for name in names)


async def test_io_methods_run_in_a_worker_thread(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    loop_thread = threading.get_ident()
    async with maker() as sess:
        worker_thread = await sess.run(lambda s: threading.get_ident())
        assert worker_thread != loop_thread
        seen: list[int] = []
        from sqlalchemy import event

        @event.listens_for(engine, "before_cursor_execute")
        def record(*args: Any) -> None:
            seen.append(threading.get_ident())

        sess.add(User(name="ada"))
        await sess.flush()
        user = await sess.scalar(select(User).where(User.name == "ada"))
        assert user is not None
        assert await sess.get(User, user.id) is user
        await sess.commit()
        event.remove(engine, "before_cursor_execute", record)
    assert seen
    assert loop_thread not in seen


async def test_plain_members_stay_plain(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        user = User(name="ada")
        sess.add(user)
        assert user in sess.new
        assert user in sess
        assert not sess.dirty
        assert not sess.deleted
        sess.expunge(user)
        assert user not in sess
        sess.add_all([user])
        sess.info["key"] = "value"
        assert sess.sync_session.info == {"key": "value"}
        assert sess.bind is engine
        assert not sess.in_nested_transaction()
        with sess.no_autoflush:
            assert sess.autoflush is False
        sess.expunge_all()
        assert not sess.new


async def test_expire_on_commit_defaults_to_false(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        user = User(name="ada")
        sess.add(user)
        await sess.commit()
        assert user.name == "ada"  # no refresh query: would be IO on the loop otherwise
        assert sess.sync_session.expire_on_commit is False


@pytest.mark.parametrize(
    "shape",
    ["result", "scalars", "mappings", "core_result", "connection_result"],
)
async def test_run_buffers_results_in_the_worker(engine: Engine, shape: str) -> None:
    """A result returned by run() is complete even after the connection went back."""
    maker = threadpool_sessionmaker(engine)
    await _seed(maker, "ada", "bob", "cyd")
    makers: dict[str, Any] = {
        "result": lambda s: s.execute(select(User.name).order_by(User.name)),
        "scalars": lambda s: s.scalars(select(User.name).order_by(User.name)),
        "mappings": lambda s: s.execute(select(User.name).order_by(User.name)).mappings(),
        "core_result": lambda s: s.execute(text("SELECT name FROM satp_user ORDER BY name")),
        "connection_result": lambda s: s.connection().execute(
            text("SELECT name FROM satp_user ORDER BY name")
        ),
    }
    async with maker() as sess:
        result = await sess.run(makers[shape])
        await sess.close()  # cursor and connection are gone now
        assert checked_out(engine) == 0
        rows = list(result)
    names = [
        row if isinstance(row, str) else row["name"] if shape == "mappings" else row[0]
        for row in rows
    ]
    assert names == ["ada", "bob", "cyd"]


async def test_execute_and_scalars_are_buffered(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    await _seed(maker, "ada", "bob")
    async with maker() as sess:
        scalars = await sess.scalars(select(User).order_by(User.name))
        rows = await sess.execute(select(User.id, User.name).order_by(User.name))
        await sess.close()
        assert [u.name for u in scalars] == ["ada", "bob"]
        assert [r.name for r in rows] == ["ada", "bob"]


async def test_dml_result_keeps_rowcount(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    await _seed(maker, "ada", "bob")
    async with threadpool_session(maker) as sess:
        result = await sess.execute(text("UPDATE satp_user SET bio = 'x'"))
        assert result.rowcount == 2  # type: ignore[attr-defined]


async def test_eager_loads_inside_the_worker_are_fine(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    await _seed(maker, "ada")
    async with maker() as sess:
        user = (await sess.scalars(select(User).options(selectinload(User.posts)))).one()
        assert [p.title for p in user.posts] == ["ada's post"]
        lazy = await sess.run(lambda s: [p.title for p in s.scalars(select(User)).one().posts])
        assert lazy == ["ada's post"]


async def test_load_runs_the_lazy_load_in_a_worker(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    await _seed(maker, "ada")
    async with maker() as sess:
        user = (await sess.scalars(select(User))).one()
        posts = await sess.load(user, "posts")
        assert [p.title for p in posts] == ["ada's post"]
        assert user.posts is posts  # loaded now: plain access does no IO


async def test_get_one_and_refresh_merge_delete(engine: Engine, other_engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    await _seed(maker, "ada")
    async with threadpool_session(maker) as sess:
        user = (await sess.scalars(select(User))).one()
        assert await sess.get_one(User, user.id) is user
        with pytest.raises(NoResultFound):
            await sess.get_one(User, -1)
        await sess.run(lambda s: s.execute(text("UPDATE satp_user SET name = 'eve'")))
        await sess.refresh(user)
        assert user.name == "eve"
        detached = User(id=user.id, name="zed")
        merged = await sess.merge(detached)
        assert merged is user
        assert user.name == "zed"
        await sess.delete(user)
    async with maker() as sess:
        assert (await sess.scalars(select(User))).all() == []


async def test_connection_returns_the_sync_connection(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        connection = await sess.connection()
        assert connection.engine is engine
        assert await sess.run(lambda s: s.connection() is connection)


async def test_invalidate_discards_the_connection(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        before = (await sess.connection()).connection.dbapi_connection
        await sess.invalidate()
        after = (await sess.connection()).connection.dbapi_connection
        assert after is not before  # the old DBAPI connection was thrown away, not pooled
    assert checked_out(engine) == 0


async def test_stream_fetches_ten_thousand_rows_in_partitions(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        await sess.execute(insert(User), [{"name": f"user{i:05}"} for i in range(10_000)])
    fetches = Overlap()
    async with maker() as sess:
        result = await sess.stream(select(User.name).order_by(User.name))
        real = result._rows._real
        original = real._fetchmany_impl

        def counted(size: int | None = None) -> Any:
            with fetches.inside():
                return original(size)

        real._fetchmany_impl = counted  # type: ignore[method-assign]
        async with result:
            names = [row.name async for row in result]
        assert len(names) == 10_000
        assert names[0] == "user00000"
        assert names[-1] == "user09999"
        assert 10 <= fetches.calls <= 11  # a chunk per worker call: not one big fetch, nor a row
        scalars = await sess.stream_scalars(select(User.id))
        count = 0
        async for part in scalars.partitions(1000):
            count += len(part)
        assert count == 10_000
        orm = await sess.stream_scalars(select(User).order_by(User.name))
        first_two = await orm.fetchmany(2)
        assert [u.name for u in first_two] == ["user00000", "user00001"]
        await orm.close()
    assert checked_out(engine) == 0


async def test_stream_closes_when_the_consumer_is_cancelled(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        await sess.execute(insert(User), [{"name": f"u{i}"} for i in range(3000)])
    async with maker() as sess:
        with anyio.CancelScope() as scope:
            async with await sess.stream(select(User)) as result:
                async for _row in result:
                    scope.cancel()
                    await anyio.lowlevel.checkpoint()
        assert result.closed
    assert checked_out(engine) == 0


async def _seed_users(engine: Engine, count: int) -> list[int]:
    async with threadpool_session(threadpool_sessionmaker(engine)) as sess:
        await sess.execute(insert(User), [{"name": f"user{i:05}"} for i in range(count)])
        return list(await sess.scalars(select(User.id).order_by(User.id)))


_IDS_AND_NAMES = select(User.id, User.name).order_by(User.id)


async def test_stream_views_continue_after_rows_read_by_async_for(engine: Engine) -> None:
    ids = await _seed_users(engine, 5)
    async with threadpool_sessionmaker(engine)() as sess:
        async with await sess.stream(_IDS_AND_NAMES) as result:
            first = await result.__anext__()
            rest = [i async for i in result.scalars()]
        assert [first.id, *rest] == ids


async def test_stream_fetchmany_then_mappings_share_the_position(engine: Engine) -> None:
    ids = await _seed_users(engine, 5)
    async with threadpool_sessionmaker(engine)() as sess:
        async with await sess.stream(_IDS_AND_NAMES) as result:
            first = await result.__anext__()
            two = await result.fetchmany(2)
            mappings = await result.mappings().all()
        assert [first.id, *(row.id for row in two), *(m["id"] for m in mappings)] == ids
        assert mappings[0]["name"] == "user00003"


async def test_stream_partitions_and_async_for_share_the_position(engine: Engine) -> None:
    ids = await _seed_users(engine, 2500)  # more than STREAM_CHUNK_SIZE
    async with threadpool_sessionmaker(engine)() as sess:
        async with await sess.stream(_IDS_AND_NAMES) as result:
            seen: list[int] = []
            async for row in result:
                seen.append(row.id)
                if len(seen) == 3:
                    break
            async for part in result.partitions(700):
                seen.extend(row.id for row in part)
                break
            seen.extend([i async for i in result.scalars()])
        assert seen == ids


async def test_stream_every_view_sees_each_row_once_in_order(engine: Engine) -> None:
    ids = await _seed_users(engine, 2500)
    async with threadpool_sessionmaker(engine)() as sess:
        async with await sess.stream(_IDS_AND_NAMES) as result:
            seen: list[int] = []
            while len(seen) < 2400:
                seen.append((await result.__anext__()).id)
                row = await result.fetchone()
                assert row is not None
                seen.append(row.id)
                seen.extend(r.id for r in await result.fetchmany(7))
                seen.extend(await result.scalars().fetchmany(5))
                mapping = await result.mappings().fetchone()
                assert mapping is not None
                seen.append(mapping["id"])
                async for i in result.scalars():
                    seen.append(i)
                    if i % 4 == 0:
                        break
                seen.extend(r[0] for r in await result.tuples().fetchmany(3))
            seen.extend(m["id"] for m in await result.mappings().fetchall())
            assert await result.fetchone() is None
        assert seen == ids


async def test_stream_first_and_one_after_partial_reads_return_the_next_row(
    engine: Engine,
) -> None:
    ids = await _seed_users(engine, 5)
    async with threadpool_sessionmaker(engine)() as sess:
        result = await sess.stream(_IDS_AND_NAMES)
        await result.__anext__()
        row = await result.first()
        assert row is not None
        assert row.id == ids[1]
        assert result.closed  # first() closes, as in SQLAlchemy
        with pytest.raises(ResourceClosedError):
            await result.fetchone()

        result = await sess.stream(_IDS_AND_NAMES)
        await result.__anext__()
        await result.fetchmany(3)
        assert await result.scalars().one() == ids[4]
        assert result.closed

        result = await sess.stream(_IDS_AND_NAMES)
        await result.__anext__()
        with pytest.raises(MultipleResultsFound):
            await result.one_or_none()
        assert result.closed

        scalars = await sess.stream_scalars(select(User.id).order_by(User.id))
        await scalars.__anext__()
        assert await scalars.first() == ids[1]
    assert checked_out(engine) == 0


async def test_stream_unique_filters_across_views(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        titles = ["x", "y", "x", "z", "y", "w", "x"]
        sess.add(User(name="ada", posts=[Post(title=t) for t in titles]))
    posts = Post.__table__.c  # a Core select: the ORM refuses unique() on server-side cursors
    async with maker() as sess:
        stmt = select(posts.title).order_by(posts.id)
        async with await sess.stream(stmt) as result:
            result.unique()
            first = await result.__anext__()
            rest = [t async for t in result.scalars()]
        assert [first.title, *rest] == ["x", "y", "z", "w"]


async def test_stream_columns_and_tuples_keep_the_position(engine: Engine) -> None:
    ids = await _seed_users(engine, 5)
    async with threadpool_sessionmaker(engine)() as sess:
        async with await sess.stream(_IDS_AND_NAMES) as result:
            first = await result.__anext__()
            assert tuple(first) == (ids[0], "user00000")
            names = result.columns("name")
            assert names is result
            assert list(names.keys()) == ["name"]
            second = await names.fetchone()
            assert second is not None
            assert tuple(second) == ("user00001",)
            rest = [tuple(row) async for row in result.tuples()]
        assert rest == [("user00002",), ("user00003",), ("user00004",)]


async def test_stream_orm_entities_shared_between_views(engine: Engine) -> None:
    ids = await _seed_users(engine, 5)
    async with threadpool_sessionmaker(engine)() as sess:
        async with await sess.stream(select(User).order_by(User.id)) as result:
            first = await result.__anext__()
            users = [first[0], *await result.scalars().fetchmany(2)]
            users.extend([u async for u in result.scalars()])
        assert [u.id for u in users] == ids
        scalars = await sess.stream_scalars(select(User).order_by(User.id))
        async with scalars:
            head = await scalars.__anext__()
            assert [head.id, *(u.id for u in await scalars.all())] == ids
    assert checked_out(engine) == 0


async def _async_fn(session: Session) -> None:
    return None


def _generator_fn(session: Session) -> Iterator[int]:
    yield 1


class _AsyncCallable:
    async def __call__(self, session: Session) -> None:
        return None


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (_async_fn, "got an async function"),
        (_AsyncCallable(), "got an async function"),
        (_generator_fn, "generator function"),
        (lambda s: _async_fn(s), "returned an awaitable"),
        (lambda s: (x for x in [1]), "returned a generator"),
        (lambda s: s.query(User), "legacy Query"),
        (42, "takes a callable"),
    ],
    ids=["async_def", "async_callable", "generator_fn", "coroutine", "generator", "query", "int"],
)
async def test_run_refuses_what_cannot_cross_back(engine: Engine, fn: Any, match: str) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        with pytest.raises(TypeError, match=match):
            await sess.run(fn)
        assert await sess.run(lambda s: 1) == 1  # the session is still usable


async def test_closed_error_needs_no_thread_and_no_capacity(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        pass
    blockers = [object() for _ in range(int(maker.limiter.total_tokens))]
    for blocker in blockers:  # no capacity left at all
        await maker.limiter.acquire_on_behalf_of(blocker)
    try:
        with pytest.raises(SessionClosedError):
            await sess.execute(select(User))
        with pytest.raises(SessionClosedError):
            await sess.run(lambda s: None)
    finally:
        for blocker in blockers:
            maker.limiter.release_on_behalf_of(blocker)


async def test_concurrent_calls_on_one_session_never_overlap(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    overlap = Overlap()

    def guarded(session: Session) -> None:
        with overlap.inside():
            session.execute(text("SELECT 1"))
            threading.Event().wait(0.01)

    async with threadpool_session(maker) as sess, anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(sess.run, guarded)
    assert overlap.calls == 8
    assert overlap.peak == 1


async def test_the_maker_limiter_bounds_worker_threads(db_url: str, engine: Engine) -> None:
    from sqlalchemy import create_engine

    small = create_engine(db_url, pool_size=2, max_overflow=0)
    try:
        maker = threadpool_sessionmaker(small)
        assert maker.limiter.total_tokens == 2
        overlap = Overlap()

        def work(session: Session) -> None:
            with overlap.inside():
                session.execute(text("SELECT 1"))
                threading.Event().wait(0.02)

        async def one() -> None:
            async with threadpool_session(maker, new=True) as sess:
                await sess.run(work)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one)
        assert overlap.calls == 10
        assert 1 <= overlap.peak <= 2
        assert small.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        small.dispose()


def test_run_result_type_flows_through() -> None:
    """A static check, run by mypy over the tests: `run` keeps the callable's return type."""

    async def typed(sess: ThreadpoolSession) -> list[str]:
        names: list[str] = await sess.run(lambda s: list(s.scalars(select(User.name))))
        result: Result[Any] = await sess.execute(select(User))
        return [*names, str(result)]

    assert callable(typed)
