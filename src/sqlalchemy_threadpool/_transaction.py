"""The transactions of sessions and connections: ``await``-able, ``async with``-able.

:class:`ThreadpoolSessionTransaction` is ``AsyncSessionTransaction``'s counterpart (from
``sess.begin()`` / ``begin_nested()``), :class:`ThreadpoolTransaction` ``AsyncTransaction``'s
(from ``conn.begin()`` / ``begin_nested()``). Each begins in a worker, and its ``async with``
ends through SQLAlchemy's own ``SessionTransaction.__exit__`` in a worker, as
``AsyncSessionTransaction`` does.
"""

from __future__ import annotations

from collections.abc import Generator
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import anyio
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session, SessionTransaction
from typing_extensions import Self

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._connection import ThreadpoolConnection
    from ._session import ThreadpoolSession

    #: Only names the types of AsyncSession's bound methods (see ``execute``); never exists.
    _ASYNC_SESSION = cast("AsyncSession", None)


from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    #: Only names the types of AsyncConnection's bound methods (see ``execute``); never exists.
    _ASYNC_CONNECTION = cast("AsyncConnection", None)

__all__ = ["ThreadpoolSessionTransaction", "ThreadpoolTransaction"]


class ThreadpoolSessionTransaction:
    """A transaction or SAVEPOINT of a :class:`ThreadpoolSession`, usable as ``async with``.

    ``await sess.begin()`` starts it and returns it; ``async with sess.begin():`` also commits
    when the block succeeds and rolls back when it raises or is cancelled.
    """

    __slots__ = ("nested", "session", "sync_transaction")

    def __init__(self, session: ThreadpoolSession, *, nested: bool) -> None:
        self.session: ThreadpoolSession = session
        self.nested: bool = nested
        self.sync_transaction: SessionTransaction | None = None

    @classmethod
    def _wrap(
        cls, session: ThreadpoolSession, transaction: SessionTransaction | None
    ) -> ThreadpoolSessionTransaction | None:
        """The facade of a sync transaction already begun (``get_transaction()``)."""
        if transaction is None:
            return None
        wrapped = cls(session, nested=transaction.nested)
        wrapped.sync_transaction = transaction
        return wrapped

    @property
    def is_active(self) -> bool:
        return self.sync_transaction is not None and self.sync_transaction.is_active

    async def start(self) -> Self:
        """Begin the transaction (SAVEPOINT for a nested one) in a worker."""
        method = Session.begin_nested if self.nested else Session.begin
        session = self.session.sync_session
        self.sync_transaction = await self.session._offloader.call(partial(method, session))
        return self

    def __await__(self) -> Generator[Any, None, Self]:
        return self.start().__await__()

    async def commit(self) -> None:
        """Commit this transaction (RELEASE SAVEPOINT for a nested one)."""
        await self._end(commit=True)

    async def rollback(self) -> None:
        """Roll this transaction back (to its SAVEPOINT for a nested one)."""
        await self._end(commit=False)

    async def _end(self, *, commit: bool) -> None:
        transaction = self.sync_transaction
        if transaction is None:
            raise RuntimeError("This transaction was never started; `await` it first.")
        if not commit and not transaction.is_active:
            return  # already rolled back, e.g. after an interrupted call
        method = transaction.commit if commit else transaction.rollback
        with anyio.CancelScope(shield=not commit):
            await self.session._offloader.call(method, recovers=not commit)

    async def __aenter__(self) -> Self:
        await self.start()
        assert self.sync_transaction is not None
        # As AsyncSessionTransaction does: the sync transaction's own context manager (no IO
        # here) decides at the end what to commit, roll back or close.
        self.sync_transaction.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        transaction = self.sync_transaction
        if transaction is None:
            return
        offloader = self.session._offloader
        if exc_type is None:
            offloader.check_usable()  # never report an interrupted one committed
        elif offloader.interrupted:
            return  # the whole unit of work was rolled back already
        # SessionTransaction.__exit__ in a worker: commit (a failed commit or RELEASE rolls the
        # transaction or SAVEPOINT back before it raises), or roll back a transaction that is
        # still active, or close one a failed flush deactivated; shielded when unwinding.
        with anyio.CancelScope(shield=exc_type is not None):
            await offloader.call(partial(transaction.__exit__, exc_type, exc, tb))


class ThreadpoolTransaction(ThreadpoolSessionTransaction):
    """A transaction or SAVEPOINT of a :class:`ThreadpoolConnection` (``AsyncTransaction``).

    ``await conn.begin()`` begins it; ``async with conn.begin():`` also commits when the block
    succeeds and rolls back when it raises or is cancelled.
    """

    __slots__ = ("connection",)

    def __init__(self, connection: ThreadpoolConnection, *, nested: bool) -> None:
        super().__init__(connection._session, nested=nested)
        self.connection: ThreadpoolConnection = connection

    @classmethod
    def _of(
        cls, connection: ThreadpoolConnection, transaction: SessionTransaction | None
    ) -> ThreadpoolTransaction | None:
        if transaction is None:
            return None
        wrapped = cls(connection, nested=transaction.nested)
        wrapped.sync_transaction = transaction
        return wrapped

    @property
    def is_valid(self) -> bool:
        """Whether it is active on a connection that was not invalidated."""
        return self.is_active and not self.connection.invalidated

    async def start(self) -> Self:
        """Begin it in a worker, taking the connection from the pool (with its options)."""
        connection = self.connection
        session = connection._session.sync_session
        if self.nested:
            self.sync_transaction = await connection._call(
                lambda c: session.begin_nested(), "begin_nested()"
            )
            return self
        connection._check_open()
        if connection.in_transaction():
            raise InvalidRequestError(
                "This ThreadpoolConnection already has a transaction in progress (a statement "
                "begins one); commit() or rollback() it before begin(), or use begin_nested()."
            )
        transaction = await connection._call(
            lambda c: session.get_transaction(), "begin()", begin=True
        )
        assert transaction is not None
        self.sync_transaction = transaction
        return self

    async def close(self) -> None:
        """Roll it back if it is still active."""
        if self.is_active:
            await self.rollback()
