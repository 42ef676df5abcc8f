"""One request's unit of work, shared by the integrations (framework-free).

A request either **owns** a fresh session from the maker, or **joins** the session already
bound to the current context when that session comes from the same maker (an outer
:class:`~sqlalchemy_threadpool.integrations.asgi.SessionMiddleware`, or the pytest plugin's
``threadpool_db_session`` when a test drives the app in its own task). A joined request gets
a SAVEPOINT instead of a transaction, so its commit/rollback decision still applies, while
committing and closing the session stays with its owner.

Every step that does IO runs in a worker through the session facade, shielded from
cancellation: a decision, once taken, is carried out.
"""

from __future__ import annotations

import logging
from typing import Literal

import anyio

from .._context import bound_session
from .._maker import threadpool_sessionmaker
from .._session import ThreadpoolSession
from .._transaction import ThreadpoolSessionTransaction

__all__ = ["CommitMode", "RequestUnit"]

logger = logging.getLogger("sqlalchemy_threadpool.integrations")

CommitMode = Literal["auto", "manual"]


def check_commit_mode(commit: str) -> None:
    if commit not in ("auto", "manual"):
        raise ValueError(f"commit must be 'auto' or 'manual', not {commit!r}.")


class RequestUnit:
    """The session of one request and the end of its unit of work."""

    __slots__ = ("_done", "_manual", "_savepoint", "owned", "session")

    def __init__(
        self,
        session: ThreadpoolSession,
        *,
        owned: bool,
        manual: bool,
        savepoint: ThreadpoolSessionTransaction | None,
    ) -> None:
        self.session = session
        self.owned = owned
        self._manual = manual
        self._savepoint = savepoint
        self._done = False

    @classmethod
    async def open(cls, maker: threadpool_sessionmaker, *, commit: CommitMode) -> RequestUnit:
        """A fresh session from ``maker``, or the bound one of the same maker, joined."""
        manual = commit == "manual"
        outer = bound_session()
        if outer is None or outer.maker is not maker:
            return cls(maker(), owned=True, manual=manual, savepoint=None)
        savepoint = None
        if not manual:
            with anyio.CancelScope(shield=True):
                savepoint = await outer.begin_nested()
        return cls(outer, owned=False, manual=manual, savepoint=savepoint)

    @property
    def done(self) -> bool:
        return self._done

    async def commit(self) -> BaseException | None:
        """Commit now (the response is about to start); return the error if that failed.

        On failure everything is rolled back (and an owned session closed) before returning.
        A session with no transaction has nothing to commit and costs no worker call;
        ``commit="manual"`` leaves committing to the application.
        """
        if self._done or self._manual:
            return None
        try:
            with anyio.CancelScope(shield=True):
                if self._savepoint is not None:
                    if self._savepoint.is_active:
                        await self._savepoint.commit()
                elif self.owned and self.session.in_transaction():
                    await self.session.commit()
        except Exception as exc:
            await self.finish(reason="its commit failed")
            return exc
        return None

    async def finish(self, *, reason: str, commit: bool = False) -> None:
        """End the unit of work once: commit if asked (and ``auto``), else roll back.

        An owned session is then closed and refuses further IO; a joined one is left open for
        its owner. A failed commit propagates, after the rollback.
        """
        if self._done:
            return
        self._done = True
        commit = commit and not self._manual
        if self.owned:
            await self.session._end(commit=commit, reason=reason)
            return
        savepoint = self._savepoint
        if savepoint is None or not savepoint.is_active:
            return
        with anyio.CancelScope(shield=True):
            if commit:
                try:
                    await savepoint.commit()
                except BaseException:
                    await _quiet_rollback(savepoint)
                    raise
            else:
                await _quiet_rollback(savepoint)


async def _quiet_rollback(savepoint: ThreadpoolSessionTransaction) -> None:
    if not savepoint.is_active:
        return
    try:
        await savepoint.rollback()
    except Exception:
        logger.warning("rolling back a request's SAVEPOINT failed", exc_info=True)
