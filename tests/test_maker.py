"""The maker: limiter sizing from the pool, configuration errors, in-memory SQLite, rebinding."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool, StaticPool

from helpers import (
    assert_clean,
    checked_out,
    only_on,
    slow_statement,
    user_names,
    wait_until_running,
)
from models import Base, User
from sqlalchemy_threadpool import (
    AdmissionTimeoutError,
    ConfigurationError,
    threadpool_session,
    threadpool_sessionmaker,
)


@pytest.mark.parametrize(
    ("kwargs", "tokens"),
    [
        ({"pool_size": 5, "max_overflow": 0}, 5),
        ({"pool_size": 3, "max_overflow": 4}, 7),
        ({"poolclass": StaticPool}, 1),
        ({"poolclass": NullPool}, 40),
        ({"pool_size": 2, "max_overflow": -1}, 40),
    ],
    ids=["queue", "overflow", "static", "null", "unlimited_overflow"],
)
def test_limiter_follows_the_pool(db_url: str, kwargs: dict[str, object], tokens: int) -> None:
    engine = create_engine(db_url, **kwargs)
    try:
        assert threadpool_sessionmaker(engine).limiter.total_tokens == tokens
    finally:
        engine.dispose()


def test_explicit_limiter(engine: Engine) -> None:
    capacity = engine.pool.size() + engine.pool._max_overflow  # type: ignore[attr-defined]
    limiter = anyio.CapacityLimiter(capacity)
    assert threadpool_sessionmaker(engine, limiter=limiter).limiter is limiter
    assert threadpool_sessionmaker(engine, limiter=capacity).limiter.total_tokens == capacity


def test_limiter_larger_than_the_pool_is_an_error(engine: Engine) -> None:
    with pytest.raises(ConfigurationError, match="larger than the connection pool"):
        threadpool_sessionmaker(engine, limiter=1000)


def test_limiter_smaller_than_the_pool_caps_the_maker(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine, limiter=1)  # no warning: a share of the pool
    assert maker.limiter.total_tokens == 1


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True])
def test_bad_limiter_values(engine: Engine, bad: object) -> None:
    with pytest.raises(ConfigurationError, match="limiter"):
        threadpool_sessionmaker(engine, limiter=bad)  # type: ignore[arg-type]


def test_bad_guard_mode(engine: Engine) -> None:
    with pytest.raises(ConfigurationError, match="guard must be"):
        threadpool_sessionmaker(engine, guard="loud")  # type: ignore[arg-type]


def test_sqlite_memory_with_singleton_pool_is_refused() -> None:
    engine = create_engine("sqlite://")
    with pytest.raises(ConfigurationError, match="StaticPool"):
        threadpool_sessionmaker(engine)


@pytest.mark.anyio
async def test_sqlite_memory_with_static_pool_is_consistent_across_threads() -> None:
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    try:
        maker = threadpool_sessionmaker(engine)
        async with threadpool_session(maker) as sess:
            await sess.run(lambda s: Base.metadata.create_all(s.connection()))
        for i in range(30):  # many scopes, many worker threads: always the same database
            async with threadpool_session(maker) as sess:
                sess.add(User(name=f"u{i}"))
        async with maker() as sess:
            names = (await sess.scalars(select(User.name))).all()
            assert len(names) == 30
            assert await sess.scalar(text("SELECT 1")) == 1
    finally:
        engine.dispose()


def test_expire_on_commit_can_still_be_chosen(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine, expire_on_commit=True)
    assert maker().sync_session.expire_on_commit is True


# -- configure(): what the maker derives from its binds is derived again --------------------


@pytest.fixture
def pool_of_one(db_url: str, engine: Engine) -> Iterator[Engine]:
    """A second engine on the test database, with one connection (``engine`` made the tables)."""
    one = create_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=3)
    try:
        yield one
    finally:
        one.dispose()


@pytest.mark.anyio
async def test_rebinding_to_a_smaller_pool_admits_only_its_capacity(
    engine: Engine, pool_of_one: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine, admission_timeout=0.2)
    maker.configure(bind=pool_of_one)
    assert maker.limiter.total_tokens == 1
    async with threadpool_session(maker) as holder:
        await holder.execute(text("SELECT 1"))  # holds the only connection until the block ends
        with pytest.raises(AdmissionTimeoutError):  # not the pool's TimeoutError after 3 s
            async with threadpool_session(maker, new=True) as waiter:
                await waiter.execute(text("SELECT 1"))
    assert maker.limiter.borrowed_tokens == 0
    assert_clean(pool_of_one, other_engine)


def test_rebinding_binds_to_a_smaller_pool_shrinks_the_limiter(
    engine: Engine, pool_of_one: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    maker.configure(binds={User: pool_of_one})  # a session may use both: the smaller bounds it
    assert maker.limiter.total_tokens == 1


def test_rebinding_to_in_memory_sqlite_is_refused_as_constructing_is(engine: Engine) -> None:
    memory = create_engine("sqlite://")
    maker = threadpool_sessionmaker(engine)
    limiter = maker.limiter
    with pytest.raises(ConfigurationError) as constructing:
        threadpool_sessionmaker(memory)
    with pytest.raises(ConfigurationError) as rebinding:
        maker.configure(bind=memory)
    assert str(rebinding.value) == str(constructing.value)
    with pytest.raises(ConfigurationError, match="StaticPool"):
        maker.configure(binds={User: memory})
    assert maker.sync_maker.kw["bind"] is engine  # a refused configure() changes nothing
    assert "binds" not in maker.sync_maker.kw
    assert maker.limiter is limiter


def test_rebinding_below_an_explicit_limiter_is_refused(
    engine: Engine, pool_of_one: Engine
) -> None:
    maker = threadpool_sessionmaker(engine, limiter=2)
    with pytest.raises(ConfigurationError, match="larger than the connection pool"):
        maker.configure(bind=pool_of_one)
    assert maker.sync_maker.kw["bind"] is engine
    assert maker.limiter.total_tokens == 2
    maker.configure(bind=pool_of_one, limiter=None)  # follow the new pool instead
    assert maker.limiter.total_tokens == 1


@pytest.mark.anyio
async def test_sessions_made_before_a_rebind_keep_their_bind_and_limiter(
    engine: Engine, pool_of_one: Engine, other_engine: Engine
) -> None:
    maker = threadpool_sessionmaker(engine)
    first = maker.limiter
    made_early = maker()  # made before the rebind, first used after it
    async with threadpool_session(maker) as early:
        early.add(User(name="early"))
        await early.flush()  # holds a connection of ``engine`` and a token of ``first``
        maker.configure(bind=pool_of_one)
        assert maker.limiter is not first
        assert maker.limiter.total_tokens == 1
        async with made_early:
            assert await made_early.scalar(text("SELECT 1")) == 1
            assert made_early.sync_session.bind is engine
            assert first.borrowed_tokens == 2
        async with threadpool_session(maker, new=True) as late:
            await late.scalar(select(func.count()).select_from(User))
            assert late.sync_session.bind is pool_of_one
            assert (first.borrowed_tokens, maker.limiter.borrowed_tokens) == (1, 1)
            assert (checked_out(engine), checked_out(pool_of_one)) == (1, 1)
        assert (first.borrowed_tokens, maker.limiter.borrowed_tokens) == (1, 0)
        assert early.sync_session.bind is engine
    assert (first.borrowed_tokens, maker.limiter.borrowed_tokens) == (0, 0)
    assert user_names(other_engine) == {"early"}
    assert checked_out(pool_of_one) == 0
    assert_clean(engine, other_engine)


def test_configure_without_new_binds_keeps_the_limiter(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    limiter = maker.limiter
    maker.configure(expire_on_commit=True)
    assert maker.limiter is limiter  # sessions holding its tokens still count
    assert maker().sync_session.expire_on_commit is True


def test_rebinding_keeps_expire_on_commit_off(engine: Engine, pool_of_one: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    maker.configure(bind=pool_of_one)
    assert maker().sync_session.expire_on_commit is False


@pytest.mark.anyio
async def test_configure_changes_the_makers_own_options(engine: Engine) -> None:
    maker = threadpool_sessionmaker(engine)
    maker.configure(offload="anyio", admission_timeout=None, strict=True, cleanup_timeout=2)
    assert (maker.offload, maker.admission_timeout, maker.strict, maker.cleanup_timeout) == (
        "anyio",
        None,
        True,
        2,
    )
    async with maker() as sess:  # not passed on to Session(): it would raise a TypeError
        assert await sess.scalar(text("SELECT 1")) == 1


@pytest.mark.parametrize(
    "kw",
    [{"guard": "off"}, {"sync_session_class": Session}, {"offload": "threads"}],
    ids=["guard", "sync_session_class", "bad_offload"],
)
def test_configure_refuses_what_it_cannot_change(engine: Engine, kw: dict[str, object]) -> None:
    maker = threadpool_sessionmaker(engine)
    with pytest.raises(ConfigurationError):
        maker.configure(**kw)
    assert maker.offload == "worker"
    assert not set(kw) & set(maker.sync_maker.kw)


class _Sleep:
    """``sess.run`` callable: a long server-side sleep; records how it ended."""

    def __init__(self, dialect: str, seconds: float) -> None:
        self.statement = slow_statement(dialect, seconds)
        self.started = threading.Event()
        self.outcome: list[object] = []  # the exception raised, or the value returned

    def __call__(self, session: Session) -> None:
        self.started.set()
        try:
            self.outcome.append(session.scalar(self.statement))
        except Exception as exc:
            self.outcome.append(exc)
            raise

    @property
    def stopped(self) -> bool:
        """Stopped by the server: an error (PostgreSQL), or SLEEP() returning 1 (MariaDB)."""
        return len(self.outcome) == 1 and (
            isinstance(self.outcome[0], Exception) or self.outcome[0] == 1
        )


@only_on("postgresql", "mysql")
@pytest.mark.anyio
async def test_cancel_reaches_the_new_bind(
    engine: Engine, other_engine: Engine, tmp_path: Path
) -> None:
    long = 10  # what the sleep would take if nothing stopped it
    first = create_engine(f"sqlite:///{tmp_path}/first.db")
    try:
        # A cleanup deadline beyond the sleep: the statement is never cut, only cancelled.
        maker = threadpool_sessionmaker(first, cleanup_timeout=3 * long)
        maker.configure(bind=engine)
        call = _Sleep(engine.dialect.name, long)
        with anyio.fail_after(5 * long):  # the test never hangs, whatever the canceller
            async with threadpool_session(maker) as sess:
                with pytest.raises(TimeoutError), anyio.fail_after(3 * long) as scope:
                    async with anyio.create_task_group() as group:

                        async def expire_when_running() -> None:
                            await wait_until_running(other_engine, call.started)
                            scope.deadline = anyio.current_time()

                        group.start_soon(expire_when_running)
                        await sess.run(call)
                await sess.rollback()
    finally:
        first.dispose()
    assert call.stopped, f"the sleep ran to its end: {call.outcome!r}"
    assert_clean(engine, other_engine)
