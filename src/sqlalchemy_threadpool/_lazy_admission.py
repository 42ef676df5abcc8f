"""Lazy admission: a session is admitted on an engine its ``get_bind`` reaches during a call.

A maker's :class:`~._capacity.Gate` names the engines known up front (``bind=``, ``binds=``),
and admission takes their capacities before the first call. A routing ``Session.get_bind``
(reads to a replica, see ``examples/read_replicas.py``) can return an engine the maker was
never told about; without more, that engine's connections would not count against its
capacity, and sessions reaching it would block worker threads in its pool's checkout until
``pool_timeout``. So the sync session class of every maker is a subclass
(:func:`admitting_class`) whose ``get_bind`` (and ``connection(bind_arguments={"bind": ...})``)
notes the bind it resolved; when a call running in a worker thread resolves a bind whose
capacity the session does not hold yet, the worker asks the event loop (through
``anyio.from_thread.run``, which works on the dedicated workers and on anyio's threads) to take
a token of that capacity on behalf of the session's :class:`~._admission.Ticket`, *before*
SQLAlchemy checks a connection out of that engine's pool. The token joins the ticket's
``taken``, so it goes back with the others when the transaction ends (``release``), when the
session is lost (``release_lost``) and in a forked child.

Such a token is taken while the session already holds others, out of the gate's process-wide
order, so two sessions each holding one engine and reaching for the other's could wait for each
other: the wait is bounded by the maker's ``admission_timeout`` (or, with ``None``, by the
engine's pool timeout, which is how long the thread would have waited in checkout) and ends in
:class:`~sqlalchemy_threadpool.AdmissionTimeoutError` raised in the worker, out of the
SQLAlchemy call that reached the engine. The wait runs on the loop while the worker thread
waits for its outcome; it ends when the loop gives up on the call (the awaiting task cancelled,
``shutdown()``: :func:`stop_waiting`, called by the recovery), is counted in the stats
(:data:`waiting`) and logged as admission waits are.
"""

from __future__ import annotations

import os
import time
import weakref
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ._admission import Ticket, log_wait, would_block
from ._binds import pool_timeout
from ._call import RUNNING, Call, running
from ._capacity import Capacity, capacity_for
from ._events import _CallGivenUp as CallGivenUp
from ._exceptions import AdmissionTimeoutError

if TYPE_CHECKING:
    from ._offload import Offloader

__all__ = ["Waiting", "admitting_class", "attach", "stop_waiting", "waiting"]


class Waiting:
    """An admitted session waiting for a token of an engine it reached."""

    __slots__ = ("capacity", "given_up", "scope", "started")

    def __init__(self, capacity: Capacity, scope: anyio.CancelScope) -> None:
        self.capacity = capacity
        #: When it began to wait (``time.monotonic()``), for the stats.
        self.started = time.monotonic()
        #: The scope of the wait, which :func:`stop_waiting` cancels.
        self.scope = scope
        #: Whether :func:`stop_waiting` ended it (the loop gave up on the call).
        self.given_up = False


#: The tickets of admitted sessions waiting now for a token of an engine they reached.
waiting: dict[Ticket, Waiting] = {}

#: The attribute of a sync session that holds its :class:`_Reach`.
_REACH = "_sqlalchemy_threadpool_reach"


class _Reach:
    """What a sync session's ``get_bind`` needs: its offloader, the capacity of each bind it
    resolved so far (looked up once per bind), and which of them its gate takes up front."""

    __slots__ = ("capacities", "offloader", "up_front")

    def __init__(self, offloader: Offloader) -> None:
        #: Weak: a session dropped without being closed stays collectable.
        self.offloader = weakref.ref(offloader)
        self.capacities: dict[Engine | Connection, Capacity] = {}
        #: Binds whose capacity is in the session's gate: held whenever a call runs, so
        #: ``get_bind`` returning one of them (the common case) costs one set look-up.
        self.up_front: set[Engine | Connection] = set()


def attach(session: Session, offloader: Offloader) -> None:
    """Let ``session``'s ``get_bind`` find the offloader whose admission it extends."""
    session.__dict__[_REACH] = _Reach(offloader)


class _AdmitsWhatItReaches(Session):
    """The mixin :func:`admitting_class` puts in front of a maker's sync session class."""

    def get_bind(self, mapper: Any = None, **kw: Any) -> Engine | Connection:
        bind = super().get_bind(mapper, **kw)
        reach: _Reach | None = self.__dict__.get(_REACH)
        if (
            reach is not None
            and bind not in reach.up_front
            and getattr(running, "call", None) is not None  # in a call, in its worker thread
        ):
            reached(self, bind)
        return bind

    def connection(self, bind_arguments: Any = None, execution_options: Any = None) -> Connection:
        """As :meth:`Session.connection`; a ``bind_arguments["bind"]`` skips ``get_bind``."""
        bind = None if not bind_arguments else bind_arguments.get("bind")
        if bind is not None and getattr(running, "call", None) is not None:
            reached(self, bind)
        return super().connection(
            bind_arguments=bind_arguments, execution_options=execution_options
        )


#: The admitting subclass of each sync session class, made once per class.
_classes: weakref.WeakKeyDictionary[type[Session], type[Session]] = weakref.WeakKeyDictionary()


def admitting_class(cls: type[Session]) -> type[Session]:
    """``cls`` with a ``get_bind`` that admits the session on each engine it reaches.

    The user's own ``get_bind`` (a routing session) still decides; this only looks at what it
    returned. Same name and module as ``cls``, as the subclass ``sessionmaker`` makes.
    """
    made = _classes.get(cls)
    if made is None:
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        made = _classes[cls] = type(cls.__name__, (_AdmitsWhatItReaches, cls), namespace)
    return made


def reached(session: Session, bind: Engine | Connection) -> None:
    """In a worker thread: ``session``'s call is about to use ``bind``; make sure the session
    holds a token of its capacity (taking one on the loop if not), before any checkout."""
    reach: _Reach | None = session.__dict__.get(_REACH)
    if reach is None:
        return
    offloader = reach.offloader()
    if offloader is None or not offloader.is_admitted:
        return
    ticket = offloader.ticket
    if ticket is None:
        return
    capacity = reach.capacities.get(bind)
    if capacity is None:
        capacity = reach.capacities[bind] = capacity_for(bind)
        if capacity in ticket.gate.capacities:
            reach.up_front.add(bind)
    if capacity.limiter in ticket.taken:  # (read only: the loop changes it between calls)
        return
    timeout = offloader.admission_timeout
    if timeout is None:  # never forever: this session holds other tokens meanwhile
        timeout = pool_timeout(bind)
    call: Call | None = getattr(running, "call", None)
    if call is None:
        return
    if not anyio.from_thread.run(_take, call, ticket, capacity, timeout):
        raise CallGivenUp(
            "The task awaiting this call was cancelled (or shutdown() stopped it) while the "
            f"call waited for admission on {capacity.name}, which this session's get_bind "
            "reached; its transaction is being rolled back."
        )


def stop_waiting(offloader: Offloader) -> None:
    """On the loop: the call of ``offloader`` was given up on; end its wait for a token, if it
    waits for one (the worker then leaves with :class:`CallGivenUp`). Needed where the wait
    is not cancelled with the awaiting task (anyio's threads on trio)."""
    ticket = offloader.ticket
    wait = None if ticket is None else waiting.get(ticket)
    if wait is not None:
        wait.given_up = True
        wait.scope.cancel()


async def _take(call: Call, ticket: Ticket, capacity: Capacity, seconds: float) -> bool:
    """On the loop: take a token of ``capacity`` for ``ticket``, waiting at most ``seconds``;
    ``False`` if the loop gave up on ``call`` before (checked here, on the loop, where it gives
    up) or meanwhile (:func:`stop_waiting` ended the wait)."""
    if call.state is not RUNNING:
        return False
    limiter = capacity.limiter
    if limiter in ticket.taken:
        return True
    try:
        limiter.acquire_on_behalf_of_nowait(ticket)
    except would_block():
        return await _wait(ticket, capacity, seconds)
    ticket.taken.append(limiter)
    return True


async def _wait(ticket: Ticket, capacity: Capacity, seconds: float) -> bool:
    limiter = capacity.limiter
    wait = waiting[ticket] = Waiting(capacity, anyio.CancelScope())
    outcome = "was cancelled"
    try:
        with wait.scope as scope:
            scope.deadline = anyio.current_time() + seconds
            await limiter.acquire_on_behalf_of(ticket)
            ticket.taken.append(limiter)  # (no await since the acquire: never lost)
            outcome = "was admitted"
        if wait.given_up:
            return False
        if scope.cancelled_caught:
            outcome = "gave up (admission_timeout)"
            raise AdmissionTimeoutError(
                f"No database connection became free within {seconds:g} s: the "
                f"{limiter.total_tokens:g}-session capacity of {capacity.name}, an engine "
                "this session's routing get_bind reached, is all held by other sessions, "
                "while this session holds connections of other engines. Two sessions that "
                "each hold one engine and reach for the other's end this way instead of "
                "waiting for each other for ever. Keep transactions that use several engines "
                "short, raise that engine's pool_size/max_overflow, pass a larger "
                "admission_timeout to the maker, or bind the maker to the engine too "
                "(binds=) so that it is admitted up front, in order."
            )
    finally:
        del waiting[ticket]
        threshold = ticket.gate.log_threshold
        waited = time.monotonic() - wait.started
        if threshold is not None and waited >= threshold:
            limiter = capacity.limiter
            log_wait(
                f"the {limiter.total_tokens:g}-session capacity of {capacity.name}",
                limiter,
                waited,
                outcome,
                where=" of an engine its get_bind reached",
            )
    return True


def _after_fork_in_child() -> None:
    """A forked child: the parent's waits are not the child's."""
    waiting.clear()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
