"""Throughput of ``examples/scale_app.py`` with 1, 2 and 4 uvicorn workers through PgBouncer.

Starts a PgBouncer of its own (``tests/scaleout.py``: transaction mode, ``default_pool_size``
``--server-connections``) in front of the PostgreSQL test server, creates the example's table
in a database of its own (``satp_bench_processes``, dropped at the end), and for each number of
workers starts ``uvicorn scale_app:app --workers N`` (each worker with ``pool_size`` ``--pool``,
``max_overflow=0``), warms it up, then times ``--requests`` requests from ``--clients``
concurrent keep-alive clients (httpx, asyncio): a write (``POST /items``) and a read
(``GET /items/{key}``) alternately. Each configuration is measured ``--repeats`` times,
interleaved (1, 2, 4, 1, 2, 4, ...); the table gives the median requests per second, the
spread and the ratio to one worker. The load generator runs on the same machine, so on few
cores it competes with the workers: read the ratios with the machine's core count in mind.

    PYTHONPATH=src python bench/processes.py                    # defaults: 3 repeats
    python bench/processes.py --workers 1,2,4 --requests 2000 --clients 32 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from scaleout import serve_example, start_pgbouncer, stop_group, wait_until_serving  # noqa: E402
from servers import free_port  # noqa: E402

DATABASE = "satp_bench_processes"


def admin(url: str, statement: str) -> None:
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def serve(workers: int, url: str, pool: int, port: int) -> subprocess.Popen[bytes]:
    return serve_example(
        [sys.executable, "-m", "uvicorn", "scale_app:app", "--workers", str(workers),
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
        url, pool,
    )  # fmt: skip


async def load(base: str, requests: int, clients: int, tag: str) -> float:
    """Requests per second of ``requests`` requests (writes and reads alternately)."""
    errors: list[str] = []

    async def client(first: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            for i in range(first, requests, clients):
                key = f"{tag}-{i // 2}"
                if i % 2 == 0:
                    response = await http.post("/items", json={"key": key, "value": "v"})
                    ok = response.status_code == 201
                else:
                    response = await http.get(f"/items/{tag}-{(i - 1) // 2}")
                    ok = response.status_code in (200, 404)  # 404: its write is in flight
                if not ok:
                    errors.append(f"{response.status_code} {response.text[:100]}")

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for first in range(clients):
            tg.start_soon(client, first)
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return requests / elapsed


async def measure(workers: int, url: str, args: argparse.Namespace, run: int) -> float:
    port = free_port()
    process = serve(workers, url, args.pool, port)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_until_serving(base, process)
        await load(base, max(100, args.requests // 10), args.clients, f"w{workers}r{run}warm")
        return await load(base, args.requests, args.clients, f"w{workers}r{run}")
    finally:
        await anyio.to_thread.run_sync(stop_group, process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--url",
        default=os.environ.get(
            "SATP_BENCH_POSTGRESQL_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
        ),
        help="the PostgreSQL server (its database is not used: the bench makes its own)",
    )
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--pool", type=int, default=5, help="pool_size of each worker")
    parser.add_argument("--server-connections", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    url = make_url(args.url)
    server_url = url.render_as_string(hide_password=False)
    admin(server_url, f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    admin(server_url, f"CREATE DATABASE {DATABASE}")
    own = url.set(database=DATABASE).render_as_string(hide_password=False)
    bouncer = start_pgbouncer(own, pool_size=args.server_connections)
    try:
        sys.path.insert(0, str(ROOT / "examples"))
        import scale_app  # the module's own engine is never used: its table only

        engine = create_engine(own, poolclass=NullPool)
        scale_app.Base.metadata.create_all(engine)
        engine.dispose()
        results: dict[int, list[float]] = {n: [] for n in counts}
        for run in range(args.repeats):
            for n in counts:
                rate = anyio.run(measure, n, bouncer.url(), args, run)
                results[n].append(rate)
                print(f"run {run + 1}: {n} worker(s): {rate:.0f} req/s", file=sys.stderr)
    finally:
        bouncer.close()
        admin(server_url, f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    base = statistics.median(results[counts[0]])
    print(
        f"{args.requests} requests (writes and reads alternately) from {args.clients} "
        f"keep-alive clients; pool_size {args.pool} per worker; PgBouncer "
        f"default_pool_size {args.server_connections}; {os.cpu_count()} CPUs; "
        f"median of {args.repeats}\n"
    )
    print("| uvicorn workers | requests/s (median) | min-max | vs 1 worker |")
    print("|---|---|---|---|")
    for n in counts:
        median = statistics.median(results[n])
        print(
            f"| {n} | {median:.0f} | {min(results[n]):.0f}-{max(results[n]):.0f} | "
            f"{median / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
