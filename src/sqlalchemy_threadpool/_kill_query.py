"""MySQL and MariaDB statement cancel: ``KILL QUERY`` over one side connection per engine.

PyMySQL and MySQLdb cannot cancel from the client: another connection must ask the server.
That side connection is made with the engine's own connect arguments but never taken from or
returned to its pool (the pool may be exhausted). On MariaDB it sends ``KILL QUERY ID <query
id>`` of the statement the session's connection is running right now, so a late kill can never
stop a later statement; on MySQL ``KILL QUERY <thread id>``. Killing another user's query needs
the ``CONNECTION ADMIN`` privilege (MariaDB also ``SUPER``); a user may always kill the queries
of its own connections.

There is one side connection per engine (its root engine: ``execution_options()`` engines
share their parent's pool and server), opened by the first cancel (with the engine's own
``connect_timeout``; PyMySQL then waits ``SIDE_CONNECTION_TIMEOUT`` at most for each answer)
and reused by the next ones, one at a time: a kill then costs two round trips instead of a new
connection (tens of ms). A statement is always killed through the side connection of the
engine its own connection came from (:func:`~._cancel.cancel_statements` resolves it per
connection), so a session using two servers never sends a kill to the wrong one. A reused
side connection found dead (``KILL``, ``wait_timeout``, a server restart) is closed and
replaced once, and the kill retried on the new one; a cancel that would wait more than
``_SIDE_LOCK_WAIT`` for another one (an unresponsive server) uses a connection of its own, as
if there were none to share. The side connection is closed when the engine is disposed
(``engine_disposed``, hence by ``shutdown()`` too), and a forked child never uses its
parent's: it forgets it without closing it, and opens its own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import weakref
from typing import Any

from sqlalchemy.engine import Engine

__all__ = ["THREAD_ID", "close_side_connection", "mysql_canceller"]

logger = logging.getLogger(__name__)

#: Seconds the side connection of ``KILL QUERY`` may take to answer (PyMySQL: its socket's
#: timeout once connected; connecting is bounded by the engine's own ``connect_timeout``).
SIDE_CONNECTION_TIMEOUT = 5

#: Key in a pool entry's ``info``: the server's id of the connection, read in the worker that
#: owns it (by :func:`~._cancel.track_connections`), because mysqlclient refuses
#: ``thread_id()`` from another thread while a query runs. The pool clears ``info`` when the
#: DBAPI connection is replaced, so the id never outlives its connection.
THREAD_ID = "sqlalchemy_threadpool.thread_id"

#: Guards the registry of cancellers (one per engine).
_lock = threading.Lock()


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
        thread_id = info.get(THREAD_ID)
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


def mysql_canceller(engine: Engine) -> _MySQLCanceller:
    """The engine's canceller, shared by all of its makers (one side connection per engine)."""
    from ._events import watch_side_connection  # here: ``_events`` imports this module

    with _lock:
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
    """A forked child: a new lock, and each canceller forgets its parent's side connection."""
    global _lock
    _lock = threading.Lock()
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
