"""``ThreadpoolEngine``: ``AsyncEngine``'s facade over a sync engine.

Code written for :class:`sqlalchemy.ext.asyncio.AsyncEngine` and ``AsyncConnection`` ports by
renaming (``create_async_engine`` -> :func:`create_threadpool_engine`). There is no second
path to the worker threads: a :class:`ThreadpoolConnection` is backed by a
:class:`ThreadpoolSession` of a maker the engine owns, and its sync
:class:`~sqlalchemy.engine.Connection` is that session's ``connection()``. So every IO call is
a call of the session's :class:`~._offload.Offloader` (admission against the pool-sized
limiter, serialisation, server-side cancel, shielded rollback and close, the guard), results
come back buffered, and streams are the session's.

Its connections are :mod:`._connection`'s, which says how they differ from
``AsyncConnection``'s (a DBAPI connection is held per transaction).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import anyio
from sqlalchemy import create_engine, engine_from_config
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool

from ._connection import ThreadpoolConnection
from ._exceptions import ConfigurationError
from ._maker import threadpool_sessionmaker
from ._stats import ThreadpoolStats, engine_stats

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.engine.interfaces import (
        Dialect,
    )
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.pool import Pool

    #: Only names the types of AsyncConnection's bound methods (see ``execute``); never exists.
    _ASYNC_CONNECTION = cast("AsyncConnection", None)

__all__ = [
    "ThreadpoolEngine",
    "create_threadpool_engine",
    "threadpool_engine_from_config",
]


def create_threadpool_engine(url: str | URL, **kw: Any) -> ThreadpoolEngine:
    """``create_async_engine``'s twin: :func:`sqlalchemy.create_engine` with a sync driver,
    wrapped in a :class:`ThreadpoolEngine`.

    ``kw`` are :func:`~sqlalchemy.create_engine`'s (``pool_size``, ``max_overflow``, ``echo``,
    ...). The pool's capacity bounds the engine's worker threads.

    An in-memory SQLite URL (``"sqlite://"``, ``"sqlite:///:memory:"``) gets, unless ``kw``
    chooses a pool, what SQLAlchemy's aiosqlite dialect gives it: one connection shared by
    every session and thread of the engine (:class:`~sqlalchemy.pool.StaticPool`, with
    ``check_same_thread=False``), so there is one database, and one session at a time uses it.
    """
    return ThreadpoolEngine(create_engine(url, **_memory_sqlite_defaults(make_url(url), kw)))


def threadpool_engine_from_config(
    configuration: dict[str, Any], prefix: str = "sqlalchemy.", **kw: Any
) -> ThreadpoolEngine:
    """``async_engine_from_config``'s twin: :func:`sqlalchemy.engine_from_config`, wrapped.

    An in-memory SQLite URL is configured as by :func:`create_threadpool_engine`.
    """
    url = configuration.get(f"{prefix}url")
    if url is not None and not any(f"{prefix}{key}" in configuration for key in _POOL_CHOICES):
        kw = _memory_sqlite_defaults(make_url(url), kw)
    return ThreadpoolEngine(engine_from_config(configuration, prefix, **kw))


#: ``create_engine`` arguments by which a user chooses the pool (then we choose nothing).
_POOL_CHOICES = ("poolclass", "pool", "creator")


def _memory_sqlite_defaults(url: URL, kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` plus StaticPool and ``check_same_thread=False`` for an in-memory SQLite URL.

    SQLAlchemy's pysqlite dialect would pick a ``SingletonThreadPool``: one connection, so one
    private empty database, per thread; our sessions run in several worker threads.
    """
    if url.get_backend_name() != "sqlite" or any(key in kw for key in _POOL_CHOICES):
        return kw
    if url.database not in (None, "", ":memory:") and url.query.get("mode") != "memory":
        return kw  # a file: pysqlite's QueuePool, one connection per thread
    connect_args = {"check_same_thread": False, **kw.get("connect_args", {})}
    return {**kw, "poolclass": StaticPool, "connect_args": connect_args}


class ThreadpoolEngine:
    """An ``AsyncEngine``-like facade over a sync :class:`~sqlalchemy.engine.Engine`.

    ``begin()`` and ``connect()`` give :class:`ThreadpoolConnection` objects whose IO runs in
    worker threads, at most as many at once as the pool has connections: its connections,
    those of the engines :meth:`execution_options` derives, and the sessions of every
    :func:`threadpool_sessionmaker` on the same engine share the engine's one capacity.
    """

    __slots__ = ("_maker", "sync_engine")

    sync_engine: Engine
    """The synchronous engine behind the facade (also an event target)."""

    def __init__(self, sync_engine: Engine) -> None:
        if not isinstance(sync_engine, Engine):
            raise TypeError(
                "ThreadpoolEngine wraps a sync sqlalchemy Engine, not "
                f"{type(sync_engine).__name__}; make one with create_threadpool_engine(url) or "
                "sqlalchemy.create_engine(url)."
            )
        if sync_engine.dialect.is_async:
            raise ConfigurationError(
                f"This asyncio engine (driver {sync_engine.dialect.driver!r}) cannot be used: a "
                "ThreadpoolEngine runs a blocking driver in worker threads. Use the sync URL, "
                "e.g. 'sqlite:///app.db' instead of 'sqlite+aiosqlite:///app.db', "
                "'postgresql+psycopg2://...' instead of 'postgresql+asyncpg://...'."
            )
        self.sync_engine = sync_engine
        self._maker = threadpool_sessionmaker(sync_engine)

    def _derived(self, sync_engine: Engine) -> ThreadpoolEngine:
        """A facade over an engine sharing this one's pool, with this one's maker (limiter)."""
        engine = object.__new__(type(self))
        engine.sync_engine = sync_engine
        engine._maker = self._maker
        return engine

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sync_engine.url!r})"

    def stats(self) -> ThreadpoolStats:
        """A snapshot of the engine's capacity: :func:`engine_stats` (``engine_stats(self)``)."""
        return engine_stats(self.sync_engine)

    def connect(self) -> ThreadpoolConnection:
        """A :class:`ThreadpoolConnection`: ``async with engine.connect() as conn:``."""
        return ThreadpoolConnection(self)

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[ThreadpoolConnection]:
        """``async with engine.begin() as conn:`` commits at the end; rolls back on error."""
        async with self.connect() as conn, conn.begin():
            yield conn

    async def dispose(self, close: bool = True) -> None:
        """:meth:`sqlalchemy.engine.Engine.dispose` in a worker thread."""
        await anyio.to_thread.run_sync(partial(self.sync_engine.dispose, close=close))

    def execution_options(self, **opt: Any) -> ThreadpoolEngine:
        """A facade over ``sync_engine.execution_options(**opt)``, sharing this one's limiter.

        E.g. ``engine.execution_options(isolation_level="AUTOCOMMIT")``.
        """
        return self._derived(self.sync_engine.execution_options(**opt))

    def clear_compiled_cache(self) -> None:
        """:meth:`sqlalchemy.engine.Engine.clear_compiled_cache`."""
        self.sync_engine.clear_compiled_cache()

    def update_execution_options(self, **opt: Any) -> None:
        """:meth:`sqlalchemy.engine.Engine.update_execution_options`."""
        self.sync_engine.update_execution_options(**opt)

    def get_execution_options(self) -> Mapping[str, Any]:
        """:meth:`sqlalchemy.engine.Engine.get_execution_options`."""
        return self.sync_engine.get_execution_options()

    @property
    def url(self) -> URL:
        """The sync engine's URL."""
        return self.sync_engine.url

    @property
    def pool(self) -> Pool:
        """The sync engine's connection pool."""
        return self.sync_engine.pool

    @property
    def dialect(self) -> Dialect:
        """The sync engine's dialect."""
        return self.sync_engine.dialect

    @property
    def engine(self) -> Engine:
        """The sync engine (as ``AsyncEngine.engine``)."""
        return self.sync_engine

    @property
    def name(self) -> str:
        """The dialect's name (``"postgresql"``, ``"sqlite"``, ...)."""
        return self.sync_engine.name

    @property
    def driver(self) -> str:
        """The driver's name (``"psycopg2"``, ``"pysqlite"``, ...)."""
        return self.sync_engine.driver

    @property
    def echo(self) -> Any:
        """The sync engine's ``echo`` (settable)."""
        return self.sync_engine.echo

    @echo.setter
    def echo(self, value: Any) -> None:
        self.sync_engine.echo = value
