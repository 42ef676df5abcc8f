"""``run_transaction()``: run a unit of work, retrying it when the database says it may.

Under ``SERIALIZABLE`` (PostgreSQL), with row-lock deadlocks (MariaDB/MySQL, PostgreSQL) or a
busy SQLite file, the database aborts a transaction that did nothing wrong, and a correct
application runs the whole transaction again. :func:`run_transaction` does that: each attempt
gets a fresh session and transaction, a failed attempt is rolled back and closed before the
next one starts, attempts are spaced by exponential backoff with full jitter, and only errors
:func:`is_retryable` (or the caller's ``retry_if``) accepts are retried. A synchronous unit of
work runs together with its flush and commit in one worker call, through
:meth:`ThreadpoolSession.run <sqlalchemy_threadpool.ThreadpoolSession.run>`.
"""

from __future__ import annotations

import inspect
import logging
import random
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, overload

import anyio
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ._context import threadpool_session
from ._maker import threadpool_sessionmaker
from ._results import check_callable, make_loop_safe
from ._session import ThreadpoolSession

__all__ = ["is_retryable", "run_transaction"]

logger = logging.getLogger(__name__)

R = TypeVar("R")

#: SQLSTATEs of a transaction the server rolled back so that it can be run again:
#: serialization_failure and deadlock_detected (standard class 40, "transaction rollback").
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
#: MySQL/MariaDB error numbers: ER_LOCK_DEADLOCK and ER_LOCK_WAIT_TIMEOUT.
_RETRYABLE_MYSQL_ERRNOS = frozenset({1213, 1205})
#: SQLite's primary result code SQLITE_BUSY (extended codes keep it in their low byte).
_SQLITE_BUSY = 5


def is_retryable(exc: BaseException) -> bool:
    """Whether the database reported ``exc`` as a transaction it aborted and that may be retried.

    The default ``retry_if`` of :func:`run_transaction`; compose it to widen or narrow it,
    e.g. ``retry_if=lambda e: is_retryable(e) or isinstance(e, MyConflict)``. ``True`` for:

    - SQLSTATE ``40001`` (serialization failure) and ``40P01`` (deadlock detected), read from
      psycopg2's ``pgcode``, psycopg 3's ``sqlstate``, pg8000's error fields, or an ODBC
      driver's first argument (pyodbc);
    - MySQL/MariaDB error 1213 (deadlock: the server rolled the transaction back) and 1205
      (lock wait timeout: the server rolled back the statement only, so the rest of the
      transaction must be rolled back before it runs again, which :func:`run_transaction`
      does, as every attempt uses a fresh session);
    - SQLite ``SQLITE_BUSY`` ("database is locked").

    ``exc`` may be SQLAlchemy's wrapper (:class:`~sqlalchemy.exc.DBAPIError`, whose ``.orig``
    is read) or the driver's exception itself. Anything else, cancellation included, is not
    retryable.
    """
    orig: BaseException | None = exc.orig if isinstance(exc, DBAPIError) else exc
    if orig is None or not isinstance(orig, Exception):
        return False
    for attribute in ("pgcode", "sqlstate"):  # psycopg2; psycopg 3, mysql-connector, mariadb
        if getattr(orig, attribute, None) in _RETRYABLE_SQLSTATES:
            return True
    errno = getattr(orig, "errno", None)  # mysql-connector, mariadb
    args = orig.args
    first = args[0] if args else None
    if isinstance(first, dict):  # pg8000: the server's error fields, "C" is the SQLSTATE
        return first.get("C") in _RETRYABLE_SQLSTATES
    package = type(orig).__module__.split(".")[0]
    if package == "pyodbc":  # (sqlstate, message)
        return first in _RETRYABLE_SQLSTATES
    if package in ("pymysql", "MySQLdb", "mysql", "mariadb"):
        if isinstance(first, int) and not isinstance(first, bool):
            errno = first  # PyMySQL, mysqlclient: (errno, message)
        return errno in _RETRYABLE_MYSQL_ERRNOS
    sqlite3 = sys.modules.get("sqlite3")
    if sqlite3 is not None and isinstance(orig, sqlite3.OperationalError):
        code = getattr(orig, "sqlite_errorcode", None)  # Python 3.11+
        if isinstance(code, int):
            return code & 0xFF == _SQLITE_BUSY
        return "database is locked" in str(orig)
    return False


@overload
async def run_transaction(
    maker: threadpool_sessionmaker,
    fn: Callable[[Session], R],
    /,
    *,
    attempts: int = ...,
    backoff: float = ...,
    max_backoff: float = ...,
    retry_if: Callable[[BaseException], bool] = ...,
) -> R: ...
@overload
async def run_transaction(
    maker: threadpool_sessionmaker,
    fn: Callable[[ThreadpoolSession], Coroutine[Any, Any, R]],
    /,
    *,
    attempts: int = ...,
    backoff: float = ...,
    max_backoff: float = ...,
    retry_if: Callable[[BaseException], bool] = ...,
) -> R: ...
async def run_transaction(
    maker: threadpool_sessionmaker,
    fn: Callable[[Any], Any],
    /,
    *,
    attempts: int = 5,
    backoff: float = 0.05,
    max_backoff: float = 2.0,
    retry_if: Callable[[BaseException], bool] = is_retryable,
) -> Any:
    """Run ``fn`` as one transaction and commit it; run it again when the database says so.

    ``fn`` is either

    - a plain function ``fn(session) -> R`` that takes the synchronous
      :class:`~sqlalchemy.orm.Session`: it runs in a worker thread **together with its flush
      and commit, in one call** (the fastest way to use this library), and a ``Result`` it
      returns is buffered before the commit; or
    - an ``async def fn(sess) -> R`` that takes a :class:`ThreadpoolSession`: each attempt runs
      inside its own ``threadpool_session(maker, new=True)`` scope (so
      :func:`current_session` returns it), committed when ``fn`` returns.

    Either way each attempt has a fresh session and transaction, and a failed one is rolled
    back and closed before the next begins, so ``fn`` must be safe to run more than once: do
    the transaction's reads inside it, and keep side effects outside the database (sending
    mail, say) after ``run_transaction`` returns. Returns what the successful attempt returned.

    :param attempts: how many times ``fn`` may run in all (at least 1).
    :param backoff: the first pause's upper bound, in seconds; it doubles after each failed
        attempt, up to ``max_backoff``. Each pause is drawn uniformly between 0 and that bound
        ("full jitter"), so contending tasks spread out. The pause is an :func:`anyio.sleep`:
        a cancellation during it is prompt.
    :param retry_if: decides whether an exception raised by an attempt is retried; default
        :func:`is_retryable`, which accepts what the database reports as a transaction it
        aborted (serialization failure, deadlock, lock wait timeout, SQLite busy). It is only
        asked about :class:`Exception`; cancellation is never retried.

    **Errors.** An error that is not retried, or the last one when the attempts run out,
    propagates unchanged (``except OperationalError`` still works). If it ends a run that had
    retried, it carries ``exc.attempts``, the number of attempts made, and (Python 3.11+) a note
    saying so; an error of the first attempt that is not retried is left untouched.

    **A commit whose outcome is unknown is never retried.** If the connection is lost while
    the commit is in flight, the transaction may or may not have been committed, and running
    it again could apply it twice. So an error raised by the commit (for an ``async`` ``fn``:
    by the scope's commit, including the flush it does first) is retried only if
    :func:`is_retryable` also accepts it (the database itself said the transaction was rolled
    back), whatever ``retry_if`` says; otherwise it propagates with a note saying why.

    **Cancellation** during an attempt behaves like in any scope: the statement is stopped,
    the transaction rolled back, the connection returned, and the cancellation propagates.
    Each retry is logged at INFO level by the ``sqlalchemy_threadpool._retry`` logger.
    """
    if attempts < 1:
        raise ValueError(f"run_transaction() needs attempts >= 1, got {attempts!r}.")
    if backoff < 0 or max_backoff < 0:
        raise ValueError(
            f"run_transaction() needs backoff >= 0 and max_backoff >= 0, got {backoff!r} and "
            f"{max_backoff!r}."
        )
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    )
    if not is_async:
        check_callable(fn, "run_transaction()")
    attempt = 0
    while True:
        attempt += 1
        progress = _Progress()
        try:
            if is_async:
                return await _async_attempt(maker, fn, progress)
            return await _sync_attempt(maker, fn, progress)
        except Exception as exc:
            retry = retry_if(exc)
            if retry and progress.committing and not is_retryable(exc):
                _note(
                    exc,
                    "run_transaction() did not retry this error: it was raised while "
                    "committing, so the transaction may have been committed; check before "
                    "running it again",
                )
                retry = False
            if not retry or attempt >= attempts:
                if attempt > 1:
                    exc.attempts = attempt  # type: ignore[attr-defined]
                    why = "attempts ran out" if retry else "this error is not retried"
                    _note(exc, f"run_transaction(): failed after {attempt} attempts ({why})")
                raise
            delay = random.uniform(0.0, min(max_backoff, backoff * 2 ** (attempt - 1)))
            logger.info(
                "run_transaction(): attempt %d of %d failed (%s); retrying in %.3f s",
                attempt,
                attempts,
                _summary(exc),
                delay,
            )
        await anyio.sleep(delay)


class _Progress:
    """How far an attempt got: ``committing`` once ``fn`` has returned and its commit began."""

    __slots__ = ("committing",)

    def __init__(self) -> None:
        self.committing = False


async def _sync_attempt(
    maker: threadpool_sessionmaker, fn: Callable[[Session], Any], progress: _Progress
) -> Any:
    """``fn``, flush and commit in one worker call; closing afterwards needs no other."""

    def unit(session: Session) -> Any:
        value = make_loop_safe(fn(session), "run_transaction()")  # buffered before COMMIT
        session.flush()
        progress.committing = True  # read on the loop once the call is over
        session.commit()
        return value

    # No transaction is left after the call, so the exit's close is no IO; after an error
    # the exit rolls back and closes in a worker, shielded.
    async with maker() as sess:
        return await sess.run(unit)


async def _async_attempt(
    maker: threadpool_sessionmaker,
    fn: Callable[[ThreadpoolSession], Coroutine[Any, Any, Any]],
    progress: _Progress,
) -> Any:
    """``await fn(sess)`` in a scope of its own, which commits when ``fn`` returns."""
    async with threadpool_session(maker, new=True) as sess:
        value = await fn(sess)
        progress.committing = True
    return value


def _note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(note)


def _summary(exc: BaseException) -> str:
    """One line: the error's class and the first line of the database's message."""
    text = str(exc.orig if isinstance(exc, DBAPIError) else exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
