"""The wake-up of the task awaiting a dedicated worker's call: several calls done together
resume each its own task, in its own context; a wake-up that comes for a call its task gave up
on (at any point of the wake-up) is skipped, and the worker serves the next call."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from functools import partial
from typing import Any

import anyio
import pytest

from sqlalchemy_threadpool import WorkerPool
from sqlalchemy_threadpool._call import Call, CallState, Worker

pytestmark = pytest.mark.anyio

#: Generous bound for "eventually": never reached when it works.
EVENTUALLY = 20.0

whose: ContextVar[int] = ContextVar("whose", default=-1)


class Owner:
    """What a worker is lent to (a session's offloader, in the library)."""


def _block_loop_until(predicate: Callable[[], bool]) -> None:
    """Wait on the loop's own thread, without letting the loop run: wake-ups queue meanwhile."""
    deadline = time.monotonic() + EVENTUALLY
    while not predicate():
        assert time.monotonic() < deadline, "the worker never got there"
        time.sleep(0.001)


def _wait_until(predicate: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + EVENTUALLY
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


async def _until(predicate: Callable[[], bool]) -> None:
    """Wait, letting the loop run, until ``predicate()`` holds."""
    assert await anyio.to_thread.run_sync(_wait_until, predicate)


class Gated:
    """A callable for a worker that returns ``value`` once its gate opens."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.gate = threading.Event()
        self.call = Call(self)

    def __call__(self) -> Any:
        assert self.gate.wait(EVENTUALLY)
        return self.value


def _workers(n: int) -> tuple[WorkerPool, list[Worker], list[Owner]]:
    pool, owners = WorkerPool(60.0), [Owner() for _ in range(n)]
    return pool, [pool.acquire(owner) for owner in owners], owners


async def test_calls_done_together_resume_each_its_own_task_in_its_own_context() -> None:
    n = 8
    pool, workers, _owners = _workers(n)
    gated = [Gated(f"value {i}") for i in range(n)]
    got: dict[int, tuple[Any, int]] = {}

    async def await_call(i: int) -> None:
        whose.set(i)
        value = await workers[i].call(gated[i].call)
        got[i] = (value, whose.get())

    async with anyio.create_task_group() as group:
        for i in range(n):
            group.start_soon(await_call, i)
        await _until(lambda: all(g.call.state is CallState.RUNNING for g in gated))
        for g in gated:
            g.gate.set()
        # Every call is done and its wake-up queued before the loop reads any of them.
        _block_loop_until(lambda: all(g.call.returned for g in gated))
    assert got == {i: (f"value {i}", i) for i in range(n)}
    for i, worker in enumerate(workers):  # each serves its next call
        assert await worker.call(Call(partial(int, i))) == i
    for worker in workers:
        pool.release(worker)


@pytest.mark.parametrize("others", [0, 2], ids=["alone", "with-others-in-flight"])
async def test_a_wake_up_for_a_call_whose_task_was_cancelled_meanwhile_is_skipped(
    others: int,
) -> None:
    """The call is done and has woken the loop, but its task is cancelled before the loop reads
    the wake-up: the task sees its cancellation, not the value; the others their values."""
    pool, workers, _owners = _workers(1 + others)
    gated = [Gated(f"value {i}") for i in range(1 + others)]
    got: dict[int, Any] = {}
    scopes = [anyio.CancelScope() for _ in gated]

    async def await_call(i: int) -> None:
        with scopes[i]:
            got[i] = await workers[i].call(gated[i].call)

    async with anyio.create_task_group() as group:
        for i in range(len(gated)):
            group.start_soon(await_call, i)
        await _until(lambda: all(g.call.state is CallState.RUNNING for g in gated))
        for g in gated:
            g.gate.set()
        _block_loop_until(lambda: all(g.call.returned for g in gated))
        scopes[0].cancel()
    assert scopes[0].cancelled_caught
    assert got == {i: f"value {i}" for i in range(1, len(gated))}
    assert gated[0].call.abandon() is not None  # it had run: its ``left`` is set
    assert gated[0].call.state is CallState.ABANDONED
    assert await workers[0].call(Call(lambda: "next")) == "next"
    for worker in workers:
        pool.release(worker)


async def test_a_task_resumed_first_may_cancel_one_resumed_after_it_in_the_same_batch(
    anyio_backend: str,
) -> None:
    """Two calls done together; the first task to resume cancels the second's scope. The
    second never sees the other's value: on asyncio, whose reader resumes both in one callback,
    it sees its cancellation at once; on trio both were already rescheduled, so it sees its own
    value. Either way the wake-ups go on and both workers serve their next call."""
    pool, workers, _owners = _workers(2)
    first, second = Gated("first"), Gated("second")
    scope = anyio.CancelScope()
    got: dict[str, Any] = {}

    async def await_first() -> None:
        got["first"] = await workers[0].call(first.call)
        scope.cancel()

    async def await_second() -> None:
        with scope:
            got["second"] = await workers[1].call(second.call)

    async with anyio.create_task_group() as group:
        group.start_soon(await_first)
        group.start_soon(await_second)
        await _until(lambda: first.call.state is second.call.state is CallState.RUNNING)
        first.gate.set()  # queued first, so resumed first
        _block_loop_until(lambda: first.call.returned)
        second.gate.set()
        _block_loop_until(lambda: second.call.returned)
    assert got["first"] == "first"
    if anyio_backend == "asyncio":
        assert scope.cancelled_caught
        assert "second" not in got
    else:
        assert got.get("second", "second") == "second"
    assert await workers[0].call(Call(lambda: 0)) == 0
    assert await workers[1].call(Call(lambda: 1)) == 1
    for worker in workers:
        pool.release(worker)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_asyncio_waiter_is_a_future_cancelled_as_any_other() -> None:
    """What anyio's cancel scopes and asyncio's task rely on: a real Future; a cancellation
    wakes the task with CancelledError; a second callback is kept the usual way."""
    from sqlalchemy_threadpool._wakeup import DirectFuture

    loop = asyncio.get_running_loop()
    future = DirectFuture(loop=loop)
    assert isinstance(future, asyncio.Future)
    seen: list[str] = []

    async def wait() -> None:
        await future

    waiting = asyncio.create_task(wait())  # awaiting it registers the task's wake-up
    await asyncio.sleep(0)
    future.add_done_callback(lambda f: seen.append("other callback"))
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert future.cancelled()
    future.resume()  # a late wake-up for it: nothing happens
    await asyncio.sleep(0)
    assert seen == ["other callback"]


def test_a_worker_back_after_its_trio_run_ended_wakes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A call abandoned under concurrency on trio, whose worker comes back only after the run
    ended: its wake-up goes nowhere (the run's eventfd is closed, nothing is written), quietly,
    and the worker serves the next run."""
    trio = pytest.importorskip("trio")
    pool, workers, _owners = _workers(2)
    other, late = Gated("other"), Gated("late")
    got: list[Any] = []

    async def run() -> None:
        async with trio.open_nursery() as nursery:

            async def await_other() -> None:
                got.append(await workers[1].call(other.call))

            nursery.start_soon(await_other)
            while other.call.state is not CallState.RUNNING:
                await trio.sleep(0.001)
            with trio.move_on_after(0.05) as scope:  # two in flight: the run's own wake-ups
                await workers[0].call(late.call)
            assert scope.cancelled_caught
            assert late.call.abandon() is not None  # it runs, blocked on its gate
            other.gate.set()

    caplog.set_level(logging.DEBUG, logger="sqlalchemy_threadpool")
    trio.run(run)
    assert got == ["other"]
    late.gate.set()  # the run is over: its worker comes back now
    assert _wait_until(lambda: late.call.returned)
    assert trio.run(workers[0].call, Call(partial(str, "next run"))) == "next run"
    assert not [r for r in caplog.records if "could not wake" in r.getMessage()]
    for worker in workers:
        pool.release(worker)
