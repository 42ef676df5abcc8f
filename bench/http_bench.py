#!/usr/bin/env python
"""W2 over HTTP: FastAPI on uvicorn (asyncio) or hypercorn (trio), loaded by ``wrk``.

Issue 14 asks whether moving a FastAPI ``def`` endpoint to ``async def`` on our session costs
throughput. ``bench/http_app.py`` serves W2's request four ways (``/def``, ``/async``,
``/whole``, ``/asyncsession``: see its docstring); this script seeds the benchmark tables
(``bench.Fixture``), starts one server process, and loads each route in turn with ``wrk`` (C,
one thread, ``--connections`` keep-alive connections) for ``--duration`` seconds, repeated
``--repeats`` times with the route order rotating, so drift hits every route alike. The rows
the requests wrote are deleted before each repeat. It prints requests/s per route (median and
range) and each route's ratio to ``/def``, paired per repeat.

    apt-get install wrk
    python bench/http_bench.py --database postgresql
    python bench/http_bench.py --database postgresql --server hypercorn   # trio
    python bench/http_bench.py --database postgresql --pin   # server on CPU 0, wrk on CPU 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402

ROUTES = ["def", "async", "whole", "asyncsession"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(args: argparse.Namespace, url: str, port: int) -> Iterator[None]:
    env = dict(os.environ, SATP_HTTP_URL=url, SATP_HTTP_POOL=str(bench.POOL_SIZE))
    env["PYTHONPATH"] = os.pathsep.join(
        [HERE, os.path.join(os.path.dirname(HERE), "src"), env.get("PYTHONPATH", "")]
    )
    if args.server == "uvicorn" and "asyncsession" in args.routes:
        env["SATP_HTTP_ASYNC_URL"] = bench.async_url(args.database, url)
    if args.server == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", "http_app:app", "--port", str(port)]
        cmd += ["--log-level", "warning", "--no-access-log"]
    else:
        cmd = [sys.executable, "-m", "hypercorn", "http_app:app", "--worker-class", "trio"]
        cmd += ["-b", f"127.0.0.1:{port}", "--log-level", "warning"]
    if args.pin:
        cmd = ["taskset", "-c", "0", *cmd]
    proc = subprocess.Popen(cmd, cwd=HERE, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def wrk(args: argparse.Namespace, url: str, seconds: float) -> float:
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{seconds:g}s", url]
    if args.pin:
        cmd = ["taskset", "-c", "1", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if bad or errors:
        raise SystemExit(f"{url}: failed requests\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise SystemExit(f"could not read wrk's output:\n{out}")
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=bench.DATABASES, default="postgresql")
    parser.add_argument("--server", choices=["uvicorn", "hypercorn"], default="uvicorn")
    parser.add_argument("--routes", type=lambda s: s.split(","), default=ROUTES)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pin", action="store_true", help="server on CPU 0, wrk on CPU 1")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if args.server == "hypercorn" and "asyncsession" in args.routes:
        args.routes = [r for r in args.routes if r != "asyncsession"]  # asyncio only
    with tempfile.TemporaryDirectory() as tmp:
        url = bench.server_url(args.database, tmp)
        fixture = bench.Fixture(args.database, url)
        port = free_port()
        results: dict[str, list[float]] = {r: [] for r in args.routes}
        try:
            with server(args, url, port):
                for route in args.routes:  # warm-up: threads, connections, imports
                    wrk(args, f"http://127.0.0.1:{port}/{route}", 1)
                for repeat in range(args.repeats):
                    fixture.reset("W23")
                    shift = repeat % len(args.routes)
                    for route in args.routes[shift:] + args.routes[:shift]:
                        rps = wrk(args, f"http://127.0.0.1:{port}/{route}", args.duration)
                        results[route].append(rps)
        finally:
            fixture.close()
    loop = "asyncio" if args.server == "uvicorn" else "trio"
    print(
        f"\nW2 over HTTP: {args.database}, {args.server} ({loop}), wrk -t1 "
        f"-c{args.connections}, {args.duration:g} s x {args.repeats}"
        f"{', pinned (server CPU 0, wrk CPU 1)' if args.pin else ''}\n"
    )
    print(f"{'route':<14} {'median req/s':>12} {'range':>17} {'vs /def':>8}")
    base = results.get("def")
    for route, values in results.items():
        ratio = "-"
        if base:
            ratio = f"{statistics.median(v / b for v, b in zip(values, base, strict=True)):.2f}x"
        span = f"{min(values):,.0f}-{max(values):,.0f}"
        print(f"/{route:<13} {statistics.median(values):>12,.0f} {span:>17} {ratio:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
