"""Server-side cancellation of the statement in flight, and severing a connection.

A worker thread cannot be killed, so when the task awaiting it is cancelled or times out, the
offload path asks the database to stop the statement, then waits for the worker to come out
(it does so with the driver's "query cancelled" error) before cleaning up. Per driver:

- psycopg2: ``connection.cancel()``, from a thread other than the worker (it opens its own
  short TCP connection to the server, which signals the backend before it answers);
- PyMySQL / MySQLdb (MySQL, MariaDB): over a side connection made with the engine's own
  connect arguments but never taken from or returned to its pool (the pool may be
  exhausted): on MariaDB ``KILL QUERY ID <query id>`` of the statement the session's
  connection is running right now, so a late kill can never stop a later statement; on MySQL
  ``KILL QUERY <thread id>``. Killing another user's query needs the ``CONNECTION ADMIN``
  privilege (MariaDB also ``SUPER``); a user may always kill the queries of its own
  connections. There is one side connection per engine, opened by the first cancel (with the
  engine's own ``connect_timeout``; PyMySQL then waits ``SIDE_CONNECTION_TIMEOUT`` at most for
  each answer) and reused by the next ones, one at a time: a kill then costs two round trips
  instead of a new connection (tens of ms). A reused side connection found dead (``KILL``,
  ``wait_timeout``, a server restart) is closed and replaced once, and the kill retried on the
  new one; a cancel that would wait more than ``_SIDE_LOCK_WAIT`` for another one (an
  unresponsive server) uses a connection of its own, as if there were none to share. The side
  connection is closed when the engine is disposed (``engine_disposed``, hence by
  ``shutdown()`` too), and a forked child never uses its parent's: it forgets it without
  closing it, and opens its own;
- sqlite3: ``Connection.interrupt()``, which is safe from any thread and a no-op when no
  statement runs;
- DuckDB (``duckdb-engine``): ``DuckDBPyConnection.interrupt()``, the same: it only sets the
  connection's atomic "interrupted" flag, which the running query checks (DuckDB's own tests
  call it from another thread); called while no statement runs, it does not stop the next
  one (checked with duckdb 2.0.1).

Each mechanism does nothing when no statement is running, so it never stops the *next* one.
Drivers without a mechanism (``canceller_for`` returns ``None``) fall back to waiting.

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

__all__ = [
    "StatementCanceller",
    "canceller_for",
    "close_side_connection",
    "count_checkin",
    "sever",
    "session_connections",
    "track_connections",
]

logger = logging.getLogger(__name__)

#: Seconds the side connection of ``KILL QUERY`` may take to answer (PyMySQL: its socket's
#: timeout once connected; connecting is bounded by the engine's own ``connect_timeout``).
SIDE_CONNECTION_TIMEOUT = 5

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
#: MySQL/MariaDB: the server's id of the connection, read in the worker that owns it, because
#: mysqlclient refuses ``thread_id()`` from another thread while a query runs. The pool clears
#: ``info`` when the DBAPI connection is replaced, so the id never outlives its connection.
_THREAD_ID = "sqlalchemy_threadpool.thread_id"


def track_connections(session: Session, transaction: Any, connection: Connection) -> None:
    """``after_begin`` listener: remember which connections a session is using."""
    info = connection.connection.info
    engine = connection.engine
    if _THREAD_ID not in info and engine.dialect.name in ("mysql", "mariadb"):
        thread_id = getattr(connection.connection.dbapi_connection, "thread_id", None)
        if thread_id is not None:
            info[_THREAD_ID] = int(thread_id())
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


class StatementCanceller(Protocol):
    """Stops the statement a DBAPI connection is running; called from a helper thread."""

    def cancel(self, dbapi_connection: Any, info: dict[Any, Any]) -> None: ...


class _Psycopg2Canceller:
    def cancel(self, dbapi_connection: Any, info: dict[Any, Any]) -> None:
        dbapi_connection.cancel()


class _InterruptCanceller:
    """sqlite3 and DuckDB: the connection's own ``interrupt()``, safe from any thread."""

    def cancel(self, dbapi_connection: Any, info: dict[Any, Any]) -> None:
        dbapi_connection.interrupt()


class _MySQLCanceller:
    """``KILL QUERY [ID]`` through one side connection per engine, made like the pool's own.

    The side connection is opened on the first cancel, kept, and reused by the next ones (one
    at a time, under ``_lock``); it is replaced when it turns out dead, forgotten (not closed)
    in a forked child, and closed when the engine is disposed.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = weakref.ref(engine)  # ``_mysql_cancellers`` keeps this alive with it
        self._lock = threading.Lock()
        self._side: Any = None  # the side connection, or None until the next cancel
        self._pid = 0  # the process that opened it

    def cancel(self, dbapi_connection: Any, info: dict[Any, Any]) -> None:
        thread_id = info.get(_THREAD_ID)
        if thread_id is None:  # not seen by track_connections: ask the connection itself
            thread_id = int(dbapi_connection.thread_id())
        engine = self._engine()
        if engine is None:  # pragma: no cover - a session still uses one of its connections
            return
        if not self._lock.acquire(timeout=_SIDE_LOCK_WAIT):
            # Another cancel is stuck on the shared connection (an unresponsive server): do
            # not queue behind it, use a connection of our own as if there were none to share.
            side = _connect(engine)
            try:
                _kill(engine, side, thread_id)
            finally:
                _close_quietly(side)
            return
        try:
            self._cancel_shared(engine, thread_id)
        finally:
            self._lock.release()

    def _cancel_shared(self, engine: Engine, thread_id: int) -> None:
        """Kill over the shared connection; if a reused one is dead, once more over a new one."""
        reused = self._side is not None and self._pid == os.getpid()
        if not reused:
            self._forget()
            self._side, self._pid = _connect(engine), os.getpid()
        dbapi = engine.dialect.loaded_dbapi
        try:
            _kill(engine, self._side, thread_id)
        except (dbapi.OperationalError, dbapi.InterfaceError):
            self._discard()
            if not reused:
                raise
            # Killed, timed out (wait_timeout) or the server restarted since the last cancel.
            logger.debug("the KILL QUERY side connection was lost; reconnecting", exc_info=True)
            self._side, self._pid = _connect(engine), os.getpid()
            try:
                _kill(engine, self._side, thread_id)
            except BaseException:
                self._discard()
                raise
        except BaseException:  # its state is unknown: never reuse it
            self._discard()
            raise

    def close(self) -> None:
        """Close the side connection (the engine was disposed); a later cancel reopens it."""
        with self._lock:
            self._discard()

    def _discard(self) -> None:
        if self._side is not None and self._pid == os.getpid():
            _close_quietly(self._side)
            self._side = None
        self._forget()

    def _forget(self) -> None:
        """Drop a connection inherited from the parent process without touching its socket."""
        if self._side is not None:
            _inherited.append(self._side)  # never closed here: closing would send COM_QUIT
            self._side = None

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a parent thread may have held it while forking
        self._forget()


#: How long a cancel waits for another one using the shared side connection, before it opens
#: a connection of its own. A kill takes about a millisecond, a reconnection some tens.
_SIDE_LOCK_WAIT = 1.0

_mysql_cancellers: weakref.WeakKeyDictionary[Engine, _MySQLCanceller] = weakref.WeakKeyDictionary()
#: Side connections a forked child inherited: kept referenced, so that collecting them cannot
#: send the parent's server a COM_QUIT on the parent's socket (mysqlclient would).
_inherited: list[Any] = []


def _mysql_canceller(engine: Engine) -> _MySQLCanceller:
    """The engine's canceller, shared by all of its makers (one side connection per engine)."""
    from ._events import watch_side_connection  # here: ``_events`` imports this module

    with _connections_lock:
        canceller = _mysql_cancellers.get(engine)
        if canceller is None:
            canceller = _mysql_cancellers[engine] = _MySQLCanceller(engine)
    watch_side_connection(engine)  # closed when the engine is disposed
    return canceller


def close_side_connection(engine: Engine) -> None:
    """``engine_disposed`` listener: close the engine's ``KILL QUERY`` side connection, if any."""
    canceller = _mysql_cancellers.get(engine)
    if canceller is not None:
        canceller.close()


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
    for canceller in list(_mysql_cancellers.values()):
        canceller._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _connect(engine: Engine) -> Any:
    """A new DBAPI connection made like the pool's own, but never part of the pool."""
    pool = engine.pool
    invoke = getattr(pool, "_invoke_creator", None)
    if invoke is not None:  # the pool's creator: URL, connect_args and do_connect events
        side = invoke(None)
    else:  # pragma: no cover - every SQLAlchemy 2.x pool has one
        dialect = engine.dialect
        args, kwargs = dialect.create_connect_args(engine.url)
        side = dialect.loaded_dbapi.connect(*args, **kwargs)
    try:
        sock = getattr(side, "_sock", None)  # PyMySQL: bound the wait for the answer
        if isinstance(sock, socket.socket):
            sock.settimeout(SIDE_CONNECTION_TIMEOUT)
        autocommit = getattr(side, "autocommit", None)
        if callable(autocommit):  # PyMySQL, mysqlclient: the idle side connection holds no
            autocommit(True)  # transaction open
    except BaseException:
        _close_quietly(side)
        raise
    return side


def _kill(engine: Engine, side: Any, thread_id: int) -> None:
    """Stop what the connection ``thread_id`` runs now, if anything."""
    cursor = side.cursor()
    try:
        if not getattr(engine.dialect, "is_mariadb", False):
            cursor.execute(f"KILL QUERY {thread_id}")
            return
        cursor.execute(
            "SELECT query_id FROM information_schema.processlist "
            "WHERE id = %s AND command = 'Query'",
            (thread_id,),
        )
        row = cursor.fetchone()
        if row is None:
            return  # nothing running: nothing to stop
        try:
            cursor.execute(f"KILL QUERY ID {int(row[0])}")
        except Exception as exc:
            if _error_code(exc) != 1957:  # ER_NO_SUCH_QUERY: it finished meanwhile
                raise
    finally:
        try:
            cursor.close()
        except Exception:  # the connection died: what the kill raised is what matters
            logger.debug("closing a cursor of the side connection failed", exc_info=True)


def _close_quietly(side: Any) -> None:
    try:
        side.close()
    except Exception:  # already closed, or the socket is dead
        logger.debug("closing the side connection for KILL QUERY failed", exc_info=True)


def _error_code(exc: BaseException) -> int | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def canceller_for(bind: Engine | Connection | None) -> StatementCanceller | None:
    """The canceller for the bind's driver, or ``None`` where there is no mechanism."""
    if bind is None:
        return None
    engine = bind.engine if isinstance(bind, Connection) else bind
    driver = engine.dialect.driver
    if driver == "psycopg2":
        return _Psycopg2Canceller()
    if driver in ("pysqlite", "duckdb_engine"):
        return _InterruptCanceller()
    if driver in ("pymysql", "mysqldb"):
        return _mysql_canceller(engine)
    return None


def cancel_statements(
    canceller: StatementCanceller, session: Session, finished: threading.Event, loud: bool
) -> None:
    """Cancel what the session's connections run, unless the worker left already.

    Runs in a helper thread. A failure is logged (at WARNING when ``loud``) and otherwise
    ignored: the caller goes on waiting for the statement to finish.
    """
    for connection, info, checkins in _tracked(session):
        lock = info.get(_CANCEL_LOCK)
        if lock is None:
            continue  # the pool replaced the DBAPI connection: not the one we ran on
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
