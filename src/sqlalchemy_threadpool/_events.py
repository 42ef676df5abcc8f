"""Every SQLAlchemy listener the library installs, and the one registry of watched engines.

This module is the one place that puts listeners on a maker's sync
:class:`~sqlalchemy.orm.sessionmaker` and on the engines its sessions use. The bodies of those
that read the call a worker thread runs (:data:`._call.running`) are here; the others live with
their concept:

================================  ===========================================  ===========
listener                          what for                                     body in
================================  ===========================================  ===========
session ``do_orm_execute``        ORM results fully loaded in the worker       ``_results``
session ``after_begin``           the session's connections, for cancelling;   ``_cancel``
                                  watch the connection's engine
session ``before_commit`` /       whether a call's ``COMMIT`` began / reached  here
``after_commit``                  the database (an interrupted commit's fate)
engine ``before_cursor_execute``  a call given up on (abandoned or stopped)    here
                                  may not start a statement
pool ``checkin``                  count check-ins (a cancel never reaches the  ``_cancel``
                                  connection's next user)
engine ``engine_disposed``        close the ``KILL QUERY`` side connection     ``_kill_query``
engine ``before_cursor_execute``  an open stream's unread rows go to memory    ``_stream_sharing``
/ ``commit`` / ``rollback``       first, or are discarded as its transaction
(MySQL, MariaDB)                  ends
session and engine events of the  SQL about to run on the event-loop thread    ``_guard``
guard (unless ``guard="off"``)
================================  ===========================================  ===========

A session-level listener is installed once per maker (:func:`install`). The engine-level ones
are installed once per engine, as a group, the first time a maker is bound to the engine or one
of its sessions begins on it; :data:`_watched` records which groups each engine carries. The
group :data:`_GUARD` is installed only for makers whose guard is on, and ``engine_disposed``
only when the engine's ``KILL QUERY`` canceller is made. The listeners stay as long
as the engine (a disposed engine keeps them: it can be used again).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from . import _guard, _stream_sharing
from ._call import RUNNING, Call, running
from ._cancel import count_checkin, track_connections
from ._exceptions import ThreadpoolSessionError
from ._guard import GuardMode
from ._kill_query import close_side_connection
from ._results import prebuffer_rows

__all__ = ["install", "watch_binds", "watch_side_connection"]

#: Engine listener groups: those every engine of our sessions carries, the guard's, and the
#: one of an engine with a ``KILL QUERY`` side connection (MySQL, MariaDB).
_OFFLOAD = 1
_GUARD = 2
_SIDE_CONNECTION = 4

#: Which groups of our listeners each engine carries (a bit set of the groups above).
_watched: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child: a new lock (a parent thread may have held it when the process forked)."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _watch(engine: Engine, groups: int) -> None:
    """Add the listener ``groups`` that ``engine`` does not carry yet, once each."""
    with _lock:
        missing = groups & ~_watched.get(engine, 0)
        if not missing:
            return
        if missing & _OFFLOAD:
            # retval=True: called as is, without SQLAlchemy's wrapper (a call per statement)
            event.listen(engine, "before_cursor_execute", refuse_if_given_up, retval=True)
            event.listen(engine, "checkin", count_checkin)
        if missing & _GUARD:
            event.listen(
                engine, "before_cursor_execute", _guard.before_cursor_execute, retval=True
            )
            event.listen(engine, "commit", _guard.commit)
        if missing & _SIDE_CONNECTION:
            event.listen(engine, "engine_disposed", close_side_connection)
        if missing & _OFFLOAD:  # after the guard's: SQL it refuses on the loop does not run
            for name, listener in _stream_sharing.engine_listeners(engine):
                event.listen(engine, name, listener)
        _watched[engine] = _watched.get(engine, 0) | missing


def watch_side_connection(engine: Engine) -> None:
    """Close ``engine``'s ``KILL QUERY`` side connection when it is disposed (called as its
    canceller is made)."""
    _watch(engine, _SIDE_CONNECTION)


def _groups(guard: GuardMode) -> int:
    return _OFFLOAD if guard == "off" else _OFFLOAD | _GUARD


def watch_binds(maker: sessionmaker[Any], guard: GuardMode) -> None:
    """Put the engine-level listeners on the engines ``maker`` is bound to (``bind=`` and
    ``binds=``), ahead of the first session: also called after ``configure()``."""
    groups = _groups(guard)
    for bind in [maker.kw.get("bind"), *(maker.kw.get("binds") or {}).values()]:
        if isinstance(bind, (Engine, Connection)):
            _watch(bind.engine, groups)


# -- what SQLAlchemy's events see of the call a worker thread runs -------------------------


class _CallGivenUp(ThreadpoolSessionError):
    """Raised inside a call given up on that tries to start another statement."""


def refuse_if_given_up(
    conn: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> tuple[str, Any]:
    """Engine ``before_cursor_execute`` (``retval=True``): a call given up on may not start
    another statement; any other statement goes on unchanged."""
    call: Call | None = getattr(running, "call", None)
    if call is not None and call.state is not RUNNING:
        raise _CallGivenUp(
            "The task awaiting this call was cancelled (or shutdown() stopped it) while it ran "
            "in a worker thread; its transaction is being rolled back, so it may not start "
            "another statement."
        )
    return statement, parameters


def note_commit_began(session: Session) -> None:
    """Session ``before_commit``: a root commit began in the call."""
    call: Call | None = getattr(running, "call", None)
    if call is not None and not session.in_nested_transaction():
        call.committing = True


def note_committed(session: Session) -> None:
    """Session ``after_commit``: the database committed it."""
    call: Call | None = getattr(running, "call", None)
    if call is not None and call.committing:
        call.committed = True


def install(maker: sessionmaker[Any], guard: GuardMode) -> None:
    """Install every listener of the library on the sessions ``maker`` makes and on their
    engines (those of its binds now; any other as a session begins on it)."""
    groups = _groups(guard)

    def after_begin(session: Session, transaction: Any, connection: Connection) -> None:
        track_connections(session, transaction, connection)
        engine = connection.engine
        if _watched.get(engine, 0) & groups != groups:  # once per engine: then a dict look-up
            _watch(engine, groups)

    event.listen(maker, "do_orm_execute", prebuffer_rows)
    event.listen(maker, "after_begin", after_begin)
    event.listen(maker, "before_commit", note_commit_began)
    event.listen(maker, "after_commit", note_committed)
    watch_binds(maker, guard)
    if guard != "off":
        for name, listener in _guard.session_listeners(guard):
            event.listen(maker, name, listener)
