"""Many worker processes through PgBouncer: ``examples/scale_app.py`` under load.

The example app runs under ``uvicorn --workers 4`` (workers spawned) and under gunicorn with
uvicorn workers and ``--preload`` (the engine and maker made in the master, before the fork),
through the tests' PgBouncer (transaction mode, 4 server connections). A bounded load (400
writes from 8 concurrent clients, each on a new connection so that every worker takes some,
then a read of each) must give no error, every acknowledged write must be in the table, and the
server connections of the test database, sampled in ``pg_stat_activity`` during the load, never
exceed PgBouncer's pool; PgBouncer's clients never exceed the processes' pools.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy import Engine, create_engine, make_url, select, text
from sqlalchemy.pool import NullPool

from scaleout import ThrowawayPgBouncer, serve_example, stop_group, wait_until_serving
from servers import free_port
from webhelpers import load_example

pytestmark = pytest.mark.anyio

PROCESSES = 4
POOL_SIZE = 3
WRITES = 400
CLIENTS = 8

COMMANDS = {
    "uvicorn": [
        sys.executable, "-m", "uvicorn", "scale_app:app", "--workers", str(PROCESSES),
        "--host", "127.0.0.1", "--no-access-log",
    ],
    "gunicorn": [
        sys.executable, "-m", "gunicorn", "scale_app:app", "--preload", "-w", str(PROCESSES),
        "-k", "uvicorn.workers.UvicornWorker",
    ],
}  # fmt: skip


@pytest.fixture
def table(pgbouncer: ThrowawayPgBouncer) -> Iterator[Engine]:
    """The example's table, empty, seen directly on the server."""
    app = load_example("scale_app")
    observer = create_engine(pgbouncer.direct_url, poolclass=NullPool)
    app.Base.metadata.drop_all(observer)
    app.Base.metadata.create_all(observer)
    try:
        yield observer
    finally:
        observer.dispose()


def serve(server: str, url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    argv = [*COMMANDS[server]]
    argv += ["--port", str(port)] if server == "uvicorn" else ["-b", f"127.0.0.1:{port}"]
    with log.open("wb") as out:
        return serve_example(argv, url, POOL_SIZE, out)


def connections(observer: Engine) -> int:
    """Server connections to the test database, other than this one."""
    with observer.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        )


def clients(bouncer: ThrowawayPgBouncer, database: str) -> int:
    return sum(1 for client in bouncer.show("CLIENTS") if client["database"] == database)


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
async def test_many_processes_through_pgbouncer(
    server: str,
    pgbouncer: ThrowawayPgBouncer,
    table: Engine,
    tmp_path: Path,
) -> None:
    database = make_url(pgbouncer.url()).database
    assert database is not None
    port = free_port()
    log = tmp_path / f"{server}.log"
    process = serve(server, pgbouncer.url(), port, log)
    base = f"http://127.0.0.1:{port}"
    acknowledged: list[str] = []
    failures: list[str] = []
    pids: set[int] = set()
    peaks = {"server": 0, "clients": 0}
    try:
        await wait_until_serving(base, process, log)
        done = anyio.Event()

        async def sample() -> None:
            while not done.is_set():
                now = await anyio.to_thread.run_sync(connections, table)
                peaks["server"] = max(peaks["server"], now)
                now = await anyio.to_thread.run_sync(clients, pgbouncer, database)
                peaks["clients"] = max(peaks["clients"], now)
                await anyio.sleep(0.02)

        async def writer(first: int) -> None:
            # a new connection per request, so that every worker accepts some of them
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
                for i in range(first, WRITES, CLIENTS):
                    key = f"k{i:04d}"
                    response = await client.post("/items", json={"key": key, "value": str(i)})
                    if response.status_code == 201:
                        acknowledged.append(key)
                        pids.add(response.json()["pid"])
                    else:
                        failures.append(f"{key}: {response.status_code} {response.text[:200]}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            async with anyio.create_task_group() as writers:
                for first in range(CLIENTS):
                    writers.start_soon(writer, first)
            done.set()

        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            reads = [(await client.get(f"/items/{key}")).json() for key in acknowledged[::40]]
    finally:
        await anyio.to_thread.run_sync(stop_group, process)

    output = log.read_text(errors="replace")
    assert failures == [], output[-3000:]
    assert len(acknowledged) == WRITES
    app = load_example("scale_app")
    with table.connect() as conn:
        stored = set(conn.scalars(select(app.Item.key)))
    assert stored == set(acknowledged)  # every acknowledged write is there
    assert [read["value"] for read in reads] == [str(int(k[1:])) for k in acknowledged[::40]]
    assert len(pids) >= 2, f"one worker took every request: {pids}"
    if server == "gunicorn":  # --preload: each worker uses the maker its parent made
        assert all(read["maker_made_in"] != read["pid"] for read in reads)
        assert len({read["maker_made_in"] for read in reads}) == 1
    assert 0 < peaks["server"] <= pgbouncer.pool_size
    assert peaks["clients"] <= PROCESSES * POOL_SIZE
    assert "Traceback" not in output, output[-3000:]
