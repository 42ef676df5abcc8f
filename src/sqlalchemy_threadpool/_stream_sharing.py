"""A stream's connection needed by another statement: its unread rows move to memory first.

MySQL and MariaDB have one unbuffered result per connection. ``stream()`` reads through an
unbuffered server-side cursor (PyMySQL's ``SSCursor``), and when any other statement starts on
that connection while the cursor has unread rows, the driver reads and *discards* them, with
only a ``UserWarning`` ("Previous unbuffered result was left incomplete"): the stream would end
early, silently. PostgreSQL (named cursors) and SQLite keep each cursor apart and need none of
this.

So on those dialects each open stream of ours is noted on its connection (:func:`register`, in
the pool record's ``info``, a weak reference: one stream at most, since opening a second one is
itself another statement), and the engine listeners of :func:`engine_listeners` act before the
driver would:

- ``before_cursor_execute`` (a query, a second stream, a flush or autoflush, a savepoint):
  the open stream's remaining rows are fetched into its own buffer, in the worker that runs the
  new statement (no IO on the loop), and the stream goes on from memory: every row once, in
  order (invariant 10). Logged at DEBUG with the number of rows: the memory this costs is the
  rest of that result, which the driver would have read off the socket anyway.
- ``commit`` / ``rollback`` (the transaction ends, also as a session closes): the unread rows
  are discarded without keeping them (closing the cursor drains it quietly), as PostgreSQL
  closes a named cursor at the end of its transaction; the rows read ahead are still served,
  then a read that needs more raises :class:`~._exceptions.StreamClosedError` instead of ending
  the stream early. Buffering there would hold the whole remainder of a stream that was
  abandoned with ``break`` in memory at every scope exit.

The buffering swaps the cursor's fetch strategy for SQLAlchemy's fully buffered one, as
:func:`._results._buffer` does (the private names are listed in docs/guides/offload.md). The
raw rows are buffered, before the ORM makes objects of them, so no ORM loading (nor its
``selectinload`` queries) runs inside another statement's events.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, CursorResult, Engine, Result
from sqlalchemy.engine.cursor import FullyBufferedCursorFetchStrategy  # private: see above

if TYPE_CHECKING:
    from ._stream_rows import StreamRows

__all__ = ["cursor_of", "engine_listeners", "register"]

logger = logging.getLogger(__name__)

#: Dialects whose connections carry one unbuffered result at a time.
ONE_RESULT_PER_CONNECTION = frozenset({"mysql", "mariadb"})

#: The key, in the pool record's ``info``, of the weak reference to the stream open on it.
_OPEN_STREAM = "sqlalchemy_threadpool.open_stream"


def cursor_of(result: Result[Any]) -> CursorResult[Any] | None:
    """The server-side ``CursorResult`` behind a stream's sync result (Core or ORM)."""
    cursor = result if isinstance(result, CursorResult) else getattr(result, "raw", None)
    if isinstance(cursor, CursorResult) and cursor.context._is_server_side:
        return cursor
    return None


def register(rows: StreamRows) -> None:
    """Note ``rows`` as the stream open on its connection, if its dialect needs it."""
    cursor = rows._cursor
    if cursor is None or cursor._soft_closed:
        return  # read to its end already (or no cursor of its own)
    conn = cursor.context.root_connection
    if conn.dialect.name in ONE_RESULT_PER_CONNECTION and not (conn.closed or conn.invalidated):
        conn.info[_OPEN_STREAM] = weakref.ref(rows)


def engine_listeners(engine: Engine) -> list[tuple[str, Callable[..., None]]]:
    """The engine events to listen to for ``engine`` (none where cursors are independent)."""
    if engine.dialect.name not in ONE_RESULT_PER_CONNECTION:
        return []
    return [
        ("before_cursor_execute", buffer_open_stream),
        ("commit", discard_at_commit),
        ("rollback", discard_at_rollback),
    ]


def _take_open_stream(conn: Connection) -> StreamRows | None:
    """The stream open on ``conn`` with unread rows in its cursor, now no longer noted."""
    if conn.closed or conn.invalidated:
        return None  # reading ``info`` would try to reconnect; its record's info is cleared
    ref: weakref.ref[StreamRows] | None = conn.info.pop(_OPEN_STREAM, None)
    rows = ref() if ref is not None else None
    if rows is None or rows._cursor is None or rows._cursor._soft_closed:
        return None
    return rows


def buffer_open_stream(conn: Connection, *args: Any) -> None:
    """Engine ``before_cursor_execute``: fetch the open stream's unread rows into memory."""
    rows = _take_open_stream(conn)
    if rows is None:
        return
    cursor = rows._cursor
    assert cursor is not None
    strategy = cursor.cursor_strategy
    alternate = getattr(strategy, "alternate_cursor_description", None)
    rest = strategy.fetchall(cursor, cursor.cursor)  # reads every row left, then soft-closes
    cursor.cursor_strategy = FullyBufferedCursorFetchStrategy(  # type: ignore[no-untyped-call,unused-ignore]
        None, alternate_description=alternate, initial_buffer=rest
    )
    logger.debug(
        "A stream's remaining %d rows were fetched into memory because another statement "
        "ran on its connection (%s has one unbuffered result per connection)",
        len(rest),
        conn.dialect.name,
    )


def _discard(conn: Connection, how: str) -> None:
    rows = _take_open_stream(conn)
    if rows is None:
        return
    rows._discarded = how
    cursor = rows._cursor
    assert cursor is not None
    cursor.close()  # the driver drains the rest of the result quietly
    logger.debug("A stream's unread rows were discarded: its transaction ended (%s)", how)


def discard_at_commit(conn: Connection) -> None:
    """Engine ``commit``: the transaction of the open stream ends; discard its unread rows."""
    _discard(conn, "commit")


def discard_at_rollback(conn: Connection) -> None:
    """Engine ``rollback`` (also as a session closes): discard the open stream's unread rows."""
    _discard(conn, "rollback")
