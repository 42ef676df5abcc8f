"""``threadpool_scoped_session``: a session per scope key, removed on request, members proxied."""

from __future__ import annotations

import inspect

import anyio
import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import async_scoped_session

from helpers import checked_out
from models import User
from sqlalchemy_threadpool import (
    ConfigurationWarning,
    ThreadpoolSession,
    threadpool_scoped_session,
    threadpool_sessionmaker,
)

pytestmark = pytest.mark.anyio


def _task_id() -> int:
    return anyio.get_current_task().id


def _scoped(engine: Engine) -> threadpool_scoped_session[ThreadpoolSession]:
    return threadpool_scoped_session(threadpool_sessionmaker(engine), scopefunc=_task_id)


async def test_one_session_per_task(engine: Engine) -> None:
    scoped = _scoped(engine)
    seen: dict[str, ThreadpoolSession] = {}

    async def in_task(name: str) -> None:
        seen[name] = scoped()
        assert scoped() is seen[name]  # the same task gets the same session again
        await scoped.remove()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(in_task, "a")
            tg.start_soon(in_task, "b")
    assert seen["a"] is not seen["b"]
    assert isinstance(seen["a"], ThreadpoolSession)
    assert scoped.registry.registry == {}


async def test_remove_closes_and_forgets_the_session(engine: Engine) -> None:
    scoped = _scoped(engine)
    sess = scoped()
    await sess.execute(select(1))
    assert sess.in_transaction()
    assert checked_out(engine) == 1
    await scoped.remove()
    assert not sess.in_transaction()
    assert checked_out(engine) == 0  # closed: the connection went back to the pool
    assert not scoped.registry.has()
    assert scoped() is not sess
    await scoped.remove()
    await scoped.remove()  # nothing to remove: no error


async def test_proxied_members_act_on_the_current_session(engine: Engine) -> None:
    scoped = _scoped(engine)
    user = User(name="ada")
    scoped.add(user)
    assert user in scoped
    assert user in scoped.new
    await scoped.commit()
    count = await scoped.scalar(select(func.count()).select_from(User))
    assert count == 1
    assert (await scoped.execute(text("select 1"))).scalar_one() == 1
    scoped.autoflush = False  # a settable attribute reaches the session
    assert scoped().autoflush is False
    await scoped.remove()
    assert checked_out(engine) == 0
    async with threadpool_sessionmaker(engine)() as other:
        assert await other.scalar(select(User.name)) == "ada"  # committed by the proxy


async def test_arguments_only_for_a_new_session(engine: Engine) -> None:
    scoped = _scoped(engine)
    sess = scoped(autoflush=False)
    assert sess.autoflush is False
    with pytest.raises(InvalidRequestError, match="already present"):
        scoped(autoflush=True)
    with pytest.warns(ConfigurationWarning, match="already present"):
        scoped.configure(autoflush=True)
    await scoped.remove()
    assert scoped().autoflush is True  # the factory was reconfigured
    await scoped.remove()


def test_every_member_of_async_scoped_session_ours_has() -> None:
    """Members of ``async_scoped_session`` that ``ThreadpoolSession`` has are all proxied."""
    ours = {n for n in dir(threadpool_scoped_session) if not n.startswith("_")}
    theirs = {n for n in dir(async_scoped_session) if not n.startswith("_")}
    session = {n for n in dir(ThreadpoolSession) if not n.startswith("_")}
    assert {"remove", "configure"} <= ours
    assert (theirs & (session | {"remove", "configure"})) <= ours
    assert session <= ours
    assert inspect.iscoroutinefunction(vars(threadpool_scoped_session)["execute"])
    assert inspect.iscoroutinefunction(threadpool_scoped_session.remove)
