"""The contextual registry: one session bound per task, and its lifecycle.

``threadpool_session()`` opens a session, binds it to the current context (a
:class:`~contextvars.ContextVar`, so child tasks inherit it and other tasks never see it), and
runs the unit of work: commit when the block exits normally, roll back on an exception or a
cancellation, always close. The cleanup runs in a worker, shielded from cancellation, and the
block's own exception or cancellation is what propagates. ``current_session()`` returns the
bound session from anywhere below.

Binding happens on the async side, never in a worker: a worker thread (the session's own, or
anyio's) runs in a copy of the caller's context, and changes to it are not copied back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from types import TracebackType

from ._exceptions import NoSessionError
from ._maker import threadpool_sessionmaker
from ._session import ThreadpoolSession

__all__ = [
    "bind_session",
    "bound_session",
    "current_session",
    "get_default_sessionmaker",
    "set_default_sessionmaker",
    "threadpool_session",
]


#: The session bound to the current context; its maker is ``session.maker``.
_bound: ContextVar[ThreadpoolSession | None] = ContextVar(
    "sqlalchemy_threadpool_session", default=None
)
_default_maker: threadpool_sessionmaker | None = None


def set_default_sessionmaker(maker: threadpool_sessionmaker | None) -> None:
    """Register the maker ``threadpool_session()`` uses when given none (``None`` clears it)."""
    global _default_maker
    if maker is not None and not isinstance(maker, threadpool_sessionmaker):
        raise TypeError(
            f"set_default_sessionmaker() takes a threadpool_sessionmaker, not "
            f"{type(maker).__name__}."
        )
    _default_maker = maker


def get_default_sessionmaker() -> threadpool_sessionmaker | None:
    """The maker registered with :func:`set_default_sessionmaker`, if any."""
    return _default_maker


def bound_session() -> ThreadpoolSession | None:
    """The session bound to the current context, or ``None`` (:func:`current_session` raises)."""
    return _bound.get()


def current_session() -> ThreadpoolSession:
    """The session bound to the current context by an enclosing :func:`threadpool_session`."""
    session = bound_session()
    if session is None:
        raise NoSessionError(
            "No threadpool session is bound to the current context. Open one around this "
            "code with `async with threadpool_session(maker):` (or register a default with "
            "`set_default_sessionmaker(maker)` and use `async with threadpool_session():`). "
            "Note that bindings made inside a worker thread, or in a task started outside "
            "the scope, are not visible here."
        )
    return session


@contextmanager
def bind_session(session: ThreadpoolSession) -> Iterator[ThreadpoolSession]:
    """Make ``session`` what :func:`current_session` returns inside the block; nothing else.

    Unlike :func:`threadpool_session` it neither commits nor closes: the caller owns the
    session's lifecycle (integrations use it to decide the transaction at a moment of their
    choosing, e.g. before an HTTP response starts). Nested :func:`threadpool_session` blocks
    with the same (or no) maker join the bound session. Enter and exit it in the same task.
    """
    if not isinstance(session, ThreadpoolSession):
        raise TypeError(f"bind_session() takes a ThreadpoolSession, not {type(session).__name__}.")
    token = _bound.set(session)
    try:
        yield session
    finally:
        _bound.reset(token)


class threadpool_session:
    """Open (or join) the session bound to the current context: ``async with`` only.

    - Outermost use: makes a session from ``maker`` (or the enclosing scope's maker, or the
      default registered with :func:`set_default_sessionmaker`), binds it, and on exit commits
      if the block succeeded, rolls back if it raised or was cancelled, and always closes.
    - Nested use with the same (or no) maker: returns the bound session and leaves the
      lifecycle to the outermost block.
    - ``new=True``, or a different maker: an independent session for this block, with its own
      lifecycle; the previous binding is restored afterwards.
    """

    __slots__ = ("_maker", "_new", "_session", "_token")

    def __init__(self, maker: threadpool_sessionmaker | None = None, *, new: bool = False) -> None:
        if maker is not None and not isinstance(maker, threadpool_sessionmaker):
            raise TypeError(
                f"threadpool_session() takes a threadpool_sessionmaker, not "
                f"{type(maker).__name__}; create one with threadpool_sessionmaker(engine)."
            )
        self._maker = maker
        self._new = new
        self._session: ThreadpoolSession | None = None
        self._token: Token[ThreadpoolSession | None] | None = None

    async def __aenter__(self) -> ThreadpoolSession:
        if self._token is not None:
            raise RuntimeError("This threadpool_session() scope is already open.")
        outer = _bound.get()
        joins = outer is not None and not self._new and self._maker in (None, outer.maker)
        if outer is not None and joins:
            self._token = _bound.set(outer)
            return outer
        maker = self._maker or (outer.maker if outer is not None else None) or _default_maker
        if maker is None:
            raise NoSessionError(
                "threadpool_session() was given no maker, none is bound by an enclosing "
                "scope, and no default is registered. Pass one, "
                "`threadpool_session(threadpool_sessionmaker(engine))`, or register it once "
                "at start-up with `set_default_sessionmaker(maker)`."
            )
        self._session = maker()
        self._token = _bound.set(self._session)
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, session = self._token, self._session
        self._token = self._session = None
        if token is None:
            return
        try:
            if session is not None:
                await session._end(
                    commit=exc_type is None, reason="its `threadpool_session()` block exited"
                )
        finally:
            _bound.reset(token)
