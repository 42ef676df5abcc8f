"""The dedicated worker threads (``offload="worker"``): the thread per admitted session, the
handoff both ways, cancellation, errors, context, idle exit, and the ``"anyio"`` alternative."""

from __future__ import annotations

import errno
import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from helpers import Overlap, user_names
from models import Base, User
from sqlalchemy_threadpool import (
    ConfigurationError,
    TransactionInterruptedError,
    WorkerPool,
    _call,
    _wakeup,
    allow_blocking,
    shutdown,
    threadpool_session,
    threadpool_sessionmaker,
)
from sqlalchemy_threadpool._call import Call, CallState
from sqlalchemy_threadpool._guard import _allowed

pytestmark = pytest.mark.anyio

#: A short idle timeout, so the idle-exit tests end quickly; long enough that a thread is
#: still there between two calls of one test.
SHORT_IDLE = 0.2
#: An idle timeout no test waits for: threads stay between the sessions of a test.
LONG_IDLE = 60.0
#: Generous bound for "eventually" (a thread exits, a flag is set): never reached when it works.
EVENTUALLY = 20.0

probe: ContextVar[str] = ContextVar("probe", default="unset")


class Owner:
    """What a worker is lent to (a session's offloader, in the library)."""


def _thread_named(ident: int) -> threading.Thread | None:
    return next((t for t in threading.enumerate() if t.ident == ident), None)


def _wait_until(predicate: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + EVENTUALLY
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """A SQLite file engine with the test tables: the worker mechanics need no server."""
    eng = create_engine(f"sqlite:///{tmp_path}/worker.db", pool_size=5, max_overflow=0)
    Base.metadata.create_all(eng)
    try:
        yield eng
    finally:
        eng.dispose()


# -- the option ------------------------------------------------------------------------------


async def test_worker_is_the_default_and_anyio_stays_selectable(sqlite_engine: Engine) -> None:
    assert threadpool_sessionmaker(sqlite_engine).offload == "worker"
    maker = threadpool_sessionmaker(sqlite_engine, offload="anyio")
    assert "offload='anyio'" in repr(maker)
    async with maker() as sess:
        name = await sess.run(lambda s: threading.current_thread().name)
    assert not name.startswith("sqlalchemy-threadpool-worker")
    async with threadpool_sessionmaker(sqlite_engine)() as sess:
        name = await sess.run(lambda s: threading.current_thread().name)
    assert name.startswith("sqlalchemy-threadpool-worker")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"offload": "threads"}, "offload must be 'worker' or 'anyio'"),
        ({"worker_idle_timeout": 0}, "worker_idle_timeout must be a positive number"),
        ({"worker_idle_timeout": -1.0}, "worker_idle_timeout must be a positive number"),
    ],
)
async def test_bad_offload_options_are_refused(
    sqlite_engine: Engine, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        threadpool_sessionmaker(sqlite_engine, **kwargs)


# -- one thread per admitted session -----------------------------------------------------------


async def test_a_transaction_runs_on_one_dedicated_thread(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    loop_thread = threading.get_ident()
    async with threadpool_session(maker) as sess:
        first = await sess.run(lambda s: threading.get_ident())
        sess.add(User(name="ada"))
        await sess.flush()
        seen = [await sess.run(lambda s: threading.get_ident()) for _ in range(5)]
        await sess.scalar(select(User).where(User.name == "ada"))
        seen.append(await sess.run(lambda s: threading.get_ident()))
    assert first != loop_thread
    assert set(seen) == {first}
    assert user_names(engine) == {"ada"}


async def test_the_thread_goes_back_to_the_pool_and_is_reused(sqlite_engine: Engine) -> None:
    maker = threadpool_sessionmaker(sqlite_engine, workers=WorkerPool(LONG_IDLE))
    idents = []
    for _ in range(5):
        async with threadpool_session(maker) as sess:
            idents.append(await sess.run(lambda s: threading.get_ident()))
            await sess.execute(text("SELECT 1"))
    assert len(set(idents)) == 1  # sequential sessions: one thread served them all


async def test_a_session_outside_a_transaction_holds_no_thread(sqlite_engine: Engine) -> None:
    pool = WorkerPool(LONG_IDLE)
    maker = threadpool_sessionmaker(sqlite_engine, workers=pool)
    async with maker() as sess:
        await sess.run(lambda s: None)  # no transaction: admitted and released again
        assert pool.idle == 1
        await sess.execute(text("SELECT 1"))  # a transaction: the thread stays lent
        assert pool.idle == 0
        await sess.commit()
        assert pool.idle == 1


async def test_concurrent_tasks_sharing_a_session_take_turns_on_its_thread(
    sqlite_engine: Engine,
) -> None:
    maker = threadpool_sessionmaker(sqlite_engine)
    overlap = Overlap()
    idents: set[int] = set()

    def work(s: Session) -> None:
        with overlap.inside():
            idents.add(threading.get_ident())
            s.execute(text("SELECT 1"))
            time.sleep(0.001)

    async with threadpool_session(maker) as sess:
        await sess.execute(text("SELECT 1"))
        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(sess.run, work)
    assert overlap.calls == 8
    assert overlap.peak == 1
    assert len(idents) == 1


async def test_many_sessions_at_once_use_no_more_threads_than_the_limiter(
    sqlite_engine: Engine,
) -> None:
    maker = threadpool_sessionmaker(sqlite_engine, workers=WorkerPool(LONG_IDLE))
    assert maker.limiter.total_tokens == 5
    overlap = Overlap()
    idents: set[int] = set()

    def work(s: Session, i: int) -> int:
        with overlap.inside():
            idents.add(threading.get_ident())
            time.sleep(0.002)
            value: int = s.execute(text("SELECT :i"), {"i": i}).scalar_one()
            return value

    results: dict[int, list[int]] = {}

    async def client(i: int) -> None:
        async with threadpool_session(maker) as sess:
            results[i] = [await sess.run(work, i) for _ in range(3)]

    async with anyio.create_task_group() as group:
        for i in range(40):
            group.start_soon(client, i)
    assert results == {i: [i, i, i] for i in range(40)}
    assert overlap.peak <= 5
    assert len(idents) <= 5


# -- the handoff: errors, context ------------------------------------------------------------


class Boom(Exception):
    pass


class Fatal(BaseException):
    pass


async def test_the_workers_exception_reaches_the_caller_unchanged(sqlite_engine: Engine) -> None:
    maker = threadpool_sessionmaker(sqlite_engine)
    raised: list[BaseException] = []

    def fail(s: Session) -> None:
        raised.append(Boom("from the worker"))
        raise raised[-1]

    async with maker() as sess:
        with pytest.raises(Boom) as caught:
            await sess.run(fail)
        assert caught.value is raised[0]
        sess.add_all([User(name="ada"), User(name="ada")])
        with pytest.raises(IntegrityError):
            await sess.flush()
        await sess.rollback()
        assert await sess.run(lambda s: 42) == 42  # the thread survived both


async def test_a_base_exception_passes_through_and_the_thread_survives(
    sqlite_engine: Engine,
) -> None:
    maker = threadpool_sessionmaker(sqlite_engine)
    fatal = Fatal()

    def die(s: Session) -> None:
        s.execute(text("SELECT 1"))
        raise fatal

    async with maker() as sess:
        with pytest.raises(Fatal) as caught:
            await sess.run(die)
        assert caught.value is fatal
        with pytest.raises(TransactionInterruptedError):  # connection state unknown: failed
            await sess.run(lambda s: None)
        await sess.rollback()
        assert await sess.run(lambda s: s.execute(text("SELECT 7")).scalar_one()) == 7


async def test_context_is_copied_into_the_worker_for_every_call(sqlite_engine: Engine) -> None:
    maker = threadpool_sessionmaker(sqlite_engine)

    def read_and_change(s: Session) -> str:
        value = probe.get()
        probe.set("changed in the worker")
        return value

    async with threadpool_session(maker) as sess:
        await sess.execute(text("SELECT 1"))  # admitted: the same thread from here on
        token = probe.set("first")
        assert await sess.run(read_and_change) == "first"
        assert probe.get() == "first"  # changes made in the worker do not come back
        probe.set("second")  # set between two calls on the same thread: seen by the next
        assert await sess.run(read_and_change) == "second"
        probe.reset(token)
        assert not await sess.run(lambda s: _allowed.get())
        with allow_blocking():  # the guard's escape hatch is a ContextVar: it must be seen
            assert await sess.run(lambda s: _allowed.get())
        assert not await sess.run(lambda s: _allowed.get())


# -- cancellation ----------------------------------------------------------------------------


async def test_a_call_cancelled_before_it_starts_never_runs(sqlite_engine: Engine) -> None:
    maker = threadpool_sessionmaker(sqlite_engine)
    ran: list[str] = []
    async with maker() as sess:
        await sess.execute(text("SELECT 1"))
        with anyio.CancelScope() as scope:
            scope.cancel()
            await sess.run(lambda s: ran.append("ran"))
        assert scope.cancelled_caught
        assert await sess.run(lambda s: 1) == 1  # not failed: nothing had started
    assert ran == []


async def test_a_queued_job_abandoned_before_the_thread_takes_it_never_runs() -> None:
    """The handoff over a busy thread: the start/abandon decision holds on the worker path."""
    pool, owner = WorkerPool(SHORT_IDLE), Owner()
    worker = pool.acquire(owner)
    release, ran = threading.Event(), []
    first = Call(lambda: release.wait(EVENTUALLY))
    second = Call(lambda: ran.append("second"))
    async with anyio.create_task_group() as group:
        group.start_soon(worker.call, first)
        assert await anyio.to_thread.run_sync(
            _wait_until, lambda: first.state is CallState.RUNNING
        )
        with anyio.move_on_after(0.05) as scope:
            await worker.call(second)  # queued behind ``first``
        assert scope.cancelled_caught
        assert second.abandon() is None  # had not started, and now never will
        release.set()
    assert await worker.call(Call(lambda: "later")) == "later"  # it skipped ``second``
    assert ran == []
    assert first.state is CallState.DONE
    assert second.state is CallState.ABANDONED
    pool.release(worker)


async def test_cancellation_wakes_the_caller_without_waiting_for_the_thread() -> None:
    pool, owner = WorkerPool(SHORT_IDLE), Owner()
    worker = pool.acquire(owner)
    release, left = threading.Event(), threading.Event()

    def blocked() -> None:
        release.wait(EVENTUALLY)
        left.set()

    with anyio.move_on_after(0.05) as scope:
        await worker.call(Call(blocked))
    assert scope.cancelled_caught
    assert not left.is_set()  # the caller is back while the thread is still inside
    release.set()
    assert await anyio.to_thread.run_sync(left.wait, EVENTUALLY)
    assert await worker.call(Call(lambda: "next")) == "next"
    pool.release(worker)


async def test_a_started_call_is_waited_for_then_the_unit_of_work_fails(
    sqlite_engine: Engine,
) -> None:
    maker = threadpool_sessionmaker(sqlite_engine, cancel_statements=False)
    started, release, left = threading.Event(), threading.Event(), threading.Event()

    def slow(s: Session) -> None:
        s.execute(text("SELECT 1"))
        started.set()
        release.wait(EVENTUALLY)
        left.set()

    async def cancel_once_started(scope: anyio.CancelScope) -> None:
        assert await anyio.to_thread.run_sync(started.wait, EVENTUALLY)
        scope.cancel()
        await anyio.sleep(0.2)  # the awaiting task is still waiting for the worker
        release.set()

    async with maker() as sess:
        async with anyio.create_task_group() as group:
            with anyio.CancelScope() as scope:
                group.start_soon(cancel_once_started, scope)
                await sess.run(slow)
        assert scope.cancelled_caught
        assert left.is_set()  # the cancellation propagated only once the worker had left
        assert not sess.in_transaction()  # rolled back
        with pytest.raises(TransactionInterruptedError):
            await sess.run(lambda s: None)
        await sess.rollback()
        assert await sess.run(lambda s: 3) == 3


# -- thread lifetime -------------------------------------------------------------------------


async def test_idle_threads_exit_and_no_thread_is_left(sqlite_engine: Engine) -> None:
    before = threading.active_count()
    maker = threadpool_sessionmaker(sqlite_engine, workers=WorkerPool(SHORT_IDLE))
    idents: set[int] = set()

    async def client() -> None:
        async with threadpool_session(maker) as sess:
            idents.add(await sess.run(lambda s: threading.get_ident()))
            await sess.execute(text("SELECT 1"))
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(client)
    assert idents
    assert await anyio.to_thread.run_sync(
        _wait_until, lambda: all(_thread_named(i) is None for i in idents)
    )
    assert await anyio.to_thread.run_sync(
        _wait_until,
        lambda: threading.active_count() <= before + 1,  # + anyio's helper
    )


async def test_shutdown_makes_idle_threads_exit_at_once(sqlite_engine: Engine) -> None:
    """Not after their idle timeout (a minute here, far beyond EVENTUALLY)."""
    maker = threadpool_sessionmaker(sqlite_engine, workers=WorkerPool(LONG_IDLE))
    idents: set[int] = set()

    async def client() -> None:
        async with threadpool_session(maker) as sess:
            idents.add(await sess.run(lambda s: threading.get_ident()))
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as group:
        for _ in range(3):
            group.start_soon(client)
    assert all(_thread_named(i) is not None for i in idents)  # idle in the pool
    await shutdown(maker)
    assert await anyio.to_thread.run_sync(
        _wait_until, lambda: all(_thread_named(i) is None for i in idents)
    )
    names = {t.name for t in threading.enumerate()}
    async with threadpool_session(maker) as sess:  # a new thread starts on demand
        assert await sess.run(lambda s: threading.current_thread().name) not in names


async def test_a_thread_lent_to_a_lost_session_exits(sqlite_engine: Engine) -> None:
    pool = WorkerPool(SHORT_IDLE)
    maker = threadpool_sessionmaker(sqlite_engine, workers=pool)
    sess = maker()
    await sess.run(lambda s: s.begin())  # a transaction, no connection: stays admitted
    assert sess.in_transaction()
    ident = await sess.run(lambda s: threading.get_ident())
    thread = _thread_named(ident)
    assert thread is not None
    # Never closed, so the thread is not given back (and the maker's limiter keeps its token
    # holder alive: a lost session is only collected with its maker).
    del sess, maker
    gc.collect()
    await anyio.to_thread.run_sync(thread.join, EVENTUALLY)
    assert not thread.is_alive()
    assert pool.idle == 0


class _RetireAfterStopIdle:
    """A pool's lock that drives one interleaving of ``stop_idle()`` and a retiring thread.

    The worker thread may take the lock only after ``stop_idle()`` has let go of it, and
    ``stop_idle()`` goes on only once that thread has exited, closed its eventfd and a file of
    the test has taken the freed descriptor number: a write the pool still makes to the
    thread's eventfd after letting go of the lock lands in that file.
    """

    def __init__(self, tmp_path: Path) -> None:
        self._lock = threading.Lock()
        self._stopper: int | None = None  # the thread calling stop_idle(), once armed
        self._released = threading.Event()
        self._victim_path = tmp_path / "victim"
        self.worker: _call.Worker | None = None
        self.victim: int | None = None  # the file's descriptor: the thread's old eventfd

    def arm(self) -> None:
        self._stopper = threading.get_ident()

    def __enter__(self) -> None:
        worker = self.worker
        if worker is not None and threading.current_thread() is worker.thread:
            assert self._released.wait(EVENTUALLY)  # retire() only after stop_idle() let go
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        if self._stopper != threading.get_ident():
            return
        self._stopper = None
        self._released.set()
        worker = self.worker
        assert worker is not None
        freed = worker._wake_fd
        worker.thread.join(EVENTUALLY)
        assert not worker.thread.is_alive()
        opened = []
        for _ in range(64):  # the lowest free number is normally the one just freed
            fd = os.open(self._victim_path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
            if fd == freed:
                self.victim = fd
                break
            opened.append(fd)
        for fd in opened:
            os.close(fd)
        assert self.victim is not None, "could not reuse the worker's eventfd number"

    def stray_bytes(self) -> int:
        return self._victim_path.stat().st_size


@pytest.mark.skipif(not _wakeup.EVENTFD, reason="needs eventfd (Linux)")
def test_stop_idle_never_writes_to_the_eventfd_of_a_thread_that_retired(tmp_path: Path) -> None:
    """A thread at its idle timeout while stop_idle() runs: stopped or retired, never both."""
    pool, owner = WorkerPool(0.05), Owner()
    lock = _RetireAfterStopIdle(tmp_path)
    pool._lock = lock  # type: ignore[assignment]
    worker = pool.acquire(owner)
    lock.worker = worker
    pool.release(worker)
    lock.arm()
    try:
        stopped = pool.stop_idle()
    finally:
        if lock.victim is not None:
            os.close(lock.victim)
    assert stopped == 1
    assert lock.stray_bytes() == 0  # nothing was written to the file that reused the number
    assert pool.idle == 0


@pytest.mark.skipif(_wakeup.write_keeping_gil is None, reason="needs eventfd and libc (Linux)")
def test_the_libc_eventfd_calls_raise_on_a_bad_descriptor() -> None:
    write, read = _wakeup.write_keeping_gil, _wakeup.read_eventfd
    assert write is not None
    for call in (write, read):
        with pytest.raises(OSError, match="Bad file descriptor") as caught:
            call(-1)
        assert caught.value.errno == errno.EBADF
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        read(fd)  # nothing to read (EAGAIN): already reset, not an error
        write(fd)
        write(fd)
        assert os.eventfd_read(fd) == 2
        write(fd)
        read(fd)
        with pytest.raises(BlockingIOError):  # the read reset the counter
            os.eventfd_read(fd)
    finally:
        os.close(fd)


_PORTABLE_WAKEUPS = """
import sys, threading, anyio
from sqlalchemy import create_engine, text
from sqlalchemy_threadpool import threadpool_sessionmaker, _wakeup, _worker_pool
from sqlalchemy_threadpool._call import Call

assert not _wakeup.EVENTFD
engine = create_engine(sys.argv[1])


async def main() -> None:
    async with threadpool_sessionmaker(engine)() as sess:
        assert await sess.run(lambda s: s.execute(text("SELECT 5")).scalar_one()) == 5
        try:
            await sess.run(lambda s: 1 / 0)
        except ZeroDivisionError:
            pass
        else:
            raise AssertionError("no error")
    worker = _worker_pool.WorkerPool(1.0).acquire(engine)
    release = threading.Event()
    with anyio.move_on_after(0.05) as scope:
        await worker.call(Call(lambda: release.wait(20)))
    assert scope.cancelled_caught and not release.is_set()
    release.set()
    assert await worker.call(Call(lambda: "next")) == "next"


for backend in ("asyncio", "trio"):
    anyio.run(main, backend=backend)
print("ok")
"""


def test_the_portable_wakeups_work_where_eventfd_is_missing(tmp_path: Path) -> None:
    """Without eventfd (or with SATP_WORKER_EVENTFD=0): call_soon_threadsafe / run_sync_soon."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SATP_WORKER_EVENTFD": "0"}
    done = subprocess.run(
        [sys.executable, "-c", _PORTABLE_WAKEUPS, f"sqlite:///{tmp_path}/portable.db"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- the GIL on the event-loop thread --------------------------------------------------------


class _Spinner:
    """A thread that counts in pure Python. With a long switch interval it gets the GIL only
    when the thread under test releases it (or after that interval: see ``_advance``)."""

    INTERVAL = 0.2

    def __init__(self) -> None:
        self.count = 0
        self.stop = False
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        while not self.stop:
            self.count += 1

    def __enter__(self) -> _Spinner:
        self.interval = sys.getswitchinterval()
        self.thread.start()
        while self.count == 0:
            time.sleep(0.001)
        sys.setswitchinterval(self.INTERVAL)
        time.sleep(0.001)  # hand it the GIL once: it now waits for it with the long interval
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setswitchinterval(self.interval)
        self.stop = True
        self.thread.join()

    def advance(self, calls: Callable[[], None], times: int) -> int | None:
        """How far the spinner counted while ``calls`` ran ``times`` times (stopping once it
        moved); ``None`` when that took so long that the interpreter may have forced a switch
        (then the try says nothing)."""
        before, start = self.count, time.perf_counter()
        for _ in range(times):
            calls()
            if self.count != before:
                break
        if time.perf_counter() - start > self.INTERVAL / 4:
            return None
        return self.count - before


@pytest.mark.skipif(_wakeup.write_keeping_gil is None, reason="needs eventfd and libc (Linux)")
def test_waking_a_worker_while_others_are_busy_keeps_the_gil() -> None:
    """The loop thread's wake-ups under concurrency do not give the GIL to busy workers."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    write, read = _wakeup.write_keeping_gil, _wakeup.read_eventfd
    assert write is not None

    def keeping() -> None:
        write(fd)
        read(fd)

    def releasing() -> None:  # the control: os's syscalls release the GIL
        os.eventfd_write(fd, 1)
        os.eventfd_read(fd)

    try:
        with _Spinner() as spinner:
            kept = [spinner.advance(keeping, 2_000) for _ in range(5)]
            released = [spinner.advance(releasing, 2_000) for _ in range(5)]
    finally:
        os.close(fd)
    # (Another thread of the test run waking up may force a switch now and then: one clean try
    # suffices for "keeps"; releasing the GIL 2,000 times five times over is always noticed.)
    assert 0 in kept, kept
    assert any(n != 0 for n in released), released  # it ran, or we waited to get it back


@pytest.mark.skipif(_wakeup.write_keeping_gil is None, reason="needs eventfd and libc (Linux)")
async def test_only_a_lone_call_hands_the_gil_over_with_its_wake_up(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call alone in flight wakes its worker with a GIL-releasing write (the fast lone hop);
    with several in flight the loop thread keeps the GIL (``_wakeup`` docstring)."""
    loop_thread = threading.get_ident()
    releasing: list[int] = []
    keeping: list[int] = []
    os_write, keep_write = os.eventfd_write, _wakeup.write_keeping_gil
    assert keep_write is not None

    def spy_os_write(fd: int, value: int) -> None:
        if threading.get_ident() == loop_thread:  # (workers write too: to wake the loop)
            releasing.append(len(_wakeup.in_flight))
        os_write(fd, value)

    def spy_keep_write(fd: int) -> None:
        keeping.append(len(_wakeup.in_flight))
        keep_write(fd)

    monkeypatch.setattr(os, "eventfd_write", spy_os_write)
    monkeypatch.setattr(_wakeup, "write_keeping_gil", spy_keep_write)
    maker = threadpool_sessionmaker(sqlite_engine, worker_idle_timeout=LONG_IDLE)
    async with maker() as sess:
        for _ in range(5):
            await sess.run(lambda s: s.execute(select(1)).scalar())
    assert releasing
    assert set(releasing) == {1}
    assert keeping == []
    releasing.clear()
    gate = threading.Barrier(4)

    async def one() -> None:
        async with maker() as sess:
            await sess.run(lambda s: gate.wait(EVENTUALLY))  # all four in flight at once

    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(one)
    assert len(keeping) >= 3  # every wake-up but the first had others in flight
    assert all(n > 1 for n in keeping)
    assert all(n == 1 for n in releasing)
    await shutdown(maker)
