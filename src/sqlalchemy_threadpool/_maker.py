"""``threadpool_sessionmaker``: configuration, what it derives from its binds, and sessions.

The maker is to :class:`ThreadpoolSession` what :class:`~sqlalchemy.ext.asyncio.async_sessionmaker`
is to ``AsyncSession``. Its sessions are admitted against the capacity of their engine, sized to
what the engine's pool can really hand out and shared by everything on that engine (invariant
6: the thread pool never outgrows the connection pool; :mod:`._capacity`), within the maker's
own ``limiter=`` cap if it has one. It installs (through :mod:`._events`) on the sessions it
makes the row pre-buffering and the event-loop guard.
"""

from __future__ import annotations

import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple

import anyio
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker
from typing_extensions import TypeVar

from ._binds import binds_of, check_memory_database, pool_timeout, unwrap_binds
from ._cancel import StatementCanceller
from ._capacity import Gate, make_gate
from ._events import install as install_events
from ._events import watch_binds
from ._exceptions import ConfigurationError
from ._guard import GuardMode
from ._lazy_admission import admitting_class, attach
from ._offload import CLEANUP_TIMEOUT, Offloader
from ._session import ThreadpoolSession
from ._transaction import ThreadpoolSessionTransaction
from ._worker_pool import WorkerPool, pool_for

if TYPE_CHECKING:
    from sqlalchemy.orm.session import _SessionBindKey

    from ._engine import ThreadpoolEngine
    from ._stats import ThreadpoolStats

__all__ = ["OffloadMode", "implicit_maker", "threadpool_sessionmaker"]

#: The session class a maker makes (``class_=``); ``ThreadpoolSession`` when not given.
#: Covariant: a maker of a ThreadpoolSession subclass goes wherever a maker goes.
_TS = TypeVar("_TS", bound=ThreadpoolSession, default=ThreadpoolSession, covariant=True)

#: How a maker's sessions reach their worker threads (see ``offload=``).
OffloadMode = Literal["worker", "anyio"]

#: The most seconds of admission wait that go unlogged by default (``admission_log_threshold=
#: "auto"``: a tenth of the admission timeout, at most this).
ADMISSION_LOG_THRESHOLD = 1.0

#: The maker's own options, given to the constructor and to ``configure()``.
_OPTIONS = (
    "limiter",
    "admission_timeout",
    "admission_log_threshold",
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
    #: What a session takes to be admitted: the ``limiter=`` cap, its engines' capacities.
    gate: Gate
    #: The binds and the options the gate was made for.
    gate_key: tuple[Any, ...]
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
    :param limiter: a cap on how many of *this maker's* sessions may hold a connection (and so
        run a worker thread) at once, within the engine's capacity: an ``int`` or an
        :class:`anyio.CapacityLimiter` (shared by the makers given it). Every maker, session
        and :class:`ThreadpoolEngine` connection on one engine shares the engine's capacity,
        what its pool can really hand out (``pool_size + max_overflow`` for a ``QueuePool``, 1
        for a single-connection pool, 40 for an unbounded one); without ``limiter=`` (the
        default) the maker's sessions may take all of it. With it, a session takes the cap's
        token, then the engine's: e.g. ``limiter=2`` on a job maker leaves the rest of the
        pool to the request maker. A cap above the pool's capacity is an error (it could never
        be reached: the engine's capacity follows the pool); the engine's own limiter (another
        maker's ``.limiter``) means no cap.
    :param guard: what to do when a session's SQL is about to run on the event-loop thread:
        ``"raise"`` (default), ``"warn"`` or ``"off"``. See :func:`allow_blocking`.
    :param admission_timeout: seconds a session may wait for connection capacity before
        :class:`AdmissionTimeoutError`; ``"pool"`` (default) uses the pool's own ``timeout``
        (30 s unless configured), ``None`` waits forever.
    :param admission_log_threshold: seconds; an admission wait that long or longer is logged
        once, when it ends (admitted, timed out or cancelled), as a warning on the
        ``sqlalchemy_threadpool._admission`` logger with the wait and the capacity, so a
        saturated pool shows in the logs before timeouts do. ``"auto"`` (default): a tenth of
        the admission timeout, at most 1 s (1 s with the pool's default 30 s); ``0`` logs
        every wait; ``None`` never logs.
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
        admission_log_threshold: float | Literal["auto"] | None = "auto",
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
        self._ref = weakref.ref(self)  # its sessions' gates name it so (for its stats)
        self.guard: GuardMode = guard
        self.class_: type[_TS] = class_
        #: The sync session class (``sync_session_class=``), before sessionmaker subclasses it.
        self.sync_class: type[Session] = sync_session_class or class_.sync_session_class
        options = {
            "limiter": limiter,
            "admission_timeout": admission_timeout,
            "admission_log_threshold": admission_log_threshold,
            "cancel_statements": cancel_statements,
            "cleanup_timeout": cleanup_timeout,
            "strict": strict,
            "offload": offload,
            "worker_idle_timeout": worker_idle_timeout,
            "workers": workers,
        }
        settings = self._settle(session_kw, options)
        self.sync_maker: sessionmaker[Session] = sessionmaker(
            class_=admitting_class(self.sync_class), **session_kw
        )
        self._adopt(settings)
        install_events(self.sync_maker, guard)

    def __call__(self, **local_kw: Any) -> _TS:
        """A new session; ``local_kw`` overrides the maker's sessionmaker arguments."""
        return self.class_(maker=self, **local_kw)

    def open_sync_session(self, session_kw: dict[str, Any]) -> tuple[Session, Offloader]:
        """The sync session and its offloader, for ``ThreadpoolSession.__init__``."""
        gate = self._settings.gate
        if "bind" in session_kw or "binds" in session_kw:  # admitted on the session's engines
            kw = {**self.sync_maker.kw, **unwrap_binds(session_kw)}
            gate = gate.rebound(binds_of(kw))
        sync_session = self.sync_maker(**session_kw)
        offloader = Offloader(
            sync_session,
            gate,
            admission_timeout=self.admission_timeout,
            canceller=self._canceller,
            cleanup_timeout=self.cleanup_timeout,
            strict=self.strict,
            workers=self._workers,
        )
        attach(sync_session, offloader)  # admitted on the engines its get_bind reaches too
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
        ``admission_timeout=``, ``admission_log_threshold=``, ``cancel_statements=``,
        ``cleanup_timeout=``, ``strict=``, ``offload=``, ``worker_idle_timeout=``,
        ``workers=``), and everything the maker derives from them is derived again, exactly
        as by the constructor: the capacity of the new engine (shared with everything else
        on it), the in-memory SQLite / DuckDB checks, the pool's admission timeout, the
        statement canceller for the new driver, the worker pool. What the constructor refuses
        is refused here with the same :class:`ConfigurationError`, and the maker is then left
        unchanged. A ``limiter=`` cap given earlier still applies (``limiter=None`` removes
        it); a cap the maker made is kept when neither the binds nor ``limiter=`` change.
        ``workers=`` replaces a ``worker_idle_timeout=`` given earlier and the other way
        round; the maker's own pool is kept while its ``worker_idle_timeout=`` does not change.

        Sessions made before keep their bind, their admission (they give their tokens back to
        the limiters they took them from), their canceller and their threads.
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
        binds = binds_of(session_kw)
        for each in binds:
            check_memory_database(each)
        admission_timeout = options["admission_timeout"]
        if admission_timeout == "pool":
            admission_timeout = pool_timeout(bind)
        threshold = options["admission_log_threshold"]
        if threshold == "auto":
            threshold = ADMISSION_LOG_THRESHOLD
            if isinstance(admission_timeout, (int, float)):
                threshold = min(threshold, admission_timeout / 10)
        key = (tuple(binds), options["limiter"])
        current: _Settings | None = getattr(self, "_settings", None)
        gate = make_gate(binds, options["limiter"], log_threshold=threshold, owner=self._ref)
        if current is not None and current.gate_key == key:  # validated, but keep the cap
            gate = current.gate  # same binds, same limiter=: the same cap and its tokens
            if gate.log_threshold != threshold:
                gate = gate.copy(gate.capacities, threshold)
        workers = pool_for(options, current.workers if current is not None else None)
        return _Settings(
            options=options,
            gate=gate,
            gate_key=key,
            admission_timeout=admission_timeout,
            # Per connection, by its own engine (binds=, a routing get_bind): not by ``bind``.
            canceller=StatementCanceller() if options["cancel_statements"] else None,
            workers=workers if offload == "worker" else None,
        )

    def _adopt(self, settings: _Settings) -> None:
        self._settings = settings
        self._options: dict[str, Any] = settings.options
        self.admission_timeout: float | None = settings.admission_timeout
        self.cancel_statements: bool = settings.options["cancel_statements"]
        self._canceller: StatementCanceller | None = settings.canceller
        self.cleanup_timeout: float = settings.options["cleanup_timeout"]
        self.strict: bool = settings.options["strict"]
        self.offload: OffloadMode = settings.options["offload"]
        self._workers: WorkerPool | None = settings.workers
        if settings.workers is not None:
            for capacity in settings.gate.capacities:
                capacity.pools.add(settings.workers)  # the engine's stats count its threads

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The limiter that bounds this maker's sessions: its ``limiter=`` cap if it has one,
        else its engine's capacity, shared by everything on the engine (with several engines,
        the smallest)."""
        return self._settings.gate.limiter

    @property
    def admission_log_threshold(self) -> float | None:
        """Seconds of admission wait from which a wait is logged (``None``: never)."""
        return self._settings.gate.log_threshold

    def stats(self) -> ThreadpoolStats:
        """A snapshot of this maker's admission and threads: see :class:`ThreadpoolStats`.

        ``capacity`` and ``in_use`` are those of :attr:`limiter` (the engine's capacity,
        shared, unless the maker has a ``limiter=`` cap); ``waiting``, ``longest_wait`` and
        ``in_flight`` count this maker's sessions; ``threads`` its worker pool's threads.
        Cheap (no IO, no lock held), for a scrape every second.
        """
        from ._stats import maker_stats  # it imports this module

        return maker_stats(self)

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
