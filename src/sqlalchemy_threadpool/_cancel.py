"""Server-side cancellation of the statement in flight, and severing a connection.

A worker thread cannot be killed, so when the task awaiting it is cancelled or times out, the
offload path asks the database to stop the statement, then waits for the worker to come out
(it does so with the driver's "query cancelled" error) before cleaning up. Per driver:

- psycopg2: ``connection.cancel()``, from a thread other than the worker (it opens its own
  short TCP connection to the server, which signals the backend before it answers);
- PyMySQL / MySQLdb (MySQL, MariaDB): ``KILL QUERY`` over a side connection of the engine
  (:mod:`._kill_query`);
- sqlite3: ``Connection.interrupt()``, which is safe from any thread and a no-op when no
  statement runs;
- DuckDB (``duckdb-engine``): ``DuckDBPyConnection.interrupt()``, the same: it only sets the
  connection's atomic "interrupted" flag, which the running query checks (DuckDB's own tests
  call it from another thread); called while no statement runs, it does not stop the next
  one (checked with duckdb 2.0.1).

Each mechanism does nothing when no statement is running, so it never stops the *next* one.
Drivers without a mechanism (``canceller_for`` returns ``None``) fall back to waiting.

The mechanism is chosen **per connection**, by the engine the connection came from, not by the
maker's bind: a session using several engines (``binds=``, a routing ``get_bind``) stops a
statement on the server that runs it, with that server's driver (a ``KILL QUERY`` sent to
another server would stop nothing there, or an unrelated statement with the same id).
:class:`StatementCanceller` is what a maker with ``cancel_statements=True`` gives its sessions.

:func:`sever` is the last resort when a statement does not stop (or a rollback does not come
back) within the cleanup deadline: it shuts down the connection's socket, so the blocked
worker gets a "connection lost" error at once and SQLAlchemy invalidates the connection.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import weakref
from typing import Any, Protocol

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ._kill_query import THREAD_ID, mysql_canceller

__all__ = [
    "DriverCanceller",
    "StatementCanceller",
    "cancel_statements",
    "canceller_for",
    "count_checkin",
    "sever",
    "session_connections",
    "track_connections",
]

logger = logging.getLogger(__name__)

#: The connections each of our sessions has used, recorded as they are checked out (in the
#: worker) and read when cancelling (on the event loop): hence the lock. Each with its pool
#: entry's ``info`` and the number of check-ins it had seen then (see ``_still_ours``).
_connections: weakref.WeakKeyDictionary[
    Session, weakref.WeakKeyDictionary[Connection, tuple[dict[Any, Any], int]]
] = weakref.WeakKeyDictionary()
_connections_lock = threading.Lock()

#: Keys in a pool entry's ``info``: the lock a cancel (or sever) holds while it acts on the
#: DBAPI connection, which the pool's ``checkin`` waits for; and the number of check-ins.
_CANCEL_LOCK = "sqlalchemy_threadpool.cancel_lock"
_CHECKINS = "sqlalchemy_threadpool.checkins"


def track_connections(session: Session, transaction: Any, connection: Connection) -> None:
    """``after_begin`` listener: remember which connections a session is using."""
    info = connection.connection.info
    engine = connection.engine
    if THREAD_ID not in info and engine.dialect.name in ("mysql", "mariadb"):
        thread_id = getattr(connection.connection.dbapi_connection, "thread_id", None)
        if thread_id is not None:
            info[THREAD_ID] = int(thread_id())
    with _connections_lock:
        info.setdefault(_CANCEL_LOCK, threading.Lock())
        tracked = _connections.setdefault(session, weakref.WeakKeyDictionary())
        tracked[connection] = (info, info.get(_CHECKINS, 0))


def count_checkin(dbapi_connection: Any, record: Any) -> None:
    """Pool ``checkin`` listener: count check-ins, after any cancel in progress is done.

    A connection is back in the pool, where another session may take it, only after this
    returns; so a cancel that started while the session still had it can never reach the
    statement of the next user of the connection.
    """
    info = record.info
    lock = info.get(_CANCEL_LOCK)
    if lock is None:
        return
    with lock:
        info[_CHECKINS] = info.get(_CHECKINS, 0) + 1


def session_connections(session: Session) -> list[Connection]:
    """The session's connections that are still open and valid."""
    return [connection for connection, _, _ in _tracked(session)]


def _tracked(session: Session) -> list[tuple[Connection, dict[Any, Any], int]]:
    with _connections_lock:
        entries = list(_connections.get(session, {}).items())
    return [
        (c, info, checkins)
        for c, (info, checkins) in entries
        if not c.closed and not c.invalidated
    ]


def _still_ours(connection: Connection, info: dict[Any, Any], checkins: int) -> bool:
    """Whether the session still has the connection checked out (call with the lock held)."""
    return (
        not connection.closed and not connection.invalidated and info.get(_CHECKINS, 0) == checkins
    )


def _dbapi(connection: Connection) -> Any:
    try:
        return connection.connection.dbapi_connection
    except Exception:  # closed or invalidated meanwhile
        return None


class DriverCanceller(Protocol):
    """Stops the statement a DBAPI connection is running; called from a helper thread."""

    def cancel(self, dbapi_connection: Any, info: dict[Any, Any]) -> None: ...


class _Psycopg2Canceller:
    def cancel(self, dbapi_connection: Any, info: dict[Any, Any]) -> None:
        dbapi_connection.cancel()


class _InterruptCanceller:
    """sqlite3 and DuckDB: the connection's own ``interrupt()``, safe from any thread."""

    def cancel(self, dbapi_connection: Any, info: dict[Any, Any]) -> None:
        dbapi_connection.interrupt()


def _after_fork_in_child() -> None:
    """A forked child: new locks, and none of the parent's sessions' connections to cancel.

    A parent thread may have held any of the locks when the process forked; in the child
    nobody ever releases them. The sessions the parent was running are not the child's (their
    connections' sockets are shared with the parent): the child must never cancel or sever
    what they run, so it forgets them. A connection's own ``_CANCEL_LOCK`` needs no reset: one
    that a parent thread held is checked out by a parent session (or in the middle of its
    check-in, which waits for the lock), so the child never gets it from the pool.
    """
    global _connections, _connections_lock
    _connections_lock = threading.Lock()
    _connections = weakref.WeakKeyDictionary()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def canceller_for(bind: Engine | Connection | None) -> DriverCanceller | None:
    """The canceller for the bind's driver, or ``None`` where there is no mechanism."""
    if bind is None:
        return None
    engine = bind.engine
    driver = engine.dialect.driver
    if driver == "psycopg2":
        return _PSYCOPG2
    if driver in ("pysqlite", "duckdb_engine"):
        return _INTERRUPT
    if driver in ("pymysql", "mysqldb"):
        return mysql_canceller(_root(engine))
    return None


_PSYCOPG2 = _Psycopg2Canceller()
_INTERRUPT = _InterruptCanceller()
#: The drivers :func:`canceller_for` has a mechanism for.
_CANCELLABLE = frozenset({"psycopg2", "pysqlite", "duckdb_engine", "pymysql", "mysqldb"})


def _root(engine: Engine) -> Engine:
    """The engine whose pool (and server) ``engine`` uses: ``execution_options()`` engines
    proxy their parent's, and share its ``KILL QUERY`` side connection."""
    while isinstance(getattr(engine, "_proxied", None), Engine):
        engine = engine._proxied  # type: ignore[attr-defined]  # OptionEngine (2.0 and 2.1)
    return engine


class StatementCanceller:
    """A session's statement cancel, each connection through its own engine's mechanism.

    What a maker with ``cancel_statements=True`` gives its sessions (``None`` otherwise),
    whatever its bind, or none: a session's connections may come from engines the maker was
    never given (``binds=``, a routing ``get_bind``), and each is cancelled by the mechanism
    of the driver and server it belongs to.
    """

    __slots__ = ()

    def applies_to(self, session: Session) -> bool:
        """Whether the session's bind or an engine it holds a connection of has a mechanism
        (else a call given up on is waited for)."""
        bind = session.bind
        if bind is not None and bind.engine.dialect.driver in _CANCELLABLE:
            return True
        return any(c.engine.dialect.driver in _CANCELLABLE for c in session_connections(session))

    def cancel(self, session: Session, finished: threading.Event, loud: bool) -> None:
        """:func:`cancel_statements` (in a helper thread)."""
        cancel_statements(session, finished, loud)


def cancel_statements(session: Session, finished: threading.Event, loud: bool) -> None:
    """Cancel what the session's connections run, unless the worker left already.

    Each connection through the canceller of its own engine's driver (none for a driver
    without a mechanism). Runs in a helper thread. A failure is logged (at WARNING when
    ``loud``) and otherwise ignored: the caller goes on waiting for the statement to finish.
    """
    for connection, info, checkins in _tracked(session):
        canceller = canceller_for(connection.engine)
        lock = info.get(_CANCEL_LOCK)
        if canceller is None or lock is None:
            continue  # no mechanism; or the pool replaced the DBAPI connection since
        with lock:
            if finished.is_set() or not _still_ours(connection, info, checkins):
                continue  # the statement ended; the connection may already be someone else's
            dbapi = _dbapi(connection)
            if dbapi is None:
                continue
            try:
                canceller.cancel(dbapi, info)
            except Exception:
                logger.log(
                    logging.WARNING if loud else logging.DEBUG,
                    "cancelling the statement in flight failed; waiting for it to finish "
                    "instead (for MySQL/MariaDB the user needs to be allowed to KILL the query)",
                    exc_info=True,
                )


def sever(session: Session) -> bool:
    """Shut down the sockets of the session's connections; return whether any was shut.

    The worker blocked on such a socket gets a "connection lost" error at once, and
    SQLAlchemy invalidates the connection. Only the socket is shut down, not the file
    descriptor closed, so the driver's own bookkeeping stays sound.
    """
    severed = False
    for connection, info, checkins in _tracked(session):
        lock = info.get(_CANCEL_LOCK)
        if lock is None:
            continue
        with lock:
            if not _still_ours(connection, info, checkins):
                continue
            fd = _socket_fd(_dbapi(connection))
            if fd is None:
                continue
            try:
                with socket.socket(fileno=os.dup(fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
                severed = True
            except OSError:
                logger.debug("shutting down a connection's socket failed", exc_info=True)
    return severed


def _socket_fd(dbapi: Any) -> int | None:
    if dbapi is None:
        return None
    sock = getattr(dbapi, "_sock", None)  # PyMySQL
    if isinstance(sock, socket.socket):
        return sock.fileno()
    fileno = getattr(dbapi, "fileno", None)  # psycopg2, and mysqlclient's socket
    if callable(fileno) and not hasattr(dbapi, "interrupt"):  # not sqlite3
        try:
            fd = fileno()
        except Exception:
            return None
        return fd if isinstance(fd, int) and fd >= 0 else None
    return None
