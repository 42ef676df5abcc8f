"""One call handed to a worker thread, as the worker and SQLAlchemy see it.

:class:`WorkerCall` wraps the callable that :class:`~._offload.Offloader` hands to a thread
with the start/abandon handshake (a call the event loop gave up on before a thread picked it up
never runs), and records what the SQLAlchemy events (installed by :mod:`._events`) see from
inside it: whether a root ``COMMIT`` began and reached the database, and, once the call is
abandoned, a refusal to start another statement. What happens to an interrupted call is
:mod:`._recovery`'s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from ._exceptions import ThreadpoolSessionError

__all__ = [
    "WorkerCall",
    "note_commit_began",
    "note_committed",
    "refuse_if_abandoned",
]

#: The call each worker thread is running (set by ``WorkerCall.run``), read by the SQLAlchemy
#: event listeners below, which fire in that same thread.
_local = threading.local()


class _CallAbandoned(ThreadpoolSessionError):
    """Raised inside an abandoned callable that tries to start another statement."""


class WorkerCall:
    """One callable handed to a worker thread, with the start/finish handshake.

    The lock makes "has it started?" and "abandon it" one atomic decision, so a call that the
    event loop gave up on before a thread picked it up is never run.
    """

    __slots__ = (
        "_finished",
        "_fn",
        "_lock",
        "abandoned",
        "aborted",
        "committed",
        "committing",
        "done",
        "error",
        "started",
    )

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self.abandoned = False  # given up on: it may not start, nor start another statement
        self.aborted = False  # shutdown() gave up on it
        self.started = False
        self.committing = False  # a root Session.commit() began in it
        self.committed = False  # ... and the database committed
        self.error: BaseException | None = None
        self.done = False  # it started and has left
        self._finished: threading.Event | None = None  # made on demand: most calls never wait

    @property
    def finished(self) -> threading.Event:
        """Set once the call started and has left (waiting for it is the rare, slow path)."""
        event = self._finished
        if event is None:
            with self._lock:
                if self._finished is None:
                    self._finished = threading.Event()
                    if self.done:
                        self._finished.set()
                event = self._finished
        return event

    def run(self) -> Any:
        with self._lock:
            if self.abandoned:
                return None
            self.started = True
        outer = getattr(_local, "call", None)
        _local.call = self
        try:
            return self._fn()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            _local.call = outer
            with self._lock:
                self.done = True
                event = self._finished
            if event is not None:
                event.set()

    def abandon(self) -> bool:
        """Stop the call from starting; return whether it had already started."""
        with self._lock:
            self.abandoned = True
            return self.started


# -- what SQLAlchemy's events see of the call (listeners installed by ``_events``) -------


def refuse_if_abandoned(conn: Connection, *args: Any) -> None:
    """Engine ``before_cursor_execute``: an abandoned call may not start another statement."""
    call: WorkerCall | None = getattr(_local, "call", None)
    if call is not None and call.abandoned:
        raise _CallAbandoned(
            "The task awaiting this call was cancelled (or shutdown() stopped it) while it ran "
            "in a worker thread; its transaction is being rolled back, so it may not start "
            "another statement."
        )


def note_commit_began(session: Session) -> None:
    """Session ``before_commit``: a root commit began in the call."""
    call: WorkerCall | None = getattr(_local, "call", None)
    if call is not None and not session.in_nested_transaction():
        call.committing = True


def note_committed(session: Session) -> None:
    """Session ``after_commit``: the database committed it."""
    call: WorkerCall | None = getattr(_local, "call", None)
    if call is not None and call.committing:
        call.committed = True
