"""The implicit-IO guard: SQL of our sessions never runs on the event-loop thread unnoticed.

Every "raises" test also proves that nothing reached the database: it counts the statements
(``before_cursor_execute``), COMMITs and pool checkouts of the engine around the offending line.
Every "does not fire" test also checks, on the same session, that the guard is armed.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import warnings
from collections.abc import Callable, Iterator

import anyio
import pytest
import sniffio
import trio
from sqlalchemy import Engine, event, func, select, text
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session, selectinload, subqueryload

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

        await sess.refresh(user)
        assert user.name == "ada"


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


OCCURRENCES = {
    "lazy": _lazy,
    "deferred": _deferred,
    "expired": _expired,
    "execute": _execute,
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
