"""Binding: one session per context, nesting, independence, inheritance by child tasks."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from sqlalchemy import Engine, select

from helpers import checked_out, user_names
from models import User
from sqlalchemy_threadpool import (
    NoSessionError,
    ThreadpoolSession,
    current_session,
    get_default_sessionmaker,
    set_default_sessionmaker,
    threadpool_session,
    threadpool_sessionmaker,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def no_default_maker() -> Iterator[None]:
    previous = get_default_sessionmaker()
    set_default_sessionmaker(None)
    yield
    set_default_sessionmaker(previous)


async def test_current_session_with_nothing_bound_says_how_to_bind() -> None:
    with pytest.raises(NoSessionError, match=r"async with threadpool_session\(maker\)"):
        current_session()


async def test_scope_binds_and_unbinds(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        assert current_session() is sess
    with pytest.raises(NoSessionError):
        current_session()


async def test_nested_scope_reuses_and_leaves_lifecycle_to_the_outermost(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as outer:
        async with threadpool_session() as inner:
            assert inner is outer
            inner.add(User(name="ada"))
        assert user_names(other_engine) == set()  # the inner exit did not commit
        assert current_session() is outer
        await outer.flush()
    assert user_names(other_engine) == {"ada"}


async def test_new_scope_is_independent_and_restores_the_binding(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    with pytest.raises(KeyError):
        async with threadpool_session(maker) as outer:
            outer.add(User(name="outer"))
            if engine.dialect.name != "sqlite":  # SQLite allows one writer at a time
                await outer.flush()
            async with threadpool_session(new=True) as inner:
                assert inner is not outer
                assert current_session() is inner
                inner.add(User(name="inner"))
            assert current_session() is outer
            raise KeyError("roll back the outer one")
    assert user_names(other_engine) == {"inner"}
    assert checked_out(engine) == 0


async def test_a_different_maker_opens_its_own_session(engine: Engine) -> None:
    first = threadpool_sessionmaker(engine)
    second = threadpool_sessionmaker(engine)
    async with threadpool_session(first) as outer:
        async with threadpool_session(second) as inner:
            assert inner is not outer
            assert inner.maker is second
        assert current_session() is outer


async def test_child_tasks_inherit_the_binding(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    seen: list[ThreadpoolSession] = []

    async def child() -> None:
        sess = current_session()
        seen.append(sess)
        await sess.execute(select(User))

    async with threadpool_session(maker) as sess, anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(child)
    assert seen == [sess] * 5


async def test_tasks_outside_the_scope_do_not_see_it(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    ready, done = anyio.Event(), anyio.Event()
    errors: list[BaseException] = []

    async def sibling() -> None:
        await ready.wait()
        try:
            current_session()
        except NoSessionError as exc:
            errors.append(exc)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sibling)
        async with threadpool_session(maker):
            ready.set()
            await done.wait()
    assert len(errors) == 1


async def test_default_sessionmaker(engine: Engine, no_default_maker: None) -> None:
    with pytest.raises(NoSessionError, match="set_default_sessionmaker"):
        async with threadpool_session():
            pass
    maker = threadpool_sessionmaker(engine)
    set_default_sessionmaker(maker)
    assert get_default_sessionmaker() is maker
    async with threadpool_session() as sess:
        assert sess.maker is maker


def test_threadpool_session_refuses_a_wrong_maker() -> None:
    with pytest.raises(TypeError, match="threadpool_sessionmaker"):
        threadpool_session(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="threadpool_sessionmaker"):
        set_default_sessionmaker(object())  # type: ignore[arg-type]
