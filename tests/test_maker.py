"""The maker: limiter sizing from the pool, configuration errors, in-memory SQLite."""

from __future__ import annotations

import anyio
import pytest
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.pool import NullPool, StaticPool

from models import Base, User
from sqlalchemy_threadpool import (
    ConfigurationError,
    ConfigurationWarning,
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


def test_limiter_smaller_than_the_pool_warns(engine: Engine) -> None:
    with pytest.warns(ConfigurationWarning, match="smaller than the connection pool"):
        maker = threadpool_sessionmaker(engine, limiter=1)
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
