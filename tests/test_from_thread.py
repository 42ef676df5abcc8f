"""``anyio.from_thread`` inside ``sess.run()``: one thread contract on both offload modes.

Sync code run by a session may call back into the event loop as from anyio's own worker
threads (``offload="anyio"``): ``from_thread.run_sync``, ``from_thread.run`` and
``from_thread.check_cancelled`` work in the dedicated worker threads (``offload="worker"``) too,
on asyncio and trio, and a cancelled call can still use them without deadlocking.
"""

from __future__ import annotations

import threading
import time
from contextvars import ContextVar
from typing import Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from helpers import user_names
from models import User
from sqlalchemy_threadpool import (
    ThreadpoolSession,
    TransactionInterruptedError,
    WorkerPool,
    _from_thread,
    threadpool_sessionmaker,
)
from sqlalchemy_threadpool._call import Call

pytestmark = pytest.mark.anyio

#: Generous bound for "eventually" (a cancellation is seen): never reached when it works.
EVENTUALLY = 20.0

Offload = Literal["worker", "anyio"]

probe: ContextVar[str] = ContextVar("probe", default="unset")


class Owner:
    """What a worker is lent to (a session's offloader, in the library)."""


@pytest.fixture(params=["worker", "anyio"])
def offload(request: pytest.FixtureRequest) -> Offload:
    mode: Offload = request.param
    return mode


class Cancellable:
    """A callable for ``sess.run`` that polls ``check_cancelled()`` until it raises (the
    cooperative stop anyio's threads allow), then calls back into the loop once more."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.raised: BaseException | None = None
        self.after: list[object] = []  # what the calls back into the loop returned afterwards

    def __call__(self, session: Session) -> None:
        session.execute(text("SELECT 1"))
        self.started.set()
        deadline = time.monotonic() + EVENTUALLY
        while time.monotonic() < deadline:
            try:
                anyio.from_thread.check_cancelled()
            except BaseException as exc:
                self.raised = exc
                self.after.append(anyio.from_thread.run_sync(lambda: "back on the loop"))
                raise
            time.sleep(0.001)

    async def cancel_once_started(self, scope: anyio.CancelScope) -> None:
        assert await anyio.to_thread.run_sync(self.started.wait, EVENTUALLY)
        scope.cancel()


async def _run_cancelled(sess: ThreadpoolSession, work: Cancellable) -> None:
    """Run ``work`` in ``sess`` and cancel it once it started; bounded."""
    with anyio.fail_after(EVENTUALLY):
        async with anyio.create_task_group() as group:
            with anyio.CancelScope() as scope:
                group.start_soon(work.cancel_once_started, scope)
                await sess.run(work)
    assert scope.cancelled_caught


async def test_run_sync_runs_on_the_loop_thread(engine: Engine, offload: Offload) -> None:
    maker = threadpool_sessionmaker(engine, offload=offload)
    loop_thread = threading.get_ident()
    on_the_loop: list[tuple[int, str]] = []

    def report(step: str) -> int:  # a progress callback, run on the loop
        on_the_loop.append((threading.get_ident(), probe.get()))
        return len(on_the_loop)

    def work(s: Session) -> tuple[int, int]:
        s.add(User(name="ada"))
        s.flush()
        first = anyio.from_thread.run_sync(report, "flushed")
        assert threading.get_ident() != loop_thread
        return first, anyio.from_thread.run_sync(report, "done")

    token = probe.set("the caller's")
    try:
        async with maker() as sess:
            assert await sess.run(work) == (1, 2)
            await sess.commit()
    finally:
        probe.reset(token)
    assert on_the_loop == [(loop_thread, "the caller's")] * 2
    assert user_names(engine) == {"ada"}


async def test_run_sync_raises_the_loop_functions_error_in_the_worker(
    engine: Engine, offload: Offload
) -> None:
    maker = threadpool_sessionmaker(engine, offload=offload)

    def refuse() -> None:
        raise LookupError("raised on the loop")

    def work(s: Session) -> str:
        try:
            anyio.from_thread.run_sync(refuse)
        except LookupError as exc:
            return str(exc)
        return "no error"

    async with maker() as sess:
        assert await sess.run(work) == "raised on the loop"


async def test_run_awaits_a_coroutine_on_the_loop_in_the_callers_context(
    engine: Engine, offload: Offload
) -> None:
    maker = threadpool_sessionmaker(engine, offload=offload)
    loop_thread = threading.get_ident()
    lock = anyio.Lock()  # an anyio lock shared with the loop's tasks
    seen: list[tuple[int, str]] = []

    async def cached(key: str) -> str:
        async with lock:
            await anyio.lowlevel.checkpoint()
            seen.append((threading.get_ident(), probe.get()))
            return f"value of {key}"

    def work(s: Session) -> str:
        value = anyio.from_thread.run(cached, "k")
        return f"{value}, {s.execute(text('SELECT 7')).scalar_one()}"

    token = probe.set("the caller's")
    try:
        async with maker() as sess:
            assert await sess.run(work) == "value of k, 7"
    finally:
        probe.reset(token)
    assert seen == [(loop_thread, "the caller's")]


async def test_check_cancelled_returns_when_the_task_is_not_cancelled(
    engine: Engine, offload: Offload
) -> None:
    maker = threadpool_sessionmaker(engine, offload=offload)

    def work(s: Session) -> int:
        anyio.from_thread.check_cancelled()
        value: int = s.execute(text("SELECT 3")).scalar_one()
        anyio.from_thread.check_cancelled()
        return value

    async with maker() as sess:
        assert await sess.run(work) == 3


async def test_check_cancelled_raises_once_the_awaiting_task_is_cancelled(
    engine: Engine, offload: Offload
) -> None:
    maker = threadpool_sessionmaker(engine, offload=offload)
    work = Cancellable()
    async with maker() as sess:
        await _run_cancelled(sess, work)
        assert isinstance(work.raised, anyio.get_cancelled_exc_class())
        with pytest.raises(TransactionInterruptedError):
            await sess.run(lambda s: None)
        await sess.rollback()
        assert await sess.run(lambda s: s.execute(text("SELECT 5")).scalar_one()) == 5


async def test_a_cancelled_call_can_still_call_back_into_the_loop(
    engine: Engine, offload: Offload
) -> None:
    """The loop keeps running while the cancelled task waits for its worker: no deadlock."""
    maker = threadpool_sessionmaker(engine, offload=offload)
    work = Cancellable()
    async with maker() as sess:
        await _run_cancelled(sess, work)
        await sess.rollback()
    assert work.after == ["back on the loop"]


async def test_a_coroutine_run_from_the_worker_is_cancelled_with_the_awaiting_task(
    engine: Engine,
) -> None:
    """Started before or after the cancellation, it does not keep the worker (and the
    cancelled task waiting for it) forever. (anyio's threads leave it running on trio.)"""
    maker = threadpool_sessionmaker(engine)
    started = threading.Event()
    raised: list[type[BaseException]] = []

    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    def work(s: Session) -> None:
        s.execute(text("SELECT 1"))
        for _ in range(2):  # the first is cancelled while it runs, the second at once
            try:
                anyio.from_thread.run(forever)
            except BaseException as exc:
                raised.append(type(exc))

    async def cancel_once_started(scope: anyio.CancelScope) -> None:
        assert await anyio.to_thread.run_sync(started.wait, EVENTUALLY)
        scope.cancel()

    async with maker() as sess:
        with anyio.fail_after(EVENTUALLY):
            async with anyio.create_task_group() as group:
                with anyio.CancelScope() as scope:
                    group.start_soon(cancel_once_started, scope)
                    await sess.run(work)
        assert scope.cancelled_caught
        await sess.rollback()
    assert raised == [anyio.get_cancelled_exc_class()] * 2


async def test_the_anyio_internals_the_worker_threads_rely_on_are_there() -> None:
    """``_from_thread.claim_thread`` sets a private thread-local of anyio: if this fails after
    an anyio upgrade, that function (and its docstring's list of internals) needs updating."""
    assert _from_thread._anyio_threadlocals() is not None, (
        "anyio._core._eventloop.threadlocals is gone: update _from_thread.claim_thread"
    )
    pool, owner = WorkerPool(60.0), Owner()
    worker = pool.acquire(owner)
    try:
        calls = (
            lambda: anyio.from_thread.run_sync(lambda: 42),
            lambda: anyio.from_thread.run(anyio.lowlevel.checkpoint),
            anyio.from_thread.check_cancelled,
        )
        for call in calls:
            try:
                await worker.call(Call(call))
            except Exception as exc:
                raise AssertionError(
                    "anyio.from_thread no longer finds the loop from a dedicated worker thread: "
                    "update _from_thread.claim_thread"
                ) from exc
    finally:
        pool.release(worker)
        pool.stop_idle()
