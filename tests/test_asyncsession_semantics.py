"""Sessions are made, closed and reused as AsyncSession's are.

``ThreadpoolSession(engine)`` needs no maker (and still shares the admission sized to the
pool), ``class_=`` / ``sync_session_class=`` work as async_sessionmaker's, ``async with sess:``
closes the session without ending it, and ``maker.begin()`` commits or rolls back, then
closes. Only ``threadpool_session()`` scopes and the integrations end a session for good.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session

from helpers import checked_out, user_names
from models import User
from sqlalchemy_threadpool import (
    BlockingOnEventLoopError,
    ThreadpoolSession,
    threadpool_sessionmaker,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def pool_of_one(db_url: str, engine: Engine) -> Iterator[Engine]:
    """An engine with one connection (``engine`` created the tables)."""
    one = create_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=10)
    try:
        yield one
    finally:
        one.dispose()


class RecordingSession(Session):
    """A sync session class of the application's own."""


class AppSession(ThreadpoolSession):
    """A facade subclass, as ``class_=`` takes; its ``__init__`` runs for every session."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.made_by_app = True


async def test_a_session_made_directly_commits(engine: Engine, other_engine: Engine) -> None:
    sess = ThreadpoolSession(engine)
    async with sess:
        sess.add(User(name="ada"))
        await sess.commit()
    assert user_names(other_engine) == {"ada"}
    assert checked_out(engine) == 0


async def test_a_session_made_directly_takes_session_arguments(engine: Engine) -> None:
    sess = ThreadpoolSession(bind=engine, autoflush=False, info={"app": 1})
    async with sess:
        assert sess.sync_session.autoflush is False
        assert sess.info == {"app": 1}
        assert sess.sync_session.expire_on_commit is False  # our default, as the maker's
        assert sess.bind is engine
        assert await sess.scalar(text("SELECT 1")) == 1
    assert checked_out(engine) == 0


async def test_a_session_made_directly_is_guarded(engine: Engine) -> None:
    async with ThreadpoolSession(engine) as sess:
        with pytest.raises(BlockingOnEventLoopError):
            sess.sync_session.execute(text("SELECT 1"))  # on the event loop
    assert checked_out(engine) == 0


async def test_sessions_made_directly_queue_for_a_pool_of_one(pool_of_one: Engine) -> None:
    """They share the bind's admission: the second waits on the loop, not in pool checkout."""
    first, second = ThreadpoolSession(pool_of_one), ThreadpoolSession(pool_of_one)
    limiter = first.maker.limiter
    assert second.maker.limiter is limiter
    assert limiter.total_tokens == 1
    order: list[str] = []

    async def use_second() -> None:
        async with second:
            assert await second.scalar(text("SELECT 2")) == 2
            order.append("second")

    with anyio.fail_after(10):
        async with first, anyio.create_task_group() as group:
            assert await first.scalar(text("SELECT 1")) == 1  # holds the one connection
            group.start_soon(use_second)
            for _ in range(1000):  # bounded by fail_after
                if limiter.statistics().tasks_waiting == 1:
                    break
                await anyio.sleep(0.005)
            assert limiter.statistics().tasks_waiting == 1  # waits on the loop, no thread
            assert checked_out(pool_of_one) == 1  # the second holds no connection meanwhile
            order.append("first")
            await first.commit()  # gives the connection and the admission back
    assert order == ["first", "second"]
    assert checked_out(pool_of_one) == 0


async def test_class_makes_instances_of_the_subclass(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine, class_=AppSession)
    async with maker() as sess:
        assert type(sess) is AppSession
        assert sess.made_by_app
        assert sess.maker is maker
        assert await sess.scalar(text("SELECT 1")) == 1
    async with maker.begin() as begun:
        assert type(begun) is AppSession
    assert checked_out(engine) == 0


async def test_sync_session_class_as_async_sessionmakers(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine, sync_session_class=RecordingSession)
    async with maker() as sess:
        assert isinstance(sess.sync_session, RecordingSession)
        assert sess.sync_session_class is RecordingSession
    direct = ThreadpoolSession(engine, sync_session_class=RecordingSession)
    assert isinstance(direct.sync_session, RecordingSession)
    assert direct.sync_session_class is RecordingSession
    assert ThreadpoolSession(engine).sync_session_class is Session

    class Routed(ThreadpoolSession):
        sync_session_class = RecordingSession

    async with threadpool_sessionmaker(engine, class_=Routed)() as routed:
        assert isinstance(routed.sync_session, RecordingSession)
    with pytest.raises(Exception, match="sync_session_class= cannot differ"):
        maker(sync_session_class=Session)


async def test_async_with_closes_and_the_session_can_be_used_again(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    sess = maker()
    async with sess:
        sess.add(User(name="ada"))
        await sess.commit()
        ada = await sess.scalar(select(User).where(User.name == "ada"))
        assert ada is not None
        sess.add(User(name="uncommitted"))
        await sess.flush()
        assert checked_out(engine) == 1
    assert checked_out(engine) == 0  # closed: rolled back, the connection returned
    assert ada not in sess  # detached, with its loaded state
    assert ada.name == "ada"
    assert user_names(other_engine) == {"ada"}
    async with sess:  # usable again: a new transaction
        assert not sess.in_transaction()
        assert await sess.scalar(select(func.count()).select_from(User)) == 1
        assert sess.in_transaction()
    assert checked_out(engine) == 0


async def test_async_with_a_session_made_directly_can_be_used_again(engine: Engine) -> None:
    sess = ThreadpoolSession(engine)
    for expected in (1, 2):
        async with sess:
            assert await sess.scalar(text(f"SELECT {expected}")) == expected
        assert checked_out(engine) == 0


async def test_async_with_closes_even_when_cancelled(engine: Engine) -> None:
    sess = ThreadpoolSession(engine)
    with anyio.CancelScope() as scope:
        async with sess:
            await sess.scalar(text("SELECT 1"))
            scope.cancel()
            await anyio.sleep(1)  # cancelled here; the exit still closes, shielded
    assert scope.cancelled_caught
    assert checked_out(engine) == 0
    assert await sess.scalar(text("SELECT 2")) == 2
    await sess.close()


async def test_maker_begin_commits_rolls_back_and_the_session_is_reusable(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker.begin() as sess:
        assert sess.in_transaction()  # begun, as async_sessionmaker.begin()'s
        transaction = sess.get_transaction()
        assert transaction is not None
        assert transaction.is_active
        with pytest.raises(InvalidRequestError):
            await sess.begin()  # already begun
        sess.add(User(name="ada"))
    assert user_names(other_engine) == {"ada"}
    assert checked_out(engine) == 0
    with pytest.raises(LookupError):
        async with maker.begin() as failing:
            failing.add(User(name="bob"))
            await failing.flush()
            raise LookupError
    assert user_names(other_engine) == {"ada"}
    assert checked_out(engine) == 0
    async with failing:  # closed, not ended: usable again
        assert await failing.scalar(select(func.count()).select_from(User)) == 1
    async with sess.begin():
        sess.add(User(name="cy"))
    assert user_names(other_engine) == {"ada", "cy"}
    await sess.close()
    assert checked_out(engine) == 0


async def test_get_transaction_wraps_the_sync_ones(engine: Engine) -> None:
    async with ThreadpoolSession(engine) as sess:
        assert sess.get_transaction() is None
        assert sess.get_nested_transaction() is None
        await sess.scalar(text("SELECT 1"))
        root = sess.get_transaction()
        assert root is not None
        assert not root.nested
        assert root.sync_transaction is sess.sync_session.get_transaction()
        async with sess.begin_nested():
            nested = sess.get_nested_transaction()
            assert nested is not None
            assert nested.nested
            assert nested.is_active
            assert sess.in_nested_transaction()
        await root.rollback()
        assert not sess.in_transaction()
    assert checked_out(engine) == 0
