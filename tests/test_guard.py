"""The implicit-IO guard: SQL of our sessions never runs on the event-loop thread unnoticed.

Every "raises" test also proves that nothing reached the database: it counts the statements
(``before_cursor_execute``), COMMITs and pool checkouts of the engine around the offending line.
Every "does not fire" test also checks, on the same session, that the guard is armed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import anyio
import pytest
import sniffio
import trio
from sqlalchemy import Engine, delete, event, func, insert, select, text, update
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import (
    Session,
    joinedload,
    raiseload,
    selectinload,
    sessionmaker,
    subqueryload,
    undefer,
)
from sqlalchemy.sql import Executable

from helpers import user_names
from models import Post, User
from sqlalchemy_threadpool import (
    BlockingOnEventLoopError,
    BlockingOnEventLoopWarning,
    LazyLoadOnEventLoopError,
    ThreadpoolSession,
    ThreadpoolSessionError,
    allow_blocking,
    threadpool_sessionmaker,
)

pytestmark = pytest.mark.anyio

T = TypeVar("T")


class DatabaseIO:
    """What reached the database through an engine, and from which thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements: list[int] = []
        self.commits: list[int] = []
        self.checkouts: list[int] = []
        self._listeners: list[tuple[str, Callable[..., None]]] = [
            ("before_cursor_execute", lambda *args: self.statements.append(_thread())),
            ("commit", lambda *args: self.commits.append(_thread())),
            ("checkout", lambda *args: self.checkouts.append(_thread())),
        ]
        for name, listener in self._listeners:
            event.listen(engine, name, listener)

    def remove(self) -> None:
        for name, listener in self._listeners:
            event.remove(self.engine, name, listener)

    def counts(self) -> tuple[int, int, int]:
        return len(self.statements), len(self.commits), len(self.checkouts)

    def on_thread(self, thread: int) -> int:
        """How many statements, COMMITs and checkouts happened on ``thread``."""
        return sum(
            events.count(thread) for events in (self.statements, self.commits, self.checkouts)
        )


def _thread() -> int:
    return threading.get_ident()


@pytest.fixture
def user_id(engine: Engine) -> int:
    """A committed user with a deferred ``bio`` and two posts (seeded outside any event loop)."""
    with Session(engine) as session:
        user = User(name="ada", bio="analyst", posts=[Post(title="one"), Post(title="two")])
        session.add(user)
        session.commit()
        return user.id


@pytest.fixture
def io(engine: Engine, user_id: int) -> Iterator[DatabaseIO]:
    """Records the engine's IO from after the seeding on.

    A maker is made first, so the guard's engine listeners come before the recorder's: a
    statement the guard stops in ``before_cursor_execute`` is not counted as sent.
    """
    threadpool_sessionmaker(engine)
    recorder = DatabaseIO(engine)
    yield recorder
    recorder.remove()


async def _loaded_user(sess: ThreadpoolSession, user_id: int) -> User:
    """The user, loaded in a worker, with the session holding no connection afterwards."""
    user = await sess.get_one(User, user_id)
    await sess.commit()  # expire_on_commit=False: stays loaded; the connection goes back
    return user


def _message(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    return str(excinfo.value)


def _every_kind_of_io(session: Session, user_id: int) -> None:
    """Lazy, deferred and expired loads, ORM and Core statements, a flush and a commit."""
    user = session.get_one(User, user_id)
    assert {"one", "two"} <= {post.title for post in user.posts}
    assert user.bio == "analyst"
    session.expire(user)
    assert user.name == "ada"
    assert session.execute(text("SELECT 1")).scalar() == 1
    session.add(Post(title="more", author_id=user_id))
    session.flush()
    session.commit()


async def _to_thread(anyio_backend: str, runner: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a worker thread of anyio, or of the backend's own ``to_thread``."""
    if runner == "anyio":
        return await anyio.to_thread.run_sync(fn)
    if anyio_backend == "trio":
        return await trio.to_thread.run_sync(fn)
    return await asyncio.to_thread(fn)


def _run_loop(library: str, fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` on a new event loop of ``library`` in the calling thread, until it ends."""
    if library == "trio":
        return trio.run(fn)

    async def main() -> T:
        return await fn()

    return asyncio.run(main())


# -- the error classes ---------------------------------------------------------------------


def test_error_classes() -> None:
    assert issubclass(LazyLoadOnEventLoopError, BlockingOnEventLoopError)
    for base in (ThreadpoolSessionError, InvalidRequestError):
        assert issubclass(BlockingOnEventLoopError, base)
        assert issubclass(LazyLoadOnEventLoopError, base)
    assert issubclass(BlockingOnEventLoopWarning, UserWarning)


# -- "raise": attribute loads --------------------------------------------------------------


async def test_lazy_relationship_on_the_loop_raises_before_any_sql(
    engine: Engine, io: DatabaseIO, user_id: int
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        before = io.counts()
        with pytest.raises(LazyLoadOnEventLoopError) as caught:
            _ = user.posts
        assert io.counts() == before
        message = _message(caught)
        assert "User.posts" in message
        assert "selectinload(User.posts)" in message
        assert "await sess.load(obj, 'posts')" in message
        assert 'lazy="raise"' in message

        posts = await sess.load(user, "posts")
        assert sorted(post.title for post in posts) == ["one", "two"]
        loaded = io.counts()
        assert user.posts is posts  # now loaded: a plain read, no IO
        assert io.counts() == loaded


async def test_deferred_column_on_the_loop_raises_before_any_sql(
    engine: Engine, io: DatabaseIO, user_id: int
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        before = io.counts()
        with pytest.raises(LazyLoadOnEventLoopError) as caught:
            _ = user.bio
        assert io.counts() == before
        message = _message(caught)
        assert "deferred column User.bio" in message
        assert "undefer(User.bio)" in message
        assert "await sess.load(obj, 'bio')" in message

        assert await sess.load(user, "bio") == "analyst"
        loaded = io.counts()
        assert user.bio == "analyst"
        assert io.counts() == loaded


async def test_many_to_one_lazy_load_on_the_loop_names_its_attribute(
    engine: Engine, io: DatabaseIO, user_id: int
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        post = await sess.scalar(select(Post).where(Post.title == "one"))  # the author is not
        assert post is not None  # in the identity map: reading it would send a SELECT
        await sess.commit()
        before = io.counts()
        with pytest.raises(LazyLoadOnEventLoopError) as caught:
            _ = post.author
        assert io.counts() == before
        assert "Lazy load of Post.author" in _message(caught)
        assert "selectinload(Post.author)" in _message(caught)

        author = await sess.load(post, "author")
        assert author.name == "ada"
        assert post.author is author


@pytest.mark.parametrize("expire_on_commit", [True, False], ids=["expire", "default"])
async def test_attribute_read_after_commit(
    engine: Engine, io: DatabaseIO, user_id: int, expire_on_commit: bool
) -> None:
    maker = (
        threadpool_sessionmaker(engine, expire_on_commit=True)
        if expire_on_commit
        else threadpool_sessionmaker(engine)  # the default
    )
    async with maker() as sess:
        user = await sess.get_one(User, user_id)
        await sess.commit()
        before = io.counts()
        if not expire_on_commit:
            assert user.name == "ada"  # the default keeps it loaded: no IO at all
            assert io.counts() == before
            return
        with pytest.raises(LazyLoadOnEventLoopError) as caught:
            _ = user.name
        assert io.counts() == before
        message = _message(caught)
        assert "expired attributes User.id, User.name" in message
        assert "expire_on_commit=False" in message
        assert "await sess.refresh(obj)" in message

        assert await sess.load(user, "name") == "ada"  # one awaitable refresh, in a worker
        loaded = io.counts()
        assert user.id == user_id
        assert io.counts() == loaded


async def test_load_refuses_an_object_of_another_session(engine: Engine, user_id: int) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess, maker() as other:
        user = await _loaded_user(other, user_id)
        with pytest.raises(InvalidRequestError, match="belongs to another session"):
            await sess.load(user, "posts")
        assert len(await other.load(user, "posts")) == 2


async def test_eager_and_lazy_loads_inside_run_never_raise(
    engine: Engine, io: DatabaseIO, user_id: int
) -> None:
    maker = threadpool_sessionmaker(engine)
    loop = _thread()

    queries = {
        "selectinload": select(User).options(selectinload(User.posts)),
        "subqueryload": select(User).options(subqueryload(User.posts)),
        "lazy": select(User),
    }

    def titles(session: Session) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for name, query in queries.items():
            session.expunge_all()
            for user in session.scalars(query):
                found[name] = sorted(post.title for post in user.posts)
                assert user.bio == "analyst"  # a deferred load, in the worker
        return found

    async with maker() as sess:
        found = await sess.run(titles)
        assert found == {name: ["one", "two"] for name in queries}
        assert io.statements
        assert io.on_thread(loop) == 0

        user = await sess.get_one(User, user_id)
        sess.expire(user, ["posts"])
        with pytest.raises(LazyLoadOnEventLoopError):  # the same access on the loop
            _ = user.posts


EAGER_FIXES = {
    "selectinload": select(User).options(selectinload(User.posts), undefer(User.bio)),
    "joinedload": select(User).options(joinedload(User.posts), undefer(User.bio)),
    "subqueryload": select(User).options(subqueryload(User.posts), undefer(User.bio)),
}


@pytest.mark.parametrize("fix", list(EAGER_FIXES))
async def test_eager_loading_in_the_query_leaves_no_io_for_the_loop(
    engine: Engine, io: DatabaseIO, user_id: int, fix: str
) -> None:
    """The fix the messages name first: eager-load in the awaited query, then read freely."""
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        user = (await sess.scalars(EAGER_FIXES[fix])).unique().one()
        await sess.commit()
        before = io.counts()
        assert sorted(post.title for post in user.posts) == ["one", "two"]
        assert user.bio == "analyst"
        assert io.counts() == before


async def test_raiseload_finds_the_access_without_io(
    engine: Engine, io: DatabaseIO, user_id: int
) -> None:
    """``lazy="raise"`` (here its per-query form): SQLAlchemy's own error, on any thread."""
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        user = (await sess.scalars(select(User).options(raiseload(User.posts)))).one()
        before = io.counts()
        with pytest.raises(InvalidRequestError, match="lazy='raise'") as caught:
            _ = user.posts
        assert not isinstance(caught.value, BlockingOnEventLoopError)
        assert io.counts() == before
        with pytest.raises(InvalidRequestError, match="lazy='raise'"):
            await sess.load(user, "posts")  # in a worker too: it is the mapping's choice


# -- "raise": flushes, statements, commits -------------------------------------------------


async def test_autoflush_inside_run_is_fine_but_not_on_the_loop(
    engine: Engine, io: DatabaseIO, user_id: int
) -> None:
    maker = threadpool_sessionmaker(engine)
    loop = _thread()
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        before = io.counts()
        user.name = "grace"  # a plain attribute set: no IO
        assert user in sess.dirty
        assert io.counts() == before

        with pytest.raises(BlockingOnEventLoopError):  # a query would autoflush on the loop
            sess.sync_session.scalars(select(User).where(User.name == "grace")).one()
        assert io.counts() == before
        assert user in sess.dirty

        found = await sess.run(lambda s: s.scalars(select(User).where(User.name == "grace")).one())
        assert found is user
        assert not sess.dirty
        assert io.on_thread(loop) == 0


async def test_sync_session_execute_on_the_loop_raises_before_any_sql(
    engine: Engine, io: DatabaseIO, user_id: int
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        before = io.counts()
        with pytest.raises(BlockingOnEventLoopError) as caught:
            sess.sync_session.execute(select(User.name))
        assert type(caught.value) is BlockingOnEventLoopError
        assert io.counts() == before
        message = _message(caught)
        assert "Session.execute() of 'SELECT" in message
        assert "await sess.execute(...)" in message
        assert "allow_blocking()" in message

        with pytest.raises(BlockingOnEventLoopError):
            sess.sync_session.get(User, user_id)
        assert io.counts() == before

        assert (await sess.execute(select(User.name))).scalars().all() == ["ada"]


CORE_STATEMENTS: dict[str, tuple[Callable[[int], Executable], str]] = {
    "text": (lambda uid: text("SELECT name FROM satp_user"), "'SELECT name FROM satp_user'"),
    "insert": (lambda uid: insert(User).values(name="grace"), "'INSERT INTO satp_user"),
    "update": (
        lambda uid: update(User).where(User.id == uid).values(name="grace"),
        "'UPDATE satp_user SET name=",
    ),
    "delete": (lambda uid: delete(Post).where(Post.author_id == uid), "'DELETE FROM satp_post"),
}


@pytest.mark.parametrize("kind", list(CORE_STATEMENTS))
@pytest.mark.parametrize("holding", [False, True], ids=["fresh", "holding_connection"])
async def test_core_statement_through_the_sync_session_raises_before_any_sql(
    engine: Engine, other_engine: Engine, io: DatabaseIO, user_id: int, kind: str, holding: bool
) -> None:
    maker = threadpool_sessionmaker(engine)
    make_statement, shown = CORE_STATEMENTS[kind]
    async with maker() as sess:
        if holding:
            await sess.execute(select(User.id))
        before = io.counts()
        with pytest.raises(BlockingOnEventLoopError) as caught:
            sess.sync_session.execute(make_statement(user_id))
        assert type(caught.value) is BlockingOnEventLoopError  # not an attribute load
        assert io.counts() == before
        assert f"Session.execute() of {shown}" in _message(caught)
        assert "await sess.execute(...)" in _message(caught)

        await sess.execute(make_statement(user_id))  # the session is usable, in a worker
        await sess.rollback()
    assert user_names(other_engine) == {"ada"}


async def test_sync_refresh_on_the_loop_raises_before_any_sql(
    engine: Engine, io: DatabaseIO, user_id: int
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        before = io.counts()
        with pytest.raises(BlockingOnEventLoopError) as caught:
            sess.sync_session.refresh(user)
        assert io.counts() == before
        assert "Session.refresh() of a User" in _message(caught)
        await sess.refresh(user)


@pytest.mark.parametrize("holding", [False, True], ids=["fresh", "holding_connection"])
async def test_sync_flush_on_the_loop_raises_before_any_sql(
    engine: Engine, other_engine: Engine, io: DatabaseIO, user_id: int, holding: bool
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        if holding:
            await sess.get_one(User, user_id)
        sess.add(User(name="grace"))
        before = io.counts()
        with pytest.raises(BlockingOnEventLoopError) as caught:
            sess.sync_session.flush()
        assert io.counts() == before
        assert "Session.flush()" in _message(caught)
        assert "await sess.flush()" in _message(caught)

        await sess.flush()  # the session is still usable
        await sess.commit()
    assert user_names(other_engine) == {"ada", "grace"}


@pytest.mark.parametrize("pending", [False, True], ids=["clean", "pending"])
async def test_sync_commit_on_the_loop_raises_before_any_sql(
    engine: Engine, other_engine: Engine, io: DatabaseIO, user_id: int, pending: bool
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        user = await sess.get_one(User, user_id)  # the session now holds a connection
        user.name = "grace"
        await sess.flush()
        if pending:
            sess.add(User(name="linus"))
        before = io.counts()
        with pytest.raises(BlockingOnEventLoopError) as caught:
            sess.sync_session.commit()
        assert io.counts() == before
        assert "Session.commit()" in _message(caught)
        assert "await sess.commit()" in _message(caught)

        await sess.commit()  # the transaction is intact and commits
    expected = {"grace", "linus"} if pending else {"grace"}
    assert user_names(other_engine) == expected


async def test_connection_of_the_session_on_the_loop_raises(
    engine: Engine, io: DatabaseIO, user_id: int
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        conn = await sess.connection()
        before = io.counts()
        with pytest.raises(BlockingOnEventLoopError) as caught:
            conn.execute(text("SELECT 1"))
        assert io.counts() == before
        assert "'SELECT 1', on a connection of a threadpool session" in _message(caught)
        assert await sess.run(lambda s: s.connection().execute(text("SELECT 1")).scalar()) == 1

    async with maker() as sess:
        before = io.counts()
        with pytest.raises(BlockingOnEventLoopError, match="Checking out a database connection"):
            sess.sync_session.connection()
        statements, commits, _ = io.counts()  # checked out (no earlier hook), but no SQL
        assert (statements, commits) == before[:2]


# -- "warn" and "off" ------------------------------------------------------------------------


async def _lazy(sess: ThreadpoolSession, user: User) -> None:
    assert sorted(post.title for post in user.posts) == ["one", "two"]


async def _deferred(sess: ThreadpoolSession, user: User) -> None:
    assert user.bio == "analyst"


async def _expired(sess: ThreadpoolSession, user: User) -> None:
    sess.expire(user)
    assert user.name == "ada"


async def _execute(sess: ThreadpoolSession, user: User) -> None:
    assert sess.sync_session.execute(select(User.name)).scalars().all() == ["ada"]


async def _flush(sess: ThreadpoolSession, user: User) -> None:
    sess.add(User(name="grace"))
    sess.sync_session.flush()
    assert await sess.scalar(select(func.count()).select_from(User)) == 2


async def _flush_holding(sess: ThreadpoolSession, user: User) -> None:
    await sess.scalar(select(func.count()).select_from(User))
    await _flush(sess, user)


async def _commit(sess: ThreadpoolSession, user: User) -> None:
    await sess.execute(select(User.id))  # the session holds a connection
    user.name = "grace"
    sess.add(User(name="linus"))
    sess.sync_session.commit()
    with Session(sess.bind) as other:  # a plain session: committed for everyone
        assert set(other.scalars(select(User.name))) == {"grace", "linus"}


async def _core(sess: ThreadpoolSession, user: User) -> None:
    sess.sync_session.execute(text("UPDATE satp_user SET name = 'grace'"))
    assert await sess.scalar(select(User.name)) == "grace"


async def _connection(sess: ThreadpoolSession, user: User) -> None:
    conn = await sess.connection()
    assert conn.execute(text("SELECT 1")).scalar() == 1


OCCURRENCES = {
    "lazy": _lazy,
    "deferred": _deferred,
    "expired": _expired,
    "execute": _execute,
    "core": _core,
    "connection": _connection,
    "flush": _flush,
    "flush_holding": _flush_holding,
    "commit": _commit,
}


@pytest.mark.parametrize("occurrence", list(OCCURRENCES))
async def test_warn_mode_warns_once_per_occurrence_and_does_the_io(
    engine: Engine, io: DatabaseIO, user_id: int, occurrence: str
) -> None:
    maker = threadpool_sessionmaker(engine, guard="warn")
    loop = _thread()
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        assert io.on_thread(loop) == 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await OCCURRENCES[occurrence](sess, user)
        assert io.on_thread(loop) > 0  # the IO happened, on the loop
        assert [w.category for w in caught] == [BlockingOnEventLoopWarning]
        assert caught[0].filename == __file__  # stacklevel: the line in this module


async def test_warn_mode_warns_again_for_each_new_occurrence(engine: Engine, user_id: int) -> None:
    maker = threadpool_sessionmaker(engine, guard="warn")
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert len(user.posts) == 2
            sess.expire(user, ["posts"])
            assert len(user.posts) == 2
            sess.add(User(name="grace"))
            sess.sync_session.flush()
            sess.add(User(name="linus"))
            sess.sync_session.flush()
        assert [w.category for w in caught] == [BlockingOnEventLoopWarning] * 4
        messages = [str(w.message) for w in caught]
        assert all(m.startswith("Lazy load of User.posts") for m in messages[:2])
        assert all(m.startswith("Session.flush()") for m in messages[2:])


async def test_off_mode_is_silent(engine: Engine, io: DatabaseIO, user_id: int) -> None:
    maker = threadpool_sessionmaker(engine, guard="off")
    loop = _thread()
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for occurrence in OCCURRENCES.values():
                await occurrence(sess, user)
                await sess.rollback()
                sess.expunge_all()
                user = await _loaded_user(sess, user_id)
        assert caught == []
        assert io.on_thread(loop) > 0


# -- allow_blocking() --------------------------------------------------------------------------


async def test_allow_blocking_permits_io_in_its_scope_only(
    engine: Engine, io: DatabaseIO, user_id: int
) -> None:
    maker = threadpool_sessionmaker(engine)
    loop = _thread()
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        with allow_blocking():
            assert len(user.posts) == 2
            assert user.bio == "analyst"
        assert io.on_thread(loop) > 0

        sess.expire(user)
        with pytest.raises(LazyLoadOnEventLoopError):
            _ = user.name

        async with allow_blocking():
            assert user.name == "ada"
            sess.add(User(name="grace"))
            sess.sync_session.commit()

        sess.add(User(name="linus"))
        with pytest.raises(BlockingOnEventLoopError):
            sess.sync_session.flush()

        scope = allow_blocking()  # one instance, entered twice: still scoped correctly
        with scope:
            with scope:
                sess.sync_session.flush()
            sess.expire(user)
            assert user.name == "ada"
        sess.expire(user)
        with pytest.raises(LazyLoadOnEventLoopError):
            _ = user.name


async def test_allow_blocking_scopes_nest(engine: Engine, user_id: int) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        async with allow_blocking():
            with allow_blocking():
                assert len(user.posts) == 2
            assert user.bio == "analyst"  # the outer scope still allows it
            sess.expire(user)
        with pytest.raises(LazyLoadOnEventLoopError):
            _ = user.name


async def test_one_allow_blocking_instance_shared_by_concurrent_tasks(
    engine: Engine, user_id: int
) -> None:
    """A module-level ``allow_blocking()`` entered by two tasks whose scopes interleave."""
    maker = threadpool_sessionmaker(engine)
    shared = allow_blocking()
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        first_in, second_in, first_out = anyio.Event(), anyio.Event(), anyio.Event()
        outcome: dict[str, object] = {}

        async def first() -> None:
            async with shared:
                first_in.set()
                await second_in.wait()
            first_out.set()  # left its scope while the second task is still inside its own
            try:
                _ = user.bio
            except LazyLoadOnEventLoopError as exc:
                outcome["first after"] = exc

        async def second() -> None:
            await first_in.wait()
            async with shared:
                second_in.set()
                await first_out.wait()
                outcome["second inside"] = len(user.posts)

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            tg.start_soon(second)
        assert outcome["second inside"] == 2
        assert isinstance(outcome["first after"], LazyLoadOnEventLoopError)


async def test_allow_blocking_is_per_task(engine: Engine, user_id: int) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        inside = anyio.Event()
        done = anyio.Event()
        outcome: dict[str, object] = {}

        async def permitted() -> None:
            async with allow_blocking():
                inside.set()
                await done.wait()  # the other task runs while this scope is open
                outcome["permitted"] = len(user.posts)

        async def other() -> None:
            await inside.wait()
            try:
                _ = user.bio
            except LazyLoadOnEventLoopError as exc:
                outcome["other"] = exc
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(permitted)
            tg.start_soon(other)
        assert outcome["permitted"] == 2
        assert isinstance(outcome["other"], LazyLoadOnEventLoopError)


# -- where the guard must not fire ---------------------------------------------------------------


async def test_plain_sessions_of_the_application_are_not_guarded(
    engine: Engine, other_engine: Engine, user_id: int
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        ours = await sess.get_one(User, user_id)  # our listeners are on `engine` now
        for bind in (other_engine, engine):  # a separate engine, and the very same one
            with Session(bind) as plain:
                user = plain.get_one(User, user_id)
                assert len(user.posts) == 2
                assert user.bio == "analyst"
                user.name = "grace"
                plain.flush()
                plain.rollback()
            with bind.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
        with pytest.raises(LazyLoadOnEventLoopError):  # while our own session is guarded
            _ = ours.posts


@pytest.mark.parametrize("runner", ["anyio", "native"])
async def test_a_plain_sessionmaker_on_the_same_engine_in_a_worker_is_not_guarded(
    engine: Engine, io: DatabaseIO, user_id: int, anyio_backend: str, runner: str
) -> None:
    maker = threadpool_sessionmaker(engine)
    plain = sessionmaker(engine)
    async with maker() as sess:
        ours = await sess.get_one(User, user_id)  # holds a connection of the same engine

        def in_worker() -> int:
            with plain() as session:
                _every_kind_of_io(session, user_id)
            return _thread()

        worker = await _to_thread(anyio_backend, runner, in_worker)
        assert worker != _thread()
        assert io.on_thread(worker) > 0
        with pytest.raises(LazyLoadOnEventLoopError):  # while our own session is guarded
            _ = ours.posts


def test_sync_code_without_a_running_loop_is_not_guarded(
    engine: Engine, io: DatabaseIO, user_id: int
) -> None:
    """Our own sessions in plain sync code (a script, a REPL, a notebook cell with no await)."""
    maker = threadpool_sessionmaker(engine)
    here = _thread()
    with maker.sync_maker() as session:
        _every_kind_of_io(session, user_id)
    assert io.on_thread(here) > 0

    async def on_a_loop() -> None:
        with maker.sync_maker() as session, pytest.raises(BlockingOnEventLoopError):
            _every_kind_of_io(session, user_id)

    for library in ("asyncio", "trio"):  # the same code on a loop in this thread: guarded
        before = io.counts()
        _run_loop(library, on_a_loop)
        assert io.counts() == before
        with maker.sync_maker() as session:  # and, the loop gone, plain again
            _every_kind_of_io(session, user_id)


def _in_a_new_thread(fn: Callable[[], int]) -> Callable[[], int]:
    """``fn`` run in a plain ``threading.Thread`` (no context copied), joined."""

    def run() -> int:
        outcome: list[int] = []
        thread = threading.Thread(target=lambda: outcome.append(fn()))
        thread.start()
        thread.join()
        return outcome[0]

    return run


def _with_a_loop_set_but_not_running(fn: Callable[[], int]) -> Callable[[], int]:
    """``fn`` in a thread that has an event loop set and a sniffio marker, but runs no loop."""

    def run() -> int:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        sniffio.thread_local.name = "asyncio"
        try:
            return fn()
        finally:
            sniffio.thread_local.name = None
            asyncio.set_event_loop(None)
            loop.close()

    return run


def _after_a_loop_ended(library: str) -> Callable[[Callable[[], int]], Callable[[], int]]:
    def wrap(fn: Callable[[], int]) -> Callable[[], int]:
        def run() -> int:
            _run_loop(library, _noop)  # this thread ran a loop, which has ended
            return fn()

        return run

    return wrap


async def _noop() -> None:
    pass


LOOPLESS_THREADS: dict[str, Callable[[Callable[[], int]], Callable[[], int]]] = {
    "thread": _in_a_new_thread,
    "loop_set_not_running": _with_a_loop_set_but_not_running,
    "after_asyncio_run": _after_a_loop_ended("asyncio"),
    "after_trio_run": _after_a_loop_ended("trio"),
}


@pytest.mark.parametrize("thread", list(LOOPLESS_THREADS))
async def test_threads_without_a_running_loop_are_not_guarded(
    engine: Engine, io: DatabaseIO, user_id: int, thread: str
) -> None:
    """Django's false positives: a thread counts only while it runs a loop."""
    maker = threadpool_sessionmaker(engine)

    def in_thread() -> int:
        with maker.sync_maker() as session:
            _every_kind_of_io(session, user_id)
        return _thread()

    worker = await anyio.to_thread.run_sync(LOOPLESS_THREADS[thread](in_thread))
    assert worker != _thread()
    assert io.on_thread(worker) > 0
    with maker.sync_maker() as session, pytest.raises(BlockingOnEventLoopError):
        _every_kind_of_io(session, user_id)  # the same code on this loop: guarded


@pytest.mark.parametrize("library", ["asyncio", "trio"])
async def test_a_thread_running_its_own_loop_is_guarded(
    engine: Engine, io: DatabaseIO, user_id: int, library: str
) -> None:
    """A second event loop in another thread would be blocked just the same: it counts."""
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)

        async def on_the_other_loop() -> None:
            before = io.counts()
            with pytest.raises(LazyLoadOnEventLoopError, match=r"User\.posts"):
                _ = user.posts
            with pytest.raises(BlockingOnEventLoopError, match="SELECT 1"):
                sess.sync_session.execute(text("SELECT 1"))
            assert io.counts() == before
            with allow_blocking():  # the escape hatch works there too
                assert user.bio == "analyst"

        def in_thread() -> int:
            _run_loop(library, on_the_other_loop)
            assert len(user.posts) == 2  # that loop has ended: this thread is plain again
            return _thread()

        worker = await anyio.to_thread.run_sync(in_thread)
        assert worker != _thread()
        assert io.on_thread(worker) > 0  # bio inside allow_blocking(), posts after the loop
        await sess.commit()


async def test_a_connection_bound_to_the_maker_is_ours_only_while_the_session_holds_it(
    engine: Engine, user_id: int
) -> None:
    with engine.connect() as conn:  # the application's connection, used on the loop
        maker = threadpool_sessionmaker(conn)
        async with maker() as sess:
            await sess.get_one(User, user_id)
            with pytest.raises(BlockingOnEventLoopError):
                conn.execute(text("SELECT 1"))
        assert conn.execute(select(User.name)).scalars().all() == ["ada"]
        conn.rollback()


@pytest.mark.parametrize("runner", ["anyio", "native"])
async def test_worker_threads_are_not_guarded(
    engine: Engine, anyio_backend: str, user_id: int, runner: str
) -> None:
    """Not even with the loop's async library marked in the context they inherit."""
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        with pytest.raises(LazyLoadOnEventLoopError):
            _ = user.posts

        def in_worker() -> tuple[int, str | None, int]:
            return len(user.posts), user.bio, _thread()

        # anyio and trio clear this in their workers; asyncio.to_thread copies it, so there
        # sniffio says "asyncio" in the worker: the guard must decide by thread, not by context.
        token = sniffio.current_async_library_cvar.set(anyio_backend)
        try:
            if runner == "anyio":
                result = await anyio.to_thread.run_sync(in_worker)
            elif anyio_backend == "trio":
                result = await trio.to_thread.run_sync(in_worker)
            else:
                result = await asyncio.to_thread(in_worker)
        finally:
            sniffio.current_async_library_cvar.reset(token)
        assert result[:2] == (2, "analyst")
        assert result[2] != _thread()
        await sess.commit()


async def test_stack_level_points_at_the_callers_line(engine: Engine, user_id: int) -> None:
    maker = threadpool_sessionmaker(engine, guard="warn")
    async with maker() as sess:
        user = await _loaded_user(sess, user_id)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = sys._getframe().f_lineno + 1
            _ = user.posts
        assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]


# -- how it is built -------------------------------------------------------------------------

_SNAPSHOT_SCRIPT = """
import asyncio, contextvars, inspect, json, sys, threading, warnings
import sqlalchemy, sqlalchemy.engine.base, sqlalchemy.event, sqlalchemy.orm
import sqlalchemy.orm.attributes, sqlalchemy.orm.context, sqlalchemy.orm.loading
import sqlalchemy.orm.session, sqlalchemy.orm.strategies, sqlalchemy.pool.base
import sniffio, trio, trio.lowlevel
from sqlalchemy import create_engine, text
from sqlalchemy.orm import configure_mappers
from models import Post, User

configure_mappers()
MODULES = [asyncio, asyncio.events, asyncio.base_events, contextvars, threading, warnings,
           sniffio, trio, trio.lowlevel, sqlalchemy, sqlalchemy.event, sqlalchemy.orm,
           sqlalchemy.orm.attributes, sqlalchemy.orm.context, sqlalchemy.orm.loading,
           sqlalchemy.orm.session, sqlalchemy.orm.strategies, sqlalchemy.engine.base,
           sqlalchemy.pool.base]

def namespaces():
    for module in MODULES:
        yield module.__name__, module, False
        for name, value in vars(module).items():
            if inspect.isclass(value) and value.__module__ == module.__name__:
                yield f"{module.__name__}.{name}", value, True
    for cls in (User, Post):
        yield cls.__name__, cls, True

def snapshot():
    return {name: dict(vars(ns)) for name, ns, _ in namespaces()}

before = snapshot()

from sqlalchemy_threadpool import (
    BlockingOnEventLoopError, allow_blocking, threadpool_sessionmaker,
)

engine = create_engine(sys.argv[1])
warnings.simplefilter("ignore")

async def trip():
    for mode in ("raise", "warn", "off"):
        maker = threadpool_sessionmaker(engine, guard=mode)
        async with maker() as sess:
            user = await sess.get_one(User, int(sys.argv[2]))
            try:
                _ = user.posts
                sess.sync_session.execute(text("SELECT 1"))
            except BlockingOnEventLoopError:
                pass
            with allow_blocking():
                _ = user.bio

asyncio.run(trip())
trio.run(trip)

after = snapshot()
changed = []
for name, ns, is_class in namespaces():
    old, new = before[name], after[name]
    for key, value in old.items():
        if key in new and new[key] is not value and (is_class or callable(value)):
            changed.append(f"{name}.{key}")
        elif key not in new:
            changed.append(f"{name}.{key} (deleted)")
    if is_class:
        changed += [f"{name}.{key} (added)" for key in new.keys() - old.keys()]
print(json.dumps(changed))
"""


def test_the_guard_never_monkeypatches(db_url: str, engine: Engine, user_id: int) -> None:
    """Importing the package, making makers in every mode and tripping the guard, in a fresh
    interpreter, leaves every class and function of asyncio, trio, sniffio, SQLAlchemy and the
    mapped classes as it was: the guard works through SQLAlchemy's events only."""
    script = textwrap.dedent(_SNAPSHOT_SCRIPT)
    completed = subprocess.run(
        [sys.executable, "-c", script, db_url, str(user_id)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        check=False,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.splitlines()[-1]) == []


async def test_statement_listeners_run_unwrapped_and_pass_sql_through(engine: Engine) -> None:
    """Our ``before_cursor_execute`` listeners are called as they are (``retval=True``, no
    SQLAlchemy wrapper per statement), return the statement unchanged, and so leave a user's
    own rewriting listener in charge of what reaches the database."""
    from sqlalchemy_threadpool import _events, _guard

    sent: list[str] = []

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def tag(
        conn: object, cursor: object, statement: str, params: object, *args: object
    ) -> tuple[str, object]:
        return f"{statement} -- tagged", params

    @event.listens_for(engine, "after_cursor_execute")
    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        sent.append(statement)

    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        assert await sess.scalar(text("SELECT 1")) == 1
    listeners = list(engine.dispatch.before_cursor_execute)
    assert _events.refuse_if_given_up in listeners
    assert _guard.before_cursor_execute in listeners
    assert sent
    assert all(statement.endswith(" -- tagged") for statement in sent), sent
    event.remove(engine, "before_cursor_execute", tag)
    event.remove(engine, "after_cursor_execute", record)
