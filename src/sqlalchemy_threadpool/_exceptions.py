"""The exceptions and warnings of sqlalchemy-threadpool.

Our own errors share one base class; database errors raised in a worker thread are never
wrapped and reach the caller unchanged (``except IntegrityError`` keeps working)::

    ThreadpoolSessionError
    ├── NoSessionError              current_session() with nothing bound, or
    │                               awaitable_attrs on an object no ThreadpoolSession owns
    ├── SessionClosedError          IO on a session whose scope has ended
    ├── ConfigurationError          a maker that cannot work (also a ValueError)
    ├── AdmissionTimeoutError       no connection capacity within the admission timeout
    │                               (also a TimeoutError)
    ├── SessionOwnershipError       a strict session used from a task that does not own it
    ├── EventLoopConflictError      a capacity or a session used by two event loops at once
    │                               (also a RuntimeError)
    ├── TransactionInterruptedError a call was cancelled or timed out while it ran: the
    │                               unit of work failed and was rolled back
    ├── StreamClosedError           a stream's unread rows were discarded as its transaction
    │                               ended (MySQL; also a sqlalchemy.exc.ResourceClosedError)
    └── BlockingOnEventLoopError    SQL about to run on the event-loop thread
        │                           (also a sqlalchemy.exc.InvalidRequestError)
        └── LazyLoadOnEventLoopError    an attribute load on the event-loop thread

    UserWarning
    ├── BlockingOnEventLoopWarning  the guard's "warn" mode
    └── ConfigurationWarning        a configuration that works, but not as it may look
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

__all__ = [
    "AdmissionTimeoutError",
    "BlockingOnEventLoopError",
    "BlockingOnEventLoopWarning",
    "ConfigurationError",
    "ConfigurationWarning",
    "EventLoopConflictError",
    "LazyLoadOnEventLoopError",
    "NoSessionError",
    "SessionClosedError",
    "SessionOwnershipError",
    "StreamClosedError",
    "ThreadpoolSessionError",
    "TransactionInterruptedError",
]


class ThreadpoolSessionError(Exception):
    """Base class of every error raised by sqlalchemy-threadpool itself."""


class NoSessionError(ThreadpoolSessionError, LookupError):
    """No ``ThreadpoolSession`` where one is needed.

    ``current_session()`` was called where no session is bound, or ``awaitable_attrs`` was
    used on an object whose session is not a ``ThreadpoolSession``'s.
    """


class SessionClosedError(ThreadpoolSessionError):
    """IO was attempted on a session whose scope has already ended."""


class ConfigurationError(ThreadpoolSessionError, ValueError):
    """A session maker was configured in a way that cannot work."""


class AdmissionTimeoutError(ThreadpoolSessionError, TimeoutError):
    """A session waited longer than the admission timeout for connection capacity."""


class SessionOwnershipError(ThreadpoolSessionError):
    """A session made with ``strict=True`` was used from a task that does not own it."""


class EventLoopConflictError(ThreadpoolSessionError, RuntimeError):
    """Two event loops running at once used one engine's capacity, or one session.

    Makers, engines and sessions serve any number of event loops one after the other, of
    asyncio and trio alike, but one at a time: a session waiting for a connection can only be
    woken in its own loop. Give each concurrently running loop its own engine and maker.
    """


class TransactionInterruptedError(ThreadpoolSessionError):
    """The session's unit of work failed because a call of it was interrupted.

    A call was cancelled or timed out (or ``shutdown()`` stopped it) while its worker was
    inside the session. The transaction was rolled back then and there, so ``commit()`` and any
    other IO raise this error, instead of committing half a unit of work, until
    ``rollback()`` (or ``close()``) acknowledges it.
    """


class StreamClosedError(ThreadpoolSessionError, sa_exc.ResourceClosedError):
    """A stream's unread rows were discarded because its transaction ended while it was open.

    On MySQL and MariaDB (one unbuffered result per connection) a commit or rollback, a
    session's close included, ends an open stream's server-side cursor; the rows it had read
    ahead are still served, then a read that needs more raises this instead of ending early.
    Also a ``sqlalchemy.exc.ResourceClosedError``, what reading a closed result raises.
    """


class BlockingOnEventLoopError(ThreadpoolSessionError, sa_exc.InvalidRequestError):
    """SQL was about to run on the event-loop thread, which would block every task."""


class LazyLoadOnEventLoopError(BlockingOnEventLoopError):
    """An attribute load (lazy relationship, deferred or expired column) on the loop thread."""


class BlockingOnEventLoopWarning(UserWarning):
    """Emitted instead of :class:`BlockingOnEventLoopError` when the guard is in "warn" mode."""


class ConfigurationWarning(UserWarning):
    """A configuration works, but not as it may look (e.g. a late ``configure()``)."""
