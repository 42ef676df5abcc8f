"""The guard: no SQL of our sessions runs on the event-loop thread unnoticed.

It decides **by thread**: SQL in a worker thread is what the library is for; SQL on a thread
that is running an asyncio or trio event loop would block every task. Which async library the
*context* says is running (sniffio, anyio) does not matter: worker threads inherit a copy of
the loop's context, and they must never trip the guard. Any thread that is running an event
loop counts, not only the one our tasks run on: a second loop in another thread (a thread
that calls ``asyncio.run()`` or ``trio.run()``) is blocked just the same. A thread that merely
*has* a loop object, or ran one earlier, or inherited a sniffio marker, does not count, so
sync code in plain threads never sees a false positive. Built on SQLAlchemy events only
(this module holds the listeners, :mod:`._events` installs them), in two lines:

1. Session events on the sessions a maker makes, which fire before any SQL is sent and, except
   for ``after_begin``, before a connection is checked out: ``do_orm_execute`` (lazy
   relationship loads, deferred and expired column loads, ``get``, ``refresh``, any statement
   run through the session), ``before_flush``, ``before_commit``, and ``after_begin`` (a
   connection procured on the loop by any other path, e.g. ``Session.connection()``).
2. On the connections our sessions hold (and only while they hold them), the engine's
   ``before_cursor_execute`` and ``commit``: SQL sent through a ``Connection`` obtained from
   the session.

``rollback()`` and ``close()`` are deliberately not intercepted: raising there cannot stop the
IO (the pool rolls the connection back when it is returned) and would leak or poison the
connection; the facade runs them in a worker anyway.

Modes: ``"raise"`` raises :class:`LazyLoadOnEventLoopError` / :class:`BlockingOnEventLoopError`
before the statement is sent; ``"warn"`` emits one :class:`BlockingOnEventLoopWarning` per
occurrence (a flush or a commit is one occurrence, however many statements it sends) and lets
the IO proceed; with ``"off"`` none of these listeners is installed. :class:`allow_blocking`
lets the current context block on purpose.

In worker threads (the hot path) each hook costs one thread check; bookkeeping is once per
transaction.
"""

from __future__ import annotations

import asyncio
import sys
import warnings
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Literal

from sqlalchemy.engine import Connection
from sqlalchemy.orm import (
    ColumnProperty,
    ORMExecuteState,
    RelationshipProperty,
    Session,
    SessionTransaction,
)

from ._exceptions import (
    BlockingOnEventLoopError,
    BlockingOnEventLoopWarning,
    LazyLoadOnEventLoopError,
)

__all__ = [
    "GuardMode",
    "allow_blocking",
    "before_cursor_execute",
    "commit",
    "on_event_loop_thread",
    "session_listeners",
]

GuardMode = Literal["raise", "warn", "off"]

#: How many ``allow_blocking()`` scopes the current context is in.
_allowed: ContextVar[int] = ContextVar("sqlalchemy_threadpool_allow_blocking", default=0)
_get_running_loop = asyncio._get_running_loop
#: ``trio.lowlevel.in_trio_run``, looked up once trio has been imported (no trio, no trio run).
_in_trio_run: Callable[[], bool] | None = None


def on_event_loop_thread() -> bool:
    """Whether the calling thread is running an asyncio or trio event loop right now.

    Any loop counts (blocking a loop in another thread is as bad as blocking ours); a loop that
    is set but not running, or has finished, does not.
    """
    global _in_trio_run
    if _get_running_loop() is not None:
        return True
    if _in_trio_run is None:
        trio = sys.modules.get("trio")
        if trio is None:
            return False
        _in_trio_run = trio.lowlevel.in_trio_run
    return _in_trio_run()


def _blocked() -> bool:
    """Whether SQL may not run here: on an event-loop thread, outside ``allow_blocking()``.

    Checked per statement and transaction event, mostly in worker threads (no loop): the
    asyncio look-up is inlined, so the common answer costs one call less.
    """
    if _get_running_loop() is None and (_in_trio_run is None or not _in_trio_run()):
        if _in_trio_run is not None or "trio" not in sys.modules:
            return False
        if not on_event_loop_thread():  # trio just imported: looks up in_trio_run once
            return False
    return _allowed.get() == 0


class allow_blocking:
    """Let the current context run SQL on the event-loop thread on purpose.

    Usable as ``with allow_blocking():`` and ``async with allow_blocking():``. It only affects
    the current context (the current task, what it awaits, and tasks it starts inside the
    block, which inherit a copy of the context), never other tasks, and ends with the block.
    Scopes nest, and one instance may be entered by several tasks at once. Meant for start-up
    code, tests and deliberate one-off blocking calls.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        # A depth per context, not a token per instance: each task counts in its own context,
        # so one instance shared by concurrent tasks (a module-level constant) stays correct.
        _allowed.set(_allowed.get() + 1)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _allowed.set(max(_allowed.get() - 1, 0))

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class _SessionGuard:
    """What the guard knows about one session: its mode, its connections, what it reported."""

    __slots__ = ("connections", "mode", "reporting")

    def __init__(self, mode: GuardMode) -> None:
        self.mode: GuardMode = mode
        #: Connections the session's current root transaction holds. Weak: each of them
        #: points to this object (:func:`_holder`), and a strong reference back would keep a
        #: lost session's connection (and so its pool slot) alive for ever.
        self.connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        #: In "warn" mode, the operation already reported ("flush", "commit"): the statements
        #: it sends are that one occurrence, not new ones.
        self.reporting: str | None = None


#: The attribute (in the instance ``__dict__``) of a session that holds its
#: :class:`_SessionGuard`, and of a connection one of our sessions holds right now that
#: holds that session's. Attributes, not weak-keyed registries: no weak reference made and
#: called back per session and per transaction in the worker, and they go with the object.
_GUARD = "_sqlalchemy_threadpool_guard"


def _guard_of(session: Session, mode: GuardMode) -> _SessionGuard:
    state = session.__dict__
    guard: _SessionGuard | None = state.get(_GUARD)
    if guard is None:
        guard = state.setdefault(_GUARD, _SessionGuard(mode))
    return guard


def _session_guard(session: Session) -> _SessionGuard | None:
    """The guard state of ``session``, if it has one yet."""
    return session.__dict__.get(_GUARD)


def _holder(conn: Connection) -> _SessionGuard | None:
    """The guard state of the session of ours that holds ``conn`` now, if any."""
    return conn.__dict__.get(_GUARD)


def session_listeners(mode: GuardMode) -> list[tuple[str, Callable[..., Any]]]:
    """The session-level listeners of the guard in ``mode`` ("raise" or "warn"), as
    ``(event name, listener)``: :func:`~._events.install` puts them on a maker, and puts
    :func:`before_cursor_execute` and :func:`commit` on the engines its sessions use."""

    def do_orm_execute(state: ORMExecuteState) -> Any:
        if not _blocked():
            return None
        guard = _guard_of(state.session, mode)
        if guard.reporting is not None:
            return None  # part of a flush or commit already reported
        _report(mode, *_describe(state))
        with allow_blocking():  # "warn": one warning per occurrence, the IO below is this one
            return state.invoke_statement()

    def before_flush(session: Session, flush_context: Any, instances: Any) -> None:
        if _blocked():
            guard = _guard_of(session, mode)
            if guard.reporting is None:
                _report(mode, _statement_message("Session.flush() of pending changes"))
                guard.reporting = "flush"

    def before_commit(session: Session) -> None:
        if not _blocked():
            return
        guard = _guard_of(session, mode)
        if guard.reporting is None and (
            guard.connections or session.new or session.deleted or session.dirty
        ):
            _report(mode, _statement_message("Session.commit() (flush and COMMIT)"))
            guard.reporting = "commit"

    def after_begin(session: Session, transaction: SessionTransaction, conn: Connection) -> None:
        guard = _guard_of(session, mode)
        if conn.__dict__.get(_GUARD) is not guard:
            conn.__dict__[_GUARD] = guard
            guard.connections.add(conn)
        if guard.reporting is None and _blocked():
            _report(mode, _statement_message("Checking out a database connection"))

    def after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            guard = _session_guard(session)
            if guard is not None:
                guard.reporting = None
                for conn in list(guard.connections):
                    if conn.__dict__.get(_GUARD) is guard:
                        del conn.__dict__[_GUARD]
                guard.connections.clear()

    listeners: list[tuple[str, Callable[..., Any]]] = [
        ("do_orm_execute", do_orm_execute),
        ("before_flush", before_flush),
        ("before_commit", before_commit),
        ("after_begin", after_begin),
        ("after_transaction_end", after_transaction_end),
    ]
    if mode == "warn":
        listeners += [
            ("after_flush_postexec", _end_of("flush")),
            ("after_commit", _end_of("commit")),
            ("after_soft_rollback", _end_of(None)),
        ]
    return listeners


def _end_of(operation: str | None) -> Any:
    """A hook that ends the reported ``operation`` (any, for ``None``) of a session."""

    def end(session: Session, *args: Any) -> None:
        guard = _session_guard(session)
        if guard is not None and (operation is None or guard.reporting == operation):
            guard.reporting = None

    return end


def before_cursor_execute(
    conn: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> tuple[str, Any]:
    """Engine listener (``retval=True``): SQL sent on the loop through a connection one of
    our sessions holds; the statement goes on unchanged."""
    if _blocked():
        _check_connection(conn, f"The statement {_short(statement)!r}")
    return statement, parameters


def commit(conn: Connection) -> None:
    """Engine listener: a ``COMMIT`` on the loop of a connection one of our sessions holds."""
    if _blocked():
        _check_connection(conn, "COMMIT")


def _check_connection(conn: Connection, what: str) -> None:
    guard = _holder(conn)
    if guard is None or guard.reporting is not None:
        return  # not held by one of our sessions (the application's business), or reported
    _report(guard.mode, _statement_message(f"{what}, on a connection of a threadpool session,"))


def _report(
    mode: GuardMode, message: str, error: type[BlockingOnEventLoopError] = BlockingOnEventLoopError
) -> None:
    if mode == "raise":
        raise error(message)
    warnings.warn(message, BlockingOnEventLoopWarning, stacklevel=_caller_stacklevel())


_PACKAGES = ("sqlalchemy", __name__.rpartition(".")[0])


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside SQLAlchemy and this package.

    Counted for a ``warnings.warn`` called by the function that calls this one.
    """
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None:
        module = frame.f_globals.get("__name__", "")
        if not any(module == name or module.startswith(name + ".") for name in _PACKAGES):
            return level
        frame = frame.f_back
        level += 1
    return level


# -- messages: what happened, and how to fix it --------------------------------------------

_FIXES = (
    "await the session's own method instead (`await sess.execute(...)`, `await sess.flush()`, "
    "`await sess.commit()`, ...) or run the code in a worker with `await sess.run(lambda s: "
    "...)`; if blocking here is deliberate (start-up code, a test), wrap it in "
    "`with allow_blocking():`"
)


def _statement_message(what: str) -> str:
    return (
        f"{what} was about to run on the event-loop thread: it would block every other task "
        f"until the database answers. Fix: {_FIXES}."
    )


def _describe(state: ORMExecuteState) -> tuple[str, type[BlockingOnEventLoopError]]:
    """The message for a statement about to run through the session, and its error class."""
    try:
        if state.is_select:  # only a SELECT has load options (and can be an attribute load)
            if getattr(state.load_options, "_is_user_refresh", False):
                return _statement_message(f"Session.refresh() of a {_owner(state)}"), (
                    BlockingOnEventLoopError
                )
            if state.is_relationship_load:
                return _relationship_message(state), LazyLoadOnEventLoopError
            if state.is_column_load:
                return _column_message(state), LazyLoadOnEventLoopError
        what = f"Session.execute() of {_short(str(state.statement))!r}"
    except Exception:  # the message must never hide the error, nor replace it
        if _is_attribute_load(state):
            return (
                "An attribute load on the event-loop thread would send a SELECT and block every "
                "other task. Fix: eager-load it in the query, load it in a worker with "
                "`await sess.load(obj, 'attribute')`, or read it inside `await sess.run(...)`.",
                LazyLoadOnEventLoopError,
            )
        what = f"Session.execute() ({type(state.statement).__name__.removeprefix('Annotated')})"
    return _statement_message(what), BlockingOnEventLoopError


def _is_attribute_load(state: ORMExecuteState) -> bool:
    try:
        return state.is_select and (state.is_relationship_load or state.is_column_load)
    except Exception:
        return False


def _owner(state: ORMExecuteState) -> str:
    refresh_state = getattr(state.load_options, "_refresh_state", None)
    mapper = refresh_state.mapper if refresh_state is not None else state.bind_mapper
    return mapper.class_.__name__ if mapper is not None else "object"


def _relationship_message(state: ORMExecuteState) -> str:
    attribute = "the relationship"
    path = state.loader_strategy_path
    for element in reversed(list(path.path) if path is not None else []):
        if isinstance(element, RelationshipProperty):
            attribute = f"{element.parent.class_.__name__}.{element.key}"
            break
    key = attribute.rpartition(".")[2]
    return (
        f"Lazy load of {attribute} on the event-loop thread: it would send a SELECT and block "
        "every other task. Fix one of: eager-load it in the query "
        f"(`.options(selectinload({attribute}))`); load it in a worker "
        f"(`await sess.load(obj, {key!r})`, or read it inside `await sess.run(...)`); or "
        'declare the relationship with `lazy="raise"` to find every such access.'
    )


def _column_message(state: ORMExecuteState) -> str:
    refresh_state = getattr(state.load_options, "_refresh_state", None)
    options = state._orm_compile_options()
    names: set[str] = set(getattr(options, "_only_load_props", None) or ())
    mapper = refresh_state.mapper if refresh_state is not None else state.bind_mapper
    owner = _owner(state)
    if mapper is not None:
        columns = {key for key in names if isinstance(mapper.attrs.get(key), ColumnProperty)}
        names = columns or names
    listed = ", ".join(f"{owner}.{name}" for name in sorted(names)) or f"the columns of {owner}"
    key = sorted(names)[0] if len(names) == 1 else "attribute"
    expired = refresh_state is not None and bool(names & refresh_state.expired_attributes)
    if not expired:
        return (
            f"Loading the deferred column {listed} on the event-loop thread would send a "
            "SELECT and block every other task. Fix one of: load it in the query "
            f"(`.options(undefer({listed}))`); or load it in a worker "
            f"(`await sess.load(obj, {key!r})`, or `await sess.refresh(obj, [{key!r}])`)."
        )
    return (
        f"Loading the expired attributes {listed} on the event-loop thread would send a "
        "SELECT and block every other task (they were expired by a commit with "
        "`expire_on_commit=True`, by `expire()` or by a rollback). Fix one of: keep "
        "`expire_on_commit=False` (the maker's default); reload them in a worker "
        f"(`await sess.refresh(obj)` or `await sess.load(obj, {key!r})`); or read them inside "
        "`await sess.run(...)`."
    )


def _short(statement: str, limit: int = 120) -> str:
    statement = " ".join(statement.split())
    return statement if len(statement) <= limit else statement[: limit - 3] + "..."
