"""Shared fixtures: event-loop backends and real test databases.

Every async test runs on asyncio and on trio (``anyio_backend``), and every test that asks for
``engine`` runs once per selected database: a SQLite file in ``tmp_path``, PostgreSQL and
MariaDB/MySQL. Server URLs come from the environment, with loopback defaults:

- ``SATP_TEST_POSTGRESQL_URL`` (default ``postgresql+psycopg2://postgres@127.0.0.1:5432/test``)
- ``SATP_TEST_MYSQL_URL`` (default ``mysql+pymysql://root@127.0.0.1:3306/test``)
- ``SATP_TEST_DATABASES``: comma-separated subset of ``sqlite,postgresql,mysql`` (default: all)

On each server the tests use a database of their own process, ``satp_test_<pid>``, created on
first use and dropped at the end of the session, so test runs sharing a server cannot drop or
fill each other's tables; inside it, the tables are dropped and re-created for each test.

A server that cannot be reached is skipped on a developer's machine, but when ``CI`` is set the
test fails instead, so CI can never go green by skipping a database.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from models import Base
from scaleout import ThrowawayPgBouncer, start_pgbouncer
from servers import ServerError

pytest.register_assert_rewrite("helpers")  # helpers' asserts report their values, too

ALL_DATABASES = ("sqlite", "postgresql", "mysql")

DEFAULT_URLS = {
    "postgresql": "postgresql+psycopg2://postgres@127.0.0.1:5432/test",
    "mysql": "mysql+pymysql://root@127.0.0.1:3306/test",
}

URL_ENV_VARS = {
    "postgresql": "SATP_TEST_POSTGRESQL_URL",
    "mysql": "SATP_TEST_MYSQL_URL",
}

START_HINTS = {
    "postgresql": (
        "`pg_ctlcluster --skip-systemctl-redirect <version> main start` "
        "(`pg_lsclusters` shows the version)"
    ),
    "mysql": "`start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd`",
}

CONNECT_TIMEOUT_S = 3
LOCK_TIMEOUT_S = 10

PROCESS_DATABASE = f"satp_test_{os.getpid()}"


def _selected_databases() -> list[str]:
    raw = os.environ.get("SATP_TEST_DATABASES", "")
    names = [part.strip() for part in raw.split(",") if part.strip()]
    if not names:
        return list(ALL_DATABASES)
    unknown = [name for name in names if name not in ALL_DATABASES]
    if unknown:
        raise pytest.UsageError(
            f"SATP_TEST_DATABASES names unknown database(s) {unknown!r}; "
            f"choose from {', '.join(ALL_DATABASES)}"
        )
    return list(dict.fromkeys(names))


SELECTED_DATABASES = _selected_databases()


def _server_url(database: str) -> str:
    return os.environ.get(URL_ENV_VARS[database]) or DEFAULT_URLS[database]


def _engine_kwargs(url: str) -> dict[str, Any]:
    if make_url(url).get_backend_name() == "sqlite":
        return {}
    return {"pool_size": 5, "max_overflow": 0, "pool_timeout": 10}


def _one_line(exc: DBAPIError) -> str:
    return " ".join(str(exc.orig).split()) or type(exc.orig).__name__


@contextmanager
def _admin_connection(url: str) -> Iterator[Connection]:
    """An autocommit connection outside any test engine's pool, for set-up DDL.

    Connecting fails within a few seconds, and waiting for a lock (held by a connection an
    earlier test leaked, say) fails after ``LOCK_TIMEOUT_S`` instead of hanging the run.
    """
    backend = make_url(url).get_backend_name()
    connect_args: dict[str, Any] = {}
    if backend != "sqlite":
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    if backend in ("mysql", "mariadb"):
        # MySQL drivers apply connect_timeout to the TCP connect only: bound the handshake
        # too, leaving a DDL statement the time to report its own lock wait timeout.
        connect_args["read_timeout"] = CONNECT_TIMEOUT_S + LOCK_TIMEOUT_S
    admin = create_engine(
        url, poolclass=NullPool, isolation_level="AUTOCOMMIT", connect_args=connect_args
    )
    try:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.execute(text(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'"))
            elif backend in ("mysql", "mariadb"):
                conn.execute(text(f"SET SESSION lock_wait_timeout = {LOCK_TIMEOUT_S}"))
            yield conn
    finally:
        admin.dispose()


def _create_process_database(server_url: str) -> str:
    """Create this process's database on a server; return the URL that points at it."""
    with _admin_connection(server_url) as conn:
        for name in _dead_process_databases(conn, make_url(server_url).host):
            _drop_database(conn, name)
        _drop_database(conn, PROCESS_DATABASE)  # left by an earlier process with our pid
        conn.execute(text(f"CREATE DATABASE {PROCESS_DATABASE}"))
    return make_url(server_url).set(database=PROCESS_DATABASE).render_as_string(False)


def _dead_process_databases(conn: Connection, host: str | None) -> list[str]:
    """Databases left by test processes of this machine that were killed before cleaning up."""
    if host not in (None, "", "localhost", "::1") and not host.startswith("127."):
        return []  # a remote server's processes may be alive on other machines
    if conn.dialect.name == "postgresql":
        query = "SELECT datname FROM pg_database WHERE datname LIKE :pattern"
    else:
        query = (
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE :pattern"
        )
    names = conn.scalars(text(query), {"pattern": "satp_test_%"}).all()
    dead = []
    for name in names:
        match = re.fullmatch(r"satp_test_(\d+)(?:_pgbouncer)?", name)
        if match and int(match[1]) != os.getpid() and not _process_alive(int(match[1])):
            dead.append(name)
    return dead


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_database(conn: Connection, name: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        return
    # MySQL: DROP DATABASE would wait for the locks of connections still open on it.
    leftover = conn.scalars(
        text(
            "SELECT id FROM information_schema.processlist "
            "WHERE db = :name AND id <> CONNECTION_ID()"
        ),
        {"name": name},
    ).all()
    for connection_id in leftover:
        with suppress(DBAPIError):  # it may have closed meanwhile
            conn.execute(text(f"KILL {int(connection_id)}"))
    conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))


@pytest.fixture(scope="session")
def _process_databases() -> Iterator[dict[str, tuple[str | None, str | None]]]:
    """Server URL -> (URL of this process's database, None) or (None, why it is unusable).

    ``db_url`` fills it on the first use of each server, so each server is probed once per
    session; the databases created are dropped when the session ends.
    """
    servers: dict[str, tuple[str | None, str | None]] = {}
    yield servers
    for server_url, (process_url, _) in servers.items():
        if process_url is not None:
            with _admin_connection(server_url) as conn:
                _drop_database(conn, PROCESS_DATABASE)


@pytest.fixture(params=["asyncio", "trio"], ids=["asyncio", "trio"], scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture(params=SELECTED_DATABASES, ids=SELECTED_DATABASES)
def db_url(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    _process_databases: dict[str, tuple[str | None, str | None]],
) -> str:
    database: str = request.param
    if database == "sqlite":
        return f"sqlite:///{tmp_path}/test.db"
    return _process_url(database, _process_databases)


def _process_url(
    database: str, _process_databases: dict[str, tuple[str | None, str | None]]
) -> str:
    """This process's database on ``database``'s server; fail under ``CI``, else skip."""
    url = _server_url(database)
    if url not in _process_databases:
        try:
            _process_databases[url] = (_create_process_database(url), None)
        except DBAPIError as exc:
            _process_databases[url] = (None, _one_line(exc))
    process_url, reason = _process_databases[url]
    if process_url is None:
        shown = make_url(url).render_as_string(hide_password=True)
        message = f"{database} test server at {shown} cannot be used: {reason}"
        if os.environ.get("CI"):
            pytest.fail(
                f"{message}\nCI never skips a database: start the server with "
                f"{START_HINTS[database]}, or point {URL_ENV_VARS[database]} at a running one.",
                pytrace=False,
            )
        pytest.skip(f"{message} (set {URL_ENV_VARS[database]} or start the server)")
    return process_url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A fresh engine on the test database, with its tables dropped and re-created."""
    with _admin_connection(db_url) as conn:
        Base.metadata.drop_all(conn)
        Base.metadata.create_all(conn)
    eng = create_engine(db_url, **_engine_kwargs(db_url))
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def other_engine(db_url: str, engine: Engine) -> Iterator[Engine]:
    """A second, independent engine on the same database, for "visible elsewhere" checks."""
    eng = create_engine(db_url, **_engine_kwargs(db_url))
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def dialect_name(engine: Engine) -> str:
    return engine.dialect.name


# -- scale-out: PgBouncer in front of the PostgreSQL test server (tests/scaleout.py) ---------


@pytest.fixture(scope="session")
def postgresql_url(_process_databases: dict[str, tuple[str | None, str | None]]) -> str:
    """This process's database on the PostgreSQL test server, for session-scoped fixtures."""
    return _process_url("postgresql", _process_databases)


@pytest.fixture(scope="session")
def pgbouncer(postgresql_url: str) -> Iterator[ThrowawayPgBouncer]:
    """A PgBouncer of this test session, in transaction mode, on the PostgreSQL test server.

    In front of a database of its own, ``satp_test_<pid>_pgbouncer`` (``pgbouncer.upstream``),
    so that the server connections it keeps open are never seen by the tests that count the
    connections to ``postgresql_url``'s database. Its ``default_pool_size`` is 4. Fails under
    ``CI`` when it cannot start (``pgbouncer`` not installed: ``apt-get install pgbouncer``),
    else the tests that use it are skipped.
    """
    database = f"{PROCESS_DATABASE}_pgbouncer"
    with _admin_connection(postgresql_url) as conn:
        _drop_database(conn, database)
        conn.execute(text(f"CREATE DATABASE {database}"))
    try:
        try:
            bouncer = start_pgbouncer(
                make_url(postgresql_url).set(database=database).render_as_string(False),
                pool_size=4,
            )
        except ServerError as exc:
            message = f"no PgBouncer for the scale-out tests: {exc}"
            if os.environ.get("CI"):
                pytest.fail(f"{message}\nCI never skips these tests.", pytrace=False)
            pytest.skip(message)
        try:
            yield bouncer
        finally:
            bouncer.close()
    finally:
        with _admin_connection(postgresql_url) as conn:
            _drop_database(conn, database)
