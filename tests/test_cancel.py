"""Cancellation: the statement in flight is stopped on the server, the unit of work fails.

Every test cancels (or times out) a call while its statement runs on the server, then checks
what the issue promises: the await ends well before the statement would have, the statement is
gone from the server, the transaction was rolled back (or, for a commit, applied entirely or
not at all), and nothing is leaked (``assert_clean``: pool, server, garbage collection).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from helpers import (
    assert_clean,
    busy_backends,
    only_on,
    slow_statement,
    user_names,
    wait_until_running,
)
from models import User
from sqlalchemy_threadpool import (
    ThreadpoolSessionError,
    TransactionInterruptedError,
    shutdown,
    threadpool_session,
    threadpool_sessionmaker,
)
from sqlalchemy_threadpool._cancel import canceller_for

pytestmark = pytest.mark.anyio

#: Seconds the slow statements would run if nothing stopped them.
LONG = 30

#: "Well under" LONG: a cancelled call that returns later than this was not cancelled.
PROMPT = 5

#: For behaviour decided on the event loop before any statement runs: one database is enough.
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


class SlowCall:
    """A callable for ``sess.run``: starts a long statement and records how the worker left."""

    def __init__(self, dialect: str, seconds: float = LONG, *, swallow: bool = False) -> None:
        self.statement = slow_statement(dialect, seconds)
        self.swallow = swallow  # catch the driver's "cancelled" error, as careless code does
        self.started = threading.Event()
        self.outcome: list[str] = []  # "returned" or "raised", appended as the worker leaves
        self.later: list[BaseException] = []  # what a second statement after it got

    def __call__(self, session: Session) -> str:
        self.started.set()
        try:
            session.execute(self.statement)
        except Exception:
            self.outcome.append("raised")
            if not self.swallow:
                raise
        else:
            self.outcome.append("returned")
        if self.swallow:
            try:
                session.execute(text("SELECT 1"))
            except Exception as exc:
                self.later.append(exc)
        return "finished"


@asynccontextmanager
async def cancelled_when_running(
    observer: Engine, call: SlowCall, statement: str = "sleep"
) -> AsyncIterator[None]:
    """Cancel the block once ``call``'s statement runs on the server; swallow the cancel."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:

            async def cancel_when_running() -> None:
                await wait_until_running(observer, call.started, statement)
                scope.cancel()

            group.start_soon(cancel_when_running)
            yield
    assert scope.cancelled_caught, "the call ended before it could be cancelled"


async def test_cancel_stops_the_statement_on_the_server(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    call = SlowCall(engine.dialect.name)
    async with threadpool_session(maker) as sess:
        start = anyio.current_time()
        async with cancelled_when_running(other_engine, call):
            await sess.run(call)
        elapsed = anyio.current_time() - start
        assert busy_backends(other_engine) == []  # stopped and rolled back before the await ended
        await sess.rollback()
    assert elapsed < PROMPT, f"the cancelled call took {elapsed:.1f} s"
    assert len(call.outcome) == 1  # the worker left the session before the await returned
    assert_clean(engine, other_engine)


async def test_rows_written_before_the_cancel_are_absent(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    call = SlowCall(engine.dialect.name)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:

            async def request() -> None:
                async with threadpool_session(maker) as sess:
                    sess.add_all([User(name="ada"), User(name="bob")])
                    await sess.flush()
                    await sess.run(call)

            group.start_soon(request)
            await wait_until_running(other_engine, call.started)
            start = anyio.current_time()
            scope.cancel()
    assert anyio.current_time() - start < PROMPT  # the task itself was cancelled promptly
    assert len(call.outcome) == 1
    assert user_names(other_engine) == set()
    assert_clean(engine, other_engine)


async def _times_out(
    engine: Engine, other_engine: Engine, deadline: Callable[[], AbstractAsyncContextManager[Any]]
) -> None:
    """A 2 s statement under a 0.3 s deadline: TimeoutError, and siblings carry on."""
    maker = threadpool_sessionmaker(engine)
    call = SlowCall(engine.dialect.name, 2)
    timed_out = anyio.Event()

    async def sibling() -> None:
        async with threadpool_session(maker, new=True) as sess:
            assert await sess.scalar(text("SELECT 1")) == 1
            await timed_out.wait()
            sess.add(User(name="sibling"))

    async with anyio.create_task_group() as group:
        group.start_soon(sibling)
        start = anyio.current_time()
        with pytest.raises(TimeoutError):
            async with deadline(), threadpool_session(maker) as sess:
                sess.add(User(name="timed-out"))
                await sess.flush()
                await sess.run(call)
        elapsed = anyio.current_time() - start
        timed_out.set()
    assert elapsed < 2, f"the timed-out call took {elapsed:.1f} s: its statement was not stopped"
    # the statement was stopped, not run to its end (SQLite's may take less than 2 s)
    assert call.outcome == ["raised"]
    assert user_names(other_engine) == {"sibling"}  # the enclosing task group went on
    assert_clean(engine, other_engine)


async def test_fail_after_raises_timeout_error(engine: Engine, other_engine: Engine) -> None:
    @asynccontextmanager
    async def deadline() -> AsyncIterator[None]:
        with anyio.fail_after(0.3):
            yield

    await _times_out(engine, other_engine, deadline)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_timeout_raises_timeout_error(
    engine: Engine, other_engine: Engine, anyio_backend: str
) -> None:
    if sys.version_info < (3, 11):
        pytest.skip("asyncio.timeout() is new in Python 3.11")
    else:
        await _times_out(engine, other_engine, lambda: asyncio.timeout(0.3))


@sqlite_only
async def test_cancelled_before_dispatch_never_runs(engine: Engine, other_engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    ran: list[bool] = []
    async with threadpool_session(maker) as sess:
        sess.add(User(name="kept"))
        await sess.flush()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await sess.run(lambda s: ran.append(True))
        assert scope.cancelled_caught
        assert await sess.scalar(text("SELECT 1")) == 1  # nothing ran: nothing failed
    assert ran == []
    assert user_names(other_engine) == {"kept"}
    assert_clean(engine, other_engine)


@sqlite_only
async def test_cancelled_while_waiting_for_its_turn_never_runs(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    holding, release = threading.Event(), threading.Event()
    ran: list[bool] = []

    def hold(session: Session) -> None:
        session.execute(text("SELECT 1"))
        holding.set()
        release.wait(10)

    async with threadpool_session(maker) as sess:
        sess.add(User(name="kept"))
        async with anyio.create_task_group() as group:
            group.start_soon(sess.run, hold)
            assert await anyio.to_thread.run_sync(holding.wait, 10)
            with anyio.CancelScope() as scope:
                group.start_soon(_cancel_soon, scope)
                await sess.run(lambda s: ran.append(True))  # waits for hold() to finish
            assert scope.cancelled_caught
            release.set()
        assert await sess.scalar(text("SELECT 1")) == 1
    assert ran == []
    assert user_names(other_engine) == {"kept"}
    assert_clean(engine, other_engine)


async def _cancel_soon(scope: anyio.CancelScope) -> None:
    await anyio.sleep(0.05)
    scope.cancel()


async def test_two_cancels_in_a_row_still_clean_up(engine: Engine, other_engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    call = SlowCall(engine.dialect.name)
    lingered: list[bool] = []

    def slow_then_linger(session: Session) -> None:
        try:
            call(session)
        finally:
            time.sleep(0.2)  # still inside the session when the second cancel comes
            lingered.append(True)

    outer, inner = anyio.CancelScope(), anyio.CancelScope()

    async def request() -> None:
        with outer, inner:
            async with threadpool_session(maker) as sess:
                sess.add(User(name="ada"))
                await sess.flush()
                await sess.run(slow_then_linger)

    async with anyio.create_task_group() as group:
        group.start_soon(request)
        await wait_until_running(other_engine, call.started)
        inner.cancel()
        await anyio.sleep(0.1)
        outer.cancel()
    assert lingered == [True]  # the request ended only once the worker had left
    assert user_names(other_engine) == set()
    assert_clean(engine, other_engine)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_repeated_task_cancels_still_clean_up(
    engine: Engine, other_engine: Engine, anyio_backend: str
) -> None:
    """asyncio's own ``Task.cancel()`` (servers, ``asyncio.timeout`` use it), again and again
    while the interrupted call is stopped and its scope cleans up: anyio's shield does not
    stop these."""
    maker = threadpool_sessionmaker(engine)
    call = SlowCall(engine.dialect.name)
    lingered: list[bool] = []

    def slow_then_linger(session: Session) -> None:
        try:
            call(session)
        finally:
            time.sleep(0.3)
            lingered.append(True)

    async def request() -> None:
        async with threadpool_session(maker) as sess:
            sess.add(User(name="ada"))
            await sess.flush()
            await sess.run(slow_then_linger)

    task = asyncio.ensure_future(request())
    await wait_until_running(other_engine, call.started)
    for _ in range(6):  # while the worker lingers: in the stop, then in the scope's cleanup
        task.cancel()
        await asyncio.sleep(0.04)
    await asyncio.wait([task])
    assert task.cancelled()
    assert lingered == [True]
    assert user_names(other_engine) == set()
    assert_clean(engine, other_engine)


async def test_a_cancel_never_hits_the_next_statement(db_url: str, other_engine: Engine) -> None:
    engine = create_engine(db_url, pool_size=1, max_overflow=0)  # the next call: same connection
    try:
        maker = threadpool_sessionmaker(engine)
        dialect = engine.dialect.name
        for _ in range(2):
            call = SlowCall(dialect)
            async with threadpool_session(maker) as sess:
                async with cancelled_when_running(other_engine, call):
                    await sess.run(call)
                await sess.rollback()
            async with threadpool_session(maker) as sess:
                await sess.execute(slow_statement(dialect, 0.1))  # would fail if hit
                sess.add(User(name="next"))
            assert user_names(other_engine) == {"next"}
            async with threadpool_session(maker) as sess:
                await sess.execute(text("DELETE FROM satp_user"))
        assert_clean(engine, other_engine)
    finally:
        engine.dispose()


async def test_an_interrupted_callable_cannot_start_another_statement(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    call = SlowCall(engine.dialect.name, swallow=True)
    async with threadpool_session(maker) as sess:
        async with cancelled_when_running(other_engine, call):
            await sess.run(call)
        await sess.rollback()
    assert len(call.later) == 1
    assert isinstance(call.later[0], ThreadpoolSessionError)
    assert "may not start another statement" in str(call.later[0])
    assert_clean(engine, other_engine)


async def test_the_unit_of_work_fails_even_if_the_worker_returned_normally(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    call = SlowCall(engine.dialect.name, swallow=True)  # returns "finished", whatever happened
    async with threadpool_session(maker) as sess:
        sess.add(User(name="before"))
        await sess.flush()
        async with cancelled_when_running(other_engine, call):
            await sess.run(call)
        assert call.outcome  # the worker left, and returned normally
        with pytest.raises(TransactionInterruptedError, match="rollback"):
            await sess.execute(text("SELECT 1"))
        with pytest.raises(TransactionInterruptedError):
            await sess.commit()
        with pytest.raises(TransactionInterruptedError):
            await sess.flush()
        await sess.rollback()  # acknowledges it: a new transaction starts
        assert await sess.scalar(text("SELECT 1")) == 1
        sess.add(User(name="after"))
    assert user_names(other_engine) == {"after"}
    assert_clean(engine, other_engine)


async def test_a_scope_that_ignores_the_interruption_commits_nothing(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    call = SlowCall(engine.dialect.name)
    with pytest.raises(TransactionInterruptedError):
        async with threadpool_session(maker) as sess:
            sess.add(User(name="before"))
            await sess.flush()
            async with cancelled_when_running(other_engine, call):
                await sess.run(call)
            sess.add(User(name="after"))  # no rollback(): the scope must not commit this
    assert user_names(other_engine) == set()
    assert_clean(engine, other_engine)


@only_on("mysql")
async def test_killed_benchmark_returns_normally_but_the_unit_of_work_fails(
    engine: Engine, other_engine: Engine
) -> None:
    """MariaDB's BENCHMARK() stopped by KILL QUERY returns 0 without an error."""
    maker = threadpool_sessionmaker(engine)
    started = threading.Event()
    returned: list[Any] = []

    def benchmark(session: Session) -> None:
        started.set()
        returned.append(session.scalar(text("SELECT BENCHMARK(1000000000000, MD5('x'))")))

    async with threadpool_session(maker) as sess:
        sess.add(User(name="before"))
        await sess.flush()
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(sess.run, benchmark)
                await wait_until_running(other_engine, started)
                scope.cancel()
        assert returned == [0]
        with pytest.raises(TransactionInterruptedError):
            await sess.commit()
        await sess.rollback()
    assert user_names(other_engine) == set()
    assert_clean(engine, other_engine)


class _Escaped(BaseException):
    """Stands for a BaseException (KeyboardInterrupt, SystemExit) raised in a worker."""


async def test_a_base_exception_in_the_worker_invalidates_the_connection(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    invalidated: list[object] = []
    event.listen(engine, "invalidate", lambda conn, record, exc: invalidated.append(exc))
    escaped = _Escaped()

    def interrupted(session: Session) -> None:
        session.execute(text("SELECT 1"))
        raise escaped  # the connection's state is unknown now

    with pytest.raises(_Escaped) as caught:
        async with threadpool_session(maker) as sess:
            sess.add(User(name="ada"))
            await sess.flush()
            await sess.run(interrupted)
    assert caught.value is escaped  # unchanged
    assert len(invalidated) == 1  # discarded, not returned to the pool
    assert user_names(other_engine) == set()
    async with threadpool_session(maker) as sess:  # the pool reconnects
        assert await sess.scalar(text("SELECT 1")) == 1
    assert_clean(engine, other_engine)


async def wait_until_sleeping(observer: Engine, started: threading.Event, pid: int) -> None:
    """Wait until PostgreSQL backend ``pid`` waits in ``pg_sleep`` (bounded)."""
    assert await anyio.to_thread.run_sync(started.wait, 10), "the worker never started"
    query = text("SELECT wait_event FROM pg_stat_activity WHERE pid = :pid")
    for _ in range(1000):
        with observer.connect() as conn:
            if conn.execute(query, {"pid": pid}).scalar() == "PgSleep":
                return
        await anyio.sleep(0.01)
    raise AssertionError(f"backend {pid} never reached pg_sleep")


@only_on("postgresql")
async def test_a_statement_that_ignores_the_cancel_is_cut_after_the_cleanup_timeout(
    engine: Engine, other_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL: a function that catches ``query_canceled`` and sleeps again."""
    with engine.begin() as conn:
        conn.execute(
            text(
                # Two blocks deep: a cancel that lands while the inner handler runs (plpgsql
                # checks for interrupts before each statement, the handler's too) is caught by
                # the outer block instead of stopping the function.
                "CREATE OR REPLACE FUNCTION satp_stubborn_sleep() RETURNS void AS $$ BEGIN "
                f"LOOP BEGIN BEGIN PERFORM pg_sleep({LONG}); RETURN; "
                "EXCEPTION WHEN query_canceled THEN NULL; END; "
                "EXCEPTION WHEN query_canceled THEN NULL; END; END LOOP; END $$ "
                "LANGUAGE plpgsql"
            )
        )
    maker = threadpool_sessionmaker(engine, cleanup_timeout=0.5)
    invalidated: list[object] = []
    event.listen(engine, "invalidate", lambda conn, record, exc: invalidated.append(exc))
    call = SlowCall("postgresql")
    call.statement = text("SELECT satp_stubborn_sleep()")
    pid: list[int] = []
    start = anyio.current_time()
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_threadpool"):
        async with threadpool_session(maker) as sess:
            pid.append(await sess.scalar(text("SELECT pg_backend_pid()")))
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as group:

                    async def cancel_once_inside_the_loop() -> None:
                        # Only inside the function's BEGIN ... EXCEPTION block is the cancel
                        # ignored: a cancel that came before would simply stop the statement.
                        await wait_until_sleeping(other_engine, call.started, pid[0])
                        scope.cancel()

                    group.start_soon(cancel_once_inside_the_loop)
                    await sess.run(call)
            assert scope.cancelled_caught
            await sess.rollback()
    assert anyio.current_time() - start < PROMPT
    assert call.outcome == ["raised"]  # "server closed the connection": the worker is out
    assert len(invalidated) == 1
    assert "shutting down its connection's socket" in caplog.text
    # The server notices the closed socket only when the statement ends (a limitation of
    # cutting the connection): end the backend here so the leak check sees the rest.
    with other_engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid[0]})
    for _ in range(100):
        if not busy_backends(other_engine):
            break
        await anyio.sleep(0.05)
    assert_clean(engine, other_engine)


# -- MySQL/MariaDB: the side connection of KILL QUERY -----------------------------------------


def _connection_ids(observer: Engine) -> set[int]:
    """The server's ids of every connection to the test database but the observer's own."""
    query = text(
        "SELECT id FROM information_schema.processlist "
        "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
    )
    with observer.connect() as conn:
        return set(conn.scalars(query))


async def _cancel_a_statement(maker: threadpool_sessionmaker, observer: Engine) -> SlowCall:
    """Run a LONG statement in a session and cancel it once the server runs it."""
    call = SlowCall(observer.dialect.name)
    async with threadpool_session(maker) as sess:
        async with cancelled_when_running(observer, call):
            await sess.run(call)
        await sess.rollback()
    assert call.outcome == ["raised"]  # stopped on the server, not run to its end
    return call


async def _side_connection_of_a_cancel(
    maker: threadpool_sessionmaker, observer: Engine
) -> tuple[set[int], int]:
    """Cancel a statement; return the connections open before, and the one the cancel left."""
    async with threadpool_session(maker) as sess:
        await sess.execute(text("SELECT 1"))  # the pool's connection exists before we look
    before = _connection_ids(observer)
    await _cancel_a_statement(maker, observer)
    opened = _connection_ids(observer) - before
    assert len(opened) == 1, f"the cancel left {opened or 'no'} connection(s) open"
    return before, opened.pop()


async def _wait_until_closed(observer: Engine, connection_id: int) -> bool:
    for _ in range(500):
        if connection_id not in _connection_ids(observer):
            return True
        await anyio.sleep(0.01)
    return False


@only_on("mysql")
async def test_consecutive_cancels_share_one_side_connection(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    before, side = await _side_connection_of_a_cancel(maker, other_engine)
    await _cancel_a_statement(maker, other_engine)
    assert _connection_ids(other_engine) == before | {side}  # the same one, no new one
    assert_clean(engine, other_engine)


@only_on("mysql")
async def test_cancels_of_two_makers_share_the_engines_side_connection(
    engine: Engine, other_engine: Engine
) -> None:
    before, side = await _side_connection_of_a_cancel(
        threadpool_sessionmaker(engine), other_engine
    )
    await _cancel_a_statement(threadpool_sessionmaker(engine), other_engine)
    assert _connection_ids(other_engine) == before | {side}
    assert_clean(engine, other_engine)


@only_on("mysql")
async def test_a_side_connection_killed_from_outside_is_replaced(
    engine: Engine, other_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    maker = threadpool_sessionmaker(engine)
    before, side = await _side_connection_of_a_cancel(maker, other_engine)
    with other_engine.connect() as conn:
        conn.execute(text(f"KILL {side}"))
    assert await _wait_until_closed(other_engine, side), "KILL did not close it"
    start = anyio.current_time()
    with caplog.at_level(logging.DEBUG, logger="sqlalchemy_threadpool"):
        await _cancel_a_statement(maker, other_engine)
    assert anyio.current_time() - start < LONG - 10  # stopped, not run to its end
    assert "side connection was lost; reconnecting" in caplog.text  # it met the dead one
    assert "cancelling the statement in flight failed" not in caplog.text  # and went on
    replacement = _connection_ids(other_engine) - before
    assert len(replacement) == 1
    assert side not in replacement
    assert_clean(engine, other_engine)


@only_on("mysql")
@pytest.mark.parametrize("how", ["dispose", "shutdown"])
async def test_disposing_the_engine_closes_the_side_connection(
    engine: Engine, other_engine: Engine, how: str
) -> None:
    maker = threadpool_sessionmaker(engine)
    _, side = await _side_connection_of_a_cancel(maker, other_engine)
    if how == "dispose":
        engine.dispose()
    else:
        await shutdown(engine)
    assert await _wait_until_closed(other_engine, side), "the side connection is still open"
    await _cancel_a_statement(maker, other_engine)  # the engine can still be used: a new one
    assert_clean(engine, other_engine)


@only_on("mysql")
async def test_a_cancel_does_not_queue_behind_a_stuck_one(
    engine: Engine, other_engine: Engine
) -> None:
    """The first cancel's side connection takes 4 s to open (an overloaded server): a second
    session's cancel does not wait for it, it kills its statement over a connection of its own
    (closed afterwards)."""
    maker = threadpool_sessionmaker(engine)
    slow_next_connect = threading.Event()

    @event.listens_for(engine, "do_connect")
    def slow_side_connection(*args: Any) -> None:
        if slow_next_connect.is_set():
            slow_next_connect.clear()  # only the first side connection is slow
            time.sleep(4)

    calls = {name: SlowCall("mysql") for name in ("stuck", "other")}
    scopes = {name: anyio.CancelScope() for name in calls}
    ended: list[str] = []

    async def request(name: str) -> None:
        with scopes[name]:
            async with threadpool_session(maker) as sess:
                await sess.run(calls[name])
        ended.append(name)

    async with anyio.create_task_group() as group:
        for name in calls:
            group.start_soon(request, name)
        for call in calls.values():
            assert await anyio.to_thread.run_sync(call.started.wait, 10)
        for _ in range(1000):  # both statements run on the server
            if sum("sleep" in row.lower() for row in busy_backends(other_engine)) >= 2:
                break
            await anyio.sleep(0.01)
        before = _connection_ids(other_engine)
        slow_next_connect.set()
        scopes["stuck"].cancel()
        await anyio.sleep(0.2)  # its cancel now holds the side connection's lock
        scopes["other"].cancel()
    assert ended == ["other", "stuck"]
    assert [call.outcome for call in calls.values()] == [["raised"], ["raised"]]
    opened = _connection_ids(other_engine) - before
    assert len(opened) == 1  # the shared one, once it opened; the other one's is closed
    assert_clean(engine, other_engine)


@only_on("mysql")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_uses_the_parents_side_connection(
    engine: Engine, other_engine: Engine
) -> None:
    """A cancel in a forked child opens a side connection of its own; the parent's stays
    open, untouched, and is still the one the parent's next cancel uses."""
    canceller = canceller_for(engine)
    assert canceller is not None
    with engine.connect() as conn:  # a connection that runs nothing: each kill is a no-op
        dbapi: Any = conn.connection.dbapi_connection  # pymysql's, with thread_id()
        assert dbapi is not None
        target = {"sqlalchemy_threadpool.thread_id": dbapi.thread_id()}
        before = _connection_ids(other_engine)
        canceller.cancel(dbapi, target)
        parents = _connection_ids(other_engine) - before
        assert len(parents) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
            pid = os.fork()
        if pid == 0:  # the child: only plain calls, then _exit
            code = 1
            try:
                observer = create_engine(other_engine.url, poolclass=NullPool)
                seen = _connection_ids(observer)
                canceller.cancel(dbapi, target)
                code = 0 if len(_connection_ids(observer) - seen) == 1 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0  # the child opened a connection
        time.sleep(0.2)  # let the server drop the child's connection
        assert parents <= _connection_ids(other_engine)  # the child did not close ours
        after_child = _connection_ids(other_engine)
        canceller.cancel(dbapi, target)  # ours still works, with no new connection
        assert _connection_ids(other_engine) == after_child
    engine.dispose()
    assert not parents & _connection_ids(other_engine)


# -- cancel during commit ------------------------------------------------------------------


async def test_cancel_during_commit_applies_nothing_and_warns(
    engine: Engine, other_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    maker = threadpool_sessionmaker(engine)
    call = SlowCall(engine.dialect.name)
    async with threadpool_session(maker) as sess:
        # the next commit() runs a slow statement
        event.listen(sess.sync_session, "before_commit", call, once=True)
        sess.add_all([User(name="ada"), User(name="bob")])
        await sess.flush()
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_threadpool"):
            async with cancelled_when_running(other_engine, call):
                await sess.commit()
        await sess.rollback()
    assert user_names(other_engine) == set()  # nothing of it: never half
    assert "commit() was interrupted" in caplog.text
    assert "did not commit" in caplog.text
    assert_clean(engine, other_engine)


@only_on("postgresql")
async def test_cancel_during_the_commit_statement_applies_nothing(
    engine: Engine, other_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL: a deferred constraint trigger makes the COMMIT statement itself slow."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION satp_slow_commit() RETURNS trigger AS "
                f"$$ BEGIN PERFORM pg_sleep({LONG}); RETURN NULL; END $$ LANGUAGE plpgsql"
            )
        )
        conn.execute(
            text(
                "CREATE CONSTRAINT TRIGGER satp_slow_commit AFTER INSERT ON satp_user "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION satp_slow_commit()"
            )
        )
    maker = threadpool_sessionmaker(engine)
    call = SlowCall("postgresql")  # only its ``started`` is used

    async with threadpool_session(maker) as sess:
        sess.add_all([User(name="ada"), User(name="bob")])
        await sess.flush()
        call.started.set()
        start = anyio.current_time()
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_threadpool"):
            async with cancelled_when_running(other_engine, call, "commit"):
                await sess.commit()
        assert anyio.current_time() - start < PROMPT
        await sess.rollback()
    assert user_names(other_engine) == set()
    assert "commit() was interrupted" in caplog.text
    assert_clean(engine, other_engine)


async def test_cancel_after_the_database_committed_keeps_everything_and_warns(
    engine: Engine, other_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    maker = threadpool_sessionmaker(engine)
    committed = threading.Event()

    def linger(session: Session) -> None:
        committed.set()
        time.sleep(0.3)  # the database has committed; the worker is still inside commit()

    async with threadpool_session(maker) as sess:
        event.listen(sess.sync_session, "after_commit", linger, once=True)
        sess.add_all([User(name="ada"), User(name="bob")])
        await sess.flush()
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_threadpool"):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as group:
                    group.start_soon(sess.commit)
                    assert await anyio.to_thread.run_sync(committed.wait, 10)
                    scope.cancel()
        await sess.rollback()
    assert user_names(other_engine) == {"ada", "bob"}  # all of it: never half
    assert "IS committed" in caplog.text
    assert_clean(engine, other_engine)


# -- without statement cancellation ----------------------------------------------------------


async def test_without_cancel_statements_the_call_waits_for_the_statement(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine, cancel_statements=False)
    call = SlowCall(engine.dialect.name, 0.6)
    # Cancelled once the statement runs (not by a deadline, which a loaded machine can reach
    # during the flush, before the statement started).
    async with cancelled_when_running(other_engine, call), threadpool_session(maker) as sess:
        sess.add(User(name="ada"))
        await sess.flush()
        await sess.run(call)
    assert call.outcome == ["returned"]  # nobody stopped the statement: it ran to its end
    assert user_names(other_engine) == set()  # and the unit of work failed all the same
    assert_clean(engine, other_engine)
