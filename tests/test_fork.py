"""Fork safety: a process forked from one that used a maker can use it (gunicorn ``--preload``).

The parent creates an engine and a maker and uses them (so worker threads, registries, a
MySQL side connection and pooled connections exist), then forks. The child disposes the
engine's pool without closing it, as SQLAlchemy advises for a forked child, runs
``anyio.run()`` on asyncio or trio, uses the maker, and leaves with ``os._exit()``: it never
returns into pytest, and its exit code and the database are what the parent checks. The parent
waits with a deadline, so a child that deadlocks (a lock held at fork time) fails the test
instead of hanging it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from helpers import assert_clean, slow_statement, user_names, wait_until_running
from models import User
from sqlalchemy_threadpool import (
    SessionClosedError,
    WorkerPool,
    _cancel,
    _events,
    shutdown,
    threadpool_session,
    threadpool_sessionmaker,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

#: Seconds the slow statements would run if nothing stopped them.
LONG = 30

#: Seconds a child may run before the parent calls it hung, kills it and fails the test. Only
#: a failing child comes near it (a slow statement the child could not cancel runs LONG s).
CHILD_DEADLINE = 3 * LONG


# -- running code in a forked child ------------------------------------------------------------


def run_in_child(work: Callable[[], None], deadline: float = CHILD_DEADLINE) -> None:
    """Fork; run ``work`` in the child, which then ``_exit``s; fail if it fails or hangs.

    The child never returns into pytest nor flushes what the parent had buffered: whatever
    happens it leaves with ``os._exit()``, after writing its traceback, if any, straight to
    file descriptor 2 (which pytest captures and shows with the failure).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            with contextlib.suppress(BaseException):
                os.write(2, f"in the forked child:\n{traceback.format_exc()}".encode())
        finally:
            os._exit(code)
    give_up_at = time.monotonic() + deadline
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > give_up_at:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(
                f"the forked child was still running after {deadline} s: it hung (a lock "
                "held by another thread at fork time?) and was killed"
            )
        time.sleep(0.02)
    code = os.waitstatus_to_exitcode(status)
    assert code == 0, f"the forked child failed (exit code {code}); its traceback is above"


def observer_for(engine: Engine) -> Engine:
    """An engine of the child's own to watch the server with (none of the parent's sockets)."""
    return create_engine(engine.url, poolclass=NullPool)


class SlowCall:
    """A callable for ``sess.run``: starts a long statement and records how the worker left."""

    def __init__(self, dialect: str) -> None:
        self.statement = slow_statement(dialect, LONG)
        self.started = threading.Event()
        self.outcome: list[str] = []

    def __call__(self, session: Session) -> None:
        self.started.set()
        try:
            session.execute(self.statement)
        except Exception:
            self.outcome.append("raised")
            raise
        self.outcome.append("returned")


class Recorder(logging.Handler):
    """Keeps the messages logged (in the child, where pytest's ``caplog`` is not to be used)."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# -- what the parent and the child do with the maker -------------------------------------------


async def write_and_read(maker: threadpool_sessionmaker, name: str) -> None:
    async with threadpool_session(maker, new=True) as sess:
        sess.add(User(name=name))
        await sess.flush()
        assert name in set(await sess.scalars(select(User.name)))


async def use_the_maker(maker: threadpool_sessionmaker, observer: Engine, name: str) -> None:
    """A scope that writes and reads a row, a stream, more sessions at once than the maker
    admits, and a statement stopped on the server by a timeout (``anyio.fail_after``)."""
    await write_and_read(maker, name)

    async with maker() as sess, await sess.stream(select(User.name)) as result:
        assert name in [row async for row in result.scalars()]

    async def briefly() -> None:  # holds its admission while the others queue for theirs
        async with threadpool_session(maker, new=True) as sess:
            await sess.execute(text("SELECT 1"))
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as group:
        for _ in range(int(maker.limiter.total_tokens) + 2):
            group.start_soon(briefly)

    call = SlowCall(observer.dialect.name)
    try:
        async with threadpool_session(maker, new=True) as sess:
            sess.add(User(name=f"{name} (cancelled)"))
            await sess.flush()
            with anyio.fail_after(CHILD_DEADLINE) as scope:
                async with anyio.create_task_group() as group:

                    async def expire_once_running() -> None:
                        await wait_until_running(observer, call.started)
                        scope.deadline = anyio.current_time()  # the timeout, now

                    group.start_soon(expire_once_running)
                    await sess.run(call)
    except TimeoutError:
        pass
    else:
        raise AssertionError("the slow statement was not timed out")
    # Stopped on the server: the maker's cleanup_timeout is longer than the statement, so its
    # connection was not cut; without a server-side cancel it would have returned.
    assert call.outcome == ["raised"], call.outcome


def maker_for(engine: Engine) -> threadpool_sessionmaker:
    return threadpool_sessionmaker(engine, cleanup_timeout=2 * LONG)


# -- the tests -----------------------------------------------------------------------------------


def test_a_child_uses_the_maker_its_parent_used(
    engine: Engine, other_engine: Engine, anyio_backend: str
) -> None:
    """gunicorn --preload: the parent used the maker on asyncio (worker threads wait in its
    pool; on MySQL a side connection is open); the child, on asyncio or trio, uses it fully."""
    maker = maker_for(engine)
    anyio.run(use_the_maker, maker, other_engine, "parent", backend="asyncio")

    def child() -> None:
        engine.dispose(close=False)  # never the parent's pooled connections (SQLAlchemy's advice)
        anyio.run(use_the_maker, maker, observer_for(other_engine), "child", backend=anyio_backend)

    run_in_child(child)
    assert user_names(other_engine) == {"parent", "child"}
    # The parent is unharmed: its pool, its threads, its side connection still work.
    anyio.run(use_the_maker, maker, other_engine, "parent again", backend="asyncio")
    assert user_names(other_engine) == {"parent", "child", "parent again"}
    assert_clean(engine, other_engine)


def test_a_child_forked_while_sessions_run_in_another_thread(
    db_url: str, engine: Engine, other_engine: Engine, anyio_backend: str
) -> None:
    """Another thread of the parent has every connection of the pool in use, each session in a
    call of its worker, when the main thread forks: in the child the maker admits as many
    sessions as its pool has connections, and ``shutdown()`` there stops the child's own
    sessions, never the parent's (their calls go on, their connections work)."""
    small = create_engine(db_url, pool_size=2, max_overflow=0, pool_timeout=3)
    maker = maker_for(small)
    release = threading.Event()
    in_flight = [threading.Event() for _ in range(2)]
    outcomes: list[str] = []

    def hold(session: Session, index: int) -> None:
        session.execute(text("SELECT 1"))  # the session holds its connection
        in_flight[index].set()
        release.wait(CHILD_DEADLINE)
        session.execute(text("SELECT 1"))  # ... which nobody has cut or rolled back meanwhile

    async def parent_requests() -> None:
        async def request(index: int) -> None:
            try:
                async with threadpool_session(maker, new=True) as sess:
                    await sess.run(hold, index)
            except Exception as exc:
                outcomes.append(repr(exc))
            else:
                outcomes.append("done")

        async with anyio.create_task_group() as group:
            for index in range(2):
                group.start_soon(request, index)

    thread = threading.Thread(target=anyio.run, args=(parent_requests,))
    thread.start()
    try:
        assert all(event.wait(10) for event in in_flight), "the parent's calls never started"

        def child() -> None:
            small.dispose(close=False)
            warned = Recorder(logging.WARNING)
            logging.getLogger("sqlalchemy_threadpool").addHandler(warned)

            async def main() -> None:
                async with anyio.create_task_group() as group:  # the whole capacity at once
                    for index in range(2):
                        group.start_soon(write_and_read, maker, f"child {index}")
                await shutdown(maker, timeout=2)

            anyio.run(main, backend=anyio_backend)
            assert warned.messages == []  # shutdown() found nothing left to stop

        run_in_child(child)
    finally:
        release.set()
        thread.join(CHILD_DEADLINE)
    assert not thread.is_alive()
    assert outcomes == ["done", "done"]
    assert user_names(other_engine) == {"child 0", "child 1"}
    assert_clean(small, other_engine)
    small.dispose()


def worker_pool_lock(maker: threadpool_sessionmaker) -> Any:
    assert maker._workers is not None
    return maker._workers._lock


#: The locks of the library's per-process registries, each as found in the parent.
REGISTRY_LOCKS: dict[str, Callable[[threadpool_sessionmaker], Any]] = {
    "cancel bookkeeping": lambda maker: _cancel._connections_lock,
    "events registry": lambda maker: _events._lock,
    "the maker's worker pool (the default one)": worker_pool_lock,
}


@contextlib.contextmanager
def held_by_another_thread(lock: Any) -> Iterator[None]:
    """Another thread holds ``lock`` for the duration of the block."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            done.wait(CHILD_DEADLINE + 10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(10)
        yield
    finally:
        done.set()
        thread.join(10)


@pytest.mark.parametrize("lock", REGISTRY_LOCKS)
def test_a_child_forked_while_a_registry_lock_is_held(
    db_url: str, engine: Engine, other_engine: Engine, anyio_backend: str, lock: str
) -> None:
    """A thread of the parent holds one of the library's locks when the main thread forks;
    the child uses the parent's maker, and makes and uses a new engine and maker (which
    register themselves), without deadlocking."""
    maker = maker_for(engine)
    anyio.run(write_and_read, maker, "parent", backend="asyncio")

    def child() -> None:
        engine.dispose(close=False)
        fresh = create_engine(db_url)
        fresh_maker = threadpool_sessionmaker(fresh, worker_idle_timeout=7.0)

        async def main() -> None:
            await write_and_read(maker, "child")
            await write_and_read(fresh_maker, "child, fresh engine")

        anyio.run(main, backend=anyio_backend)

    with held_by_another_thread(REGISTRY_LOCKS[lock](maker)):
        run_in_child(child, deadline=LONG)  # it does not wait for anything slow
    anyio.run(write_and_read, maker, "parent again", backend="asyncio")
    assert user_names(other_engine) == {"parent", "child", "child, fresh engine", "parent again"}
    assert_clean(engine, other_engine)


def test_a_child_uses_a_worker_pool_the_application_made(
    engine: Engine, other_engine: Engine, anyio_backend: str
) -> None:
    """The fork hook reaches every live pool, not only the default one: a pool the application
    made and gave to its maker, with a parent's thread idle in it and its lock held by another
    thread at fork time, starts empty and unlocked in the child, which then uses it."""
    workers = WorkerPool(idle_timeout=LONG)
    maker = threadpool_sessionmaker(engine, workers=workers, cleanup_timeout=2 * LONG)
    anyio.run(write_and_read, maker, "parent", backend="asyncio")
    assert workers.idle == 1  # the parent's thread waits in the pool

    def child() -> None:
        engine.dispose(close=False)
        assert workers.idle == 0  # none of the parent's threads
        anyio.run(write_and_read, maker, "child", backend=anyio_backend)
        assert workers.idle == 1  # the child's own thread, back in the pool

    with held_by_another_thread(workers._lock):
        run_in_child(child, deadline=LONG)
    anyio.run(write_and_read, maker, "parent again", backend="asyncio")
    assert workers.idle == 1  # the parent's thread was not lost to the child's reset
    assert user_names(other_engine) == {"parent", "child", "parent again"}
    assert_clean(engine, other_engine)


def test_a_child_ends_a_session_its_parent_holds_a_transaction_in(
    engine: Engine, other_engine: Engine, anyio_backend: str
) -> None:
    """Sessions hold a transaction when the process forks. In the child, nothing touches the
    parent's connection or waits for the parent's worker thread, which the child does not
    have: leaving ``async with sess:`` returns at once; leaving ``async with maker.begin()``
    or a ``threadpool_session()`` scope normally raises SessionClosedError (nothing of it can
    be committed there), with an error returns at once; ``close()`` and any other IO raise
    SessionClosedError. The parent's transactions are unharmed: they commit afterwards."""
    maker = maker_for(engine)
    sess = maker()
    scope = maker.begin()

    async def begin() -> None:
        sess.add(User(name="parent"))
        await sess.flush()
        inner = await scope.__aenter__()
        assert await inner.scalar(text("SELECT 5")) == 5  # (SQLite: one writer at a time)

    anyio.run(begin, backend="asyncio")  # both hold a transaction and a connection

    def child() -> None:
        engine.dispose(close=False)

        async def main() -> None:
            with anyio.fail_after(LONG):  # (it hung: the parent's worker is not in the child)
                with pytest.raises(SessionClosedError, match="forked"):
                    await sess.close()  # (as on any session whose scope has ended)
                async with sess:  # its exit closes it, as AsyncSession's: not an error
                    pass
                with pytest.raises(SessionClosedError, match="forked"):
                    await sess.execute(text("SELECT 1"))
                with pytest.raises(SessionClosedError, match="forked"):  # its commit
                    await scope.__aexit__(None, None, None)
                # What a threadpool_session() scope's exit does: with an error, then without.
                await sess._end(commit=False, reason="the scope raised")
                with pytest.raises(SessionClosedError, match="nothing of its transaction"):
                    await sess._end(commit=True, reason="the scope ended")
                with pytest.raises(ZeroDivisionError):
                    async with threadpool_session(maker, new=True) as other:
                        await other.execute(text("SELECT 1"))
                        1 / 0  # noqa: B018
                async with threadpool_session(maker, new=True) as fresh:  # the maker works
                    assert await fresh.scalar(text("SELECT 7")) == 7

        anyio.run(main, backend=anyio_backend)

    run_in_child(child, deadline=LONG + 10)

    async def finish() -> None:
        sess.add(User(name="parent, later"))
        await sess.commit()
        await scope.__aexit__(None, None, None)

    anyio.run(finish, backend="asyncio")
    assert user_names(other_engine) == {"parent", "parent, later"}
    assert_clean(engine, other_engine)
