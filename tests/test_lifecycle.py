"""The unit of work: commit on success, roll back on error or cancellation, always close."""

from __future__ import annotations

import threading
import time
from threading import get_ident

import anyio
import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from helpers import checked_out, slow_statement, user_names
from models import User
from sqlalchemy_threadpool import (
    SessionClosedError,
    TransactionInterruptedError,
    threadpool_session,
    threadpool_sessionmaker,
)

pytestmark = pytest.mark.anyio


async def test_commit_on_success_is_visible_elsewhere(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        sess.add(User(name="ada"))
    assert user_names(other_engine) == {"ada"}
    assert checked_out(engine) == 0


async def test_scope_exit_commits_and_closes_in_one_worker_call(engine: Engine) -> None:
    """The end of a unit of work that went well is one hop: commit and close together, in the
    session's thread (its objects are detached there, not on the event loop)."""
    maker = threadpool_sessionmaker(engine)
    loop_thread = threading.get_ident()
    async with threadpool_session(maker) as sess:
        sess.add(User(name="ada"))
    commits: list[int] = []
    detaches: list[int] = []
    async with threadpool_session(maker) as sess:
        event.listen(sess.sync_session, "after_commit", lambda _s: commits.append(get_ident()))
        event.listen(
            sess.sync_session,
            "persistent_to_detached",
            lambda _s, _o: detaches.append(get_ident()),
        )
        user = await sess.scalar(select(User))
        assert user is not None
    assert len(commits) == 1
    assert detaches == commits  # the same thread, not the loop's
    assert commits[0] != loop_thread
    assert user not in sess.sync_session
    assert checked_out(engine) == 0


async def test_exception_rolls_back_and_propagates_the_same_object(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    boom = ValueError("boom")
    with pytest.raises(ValueError) as caught:
        async with threadpool_session(maker) as sess:
            sess.add(User(name="ada"))
            await sess.flush()  # the row reached the database inside the transaction
            raise boom
    assert caught.value is boom
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


async def test_database_error_reaches_the_caller_unchanged(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        sess.add(User(name="ada"))
    with pytest.raises(IntegrityError):
        async with threadpool_session(maker) as sess:
            sess.add(User(name="ada"))
            await sess.flush()
    assert checked_out(engine) == 0


async def test_failed_commit_raises_and_leaves_nothing(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        sess.add(User(name="ada"))
    with pytest.raises(IntegrityError):
        async with threadpool_session(maker) as sess:
            sess.add(User(name="bob"))
            sess.add(User(name="ada"))  # the flush inside commit fails on the unique name
    assert user_names(other_engine) == {"ada"}
    assert checked_out(engine) == 0


async def test_maker_context_closes_without_committing(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        sess.add(User(name="ada"))
        await sess.flush()
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


async def test_scope_end_refuses_later_io(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        await sess.execute(select(User))
    with pytest.raises(SessionClosedError, match="scope has ended"):
        await sess.execute(select(User))


async def test_maker_begin_commits_on_success_and_rolls_back_on_error(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker.begin() as sess:
        sess.add(User(name="ada"))
    with pytest.raises(RuntimeError):
        async with maker.begin() as sess:
            sess.add(User(name="bob"))
            await sess.flush()
            raise RuntimeError("no")
    assert user_names(other_engine) == {"ada"}
    assert checked_out(engine) == 0


async def test_reuse_after_close_reacquires_a_connection(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        await sess.execute(text("SELECT 1"))
        assert checked_out(engine) == 1
        await sess.close()
        assert checked_out(engine) == 0
        assert await sess.scalar(text("SELECT 2")) == 2
        assert checked_out(engine) == 1
    assert checked_out(engine) == 0


async def test_begin_nested_rolls_back_only_its_rows(engine: Engine, other_engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        sess.add(User(name="kept"))
        await sess.flush()
        with pytest.raises(LookupError):
            async with sess.begin_nested():
                sess.add(User(name="dropped"))
                await sess.flush()
                raise LookupError
        async with sess.begin_nested():
            sess.add(User(name="released"))
    assert user_names(other_engine) == {"kept", "released"}


async def test_a_savepoint_whose_flush_fails_rolls_back_only_itself(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as setup:
        setup.add(User(name="taken"))
    async with maker() as sess:
        async with sess.begin():
            sess.add(User(name="order"))
            with pytest.raises(IntegrityError):
                async with sess.begin_nested():  # its RELEASE flushes, and the flush fails
                    sess.add(User(name="taken"))
            with pytest.raises(IntegrityError):
                async with sess.begin_nested():  # the flush fails inside: deactivated
                    sess.add(User(name="taken"))
                    await sess.flush()
            sess.add(User(name="later"))
        assert not sess.in_transaction()
    assert user_names(other_engine) == {"taken", "order", "later"}
    assert checked_out(engine) == 0


async def test_an_interrupted_savepoint_fails_the_whole_unit_of_work(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    statement = slow_statement(engine.dialect.name, 2)
    started = threading.Event()

    def slow(session: Session) -> None:
        started.set()
        session.execute(statement)

    async with maker() as sess:
        with pytest.raises(TransactionInterruptedError):
            async with sess.begin():
                sess.add(User(name="lost"))
                await sess.flush()
                async with anyio.create_task_group() as group:

                    async def cancel_once_started() -> None:
                        await anyio.to_thread.run_sync(started.wait, 10)
                        group.cancel_scope.cancel()

                    group.start_soon(cancel_once_started)
                    async with sess.begin_nested():
                        await sess.run(slow)
                # the commit at the end of begin() must not report the lost work committed
        await sess.rollback()
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


async def test_begin_commits_and_await_form_starts(engine: Engine, other_engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    async with maker() as sess:
        async with sess.begin():
            sess.add(User(name="ada"))
        assert user_names(other_engine) == {"ada"}
        transaction = await sess.begin()
        assert transaction.is_active
        sess.add(User(name="bob"))
        await transaction.rollback()
    assert user_names(other_engine) == {"ada"}


async def test_cancellation_rolls_back_and_waits_for_the_worker(
    engine: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    dialect = engine.dialect.name
    left_session: list[bool] = []

    def slow(session: Session) -> None:
        try:
            session.execute(slow_statement(dialect, 2))
        finally:
            left_session.append(True)

    with anyio.move_on_after(0.3) as scope:
        async with threadpool_session(maker) as sess:
            sess.add(User(name="ada"))
            await sess.flush()
            await sess.run(slow)
    assert scope.cancelled_caught
    assert left_session == [True]  # the worker was out before the await returned
    assert user_names(other_engine) == set()
    assert checked_out(engine) == 0


async def test_fail_after_raises_timeout_error_without_leak(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    statement = slow_statement(engine.dialect.name, 2)
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.3):
            async with threadpool_session(maker) as sess:
                await sess.execute(statement)
    assert checked_out(engine) == 0


async def test_cancelled_even_if_the_worker_returned_normally(engine: Engine) -> None:
    """A call that outlived its deadline raises the timeout, not its value."""
    maker = threadpool_sessionmaker(engine, cancel_statements=False)

    def uninterruptible(session: Session) -> str:
        time.sleep(0.5)  # not a statement: nothing on the server to cancel
        return "finished"

    reached: list[str] = []
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.1):
            async with maker() as sess:
                reached.append(await sess.run(uninterruptible))
    assert reached == []
    assert checked_out(engine) == 0


async def test_cancelled_before_dispatch_never_runs(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    ran: list[bool] = []
    async with maker() as sess:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await sess.run(lambda s: ran.append(True))
    assert ran == []
    assert checked_out(engine) == 0
