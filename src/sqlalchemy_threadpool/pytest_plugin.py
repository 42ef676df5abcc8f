"""pytest plugin: a database session per test, rolled back at the end whatever the code did.

Opt-in (it is not registered as an entry point, so it never activates by itself)::

    # conftest.py at the root of your tests
    pytest_plugins = ["sqlalchemy_threadpool.pytest_plugin"]

or ``pytest -p sqlalchemy_threadpool.pytest_plugin``. The database URL comes from, in order,
``--threadpool-db-url``, the ``threadpool_db_url`` ini option, or the
``SQLALCHEMY_THREADPOOL_TEST_URL`` environment variable.

Fixtures (override any of them in your ``conftest.py``):

- ``threadpool_db_url`` (session): the URL above.
- ``threadpool_engine`` (session): ``create_engine(threadpool_db_url)``, disposed at the end.
  Create your schema in a session fixture that uses it. On SQLite it applies
  :func:`enable_sqlite_savepoints`, without which pysqlite's SAVEPOINTs do not isolate.
- ``threadpool_connection``: one connection inside an outer transaction that is rolled back
  when the test ends.
- ``threadpool_maker``: a :class:`~sqlalchemy_threadpool.threadpool_sessionmaker` bound to that
  connection with ``join_transaction_mode="create_savepoint"``: a session's ``commit()`` only
  releases a SAVEPOINT, so code under test that commits still leaves the database clean.
- ``threadpool_db_session``: a session from that maker, bound to the test's task, so
  :func:`~sqlalchemy_threadpool.current_session` and ``threadpool_session()`` inside the code
  under test return it. It is async: the test must run under anyio's pytest plugin
  (``@pytest.mark.anyio``, with the ``anyio_backend`` fixture choosing asyncio and/or trio).

An ASGI app built with ``threadpool_maker`` and called in the test's task (e.g. through
``httpx.ASGITransport``) joins ``threadpool_db_session``: each request runs in a SAVEPOINT that
``SessionMiddleware`` releases or rolls back by the response status, and the test sees the
request's writes through the same session.

One session at a time: the maker is bound to a single connection, so its limiter admits one
session with an open transaction; a second, independent session opened while the first holds
one waits (up to the pool timeout). Use ``threadpool_db_session`` (or nested
``threadpool_session()`` blocks, which join it) throughout a test.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, event

from ._context import bind_session
from ._maker import threadpool_sessionmaker
from ._session import ThreadpoolSession

__all__ = [
    "URL_ENV_VAR",
    "enable_sqlite_savepoints",
    "threadpool_connection",
    "threadpool_db_session",
    "threadpool_db_url",
    "threadpool_engine",
    "threadpool_maker",
]

URL_ENV_VAR = "SQLALCHEMY_THREADPOOL_TEST_URL"
_OPTION = "--threadpool-db-url"
_INI = "threadpool_db_url"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sqlalchemy-threadpool")
    group.addoption(
        _OPTION,
        dest="threadpool_db_url",
        default=None,
        help=f"database URL for the threadpool_* fixtures (else ini {_INI}, else ${URL_ENV_VAR})",
    )
    parser.addini(_INI, help="database URL for the threadpool_* fixtures", default=None)


@pytest.fixture(scope="session")
def threadpool_db_url(pytestconfig: pytest.Config) -> str:
    """The test database URL: ``--threadpool-db-url``, ini ``threadpool_db_url``, or env."""
    url = (
        pytestconfig.getoption("threadpool_db_url")
        or pytestconfig.getini(_INI)
        or os.environ.get(URL_ENV_VAR)
    )
    if not url:
        pytest.fail(
            f"No database URL for the sqlalchemy-threadpool fixtures: pass {_OPTION}=URL, set "
            f"`{_INI} = URL` in the [pytest] ini section, or export {URL_ENV_VAR}=URL.",
            pytrace=False,
        )
    return str(url)


def enable_sqlite_savepoints(engine: Engine) -> None:
    """Make SAVEPOINTs work on a pysqlite engine (SQLAlchemy's documented recipe).

    By default the sqlite3 module starts transactions only before DML, so a ``SAVEPOINT``
    issued first opens the transaction itself and its ``RELEASE`` commits it. The recipe turns
    that off and has SQLAlchemy emit ``BEGIN``. No effect on other drivers.
    """
    if engine.dialect.driver != "pysqlite":
        return

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _emit_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")

    engine.dispose()  # connections made before the listeners would keep the old behaviour


@pytest.fixture(scope="session")
def threadpool_engine(threadpool_db_url: str) -> Iterator[Engine]:
    """An engine on the test database for the whole session."""
    engine = create_engine(threadpool_db_url)
    enable_sqlite_savepoints(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def threadpool_connection(threadpool_engine: Engine) -> Iterator[Connection]:
    """A connection in an outer transaction, rolled back (and returned) after the test."""
    with threadpool_engine.connect() as connection:
        transaction = connection.begin()
        try:
            yield connection
        finally:
            if transaction.is_active:
                transaction.rollback()


@pytest.fixture
def threadpool_maker(threadpool_connection: Connection) -> threadpool_sessionmaker:
    """Sessions joined to the test's transaction: their commits only release SAVEPOINTs."""
    return threadpool_sessionmaker(threadpool_connection, join_transaction_mode="create_savepoint")


@pytest.fixture
async def threadpool_db_session(
    threadpool_maker: threadpool_sessionmaker, anyio_backend: object
) -> AsyncIterator[ThreadpoolSession]:
    """A session bound to the test's task; whatever it did is rolled back at the end."""
    session = threadpool_maker()
    with bind_session(session):
        try:
            yield session
        finally:
            await session._end(commit=False, reason="its test ended (threadpool_db_session)")
