"""The example apps under real servers, each in a subprocess (the scripts: test_examples.py).

Each app is served on 127.0.0.1 (a free port) by uvicorn, and the Starlette app also by
Hypercorn with its trio worker, against PostgreSQL (and the Starlette app against SQLite under
both servers). One load run sends a few hundred concurrent requests through httpx:

- fresh notes (201), whose writes must all be in the database afterwards;
- "spam" notes, which the app flushes and then refuses (422): their writes must be absent;
- pairs of requests racing for one new key: exactly one gets its 201 and its text is stored,
  the other fails at commit (unique violation) and gets a 500;
- re-posts of existing keys, which fail at commit: 500, and the stored text is unchanged;

then reads the notes back through the app's streaming endpoint and checks, through
``/health``, that the app's pool has no connection checked out. The numbers (requests,
failures, wall time) are printed per framework and server (``pytest -rP`` shows them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy import create_engine, make_url
from sqlalchemy import text as sql
from sqlalchemy.pool import NullPool

from conftest import SELECTED_DATABASES
from webhelpers import EXAMPLES, drop_web_tables


@dataclass(frozen=True)
class Load:
    fresh: int  # new keys: 201
    spam: int  # flushed, then refused: 422
    races: int  # pairs of requests for one new key: one 201, one 500
    reposts: int  # existing keys again: 500

    @property
    def requests(self) -> int:
        return self.fresh + self.spam + 2 * self.races + self.reposts


# The full load on PostgreSQL (the target); a lighter one on SQLite, whose writers
# queue for one file lock, keeps the whole module within its time budget.
LOADS = {"postgresql": Load(150, 30, 50, 20), "sqlite": Load(60, 10, 20, 10)}

STARTUP_TIMEOUT_S = 20
LOAD_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10


@dataclass(frozen=True)
class Server:
    name: str  # for ids and the report
    example: str  # the module in examples/
    command: tuple[str, ...]  # {app} and {port} are filled in
    client_backend: str  # the event loop the load driver runs on


# A burst of new connections fits the listen backlog, and a connection the client keeps for
# its next request is not closed under it (the servers' 5 s idle default races with a client
# that a loaded machine slows down: the request then fails without reaching the app).
UVICORN = (
    *("-m", "uvicorn", "{app}", "--host", "127.0.0.1", "--port", "{port}", "--no-access-log"),
    *("--backlog", "1024", "--timeout-keep-alive", "75"),
)

SERVERS = [
    Server(
        "fastapi-uvicorn",
        "fastapi_app",
        UVICORN,
        "asyncio",
    ),
    Server(
        "starlette-uvicorn",
        "starlette_app",
        UVICORN,
        "asyncio",
    ),
    Server(
        "starlette-hypercorn-trio",
        "starlette_app",
        # -w 0: serve in this process (no worker processes to track).
        (
            *("-m", "hypercorn", "{app}", "-k", "trio", "-w", "0", "-b", "127.0.0.1:{port}"),
            *("--backlog", "1024", "--keep-alive", "75"),
        ),
        "trio",
    ),
    Server(
        "litestar-uvicorn",
        "litestar_app",
        UVICORN,
        "asyncio",
    ),
]

SERVER_DATABASES = [name for name in ("postgresql", "sqlite") if name in SELECTED_DATABASES]

# Every app and server on PostgreSQL; on SQLite, the middleware under both server families
# (FastAPI and Litestar on SQLite run in process in test_fastapi.py and test_litestar.py).
# This keeps the module within about a minute on a busy two-core machine.
RUNS = [
    pytest.param(server, database, id=f"{server.name}-{database}")
    for server in SERVERS
    for database in SERVER_DATABASES
    if database == "postgresql" or server.example == "starlette_app"
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RunningServer:
    """An example app served in a subprocess of its own process group."""

    def __init__(self, server: Server, db_url: str, log_path: Path) -> None:
        self.port = free_port()
        args = [arg.format(app=f"{server.example}:app", port=self.port) for arg in server.command]
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = {**os.environ, "DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, *args],
            cwd=EXAMPLES,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown can stop all of it
        )
        self.base_url = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"the server did not answer within {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def stop(self) -> int | None:
        """SIGTERM (a graceful shutdown runs the lifespan), then SIGKILL; the exit code.

        ``None`` if it had to be killed; uvicorn re-raises the SIGTERM it handled, so a clean
        exit is 0 or -SIGTERM.
        """
        pgid = self.process.pid  # start_new_session: the group id is the process id
        try:
            if self.process.poll() is None:
                os.killpg(pgid, signal.SIGTERM)
                try:
                    return self.process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(pgid, signal.SIGKILL)
                    self.process.wait(STOP_TIMEOUT_S)
                    return None
            return self.process.returncode
        finally:
            self._log.close()


@pytest.fixture
def running(server: Server, db_url: str, tmp_path: Path) -> Iterator[RunningServer]:
    drop_web_tables(db_url)
    proc = RunningServer(server, db_url, tmp_path / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        code = proc.stop()
    assert code in (0, -signal.SIGTERM), f"no clean shutdown ({code}):\n{proc.log()}"


def stored_notes(db_url: str) -> dict[str, str]:
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sql("SELECT key, text FROM satp_web_note"))
            return {key: value for key, value in rows}
    finally:
        engine.dispose()


@dataclass
class LoadResult:
    requests: int
    statuses: Counter[int]
    seconds: float


async def post_all(
    client: httpx.AsyncClient, notes: list[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """POST every note at once; the status of each (-1: no response, a transport error)."""
    statuses: dict[tuple[str, str], int] = {}

    async def post(key: str, text: str) -> None:
        try:
            response = await client.post("/notes", json={"key": key, "text": text})
        except httpx.TransportError:
            statuses[key, text] = -1
            return
        statuses[key, text] = response.status_code

    async with anyio.create_task_group() as tg:
        for key, text in notes:
            tg.start_soon(post, key, text)
    return statuses


async def checked_out_when_idle(client: httpx.AsyncClient) -> object:
    """The app's ``pool_checked_out`` once it is idle.

    The middleware closes a session (returning its connection) right *after* the last body
    chunk went out, so the client may ask before the previous request's close has finished:
    ask again for a little while. A leaked connection stays checked out and fails the test.
    """
    with anyio.move_on_after(5):
        for _ in range(100):  # polling the server: there is no event to wait for
            health = (await client.get("/health")).json()
            if health["pool_checked_out"] == 0:
                break
            await anyio.sleep(0.05)
    return health["pool_checked_out"]


async def drive(base_url: str, db_url: str, load: Load) -> LoadResult:
    fresh = [(f"k{i}", f"text {i}") for i in range(load.fresh)]
    spam = [(f"s{i}", f"spam {i}") for i in range(load.spam)]
    races = [(f"r{i}", f"{side} {i}") for i in range(load.races) for side in ("left", "right")]
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=20) as client:
        with anyio.fail_after(LOAD_TIMEOUT_S):
            first = await post_all(client, fresh + spam + races)
            reposts = [(key, f"again {key}") for key, _ in fresh[: load.reposts]]
            second = await post_all(client, reposts)
            listing = (await client.get("/notes")).text
            pool_checked_out = await checked_out_when_idle(client)
    seconds = time.perf_counter() - started
    stored = stored_notes(db_url)

    # Every acknowledged write is there; every failed request's write is not.
    for key, text in fresh:
        assert first[key, text] == 201, (key, first[key, text])
        assert stored[key] == text
    for key, text in spam:
        assert first[key, text] == 422
        assert key not in stored
    for i in range(load.races):
        key = f"r{i}"
        outcome = {text: first[k, text] for k, text in races if k == key}
        assert sorted(outcome.values()) == [201, 500], (key, outcome)
        assert stored[key] == next(t for t, status in outcome.items() if status == 201)
    for key, text in reposts:
        assert second[key, text] == 500  # failed at commit: never the 201
        assert stored[key] != text
    assert len(stored) == load.fresh + load.races

    # The app reads them all back (streamed), and no connection is left checked out.
    lines = [line for line in listing.splitlines() if not line.startswith("#")]
    assert len(lines) == load.fresh + load.races
    assert pool_checked_out == 0

    statuses = Counter([*first.values(), *second.values()])
    return LoadResult(len(first) + len(second), statuses, seconds)


@pytest.mark.parametrize(("server", "db_url"), RUNS, indirect=["db_url"])
def test_example_app_under_load(server: Server, running: RunningServer, db_url: str) -> None:
    database = make_url(db_url).get_backend_name()
    load = LOADS[database]
    result = anyio.run(drive, running.base_url, db_url, load, backend=server.client_backend)
    failures = sum(n for status, n in result.statuses.items() if status >= 400)
    report = {
        "server": server.name,
        "database": database,
        "requests": result.requests,
        "failures": failures,
        "statuses": dict(sorted(result.statuses.items())),
        "wall_s": round(result.seconds, 2),
    }
    print("LOAD " + json.dumps(report))
    assert result.requests == load.requests
    assert result.statuses == {
        201: load.fresh + load.races,
        422: load.spam,
        500: load.races + load.reposts,
    }
