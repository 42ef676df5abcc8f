"""What ``doctor`` measures: everything in it that touches the database.

:func:`open_engine` turns the URL into a connected engine or a one-line :class:`DoctorError`;
:func:`engine_facts`, :func:`maker_for` and :func:`server_limits` read what the engine, a
:class:`threadpool_sessionmaker` and the server say about themselves; :func:`measure` (run in an
event loop) tries server-side statement cancel on a ``sleep`` statement and times thread hops
(a no-op call inside a transaction), point queries and the event loop's lag. Each returns a
part of the report as plain JSON-ready dicts; ``_doctor`` turns them into advice and prints
them.
"""

from __future__ import annotations

import argparse
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

from .. import ConfigurationError, threadpool_sessionmaker
from .._binds import pool_capacity  # internal: the capacity a maker sizes its limiter to
from .._cancel import canceller_for  # internal: the driver's statement canceller, if any
from ._lag import recording_lag

__all__ = [
    "DoctorError",
    "engine_facts",
    "first_line",
    "maker_for",
    "measure",
    "open_engine",
    "progress",
    "server_limits",
    "sqlite_journal_mode",
]

#: The library's logger: the cancel check reports what the library warns about there.
_LIBRARY_LOGGER = "sqlalchemy_threadpool"
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


def progress(quiet: bool, message: str) -> None:
    """One ``doctor: ...`` progress line on stderr, unless ``quiet``."""
    if not quiet:
        print(f"doctor: {message}", file=sys.stderr, flush=True)


def first_line(exc: BaseException) -> str:
    """The first line of what went wrong: the DBAPI's own message, a group's first error."""
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
        raise DoctorError(f"cannot connect to {shown}: {first_line(exc)}") from None
    return engine


# -- what the engine and a maker would do ------------------------------------------------


def _distribution_version(name: str) -> tuple[int | str, ...] | None:
    try:
        return tuple(int(p) if p.isdigit() else p for p in metadata.version(name).split("."))
    except metadata.PackageNotFoundError:
        return None


def engine_facts(engine: Engine) -> dict[str, Any]:
    """The report's first keys: URL, dialect, driver, server version, DBAPI and pool."""
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


def maker_for(engine: Engine) -> tuple[threadpool_sessionmaker | None, dict[str, Any]]:
    """The maker doctor measures with (``None`` if it refuses the engine), and its limiter."""
    try:
        maker = threadpool_sessionmaker(engine)
    except ConfigurationError as exc:
        return None, {"tokens": None, "error": str(exc)}
    capacity = pool_capacity(engine)
    tokens = maker.limiter.total_tokens
    follows = capacity is not None and capacity != math.inf and tokens == capacity
    return maker, {"tokens": int(tokens), "follows_pool": follows, "error": None}


def server_limits(engine: Engine) -> dict[str, Any] | None:
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
        limits["error"] = first_line(exc)
    return limits


def sqlite_journal_mode(engine: Engine) -> str | None:
    """A SQLite database file's ``journal_mode``; ``None`` for any other database."""
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return None
    with engine.connect() as conn:
        return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar())


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
    package_logger = logging.getLogger(_LIBRARY_LOGGER)
    package_logger.addHandler(captured)
    start = time.perf_counter()
    try:
        async with maker() as sess:
            with anyio.move_on_after(CANCEL_AFTER):
                await sess.execute(text(statement))
    except Exception as exc:  # a driver's "query cancelled" surfacing anyway: still a result
        captured.messages.append(first_line(exc))
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
    # Inside one transaction, as the calls of a unit of work are: the session is admitted (and
    # given its worker) once, by begin(), so each figure is the cost of one more call, without
    # admission. Outside a transaction every call would take and give back a limiter token.
    async with maker() as sess, sess.begin():
        for _ in range(n):
            start = time.perf_counter()
            await sess.run(_noop)
            hop.append(time.perf_counter() - start)
        for _ in range(n):
            start = time.perf_counter()
            await sess.scalar(point)
            offloaded.append(time.perf_counter() - start)
    direct: list[float] = []
    with Session(engine) as direct_session, direct_session.begin():  # the same ORM call, here
        for _ in range(n):
            start = time.perf_counter()
            direct_session.scalar(point)
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


async def measure(
    maker: threadpool_sessionmaker, engine: Engine, args: argparse.Namespace
) -> dict[str, Any]:
    report: dict[str, Any] = {}
    progress(args.quiet, "trying server-side statement cancel on a sleep statement ...")
    report["cancel"] = await _step(_cancel_check(maker, engine))
    progress(args.quiet, f"timing thread hops and point queries ({args.samples} each) ...")
    report["timings"] = await _step(_timings(maker, engine, args.samples))
    # Behind PgBouncer, more clients than its server connections would deadlock the run of
    # the same queries on the loop (a blocked loop cannot end the transactions they wait for).
    tasks = max(1, min(8, maker.limiter.total_tokens, getattr(args, "server_connections", 8)))
    progress(args.quiet, f"measuring event-loop lag under {tasks} concurrent tasks ...")
    report["loop_lag"] = await _step(
        _loop_lag(maker, engine, int(tasks), max(5, args.samples // 8))
    )
    return report


async def _step(measurement: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """A measurement's result, or ``{"error": ...}``: one failed step spoils no other."""
    try:
        return await measurement
    except Exception as exc:  # e.g. the server refusing the n-th concurrent connection
        return {"error": first_line(exc)}
