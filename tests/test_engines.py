"""Sessions that use several engines: cancel, guard and cleanup act on each engine.

A session reaches a second engine through ``binds=`` or a routing ``get_bind`` (the
``RoutingSession`` of ``examples/read_replicas.py``, whose replica no maker is bound to). Engine
*A* is the test database; engine *B* is another one: for MariaDB a throwaway server
(``tests/servers.py``), so that a ``KILL QUERY`` sent to the wrong server stops nothing; for
PostgreSQL a second database on the test server; for SQLite a second file. ``User`` and ``Post``
live on both, and every test sends ``Post`` to *B*.

- **cancel**: a statement running on *B* is stopped on *B*, by *B*'s own mechanism, also when
  the maker has no bind at all;
- **guard**: SQL on the event-loop thread that would run on *B* raises before any connection of
  *B* is checked out, as on the maker's own engine;
- **cleanup**: a cancelled session gives back the connections of both engines; ``shutdown(B)``
  and ``engine_stats(B)`` see the sessions that hold a connection of *B*.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import Engine, create_engine, func, literal_column, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.pool import NullPool

from helpers import (
    busy_backends,
    cancel_once_running,
    checked_out,
    only_on,
    slow_statement,
    wait_until_running,
)
from models import Base, Post, User
from servers import ServerError, ThrowawayServer, start_server
from sqlalchemy_threadpool import (
    BlockingOnEventLoopError,
    LazyLoadOnEventLoopError,
    TransactionInterruptedError,
    engine_stats,
    shutdown,
    threadpool_session,
    threadpool_sessionmaker,
)
from webhelpers import load_example

pytestmark = pytest.mark.anyio

#: Seconds the slow statement would run if nothing stopped it.
LONG = 30

#: The two ways a session reaches engine B.
SETUPS = ["binds", "routing"]


@pytest.fixture(scope="module")
def mariadb_b() -> Iterator[ThrowawayServer | str]:
    """A throwaway MariaDB server (engine B of the MariaDB tests), or why it did not start."""
    try:
        server = start_server("mysql")
    except (ServerError, OSError) as exc:
        yield f"{type(exc).__name__}: {exc}"
        return
    try:
        yield server
    finally:
        server.close()


def _second_database(url: str) -> Iterator[str]:
    """A second PostgreSQL database next to ``url``'s, dropped afterwards."""
    name = f"{make_url(url).database}_b"
    admin = create_engine(
        make_url(url).set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def b_url(db_url: str, tmp_path: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of engine B for the database under test (see the module docstring)."""
    backend = make_url(db_url).get_backend_name()
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/b.db"
    elif backend == "postgresql":
        yield from _second_database(db_url)
    else:
        server = request.getfixturevalue("mariadb_b")
        if isinstance(server, str):
            message = f"a throwaway MariaDB server could not be started: {server}"
            if os.environ.get("CI"):
                pytest.fail(f"{message}\nCI never skips these tests.", pytrace=False)
            pytest.skip(message)
        yield server.url


@pytest.fixture
def engine_b(b_url: str) -> Iterator[Engine]:
    """Engine B, with ``User`` and ``Post`` (re-)created on it."""
    eng = create_engine(b_url, pool_size=5, max_overflow=0, pool_timeout=10)
    Base.metadata.drop_all(eng)
    Base.metadata.create_all(eng)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def observer_b(b_url: str) -> Iterator[Engine]:
    """Another engine on B, to look at what B's server runs."""
    eng = create_engine(b_url, poolclass=NullPool)
    try:
        yield eng
    finally:
        eng.dispose()


def make_maker(setup: str, a: Engine, b: Engine, **kw: Any) -> threadpool_sessionmaker:
    """A maker whose sessions send ``Post`` to B: without a bind (``binds=``), or bound to A
    with a routing ``get_bind`` whose replica is B (reads of ``Post`` go there)."""
    if setup == "binds":
        return threadpool_sessionmaker(binds={User: a, Post: b}, **kw)
    routing = load_example("read_replicas")
    return routing.routing_sessionmaker(a, b, **kw)  # type: ignore[no-any-return]


def sleep_on_b(dialect: str) -> Any:
    """A ``SELECT`` (a read, so routed to the replica) that keeps B busy for ``LONG`` s."""
    if dialect == "postgresql":
        return select(func.pg_sleep(LONG))
    if dialect == "mysql":
        return select(func.sleep(LONG))
    return select(literal_column(f"({slow_statement('sqlite', LONG).text})"))


class SleepOnB:
    """``sess.run`` callable: touch A (``binds=`` only), then sleep on B; records how it left."""

    def __init__(self, setup: str, dialect: str) -> None:
        self.setup = setup
        self.statement = sleep_on_b(dialect)
        self.started = threading.Event()
        self.errors: list[BaseException] = []
        self.returned = False

    def __call__(self, session: Session) -> None:
        if self.setup == "binds":  # the session holds a connection of A too
            session.execute(select(User.id))
        self.started.set()
        try:
            session.execute(self.statement, bind_arguments={"mapper": Post})
        except DBAPIError as exc:
            self.errors.append(exc.orig)  # type: ignore[arg-type]
            raise
        self.returned = True


def assert_cancelled_by_the_server(error: BaseException, dialect: str) -> None:
    """The statement was stopped by the server's cancel, not cut (severed) nor run out."""
    if dialect == "postgresql":
        assert getattr(error, "pgcode", None) == "57014", repr(error)  # query_canceled
    else:
        assert error.args[0] == 1317, repr(error)  # ER_QUERY_INTERRUPTED


# -- 1. cancel -------------------------------------------------------------------------------


@only_on("postgresql", "mysql")
@pytest.mark.parametrize("setup", SETUPS)
async def test_a_statement_on_the_other_engine_is_cancelled_there(
    setup: str,
    engine: Engine,
    other_engine: Engine,
    engine_b: Engine,
    observer_b: Engine,
) -> None:
    dialect = engine.dialect.name
    # A long cleanup deadline: a cancel that misses lets the statement run out (not cut).
    maker = make_maker(setup, engine, engine_b, cleanup_timeout=2 * LONG)
    call = SleepOnB(setup, dialect)
    a_before, b_before = checked_out(engine), checked_out(engine_b)
    start = anyio.current_time()
    async with threadpool_session(maker) as sess:
        scope = await cancel_once_running(lambda: sess.run(call), observer_b, call.started)
        elapsed = anyio.current_time() - start
        assert scope.cancelled_caught
        assert busy_backends(observer_b) == []  # gone from B before the await ended
        # 3. cleanup: rolled back, the connections of both engines are back in their pools
        assert checked_out(engine) == a_before
        assert checked_out(engine_b) == b_before
        await sess.rollback()
    assert not call.returned, "the statement ran out: the cancel missed it"
    assert len(call.errors) == 1
    assert_cancelled_by_the_server(call.errors[0], dialect)
    assert elapsed < LONG
    assert busy_backends(other_engine) == []
    assert checked_out(engine) == a_before
    assert checked_out(engine_b) == b_before


@only_on("postgresql", "mysql")
@pytest.mark.parametrize("setup", SETUPS)
async def test_fail_after_stops_the_statement_on_the_other_engine(
    setup: str, engine: Engine, engine_b: Engine, observer_b: Engine
) -> None:
    maker = make_maker(setup, engine, engine_b, cleanup_timeout=2 * LONG)
    call = SleepOnB(setup, engine.dialect.name)
    with pytest.raises(TimeoutError):
        async with threadpool_session(maker) as sess:
            with anyio.fail_after(0.5):
                await sess.run(call)
    assert not call.returned
    assert len(call.errors) == 1
    assert_cancelled_by_the_server(call.errors[0], engine.dialect.name)
    assert busy_backends(observer_b) == []
    assert checked_out(engine) == 0
    assert checked_out(engine_b) == 0


@only_on("postgresql", "mysql")
@pytest.mark.parametrize("setup", SETUPS)
async def test_a_session_is_admitted_on_the_other_engine_and_gives_it_back_when_cancelled(
    setup: str, engine: Engine, engine_b: Engine, observer_b: Engine
) -> None:
    """Also when only a routing get_bind reaches B: B's stats count the session while its
    statement runs there; cancelled, the statement stops on B and the token goes back."""
    maker = make_maker(setup, engine, engine_b, cleanup_timeout=2 * LONG)
    call = SleepOnB(setup, engine.dialect.name)
    seen: list[int] = []

    async def count_then_wait() -> None:
        await sess.run(call)

    async with threadpool_session(maker) as sess:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:

                async def cancel_when_running() -> None:
                    await wait_until_running(observer_b, call.started)
                    seen.append(engine_stats(engine_b).in_use)
                    scope.cancel()

                group.start_soon(cancel_when_running)
                await count_then_wait()
        assert scope.cancelled_caught
        assert engine_stats(engine_b).in_use == 0
        await sess.rollback()
    assert seen == [1]
    assert not call.returned
    assert_cancelled_by_the_server(call.errors[0], engine.dialect.name)
    assert busy_backends(observer_b) == []
    assert (engine_stats(engine).in_use, engine_stats(engine_b).in_use) == (0, 0)
    assert checked_out(engine) == 0
    assert checked_out(engine_b) == 0


# -- 2. guard --------------------------------------------------------------------------------


@pytest.fixture
def seeded_b(engine_b: Engine) -> Engine:
    """B with a user and two posts (A has none: whatever is found was read on B)."""
    with Session(engine_b) as s, s.begin():
        s.add(User(name="on-b", bio="bio", posts=[Post(title="p1"), Post(title="p2")]))
    return engine_b


def _guard_maker(setup: str, a: Engine, b: Engine) -> threadpool_sessionmaker:
    if setup == "binds":  # the maker is bound to A; User and Post go to B
        return threadpool_sessionmaker(a, binds={User: b, Post: b})
    return make_maker("routing", a, b)


@only_on("sqlite", "postgresql")
@pytest.mark.parametrize("setup", SETUPS)
async def test_a_lazy_load_on_the_loop_on_the_other_engine_raises_before_checkout(
    setup: str, engine: Engine, seeded_b: Engine
) -> None:
    maker = _guard_maker(setup, engine, seeded_b)
    async with maker() as sess:
        user = (await sess.scalars(select(User))).one()  # read on B, in a worker
        await sess.commit()  # no connection held any more
        assert checked_out(seeded_b) == 0
        with pytest.raises(LazyLoadOnEventLoopError, match=r"User\.posts"):
            user.posts  # noqa: B018
        with pytest.raises(LazyLoadOnEventLoopError, match=r"User\.bio"):
            user.bio  # noqa: B018
        with pytest.raises(BlockingOnEventLoopError):
            sess.sync_session.execute(select(Post))
        assert checked_out(seeded_b) == 0  # raised before any connection of B was taken
        assert checked_out(engine) == 0
        titles = await sess.run(lambda s: sorted(p.title for p in s.get_one(User, user.id).posts))
        assert titles == ["p1", "p2"]  # in a worker the same load works, on B


@only_on("sqlite", "postgresql")
@pytest.mark.parametrize("setup", SETUPS)
async def test_sql_on_the_loop_through_a_connection_of_the_other_engine_raises(
    setup: str, engine: Engine, seeded_b: Engine
) -> None:
    maker = _guard_maker(setup, engine, seeded_b)
    async with maker() as sess:
        # A connection of B, checked out in a worker (the session holds it until it ends).
        conn = await sess.run(
            lambda s: s.connection(bind_arguments={"mapper": Post, "clause": select(Post)})
        )
        assert conn.engine is seeded_b
        with pytest.raises(BlockingOnEventLoopError, match="SELECT count"):
            conn.execute(text("SELECT count(*) FROM satp_post"))
        with pytest.raises(BlockingOnEventLoopError):
            sess.sync_session.scalars(select(User).options(selectinload(User.posts)))
        assert (
            await sess.run(
                lambda s: s.connection(
                    bind_arguments={"mapper": Post, "clause": select(Post)}
                ).scalar(text("SELECT count(*) FROM satp_post"))
            )
            == 2
        )


# -- 3. cleanup: shutdown() and engine_stats() of the other engine ---------------------------


@only_on("sqlite", "postgresql", "mysql")
@pytest.mark.parametrize("setup", SETUPS)
async def test_shutdown_of_the_other_engine_stops_the_sessions_using_it(
    setup: str, engine: Engine, engine_b: Engine, observer_b: Engine
) -> None:
    maker = make_maker(setup, engine, engine_b)
    call = SleepOnB(setup, engine.dialect.name)
    caught: list[BaseException] = []

    async def victim() -> None:
        try:
            async with threadpool_session(maker) as sess:
                await sess.run(call)
        except TransactionInterruptedError as exc:
            caught.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(victim)
        await wait_until_running(observer_b, call.started)
        stats = engine_stats(engine_b)
        assert stats.in_flight == 1, stats  # the session running on B is seen on B
        await shutdown(engine_b, timeout=2 * LONG / 3, dispose=False)
    assert len(caught) == 1
    assert not call.returned
    if engine.dialect.name != "sqlite":
        assert_cancelled_by_the_server(call.errors[0], engine.dialect.name)
    assert busy_backends(observer_b) == []
    assert checked_out(engine) == 0
    assert checked_out(engine_b) == 0
    assert engine_stats(engine_b).in_flight == 0
