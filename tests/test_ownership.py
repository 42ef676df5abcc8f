"""Session ownership: child tasks that inherit a binding take turns, or are refused (strict).

A bound session remembers its owner task. Without ``strict`` (the default) child tasks that
inherited the binding and use it concurrently are serialised; with ``strict=True`` on the maker
such use from a task other than the owner raises :class:`SessionOwnershipError`. A child that
needs its own transaction opens ``threadpool_session(new=True)``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from helpers import Overlap, assert_clean, user_names
from models import User
from sqlalchemy_threadpool import (
    SessionOwnershipError,
    ThreadpoolSession,
    current_session,
    threadpool_session,
    threadpool_sessionmaker,
)

#: Ownership is decided on the event loop, before any database work: one database is enough.
pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


async def test_strict_refuses_use_from_a_child_task(engine: Engine, other_engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine, strict=True)
    refused: list[SessionOwnershipError] = []

    async def child() -> None:
        with pytest.raises(SessionOwnershipError) as caught:
            await current_session().execute(text("SELECT 1"))
        refused.append(caught.value)

    async with threadpool_session(maker) as sess:
        sess.add(User(name="owner"))
        async with anyio.create_task_group() as group:
            group.start_soon(child)
        await sess.flush()  # the owner still works
    assert len(refused) == 1
    assert "strict=True" in str(refused[0])
    assert "threadpool_session(new=True)" in str(refused[0])
    assert user_names(other_engine) == {"owner"}
    assert_clean(engine, other_engine)


async def test_strict_refuses_a_session_handed_to_another_task(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine, strict=True)
    async with maker() as sess:
        await sess.execute(text("SELECT 1"))
        scalar: object = sess.scalar  # mypy cannot pass SQLAlchemy 2.1's overloads through
        async with anyio.create_task_group() as group:
            group.start_soon(_expect_refusal, scalar, text("SELECT 2"))
            group.start_soon(_expect_refusal, sess.commit)
        assert await sess.scalar(text("SELECT 3")) == 3
    assert_clean(engine, other_engine)


async def _expect_refusal(method: object, *args: object) -> None:
    with pytest.raises(SessionOwnershipError):
        await method(*args)  # type: ignore[operator]


async def test_strict_child_opens_its_own_session_with_new(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine, strict=True)
    children: list[object] = []

    async def child() -> None:
        async with threadpool_session(new=True) as own:  # the maker comes from the binding
            children.append(own)
            own.add(User(name="child"))
            await own.flush()

    async with threadpool_session(maker) as sess:
        sess.add(User(name="parent"))
        async with anyio.create_task_group() as group:
            group.start_soon(child)
        assert len(children) == 1
        assert children[0] is not sess
        assert user_names(other_engine) == {"child"}  # its own transaction, committed already
        assert current_session() is sess
    assert user_names(other_engine) == {"parent", "child"}
    assert_clean(engine, other_engine)


async def test_without_strict_concurrent_children_take_turns(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    overlap = Overlap()

    def work(session: Session, name: str) -> None:
        with overlap.inside():
            session.add(User(name=name))
            session.flush()
            time.sleep(0.01)  # long enough for another call to overlap, if one could

    async def child(i: int) -> None:
        await current_session().run(work, f"c{i}")

    async with threadpool_session(maker), anyio.create_task_group() as group:
        for i in range(5):
            group.start_soon(child, i)
    assert overlap.calls == 5
    assert overlap.peak == 1
    assert user_names(other_engine) == {f"c{i}" for i in range(5)}
    assert_clean(engine, other_engine)


async def test_waiting_tasks_take_turns_in_arrival_order(
    engine: Engine, other_engine: Engine
) -> None:
    """Tasks that find the session busy run in the order they came, and the holder calling
    again at once (before any waiter ran) queues behind them instead of overtaking."""
    maker = threadpool_sessionmaker(engine)
    go = threading.Event()
    order: list[str] = []

    def record(session: Session, name: str) -> None:
        if name == "first":
            assert go.wait(10)
        order.append(name)

    async def holder(sess: ThreadpoolSession) -> None:
        await sess.run(record, "first")
        await sess.run(record, "again")  # no checkpoint in between: the waiters came first

    async with threadpool_session(maker) as sess:
        await sess.execute(text("SELECT 1"))
        async with anyio.create_task_group() as group:
            group.start_soon(holder, sess)
            await anyio.wait_all_tasks_blocked()
            for name in ("second", "third", "fourth"):
                group.start_soon(sess.run, record, name)
                await anyio.wait_all_tasks_blocked()
            go.set()
        assert await sess.scalar(text("SELECT 2")) == 2
    assert order == ["first", "second", "third", "fourth", "again"]
    assert_clean(engine, other_engine)


async def test_a_call_cancelled_before_it_has_the_session_never_runs(
    engine: Engine, other_engine: Engine
) -> None:
    """Cancelled before its turn, whether the session was free or busy: the callable never
    runs, the other waiters keep their turns, the session stays usable."""
    maker = threadpool_sessionmaker(engine)
    go = threading.Event()
    order: list[str] = []

    def record(session: Session, name: str) -> None:
        if name == "first":
            assert go.wait(10)
        order.append(name)

    async with threadpool_session(maker) as sess:
        await sess.execute(text("SELECT 1"))
        with anyio.CancelScope() as free:  # free session, task already cancelled
            free.cancel()
            await sess.run(record, "cancelled while free")
        assert free.cancelled_caught
        async with anyio.create_task_group() as group:
            group.start_soon(sess.run, record, "first")
            await anyio.wait_all_tasks_blocked()
            queued = anyio.CancelScope()
            group.start_soon(_run_in, queued, sess, record, "cancelled while queued")
            await anyio.wait_all_tasks_blocked()
            group.start_soon(sess.run, record, "third")
            await anyio.wait_all_tasks_blocked()
            queued.cancel()
            await anyio.wait_all_tasks_blocked()
            go.set()
        assert await sess.scalar(text("SELECT 2")) == 2
    assert order == ["first", "third"]
    assert_clean(engine, other_engine)


async def _run_in(scope: anyio.CancelScope, sess: ThreadpoolSession, *args: Any) -> None:
    with scope:
        await sess.run(*args)


async def test_strict_scope_end_is_never_refused(engine: Engine, other_engine: Engine) -> None:
    """A strict session ended by another task (a shutdown, a framework) still cleans up."""
    maker = threadpool_sessionmaker(engine, strict=True)
    sess = maker()
    sess.add(User(name="ada"))
    await sess.flush()

    async def closer() -> None:
        await sess._end(commit=False, reason="closed by another task")

    async with anyio.create_task_group() as group:
        group.start_soon(closer)
    assert user_names(other_engine) == set()
    assert_clean(engine, other_engine)
