"""``shutdown()``, and programs that end with a statement in flight.

In process: ``shutdown(maker)`` cancels the statements in flight of every session on the
engine (their tasks see :class:`TransactionInterruptedError`), rolls back idle transactions and
disposes the engine, leaving no backend on the server. In a subprocess
(``tests/scripts/inflight.py``): a program whose main returns, or that gets SIGINT, or that
calls ``shutdown()``, with a 30 s statement in flight, exits well before the statement would
end and leaves no backend behind.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool, QueuePool

from helpers import checked_out, slow_statement, user_names
from models import User
from sqlalchemy_threadpool import (
    TransactionInterruptedError,
    shutdown,
    threadpool_session,
    threadpool_sessionmaker,
)
from sqlalchemy_threadpool._admission import admitted_offloaders

_SELECTED = [
    name.strip() for name in os.environ.get("SATP_TEST_DATABASES", "").split(",") if name.strip()
]
SERVER_KINDS = [k for k in ("postgresql", "mysql") if not _SELECTED or k in _SELECTED]
SCRIPT = Path(__file__).parent / "scripts" / "inflight.py"
#: "Promptly": far below the 30 s the statement would take.
PROMPT_S = 10.0


def other_backends(url: str) -> list[str]:
    """What else is connected to ``url``'s database right now (empty for SQLite)."""
    if url.startswith("sqlite"):
        return []
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                query = (
                    "SELECT state || ': ' || query FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            else:
                query = (
                    "SELECT concat(command, ': ', coalesce(info, '')) "
                    "FROM information_schema.processlist "
                    "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
                )
            return list(conn.scalars(text(query)))
    finally:
        engine.dispose()


def backend_alive(url: str, backend: int) -> bool:
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                query = "SELECT count(*) FROM pg_stat_activity WHERE pid = :id"
            else:
                query = "SELECT count(*) FROM information_schema.processlist WHERE id = :id"
            return bool(conn.scalar(text(query), {"id": backend}))
    finally:
        engine.dispose()


def wait_until(predicate: object, seconds: float) -> bool:
    """Poll ``predicate()`` until it is true or ``seconds`` passed; return its last value."""
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# -- in process ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_shutdown_stops_statements_in_flight_and_disposes(
    engine: Engine, dialect_name: str, db_url: str
) -> None:
    maker = threadpool_sessionmaker(engine)
    tasks = 3
    started = [threading.Event() for _ in range(tasks)]
    outcomes: dict[int, BaseException | str] = {}

    async def request(i: int) -> None:
        def work(session: Session) -> None:
            started[i].set()
            session.execute(slow_statement(dialect_name, 30))

        try:
            async with threadpool_session(maker) as sess:
                if i == 0:  # one writer (SQLite allows no more), whose row must vanish
                    sess.add(User(name="in-flight"))
                    await sess.flush()
                await sess.run(work)
            outcomes[i] = "returned"
        except Exception as exc:
            outcomes[i] = exc

    old_pool = engine.pool
    async with anyio.create_task_group() as group:
        for i in range(tasks):
            group.start_soon(request, i)
        with anyio.fail_after(PROMPT_S):
            while not all(event.is_set() for event in started):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await anyio.sleep(0.3)  # the statements are on the server now
        begun = anyio.current_time()
        await shutdown(maker, timeout=PROMPT_S)
        elapsed = anyio.current_time() - begun
    assert elapsed < PROMPT_S
    assert all(isinstance(outcomes[i], TransactionInterruptedError) for i in range(tasks)), (
        outcomes
    )
    assert engine.pool is not old_pool  # disposed: a fresh pool replaced the old one
    assert isinstance(old_pool, QueuePool)
    assert old_pool.checkedout() == 0
    assert maker.limiter.borrowed_tokens == 0
    assert admitted_offloaders(engine) == []
    assert wait_until(lambda: not other_backends(db_url), 5), other_backends(db_url)
    assert user_names(engine) == set()


@pytest.mark.anyio
async def test_shutdown_rolls_back_an_idle_transaction(engine: Engine, db_url: str) -> None:
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        sess.add(User(name="never-committed"))
        await sess.flush()  # holds a transaction and its connection, doing nothing

        await shutdown(maker, timeout=PROMPT_S)

        assert checked_out(engine) == 0
        assert wait_until(lambda: not other_backends(db_url), 5), other_backends(db_url)
        with pytest.raises(TransactionInterruptedError):
            await sess.execute(text("SELECT 1"))
        await sess.rollback()  # acknowledges it: the session is usable again
        sess.add(User(name="after-shutdown"))
    assert user_names(engine) == {"after-shutdown"}
    assert checked_out(engine) == 0


@pytest.mark.anyio
@pytest.mark.parametrize("db_url", SERVER_KINDS, indirect=True)
async def test_shutdown_severs_a_statement_it_may_not_cancel(
    engine: Engine, dialect_name: str, db_url: str
) -> None:
    """With ``cancel_statements=False`` shutdown() still ends in bounded time: at half its
    timeout it cuts the connection the statement runs on."""
    maker = threadpool_sessionmaker(engine, cancel_statements=False)
    started = threading.Event()
    outcome: list[BaseException] = []

    def work(session: Session) -> None:
        started.set()
        session.execute(slow_statement(dialect_name, 30))

    async def request() -> None:
        try:
            async with threadpool_session(maker) as sess:
                await sess.run(work)
        except Exception as exc:
            outcome.append(exc)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(request)
            with anyio.fail_after(PROMPT_S):
                while not started.is_set():  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            await anyio.sleep(0.3)  # the statement is on the server now
            begun = anyio.current_time()
            await shutdown(maker, timeout=2)
        elapsed = anyio.current_time() - begun
        assert elapsed < PROMPT_S
        assert len(outcome) == 1
        assert isinstance(outcome[0], TransactionInterruptedError), outcome
        assert checked_out(engine) == 0
        assert admitted_offloaders(engine) == []
    finally:
        _stop_sleepers(db_url)  # the server was never asked to stop it: do it now


def _stop_sleepers(url: str) -> None:
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                        "datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
                return
            ids = conn.scalars(
                text(
                    "SELECT id FROM information_schema.processlist "
                    "WHERE db = DATABASE() AND id <> CONNECTION_ID() AND command = 'Query'"
                )
            ).all()
            for backend in ids:
                conn.execute(text(f"KILL QUERY {int(backend)}"))
    finally:
        engine.dispose()


# -- subprocesses -------------------------------------------------------------------------


def _reader(stream: object, lines: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)


@pytest.mark.parametrize("db_url", SERVER_KINDS, indirect=True)
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@pytest.mark.parametrize("mode", ["return", "sigint", "shutdown"])
def test_program_ending_with_a_statement_in_flight_exits_promptly(
    db_url: str, loop: str, mode: str
) -> None:
    with subprocess.Popen(
        [sys.executable, str(SCRIPT), db_url, loop, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=_reader, args=(process.stdout, lines), daemon=True)
        reader.start()
        output: list[str] = []
        try:
            backend = None
            deadline = time.monotonic() + PROMPT_S
            while backend is None:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    pytest.fail(f"the script never started its statement:\n{''.join(output)}")
                output.append(line)
                if line.startswith("RUNNING "):
                    backend = int(line.split()[1])
            begun = time.monotonic()
            if mode == "sigint":
                time.sleep(0.3)  # the statement is on the server now
                process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=PROMPT_S)
            elapsed = time.monotonic() - begun
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(PROMPT_S)
    while not lines.empty():
        output.append(lines.get())
    text_out = "".join(output)
    assert elapsed < PROMPT_S, text_out
    assert "FINISHED" not in text_out  # the statement was stopped, not waited for
    expected = {"return": "EXITING", "sigint": "INTERRUPTED", "shutdown": "STOPPED BY SHUTDOWN"}
    assert expected[mode] in text_out, text_out
    assert returncode == (130 if mode == "sigint" else 0), text_out
    assert wait_until(lambda: not backend_alive(db_url, backend), 5), (
        f"backend {backend} is still on the server"
    )
