"""Pure ASGI middleware: one threadpool session per request, decided before the response starts.

.. code-block:: python

    from sqlalchemy_threadpool.integrations.asgi import SessionMiddleware

    app = SessionMiddleware(app, sessionmaker=Session)       # any ASGI app
    app.add_middleware(SessionMiddleware, sessionmaker=Session)   # Starlette / FastAPI

For every ``http`` and ``websocket`` connection the middleware makes a session, binds it so
:func:`~sqlalchemy_threadpool.current_session` returns it anywhere below (also stored in
``scope["state"]["db_session"]``, i.e. ``request.state.db_session``), and ends the unit of work
at the right moment:

- **http**: when the application sends ``http.response.start``, the middleware holds that
  message, commits in a worker if the status calls for it, and only then forwards it. If the
  commit fails, the client gets a ``500 Internal Server Error`` instead, never the original
  2xx. Other statuses roll back. The session stays open (for streaming bodies) until the last
  body chunk has been sent, then it is closed; work done after the decision is rolled back.
- **websocket**: commit when the application returns, roll back if it raises (a denial
  response, ``websocket.http.response.start``, is decided by its status like http).
- an exception from the application rolls back and propagates; ``lifespan`` passes through.

It is plain ASGI (no ``BaseHTTPMiddleware``, which runs the app in another task and loses
context variables), imports no framework, and runs on asyncio and trio.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from .._context import bind_session
from .._maker import threadpool_sessionmaker
from ._unit import CommitMode, RequestUnit, check_commit_mode, logger

__all__ = ["ASGIApp", "CommitPolicy", "Message", "Receive", "Scope", "Send", "SessionMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_START = frozenset({"http.response.start", "websocket.http.response.start"})
_BODY = frozenset(
    {"http.response.body", "http.response.zerocopysend", "websocket.http.response.body"}
)
_FINAL = frozenset({"http.response.pathsend"})

_ERROR_BODY = b"Internal Server Error"
_ERROR_START: dict[str, Any] = {
    "type": "http.response.start",
    "status": 500,
    "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(_ERROR_BODY)).encode()),
    ],
}


class CommitPolicy:
    """Which response statuses commit the request's transaction.

    2xx commits; 3xx commits too with ``commit_on_redirect``; ``extra_commit_statuses`` are
    added and ``extra_rollback_statuses`` removed (a status in both is a ``ValueError``).
    """

    __slots__ = ("commit_on_redirect", "extra_commit_statuses", "extra_rollback_statuses")

    def __init__(
        self,
        *,
        commit_on_redirect: bool = False,
        extra_commit_statuses: Iterable[int] | None = None,
        extra_rollback_statuses: Iterable[int] | None = None,
    ) -> None:
        commits = frozenset(extra_commit_statuses or ())
        rollbacks = frozenset(extra_rollback_statuses or ())
        for status in commits | rollbacks:
            if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
                raise ValueError(f"HTTP statuses are integers from 100 to 599, not {status!r}.")
        overlap = commits & rollbacks
        if overlap:
            raise ValueError(
                f"Status codes {sorted(overlap)} are in both extra_commit_statuses and "
                "extra_rollback_statuses; each status may only commit or roll back."
            )
        self.commit_on_redirect: bool = commit_on_redirect
        self.extra_commit_statuses: frozenset[int] = commits
        self.extra_rollback_statuses: frozenset[int] = rollbacks

    def commits(self, status: int) -> bool:
        """Whether a response with this status commits."""
        if status in self.extra_rollback_statuses:
            return False
        if status in self.extra_commit_statuses or 200 <= status < 300:
            return True
        return self.commit_on_redirect and 300 <= status < 400

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(commit_on_redirect={self.commit_on_redirect!r}, "
            f"extra_commit_statuses={sorted(self.extra_commit_statuses)!r}, "
            f"extra_rollback_statuses={sorted(self.extra_rollback_statuses)!r})"
        )


class SessionMiddleware:
    """Give every ``http``/``websocket`` request a threadpool session; see the module docs.

    :param app: the ASGI application to wrap.
    :param sessionmaker: the :class:`~sqlalchemy_threadpool.threadpool_sessionmaker`.
    :param commit: ``"auto"`` (default) decides by status as described above; ``"manual"``
        never commits: the application calls ``await session.commit()`` itself, and whatever
        is left uncommitted is rolled back when the session closes.
    :param commit_on_redirect: 3xx responses commit too.
    :param extra_commit_statuses: more statuses that commit (e.g. ``{409}``).
    :param extra_rollback_statuses: statuses that roll back although 2xx (e.g. ``{202}``).
    :param state_key: the key of the session in ``scope["state"]``.

    If a session of the same maker is already bound (an outer ``SessionMiddleware``, or the
    pytest plugin's session in a test that calls the app in its own task), the request joins
    it inside a SAVEPOINT, released or rolled back by the same rules; the owner commits.
    """

    def __init__(
        self,
        app: ASGIApp,
        sessionmaker: threadpool_sessionmaker,
        *,
        commit: CommitMode = "auto",
        commit_on_redirect: bool = False,
        extra_commit_statuses: Iterable[int] | None = None,
        extra_rollback_statuses: Iterable[int] | None = None,
        state_key: str = "db_session",
    ) -> None:
        if not isinstance(sessionmaker, threadpool_sessionmaker):
            raise TypeError(
                f"SessionMiddleware needs a threadpool_sessionmaker, not "
                f"{type(sessionmaker).__name__}; create one with threadpool_sessionmaker(engine)."
            )
        check_commit_mode(commit)
        self.app = app
        self.sessionmaker = sessionmaker
        self.commit: CommitMode = commit
        self.policy: CommitPolicy = CommitPolicy(
            commit_on_redirect=commit_on_redirect,
            extra_commit_statuses=extra_commit_statuses,
            extra_rollback_statuses=extra_rollback_statuses,
        )
        self.state_key = state_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        unit = await RequestUnit.open(self.sessionmaker, commit=self.commit)
        scope.setdefault("state", {})[self.state_key] = unit.session
        response = _Response(unit, self.policy, send)
        with bind_session(unit.session):
            try:
                await self.app(scope, receive, response.send)
            except BaseException:
                await unit.finish(reason="the request failed (SessionMiddleware)")
                raise
            # No response started (a websocket, or an app that sent nothing): commit on success.
            commit = not response.started and kind == "websocket"
            await unit.finish(commit=commit, reason="the request ended (SessionMiddleware)")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.app!r}, sessionmaker={self.sessionmaker!r}, "
            f"commit={self.commit!r}, policy={self.policy!r})"
        )


class _Response:
    """The ``send`` the application sees: holds the response start until the decision."""

    __slots__ = ("_policy", "_replaced", "_send", "_unit", "started")

    def __init__(self, unit: RequestUnit, policy: CommitPolicy, send: Send) -> None:
        self._unit = unit
        self._policy = policy
        self._send = send
        self._replaced = False
        self.started = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind in _START:
            self.started = True
            status = int(message["status"])
            error = await self._unit.commit() if self._policy.commits(status) else None
            if error is not None:
                self._replaced = True
                logger.error(
                    "committing the request's transaction failed; the client gets a 500 "
                    "instead of the application's %d",
                    status,
                    exc_info=error,
                )
                prefix = "websocket." if kind.startswith("websocket.") else ""
                await self._send({**_ERROR_START, "type": f"{prefix}http.response.start"})
                await self._send({"type": f"{prefix}http.response.body", "body": _ERROR_BODY})
                return
            await self._send(message)
            return
        if self._replaced and kind.startswith(("http.response.", "websocket.http.response.")):
            return  # the body (or trailers) of the response the 500 replaced
        await self._send(message)
        if (kind in _BODY and not message.get("more_body", False)) or kind in _FINAL:
            await self._unit.finish(reason="its response was sent (SessionMiddleware)")
