"""``threadpool_sessionmaker``: configuration, the capacity limiter, and session creation.

The maker is to :class:`ThreadpoolSession` what :class:`~sqlalchemy.ext.asyncio.async_sessionmaker`
is to ``AsyncSession``. It owns one :class:`anyio.CapacityLimiter` sized to what the engine's
pool can really hand out (invariant 6: the thread pool never outgrows the connection pool), and
installs (through :mod:`._events`) on the sessions it makes the row pre-buffering and the
event-loop guard.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple

import anyio
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker
from typing_extensions import TypeVar

from ._binds import check_memory_database, pool_capacity, pool_timeout, unwrap_binds
from ._cancel import StatementCanceller, canceller_for
from ._events import install as install_events
from ._events import watch_binds
from ._exceptions import ConfigurationError, ConfigurationWarning
from ._guard import GuardMode
from ._offload import CLEANUP_TIMEOUT, Offloader
from ._session import ThreadpoolSession
from ._transaction import ThreadpoolSessionTransaction
from ._worker_pool import WorkerPool, pool_for

if TYPE_CHECKING:
    from sqlalchemy.orm.session import _SessionBindKey

    from ._engine import ThreadpoolEngine

__all__ = ["OffloadMode", "implicit_maker", "threadpool_sessionmaker"]

#: The session class a maker makes (``class_=``); ``ThreadpoolSession`` when not given.
#: Covariant: a maker of a ThreadpoolSession subclass goes wherever a maker goes.
_TS = TypeVar("_TS", bound=ThreadpoolSession, default=ThreadpoolSession, covariant=True)

#: How a maker's sessions reach their worker threads (see ``offload=``).
OffloadMode = Literal["worker", "anyio"]

#: Tokens when the pool does not bound connections (NullPool, unlimited overflow): as many
#: threads as anyio's own default limiter allows.
UNBOUNDED_POOL_TOKENS = 40

#: The maker's own options, given to the constructor and to ``configure()``.
_OPTIONS = (
    "limiter",
    "admission_timeout",
    "cancel_statements",
    "cleanup_timeout",
    "strict",
    "offload",
    "worker_idle_timeout",
    "workers",
)


class _Settings(NamedTuple):
    """The maker's options and what it derived from them and its binds."""

    options: dict[str, Any]
    limiter: anyio.CapacityLimiter
    #: The binds and the ``limiter=`` option the limiter was made for.
    limiter_key: tuple[tuple[Engine | Connection, ...], int | anyio.CapacityLimiter | None]
    admission_timeout: float | None
    canceller: StatementCanceller | None
    workers: WorkerPool | None


class threadpool_sessionmaker(Generic[_TS]):
    """A factory of :class:`ThreadpoolSession` objects, configured once per engine.

    Generic in the class it makes, like :class:`~sqlalchemy.ext.asyncio.async_sessionmaker`:
    ``threadpool_sessionmaker[ThreadpoolSession]`` is the type of ``threadpool_sessionmaker(
    engine)``, and ``maker()`` is typed as ``class_``.

    :param bind: the :class:`~sqlalchemy.engine.Engine` (or ``Connection``) sessions use.
    :param class_: the :class:`ThreadpoolSession` subclass to make (default
        ``ThreadpoolSession``); it is called as ``class_(maker=self, **local_kw)``.
    :param sync_session_class: the :class:`~sqlalchemy.orm.Session` class behind each session,
        as ``async_sessionmaker``'s; default ``class_.sync_session_class`` (``Session``).
    :param limiter: how many sessions may hold a connection (and so run a worker thread) at
        once: an ``int`` or an :class:`anyio.CapacityLimiter`. Defaults to what the pool can
        really hand out: ``pool_size + max_overflow`` for a ``QueuePool``, 1 for a
        single-connection pool, 40 for an unbounded one. A value above the pool's capacity is
        an error (threads would wait in pool checkout); a value below it gets a warning.
    :param guard: what to do when a session's SQL is about to run on the event-loop thread:
        ``"raise"`` (default), ``"warn"`` or ``"off"``. See :func:`allow_blocking`.
    :param admission_timeout: seconds a session may wait for connection capacity before
        :class:`AdmissionTimeoutError`; ``"pool"`` (default) uses the pool's own ``timeout``
        (30 s unless configured), ``None`` waits forever.
    :param cancel_statements: when an awaiting task is cancelled or times out, ask the database
        to stop the statement in flight (psycopg2 ``cancel()``, MySQL/MariaDB ``KILL QUERY``,
        sqlite3 and DuckDB ``interrupt()``). Default ``True``. See the cancellation docs.
    :param cleanup_timeout: seconds an interrupted call may take to stop its statement, and
        then to roll back, before the connection is cut and invalidated. Default 5.
    :param offload: how calls reach a thread. ``"worker"`` (default): an admitted session has
        a dedicated worker thread of its own until it is released (one thread per
        transaction, which is also what drivers that insist on one thread need), woken
        directly: the short path. ``"anyio"``: every call goes through
        :func:`anyio.to_thread.run_sync` (the maker's limiter still bounds them).
    :param worker_idle_timeout: with ``offload="worker"``, seconds an idle worker thread waits
        for another session before it exits. Given, the maker owns a :class:`WorkerPool` of
        its own with that timeout (the timeout is this maker's choice, which threads shared
        with makers that chose otherwise could not keep). Not given, and without ``workers=``,
        the maker uses the process's default pool (10 s, as anyio's threads), shared by every
        such maker: a thread goes from one maker's sessions to another's.
    :param workers: with ``offload="worker"``, the :class:`WorkerPool` whose threads the
        maker's sessions use. Give one pool to several makers to share threads between them;
        its own ``idle_timeout`` applies (giving ``worker_idle_timeout=`` too is an error).
    :param strict: each session belongs to the task that created it (or first used it); use
        from any other task raises :class:`SessionOwnershipError`. By default (``False``)
        tasks sharing a session take turns.
    :param session_kw: passed to :class:`~sqlalchemy.orm.sessionmaker`. ``expire_on_commit``
        defaults to ``False`` (reading an expired attribute would be IO on the event loop).
    """

    def __init__(
        self,
        bind: Engine | Connection | ThreadpoolEngine | None = None,
        *,
        limiter: int | anyio.CapacityLimiter | None = None,
        guard: GuardMode = "raise",
        admission_timeout: float | Literal["pool"] | None = "pool",
        cancel_statements: bool = True,
        cleanup_timeout: float = CLEANUP_TIMEOUT,
        strict: bool = False,
        offload: OffloadMode = "worker",
        worker_idle_timeout: float | None = None,
        workers: WorkerPool | None = None,
        class_: type[_TS] = ThreadpoolSession,  # type: ignore[assignment]
        sync_session_class: type[Session] | None = None,
        **session_kw: Any,
    ) -> None:
        session_kw = unwrap_binds({**session_kw, "bind": bind})  # now holds the sync bind
        if guard not in ("raise", "warn", "off"):
            raise ConfigurationError(f"guard must be 'raise', 'warn' or 'off', not {guard!r}.")
        session_kw.setdefault("expire_on_commit", False)
        self.guard: GuardMode = guard
        self.class_: type[_TS] = class_
        #: The sync session class (``sync_session_class=``), before sessionmaker subclasses it.
        self.sync_class: type[Session] = sync_session_class or class_.sync_session_class
        options = {
            "limiter": limiter,
            "admission_timeout": admission_timeout,
            "cancel_statements": cancel_statements,
            "cleanup_timeout": cleanup_timeout,
            "strict": strict,
            "offload": offload,
            "worker_idle_timeout": worker_idle_timeout,
            "workers": workers,
        }
        settings = self._settle(session_kw, options)
        self.sync_maker: sessionmaker[Session] = sessionmaker(class_=self.sync_class, **session_kw)
        self._adopt(settings)
        install_events(self.sync_maker, guard)

    def __call__(self, **local_kw: Any) -> _TS:
        """A new session; ``local_kw`` overrides the maker's sessionmaker arguments."""
        return self.class_(maker=self, **local_kw)

    def open_sync_session(self, session_kw: dict[str, Any]) -> tuple[Session, Offloader]:
        """The sync session and its offloader, for ``ThreadpoolSession.__init__``."""
        sync_session = self.sync_maker(**unwrap_binds(session_kw))
        offloader = Offloader(
            sync_session,
            self.limiter,
            admission_timeout=self.admission_timeout,
            canceller=self._canceller,
            cleanup_timeout=self.cleanup_timeout,
            strict=self.strict,
            workers=self._workers,
        )
        return sync_session, offloader

    def begin(self) -> _BeginContext[_TS]:
        """``async with maker.begin() as sess:`` as ``async_sessionmaker.begin()``.

        A new session with a transaction begun; when the block exits the transaction commits
        (or rolls back if the block raised), then the session is closed, shielded.
        """
        return _BeginContext(self())

    def configure(self, **new_kw: Any) -> None:
        """Change the maker's configuration for the sessions it makes from now on.

        Like :meth:`sqlalchemy.orm.sessionmaker.configure`: ``new_kw`` updates the arguments
        given to the maker (``bind=``, ``binds=``, ``expire_on_commit=``, any other
        :class:`~sqlalchemy.orm.Session` argument, and the maker's own ``limiter=``,
        ``admission_timeout=``, ``cancel_statements=``, ``cleanup_timeout=``, ``strict=``,
        ``offload=``, ``worker_idle_timeout=``, ``workers=``), and everything the maker
        derives from them is derived again, exactly as by the constructor: the limiter from
        the new pool, the in-memory SQLite / DuckDB checks, the pool's admission timeout, the
        statement canceller for the new driver, the worker pool. What the constructor refuses
        is refused here with the same :class:`ConfigurationError`, and the maker is then left
        unchanged. A ``limiter=`` given earlier still applies (``limiter=None`` follows the
        new pool again); the limiter object is kept when neither the binds nor ``limiter=``
        change. ``workers=`` replaces a ``worker_idle_timeout=`` given earlier and the other
        way round; the maker's own pool is kept while its ``worker_idle_timeout=`` does not
        change.

        Sessions made before keep their bind, their limiter (they give their token back to
        the limiter they took it from), their canceller and their threads.
        ``shutdown(maker)`` reaches the sessions of the maker's *current* engine; pass the
        old engine to :func:`shutdown` for sessions still open on it. ``guard=`` and
        ``sync_session_class=`` cannot be changed: make a new maker.
        """
        for fixed in ("guard", "sync_session_class", "class_"):
            if fixed in new_kw:
                raise ConfigurationError(
                    f"configure() cannot change {fixed}=: it is fixed when the maker is made "
                    "(its listeners are installed on the maker's sync sessionmaker). Make a "
                    f"new threadpool_sessionmaker(..., {fixed}=...) instead."
                )
        unwrap_binds(new_kw)
        options = {name: new_kw.pop(name) for name in _OPTIONS if name in new_kw}
        merged = {**self._options, **options}
        for given, replaced in (
            ("workers", "worker_idle_timeout"),
            ("worker_idle_timeout", "workers"),
        ):
            if given in options and replaced not in options:
                merged[replaced] = None  # two ways to say which threads: the newer one holds
        settings = self._settle({**self.sync_maker.kw, **new_kw}, merged)
        self.sync_maker.configure(**new_kw)
        watch_binds(self.sync_maker, self.guard)
        self._adopt(settings)

    def _settle(self, session_kw: dict[str, Any], options: dict[str, Any]) -> _Settings:
        """Validate the options and derive from the binds what sessions need; change nothing.

        The one path of both ``__init__`` and ``configure()`` (warnings point at their caller).
        """
        offload = options["offload"]
        if offload not in ("worker", "anyio"):
            raise ConfigurationError(f"offload must be 'worker' or 'anyio', not {offload!r}.")
        bind = session_kw.get("bind")
        binds = [b for b in (bind, *(session_kw.get("binds") or {}).values()) if b is not None]
        for each in binds:
            check_memory_database(each)
        key = (tuple(binds), options["limiter"])
        current: _Settings | None = getattr(self, "_settings", None)
        if current is not None and current.limiter_key == key:
            limiter = current.limiter  # same binds, same limiter=: same capacity, same tokens
        else:
            limiter = _make_limiter(binds, options["limiter"])
        admission_timeout = options["admission_timeout"]
        workers = pool_for(options, current.workers if current is not None else None)
        return _Settings(
            options=options,
            limiter=limiter,
            limiter_key=key,
            admission_timeout=(
                pool_timeout(bind) if admission_timeout == "pool" else admission_timeout
            ),
            canceller=canceller_for(bind) if options["cancel_statements"] else None,
            workers=workers if offload == "worker" else None,
        )

    def _adopt(self, settings: _Settings) -> None:
        self._settings = settings
        self._options: dict[str, Any] = settings.options
        self.limiter: anyio.CapacityLimiter = settings.limiter
        if isinstance(settings.options["limiter"], anyio.CapacityLimiter):
            _own_limiters.discard(self)
        else:
            _own_limiters.add(self)  # a forked child gets a fresh one
        self.admission_timeout: float | None = settings.admission_timeout
        self.cancel_statements: bool = settings.options["cancel_statements"]
        self._canceller: StatementCanceller | None = settings.canceller
        self.cleanup_timeout: float = settings.options["cleanup_timeout"]
        self.strict: bool = settings.options["strict"]
        self.offload: OffloadMode = settings.options["offload"]
        self._workers: WorkerPool | None = settings.workers

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(bind={self.sync_maker.kw.get('bind')!r}, "
            f"limiter={self.limiter.total_tokens:g}, guard={self.guard!r}, "
            f"offload={self.offload!r})"
        )


class _BeginContext(Generic[_TS]):
    """``maker.begin()``: the session's ``begin()`` block, then its ``async with`` exit."""

    __slots__ = ("session", "transaction")

    def __init__(self, session: _TS) -> None:
        self.session: _TS = session
        self.transaction: ThreadpoolSessionTransaction = session.begin()

    async def __aenter__(self) -> _TS:
        await self.transaction.__aenter__()
        return self.session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.transaction.__aexit__(exc_type, exc, tb)
        finally:
            await self.session.__aexit__(exc_type, exc, tb)


#: The implicit makers of sessions made directly, ``ThreadpoolSession(engine)``: one per bind,
#: binds and sync session class, alive while one of its sessions is.
_implicit: weakref.WeakValueDictionary[tuple[Any, ...], threadpool_sessionmaker[Any]] = (
    weakref.WeakValueDictionary()
)


def implicit_maker(
    bind: Engine | Connection | None,
    binds: dict[_SessionBindKey, Engine | Connection] | None,
    sync_session_class: type[Session],
) -> threadpool_sessionmaker[Any]:
    """The maker behind ``ThreadpoolSession(bind, binds=...)``: its limiter, guard, canceller.

    Sessions made directly on the same bind at the same time share it, and so share the
    admission sized to the pool, as the sessions of one maker do.
    """
    key = (bind, sync_session_class, *(binds or {}).items())
    maker = _implicit.get(key)
    if maker is None:
        maker = threadpool_sessionmaker(bind, binds=binds, sync_session_class=sync_session_class)
        _implicit[key] = maker
    return maker


#: Makers whose limiter they made themselves (not one passed with ``limiter=``).
_own_limiters: weakref.WeakSet[threadpool_sessionmaker[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child: each maker's own limiter is replaced by a fresh one of the same size.

    The parent's tokens were borrowed by tasks that do not exist in the child, tasks of loops
    it does not run may be queued in it, and it may be bound to the parent's event loop
    library (anyio binds a limiter to the first one that uses it) while the child runs another.
    """
    for maker in list(_own_limiters):
        maker.limiter = anyio.CapacityLimiter(maker.limiter.total_tokens)
        maker._settings = maker._settings._replace(limiter=maker.limiter)


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _make_limiter(
    binds: list[Engine | Connection], limiter: int | anyio.CapacityLimiter | None
) -> anyio.CapacityLimiter:
    """The limiter of a maker whose sessions use ``binds``: the smallest pool bounds it."""
    capacities = [c for c in map(pool_capacity, binds) if c is not None]
    capacity = min(capacities) if capacities else None
    if limiter is None:
        if capacity is None or capacity == math.inf:
            return anyio.CapacityLimiter(UNBOUNDED_POOL_TOKENS)
        return anyio.CapacityLimiter(int(capacity))
    if isinstance(limiter, bool) or not isinstance(limiter, (int, anyio.CapacityLimiter)):
        raise ConfigurationError(
            f"limiter must be an int or an anyio.CapacityLimiter, not {type(limiter).__name__}."
        )
    tokens = limiter if isinstance(limiter, int) else limiter.total_tokens
    if tokens < 1:
        raise ConfigurationError(f"limiter must allow at least 1 session, not {tokens}.")
    if capacity is not None and tokens > capacity:
        raise ConfigurationError(
            f"limiter={tokens:g} is larger than the connection pool ({capacity:g} connections: "
            "pool_size + max_overflow). Sessions admitted beyond the pool would block worker "
            "threads in pool checkout and can deadlock. Omit limiter= (or pass limiter=None "
            "to configure()) to follow the pool, or grow the pool "
            "(create_engine(..., pool_size=N, max_overflow=M))."
        )
    if capacity is not None and tokens < capacity and capacity != math.inf:
        warnings.warn(
            f"limiter={tokens:g} is smaller than the connection pool ({capacity:g} "
            "connections): at most that many sessions will run at once and the rest of the "
            "pool stays idle. Omit limiter= to follow the pool.",
            ConfigurationWarning,
            stacklevel=4,  # _make_limiter < _settle < __init__ or configure() < the caller
        )
    return limiter if isinstance(limiter, anyio.CapacityLimiter) else anyio.CapacityLimiter(tokens)
