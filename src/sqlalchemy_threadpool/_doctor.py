"""``python -m sqlalchemy_threadpool doctor URL``: is this database ready for threadpool sessions?

It connects (and only reads: ``SELECT`` statements and a server-side ``sleep``), then reports
what a :class:`threadpool_sessionmaker` would do with the engine and what it costs:

- dialect, driver and the DBAPI's declared ``threadsafety``;
- the pool class and capacity, against the limiter a maker would use (and what goes wrong if
  they differ);
- whether server-side statement cancel works, tried on a ``sleep`` statement cancelled after a
  moment, and what is missing if it does not;
- the cost of one hop to a worker thread, a point query with and without offloading, and the
  event loop's lag under a small load, offloaded and with the same queries run on the loop;
- concrete recommendations.

``--json`` prints the same as one JSON object. A bad URL, an unreachable server, a missing
driver or a missing database file is one ``error:`` line on stderr and exit status 1, never a
traceback. Exit status 0 means the report was printed; 3 that it was printed but a
``threadpool_sessionmaker`` refuses this engine (the report says why); 2 is a usage error.
Progress goes to stderr (``--quiet`` silences it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any

import anyio
import anyio.lowlevel
from sqlalchemy import create_engine, literal, make_url, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from ._cancel import canceller_for
from ._exceptions import ConfigurationError
from ._lag import recording_lag
from ._maker import pool_capacity, threadpool_sessionmaker

__all__ = ["main"]

#: pip distributions of DBAPI modules whose import name differs.
_PIP_NAMES = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "psycopg[binary]",
    "MySQLdb": "mysqlclient",
    "mysql": "mysql-connector-python",
    "duckdb_engine": "duckdb-engine",
}
#: Drivers whose connect timeout argument we know, so an unreachable host fails quickly.
_TIMEOUT_ARGS = {
    "psycopg2": "connect_timeout",
    "psycopg": "connect_timeout",
    "pymysql": "connect_timeout",
    "mysqldb": "connect_timeout",
    "mysqlconnector": "connection_timeout",
    "mariadbconnector": "connect_timeout",
    "pg8000": "timeout",
}
#: How to bound statements on the server when the driver has no canceller.
_SERVER_TIMEOUTS = {
    "postgresql": "Bound statements on the server with statement_timeout.",
    "mysql": "Bound statements on the server with max_execution_time (MySQL) or "
    "max_statement_time (MariaDB).",
    "mariadb": "Bound statements on the server with max_statement_time.",
}
#: Exit status when the report is printed but a maker refuses the engine.
EXIT_REFUSED = 3
SLEEP_SECONDS = 3.0
CANCEL_AFTER = 0.2
_THREADSAFETY = {
    0: "threads may not share the module",
    1: "threads may share the module, not connections",
    2: "threads may share the module and connections",
    3: "threads may share the module, connections and cursors",
}


class DoctorError(Exception):
    """A problem reported as one line, without a traceback."""


def _progress(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"doctor: {message}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    while isinstance(getattr(exc, "exceptions", None), tuple) and exc.exceptions:  # type: ignore[attr-defined]
        exc = exc.exceptions[0]  # type: ignore[attr-defined]  # an exception group's first
    inner = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(inner).strip().splitlines()
    return lines[0].strip() if lines else type(inner).__name__


def _missing_driver(drivername: str, exc: ImportError) -> str:
    module = (exc.name or "").split(".")[0] or str(exc)
    return (
        f"the driver for {drivername} is not installed: no module {module!r} "
        f"(pip install {_PIP_NAMES.get(module, module)})"
    )


def open_engine(args: argparse.Namespace) -> Engine:
    """The engine for ``args.url``, connected once; :class:`DoctorError` if it cannot be."""
    try:
        url = make_url(args.url)
    except ArgumentError:
        raise DoctorError(
            f"not a database URL: {args.url!r} (expected dialect+driver://user:password@host:"
            "port/database, e.g. postgresql+psycopg2://app@127.0.0.1/app)"
        ) from None
    shown = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    try:
        driver = url.get_driver_name()  # loads the dialect when the URL names no driver
    except NoSuchModuleError:
        raise DoctorError(
            f"unknown dialect {url.drivername!r} in {shown} (is its SQLAlchemy dialect package "
            "installed?)"
        ) from None
    except ImportError as exc:
        raise DoctorError(_missing_driver(url.drivername, exc)) from None
    if (
        backend in ("sqlite", "duckdb")
        and url.database not in (None, "")
        and (not url.database.startswith(":memory:") and not url.database.startswith("file:"))
        and not os.path.exists(url.database)
    ):
        raise DoctorError(f"no database file {url.database!r} (doctor does not create one)")
    kwargs: dict[str, Any] = {}
    if args.pool_size is not None:
        kwargs["pool_size"] = args.pool_size
    if args.max_overflow is not None:
        kwargs["max_overflow"] = args.max_overflow
    connect_args: dict[str, Any] = {}
    timeout_arg = _TIMEOUT_ARGS.get(driver)
    if timeout_arg is not None and backend not in ("sqlite", "duckdb"):
        connect_args[timeout_arg] = args.connect_timeout
    if backend == "duckdb" and url.database and not url.database.startswith(":memory:"):
        connect_args["read_only"] = True
    try:
        engine = create_engine(url, connect_args=connect_args, **kwargs)
    except NoSuchModuleError:
        raise DoctorError(
            f"unknown dialect or driver {url.drivername!r} in {shown} (is its SQLAlchemy "
            "dialect package installed?)"
        ) from None
    except ImportError as exc:
        raise DoctorError(_missing_driver(url.drivername, exc)) from None
    except TypeError as exc:
        raise DoctorError(f"bad engine options for {shown}: {exc}") from None
    if engine.dialect.is_async:
        engine.dispose()
        raise DoctorError(
            f"{url.drivername} is an async driver: use it with SQLAlchemy's AsyncSession, or "
            "pick its sync counterpart (e.g. postgresql+psycopg2, mysql+pymysql) for "
            "threadpool sessions"
        )
    try:
        with engine.connect() as conn:
            conn.execute(select(literal(1))).scalar()
    except Exception as exc:  # an unreachable server, bad credentials, a missing database
        engine.dispose()
        raise DoctorError(f"cannot connect to {shown}: {_first_line(exc)}") from None
    return engine


# -- what the engine and a maker would do ------------------------------------------------


def _distribution_version(name: str) -> tuple[int | str, ...] | None:
    try:
        return tuple(int(p) if p.isdigit() else p for p in metadata.version(name).split("."))
    except metadata.PackageNotFoundError:
        return None


def _facts(engine: Engine) -> dict[str, Any]:
    dialect = engine.dialect
    dbapi = dialect.loaded_dbapi
    threadsafety = getattr(dbapi, "threadsafety", None)
    version = dialect.server_version_info
    module = getattr(dbapi, "__name__", None) or type(dbapi).__module__.split(".")[0]
    if dialect.name == "duckdb":  # duckdb-engine reports PostgreSQL 8.0, its SQL flavour
        module, version = "duckdb", _distribution_version("duckdb")
    pool = engine.pool
    capacity = pool_capacity(engine)
    facts: dict[str, Any] = {
        "url": engine.url.render_as_string(hide_password=True),
        "dialect": dialect.name,
        "driver": dialect.driver,
        "server_version": ".".join(str(part) for part in version) if version else None,
        "dbapi": {
            "module": module,
            "threadsafety": threadsafety,
            "meaning": _THREADSAFETY.get(threadsafety, "not declared")
            if isinstance(threadsafety, int)
            else "not declared",
        },
        "pool": {
            "class": type(pool).__name__,
            "capacity": None if capacity is None or capacity == math.inf else int(capacity),
            "bounded": capacity is not None and capacity != math.inf,
            "timeout_s": pool.timeout() if isinstance(pool, QueuePool) else None,
        },
    }
    if isinstance(pool, QueuePool):
        facts["pool"]["size"] = pool.size()
        facts["pool"]["max_overflow"] = pool._max_overflow
    return facts


def _limiter(engine: Engine) -> tuple[threadpool_sessionmaker | None, dict[str, Any]]:
    try:
        maker = threadpool_sessionmaker(engine)
    except ConfigurationError as exc:
        return None, {"tokens": None, "error": str(exc)}
    capacity = pool_capacity(engine)
    tokens = maker.limiter.total_tokens
    follows = capacity is not None and capacity != math.inf and tokens == capacity
    return maker, {"tokens": int(tokens), "follows_pool": follows, "error": None}


def _server_limits(engine: Engine) -> dict[str, Any] | None:
    """The server's connection limits: for the whole server, and for this account."""
    name = engine.dialect.name
    if name not in ("postgresql", "mysql", "mariadb"):
        return None
    limits: dict[str, Any] = {"max_connections": None, "account_limit": None, "error": None}
    try:
        with engine.connect() as conn:
            if name == "postgresql":
                limits["max_connections"] = int(
                    conn.exec_driver_sql("SHOW max_connections").scalar_one()
                )
                reserved = int(
                    conn.exec_driver_sql("SHOW superuser_reserved_connections").scalar_one()
                )
                superuser, role_limit = conn.execute(
                    text(
                        "SELECT rolsuper, rolconnlimit FROM pg_roles WHERE rolname = current_user"
                    )
                ).one()
                if not superuser:
                    limits["max_connections"] -= reserved
                limits["account_limit"] = role_limit if role_limit >= 0 else None
            else:
                server, user = conn.exec_driver_sql(
                    "SELECT @@max_connections, @@max_user_connections"
                ).one()
                limits["max_connections"] = int(server)
                account = int(user) or None  # 0: no limit
                for (grant,) in conn.exec_driver_sql("SHOW GRANTS"):
                    match = re.search(r"MAX_USER_CONNECTIONS (\d+)", str(grant))
                    if match and int(match[1]):
                        account = int(match[1])  # the account's own limit wins
                limits["account_limit"] = account
    except Exception as exc:  # a proxy, or a server that hides its settings
        limits["error"] = _first_line(exc)
    return limits


# -- measurements --------------------------------------------------------------------------


def _sleep_statement(dialect: str) -> str | None:
    if dialect == "postgresql":
        return f"SELECT pg_sleep({SLEEP_SECONDS})"
    if dialect in ("mysql", "mariadb"):
        return f"SELECT SLEEP({SLEEP_SECONDS})"
    if dialect == "sqlite":  # about SLEEP_SECONDS of work, or much less on a fast machine
        rows = int(SLEEP_SECONDS * 3_000_000)
        return (
            f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) "
            "SELECT count(*) FROM c"
        )
    return None


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        detail = f": {record.exc_info[1]}" if record.exc_info and record.exc_info[1] else ""
        self.messages.append(f"{record.getMessage()}{detail}")


async def _cancel_check(maker: threadpool_sessionmaker, engine: Engine) -> dict[str, Any]:
    statement = _sleep_statement(engine.dialect.name)
    has_canceller = canceller_for(engine) is not None
    result: dict[str, Any] = {"mechanism": has_canceller, "tested": False, "works": None}
    if not has_canceller or statement is None:
        return result
    captured = _Captured()
    package_logger = logging.getLogger(__name__.rpartition(".")[0])
    package_logger.addHandler(captured)
    start = time.perf_counter()
    try:
        async with maker() as sess:
            with anyio.move_on_after(CANCEL_AFTER):
                await sess.execute(text(statement))
    except Exception as exc:  # a driver's "query cancelled" surfacing anyway: still a result
        captured.messages.append(_first_line(exc))
    finally:
        package_logger.removeHandler(captured)
    late = max(0.0, time.perf_counter() - start - CANCEL_AFTER)
    result.update(
        tested=True,
        statement=statement,
        returned_after_deadline_s=round(late, 4),
        works=late < SLEEP_SECONDS / 2,
        problems=captured.messages,
    )
    return result


def _noop(session: Session) -> None:
    return None


def _median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 1)


async def _timings(maker: threadpool_sessionmaker, engine: Engine, n: int) -> dict[str, Any]:
    point = select(literal(1))
    raw: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        await anyio.to_thread.run_sync(time.perf_counter)
        raw.append(time.perf_counter() - start)
    hop: list[float] = []
    offloaded: list[float] = []
    async with maker() as sess:
        for _ in range(n):
            start = time.perf_counter()
            await sess.run(_noop)
            hop.append(time.perf_counter() - start)
        for _ in range(n):
            start = time.perf_counter()
            await sess.scalar(point)
            offloaded.append(time.perf_counter() - start)
    direct: list[float] = []
    with engine.connect() as conn:
        for _ in range(n):
            start = time.perf_counter()
            conn.execute(point).scalar()
            direct.append(time.perf_counter() - start)
    return {
        "samples": n,
        "to_thread_hop_us": _median_us(raw),
        "session_hop_us": _median_us(hop),
        "point_query_direct_us": _median_us(direct),
        "point_query_offloaded_us": _median_us(offloaded),
    }


async def _lag_ms(load: Callable[[], Awaitable[None]]) -> dict[str, float]:
    async with recording_lag() as lags:
        await load()
    q = statistics.quantiles(lags, n=100, method="inclusive") if len(lags) > 1 else lags * 99
    return {"p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2), "max_ms": round(max(lags), 2)}


async def _loop_lag(
    maker: threadpool_sessionmaker, engine: Engine, tasks: int, queries: int
) -> dict[str, Any]:
    point = select(literal(1))

    async def offloaded() -> None:
        async def one() -> None:
            async with maker() as sess:
                for _ in range(queries):
                    await sess.scalar(point)

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(one)

    async def on_the_loop() -> None:
        async def one() -> None:
            with engine.connect() as conn:  # blocks the loop for every query: the point
                for _ in range(queries):
                    conn.execute(point).scalar()
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(one)

    await offloaded()  # warm-up, unmeasured: connections and worker threads are created once
    return {
        "load": f"{tasks} tasks x {queries} point queries",
        "threadpool": await _lag_ms(offloaded),
        "sync_on_the_loop": await _lag_ms(on_the_loop),
    }


async def _measure(
    maker: threadpool_sessionmaker, engine: Engine, args: argparse.Namespace
) -> dict[str, Any]:
    report: dict[str, Any] = {}
    _progress(args.quiet, "trying server-side statement cancel on a sleep statement ...")
    report["cancel"] = await _step(_cancel_check(maker, engine))
    _progress(args.quiet, f"timing thread hops and point queries ({args.samples} each) ...")
    report["timings"] = await _step(_timings(maker, engine, args.samples))
    tasks = max(1, min(8, maker.limiter.total_tokens))
    _progress(args.quiet, f"measuring event-loop lag under {tasks} concurrent tasks ...")
    report["loop_lag"] = await _step(
        _loop_lag(maker, engine, int(tasks), max(5, args.samples // 8))
    )
    return report


async def _step(measurement: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """A measurement's result, or ``{"error": ...}``: one failed step spoils no other."""
    try:
        return await measurement
    except Exception as exc:  # e.g. the server refusing the n-th concurrent connection
        return {"error": _first_line(exc)}


# -- advice and output ---------------------------------------------------------------------


def _recommendations(report: dict[str, Any], engine: Engine) -> list[str]:
    advice: list[str] = []
    limiter, pool = report["limiter"], report["pool"]
    if limiter["error"]:
        advice.append(limiter["error"])
    elif not pool["bounded"]:
        advice.append(
            f"{pool['class']} does not bound connections, so a maker admits "
            f"{limiter['tokens']} sessions at once (anyio's default). Bound the pool to what the "
            "server allows, e.g. create_engine(url, pool_size=10, max_overflow=0); the maker's "
            "limiter then follows it."
        )
    advice += _limit_advice(report)
    for step in ("cancel", "timings", "loop_lag"):
        error = (report.get(step) or {}).get("error")
        if error:
            advice.append(f"Measuring {step.replace('_', ' ')} failed: {error}")
    if report["dbapi"]["threadsafety"] == 0:
        advice.append(
            "The driver declares threadsafety 0. Use one connection for the whole process "
            "(poolclass=StaticPool, so the maker's limiter is 1) and test it under load."
        )
    cancel = report.get("cancel") or {}
    if cancel.get("error"):
        pass  # reported above
    elif cancel and not cancel.get("mechanism"):
        advice.append(
            f"No server-side cancel for {report['dialect']}+{report['driver']}: a cancelled "
            "or timed-out await waits for its statement to finish. "
            + _SERVER_TIMEOUTS.get(
                report["dialect"],
                "Keep statements short, or bound them with the database's own timeout.",
            )
        )
    elif cancel.get("tested") and not cancel.get("works"):
        problems = " ".join(cancel.get("problems") or [])
        first = (cancel.get("problems") or ["no error was reported"])[0]
        hint = f"the driver reported: {first}"
        if "1095" in problems or "not owner" in problems.lower():
            hint = "grant CONNECTION ADMIN (MariaDB >= 10.5 / MySQL 8) or SUPER to the user"
        elif "1203" in problems or "1226" in problems or "max_user_connections" in problems:
            hint = "KILL QUERY needs one more connection: raise max_user_connections by one"
        advice.append(f"Statement cancel did not stop the sleep statement: {hint.rstrip('.')}.")
    timings = report.get("timings")
    if timings and not timings.get("error"):
        overhead = timings["point_query_offloaded_us"] - timings["point_query_direct_us"]
        if overhead > timings["point_query_direct_us"]:
            advice.append(
                f"A thread hop (~{overhead:.0f} us) costs more than a point query here "
                f"({timings['point_query_direct_us']:.0f} us): group short statements into one "
                "`await sess.run(fn)` instead of awaiting each."
            )
    lag = (report.get("loop_lag") or {}).get("threadpool")
    if lag and lag["p99_ms"] > 10:
        advice.append(
            f"The loop lagged {lag['p99_ms']} ms (p99) even with offloading: something holds "
            "the event loop or the GIL (CPU-heavy work, a sync call on the loop, a driver that "
            "keeps the GIL while it waits); on a busy machine run doctor again to be sure."
        )
    if report["dialect"] == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        with engine.connect() as conn:
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        if str(mode).lower() != "wal":
            advice.append(
                f"SQLite journal_mode is {mode}: with concurrent sessions enable WAL and a busy "
                "timeout on connect (PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000), or "
                "writers fail with 'database is locked'."
            )
    if report["dialect"] == "duckdb":
        advice.append(
            "DuckDB lets one process write: concurrent sessions writing the same rows fail "
            "with a conflict error; retry them, or serialise writers with a separate maker "
            "(limiter=1)."
        )
    return advice


def _limit_advice(report: dict[str, Any]) -> list[str]:
    """Advice when the pool may open more connections than the server lets this account."""
    limits, pool = report.get("server_limits"), report["pool"]
    if not limits or limits["error"]:
        return []
    known = [n for n in (limits["max_connections"], limits["account_limit"]) if n is not None]
    if not known:
        return []
    allowed = min(known)
    # KILL QUERY keeps one connection more than the pool, from the first cancel on.
    side = (
        1
        if report["dialect"] in ("mysql", "mariadb") and report.get("cancel", {}).get("mechanism")
        else 0
    )
    wanted = (pool["capacity"] if pool["bounded"] else math.inf) + side
    if wanted <= allowed:
        return []
    whose = "this account" if allowed == limits["account_limit"] else "the server"
    extra = " plus 1 for KILL QUERY" if side else ""
    opens = _plural(pool["capacity"], "connection") if pool["bounded"] else "unlimited connections"
    if allowed - side < 1:
        fix = (
            f"Let the account open at least {1 + side} connections (MAX_USER_CONNECTIONS), "
            "or turn statement cancel off with threadpool_sessionmaker(engine, "
            "cancel_statements=False)."
        )
    else:
        fix = (
            f"Bound the pool, e.g. create_engine(url, pool_size={allowed - side}, "
            "max_overflow=0) (the maker's limiter follows it), and count every process: each "
            "has its own pool."
        )
    return [
        f"The pool may open {opens}{extra}, but {whose} allows {allowed}: sessions beyond "
        f"that fail with 'too many connections' instead of waiting. {fix}"
    ]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _table(report: dict[str, Any]) -> str:
    dbapi, pool, limiter = report["dbapi"], report["pool"], report["limiter"]
    rows = [
        (
            "database",
            f"{report['dialect']} {report['server_version'] or ''} (driver {report['driver']})",
        ),
        ("DBAPI", f"{dbapi['module']}, threadsafety {dbapi['threadsafety']}: {dbapi['meaning']}"),
    ]
    detail = f" ({pool['size']} + {pool['max_overflow']} overflow)" if "size" in pool else ""
    shown = _plural(pool["capacity"], "connection") if pool["bounded"] else "unbounded"
    rows.append(("pool", f"{pool['class']}: {shown}{detail}"))
    limits = report.get("server_limits")
    if limits:
        if limits["error"]:
            text_ = f"unknown: {limits['error']}"
        else:
            account = limits["account_limit"]
            text_ = f"max_connections {limits['max_connections']}; this account: " + (
                "no limit of its own" if account is None else str(account)
            )
        rows.append(("server limits", text_))
    if limiter["error"]:
        rows.append(("maker limiter", "refused: " + limiter["error"].split(":")[0]))
    else:
        note = (
            "follows the pool; a larger limiter= is refused (threads would block in pool "
            "checkout), a smaller one leaves connections idle"
            if limiter["follows_pool"]
            else "the pool is unbounded: anyio's default"
        )
        sessions = _plural(limiter["tokens"], "session")
        rows.append(("maker limiter", f"{sessions} at once; {note}"))
    cancel = report.get("cancel")
    if cancel is not None:
        if cancel.get("error"):
            text_ = f"not measured: {cancel['error']}"
        elif not cancel["mechanism"]:
            text_ = "none for this driver: a cancelled await waits for the statement"
        elif not cancel["tested"]:
            text_ = "available, not tried (no sleep statement known for this dialect)"
        else:
            verdict = "works" if cancel["works"] else "DID NOT stop the statement"
            text_ = (
                f"{verdict}: a cancelled await returned "
                f"{cancel['returned_after_deadline_s'] * 1000:.0f} ms after its deadline"
            )
        rows.append(("statement cancel", text_))
    timings = report.get("timings")
    if timings and timings.get("error"):
        rows.append(("thread hop", f"not measured: {timings['error']}"))
    elif timings:
        rows.append(
            (
                "thread hop",
                f"{timings['session_hop_us']:.0f} us through a session "
                f"(bare anyio.to_thread: {timings['to_thread_hop_us']:.0f} us)",
            )
        )
        rows.append(
            (
                "point query",
                f"{timings['point_query_direct_us']:.0f} us direct, "
                f"{timings['point_query_offloaded_us']:.0f} us awaited through a session",
            )
        )
    lag = report.get("loop_lag")
    if lag and lag.get("error"):
        rows.append(("event-loop lag", f"not measured: {lag['error']}"))
    elif lag:
        ours, naive = lag["threadpool"], lag["sync_on_the_loop"]
        rows.append(
            (
                "event-loop lag",
                f"p99 {ours['p99_ms']} ms (max {ours['max_ms']}) offloaded vs p99 "
                f"{naive['p99_ms']} ms (max {naive['max_ms']}) sync on the loop; "
                f"{lag['load']}",
            )
        )
    width = max(len(name) for name, _ in rows)
    lines = [f"sqlalchemy-threadpool doctor: {report['url']}", ""]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    lines += ["", "Recommendations:"]
    advice = report["recommendations"] or ["none: this engine is ready for threadpool sessions."]
    lines += [f"  {n}. " + item.replace("\n", "\n     ") for n, item in enumerate(advice, 1)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Examine ``args.url``; raise :class:`DoctorError` for anything that stops it early."""
    _progress(args.quiet, f"connecting to {args.url_shown} ...")
    engine = open_engine(args)
    try:
        report = _facts(engine)
        report["server_limits"] = _server_limits(engine)
        maker, report["limiter"] = _limiter(engine)
        if maker is not None:
            report.update(anyio.run(_measure, maker, engine, args, backend=args.backend))
        report["backend"] = args.backend
        report["recommendations"] = _recommendations(report, engine)
    finally:
        engine.dispose()
    return report


def main(argv: list[str] | None = None) -> int:
    """``doctor URL [options]``: print the report; return the exit status (see above)."""
    parser = argparse.ArgumentParser(
        prog="python -m sqlalchemy_threadpool doctor",
        description="Check a database URL for use with threadpool sessions (read-only).",
    )
    parser.add_argument("url", help="SQLAlchemy URL with a sync driver, e.g. sqlite:///app.db")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--pool-size", type=int, help="create_engine(pool_size=...)")
    parser.add_argument("--max-overflow", type=int, help="create_engine(max_overflow=...)")
    parser.add_argument("--connect-timeout", type=int, default=5, help="seconds (default 5)")
    parser.add_argument("--samples", type=int, default=200, help="timed calls per measurement")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    try:
        args.url_shown = make_url(args.url).render_as_string(hide_password=True)
    except ArgumentError:
        args.url_shown = args.url
    try:
        report = run(args)
    except DoctorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for whatever else a driver may raise
        print(f"error: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return EXIT_REFUSED if report["limiter"]["error"] else 0
