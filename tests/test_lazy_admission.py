"""Admission on an engine a session reaches only through a routing ``get_bind``.

A maker bound to a primary whose ``Session.get_bind`` sends some statements to another engine
(a read replica, ``examples/read_replicas.py``) admits its sessions on the primary's capacity up
front, and on the other engine's capacity when a session first reaches it, for the rest of its
transaction. So sessions routed to one engine wait for its capacity in admission, on the loop,
instead of in the pool's checkout, holding a thread, until the pool's ``TimeoutError``; two
sessions that each hold one engine and reach for the other's end in
:class:`AdmissionTimeoutError`; the engine's stats count the routed sessions; and the token
goes back when the transaction ends, also when the session was lost. Two engines of one
connection each on the test database are enough for these mechanics (the replica guide's tests
in ``test_replicas.py`` use a real hot standby).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import Connection, Engine, create_engine, literal_column, select, text
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from helpers import assert_clean, checked_out, user_names
from models import User
from sqlalchemy_threadpool import (
    AdmissionTimeoutError,
    ThreadpoolSession,
    engine_stats,
    threadpool_session,
    threadpool_sessionmaker,
)

pytestmark = pytest.mark.anyio

#: The pools' own checkout timeout: a thread waiting in checkout fails after it.
POOL_TIMEOUT = 3


class Routing(Session):
    """Sends a statement made with ``.execution_options(on=NAME)`` to ``info["engines"][NAME]``,
    everything else to the session's own bind."""

    def get_bind(self, mapper: Any = None, *, clause: Any = None, **kw: Any) -> Any:
        name = None if clause is None else clause.get_execution_options().get("on")
        if name is not None:
            return self.info["engines"][name]
        return super().get_bind(mapper, clause=clause, **kw)


def on(name: str) -> Select[Any]:
    """A ``SELECT 1`` that :class:`Routing` sends to the engine called ``name``."""
    return select(literal_column("1")).execution_options(on=name)


def routing_maker(
    bind: Engine | Connection, engines: dict[str, Engine | Connection], **kw: Any
) -> threadpool_sessionmaker:
    return threadpool_sessionmaker(
        bind, sync_session_class=Routing, info={"engines": engines}, **kw
    )


def _engine(db_url: str, size: int) -> Engine:
    return create_engine(db_url, pool_size=size, max_overflow=0, pool_timeout=POOL_TIMEOUT)


@pytest.fixture
def primary(db_url: str, engine: Engine) -> Iterator[Engine]:
    """An engine of two connections (``engine`` created the tables)."""
    eng = _engine(db_url, 2)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def replica(db_url: str, engine: Engine) -> Iterator[Engine]:
    """An engine of one connection that no maker is bound to."""
    eng = _engine(db_url, 1)
    try:
        yield eng
    finally:
        eng.dispose()


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition()`` on the loop until it holds (a deadline, not a threshold)."""
    with anyio.fail_after(2 * POOL_TIMEOUT):
        for _ in range(100_000):
            if condition():
                return
            await anyio.sleep(0.005)
    pytest.fail(f"never happened: {what}")


@pytest.mark.parametrize("offload", ["worker", "anyio"])
async def test_sessions_routed_to_an_engine_wait_for_its_capacity_in_admission(
    offload: str, primary: Engine, replica: Engine, other_engine: Engine
) -> None:
    """The second routed session waits on the loop (seen in the replica's stats) for the first
    to end its transaction, not in the replica pool's checkout until its TimeoutError."""
    maker = routing_maker(primary, {"replica": replica}, offload=offload)
    first_reads = anyio.Event()
    done: list[str] = []

    async def second() -> None:
        await first_reads.wait()
        async with threadpool_session(maker, new=True) as sess:
            assert await sess.scalar(on("replica")) == 1
            done.append("second")

    async with anyio.create_task_group() as group:
        group.start_soon(second)
        async with threadpool_session(maker, new=True) as sess:
            assert await sess.scalar(on("replica")) == 1
            stats = engine_stats(replica)
            assert (stats.in_use, stats.capacity) == (1, 1), stats  # the routed session counts
            first_reads.set()
            await _until(lambda: engine_stats(replica).waiting == 1, "the second session waits")
            assert maker.stats().waiting == 1  # ... and its maker's
            done.append("first")
    assert done == ["first", "second"]
    assert (engine_stats(primary).in_use, engine_stats(replica).in_use) == (0, 0)
    assert checked_out(replica) == 0
    assert_clean(primary, other_engine)


async def test_two_sessions_reaching_for_each_others_engine_end_in_admission_timeout(
    db_url: str, replica: Engine, other_engine: Engine
) -> None:
    """Each session holds one one-connection engine and reaches for the other's: a routed
    token is taken out of the process-wide order, so the wait ends in AdmissionTimeoutError
    (not a hang, nor the pool's TimeoutError), and then the other session goes on."""
    one = _engine(db_url, 1)
    try:
        engines: dict[str, Engine | Connection] = {"a": one, "b": replica}
        makers = {
            "a": routing_maker(one, engines, admission_timeout=1),
            "b": routing_maker(replica, engines, admission_timeout=1),
        }
        holding = {"a": anyio.Event(), "b": anyio.Event()}
        outcomes: dict[str, str] = {}
        messages: list[str] = []

        async def use(mine: str, theirs: str) -> None:
            try:
                async with threadpool_session(makers[mine], new=True) as sess:
                    await sess.execute(text("SELECT 1"))  # its own bind: admitted up front
                    holding[mine].set()
                    await holding[theirs].wait()
                    await sess.execute(on(theirs))  # routed: admitted when reached
                outcomes[mine] = "done"
            except AdmissionTimeoutError as exc:
                outcomes[mine] = "timed out"
                messages.append(str(exc))

        async with anyio.create_task_group() as group:
            group.start_soon(use, "a", "b")
            group.start_soon(use, "b", "a")
        assert "timed out" in outcomes.values(), outcomes
        assert set(outcomes) == {"a", "b"}
        assert all("routing get_bind reached" in message for message in messages), messages
        assert (engine_stats(one).in_use, engine_stats(replica).in_use) == (0, 0)
        assert checked_out(one) == checked_out(replica) == 0
    finally:
        one.dispose()
    assert_clean(replica, other_engine)


async def test_a_routed_token_goes_back_when_the_transaction_ends(
    primary: Engine, replica: Engine, other_engine: Engine
) -> None:
    """Released with the transaction, taken again by the next one that reaches the engine."""
    maker = routing_maker(primary, {"replica": replica})
    async with threadpool_session(maker) as sess:
        await sess.scalar(on("replica"))
        assert engine_stats(replica).in_use == 1
        await sess.commit()
        assert engine_stats(replica).in_use == 0
        await sess.execute(text("SELECT 1"))  # a transaction on the primary only
        assert (engine_stats(primary).in_use, engine_stats(replica).in_use) == (1, 0)
        await sess.scalar(on("replica"))
        assert (engine_stats(primary).in_use, engine_stats(replica).in_use) == (1, 1)
    assert (engine_stats(primary).in_use, engine_stats(replica).in_use) == (0, 0)
    assert_clean(replica, other_engine)


async def test_a_lost_session_gives_back_its_routed_token(
    primary: Engine, replica: Engine, other_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    maker = routing_maker(primary, {"replica": replica}, admission_timeout=2)
    sess = maker()  # never closed: the caller forgot `async with`
    sess.add(User(name="lost"))
    await sess.flush()
    await sess.scalar(on("replica"))
    assert (engine_stats(primary).in_use, engine_stats(replica).in_use) == (1, 1)
    del sess
    with anyio.fail_after(10):  # collected, then the tokens are given back on the loop
        while engine_stats(replica).in_use or checked_out(replica) or checked_out(primary):
            gc.collect()
            await anyio.sleep(0.01)
    assert "garbage-collected while it held a transaction" in caplog.text
    assert engine_stats(primary).in_use == 0
    async with threadpool_session(maker) as again:  # the replica's one connection is free
        assert await again.scalar(on("replica")) == 1
    assert user_names(other_engine) == set()  # the lost transaction was rolled back
    assert_clean(replica, other_engine)


async def test_a_connection_a_routing_get_bind_returns_serves_one_session_at_a_time(
    primary: Engine, replica: Engine, other_engine: Engine
) -> None:
    """A Connection is a capacity of one of its own: two sessions routed to it never use it
    from two threads at once; the second waits in admission for the first's transaction."""
    with replica.connect() as shared:
        maker = routing_maker(primary, {"shared": shared})
        first_reads = anyio.Event()
        done: list[str] = []

        async def second() -> None:
            await first_reads.wait()
            async with threadpool_session(maker, new=True) as sess:
                assert await sess.scalar(on("shared")) == 1
                done.append("second")

        async with anyio.create_task_group() as group:
            group.start_soon(second)
            async with threadpool_session(maker, new=True) as sess:
                assert await sess.scalar(on("shared")) == 1
                assert engine_stats(shared).in_use == 1
                first_reads.set()
                await _until(lambda: engine_stats(shared).waiting == 1, "the second waits")
                done.append("first")
        assert done == ["first", "second"]
        assert engine_stats(shared).in_use == 0
        shared.rollback()
    assert_clean(primary, other_engine)


@pytest.mark.parametrize("offload", ["worker", "anyio"])
async def test_a_task_cancelled_while_waiting_for_a_routed_engine_stops_waiting(
    offload: str,
    primary: Engine,
    replica: Engine,
    other_engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The wait on the loop is cancelled with the task: the worker leaves the SQLAlchemy call,
    the session's tokens (the primary's) go back, the routed token is never taken."""
    maker = routing_maker(
        primary,
        {"replica": replica},
        offload=offload,
        admission_timeout=60,
        admission_log_threshold=0,  # every wait is logged with how it ended
    )
    outcomes: list[str] = []
    async with threadpool_session(maker, new=True) as holder:
        assert await holder.scalar(on("replica")) == 1

        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:

                async def cancel_once_waiting() -> None:
                    await _until(lambda: engine_stats(replica).waiting == 1, "it waits")
                    assert engine_stats(primary).in_use == 2  # both admitted on their bind
                    scope.cancel()

                group.start_soon(cancel_once_waiting)
                async with threadpool_session(maker, new=True) as waiter:
                    await waiter.scalar(on("replica"))
                    outcomes.append("read")
        assert scope.cancelled_caught
        assert outcomes == []
        stats = engine_stats(replica)
        assert (stats.in_use, stats.waiting) == (1, 0)  # only the holder's
        assert engine_stats(primary).in_use == 1  # the waiter's went back
        assert await holder.scalar(on("replica")) == 1  # the holder is unaffected
    assert (engine_stats(primary).in_use, engine_stats(replica).in_use) == (0, 0)
    assert checked_out(replica) == 0
    assert_clean(primary, other_engine)
    waits = [r.getMessage() for r in caplog.records if "its get_bind reached" in r.getMessage()]
    assert len(waits) == 1, waits
    assert "reached and was cancelled" in waits[0]  # not ended by the admission timeout


async def test_a_session_bound_to_a_connection_is_admitted_on_the_engine_it_routes_to(
    primary: Engine, replica: Engine, other_engine: Engine
) -> None:
    """``ThreadpoolSession(connection, ...)``: the Connection's capacity of one up front, the
    routed engine's when reached."""
    with primary.connect() as conn:
        sess = ThreadpoolSession(conn, sync_session_class=Routing, info={"engines": {}})
        sess.info["engines"]["replica"] = replica
        async with sess:
            await sess.execute(text("SELECT 1"))
            assert (engine_stats(conn).in_use, engine_stats(replica).in_use) == (1, 0)
            assert await sess.scalar(on("replica")) == 1
            assert (engine_stats(conn).in_use, engine_stats(replica).in_use) == (1, 1)
        assert (engine_stats(conn).in_use, engine_stats(replica).in_use) == (0, 0)
        conn.rollback()
    assert checked_out(replica) == 0
    assert_clean(primary, other_engine)
