"""Sync drivers beyond psycopg2, PyMySQL and sqlite3 work through the library unchanged.

Each runs the same unit of work on the test servers (the databases of ``db_url``, reached
through another driver): concurrent sessions commit, an error rolls back, the pool is clean
afterwards. None of these drivers has a statement canceller yet, so a cancelled await waits
for its statement to finish (see the per-database notes in the docs).
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from sqlalchemy import Engine, create_engine, make_url, select

from conftest import SELECTED_DATABASES
from helpers import user_names
from models import User
from sqlalchemy_threadpool import threadpool_session, threadpool_sessionmaker

pytestmark = pytest.mark.anyio

#: (database of ``db_url``, SQLAlchemy driver name, module to import)
DRIVERS = [
    pytest.param("postgresql", "postgresql+pg8000", "pg8000", id="pg8000"),
    pytest.param("postgresql", "postgresql+psycopg", "psycopg", id="psycopg3-sync"),
    pytest.param("mysql", "mysql+mysqlconnector", "mysql.connector", id="mysql-connector"),
]
by_driver = pytest.mark.parametrize(
    ("db_url", "drivername", "module"),
    [driver for driver in DRIVERS if driver.values[0] in SELECTED_DATABASES],
    indirect=["db_url"],
)


@pytest.fixture
def driver_engine(engine: Engine, drivername: str, module: str) -> Iterator[Engine]:
    """The test database (tables fresh from ``engine``), reached through another driver."""
    pytest.importorskip(module)
    url = make_url(engine.url.render_as_string(hide_password=False)).set(drivername=drivername)
    other = create_engine(url, pool_size=3, max_overflow=0)
    try:
        yield other
    finally:
        other.dispose()


@by_driver
async def test_concurrent_units_of_work(driver_engine: Engine) -> None:
    maker = threadpool_sessionmaker(driver_engine)

    async def one(i: int) -> None:
        async with threadpool_session(maker) as sess:
            sess.add(User(name=f"user {i}"))
            await sess.flush()
            assert await sess.scalar(select(User.name).where(User.name == f"user {i}"))

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(one, i)
    assert user_names(driver_engine) == {f"user {i}" for i in range(12)}
    assert driver_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@by_driver
async def test_error_rolls_back(driver_engine: Engine) -> None:
    maker = threadpool_sessionmaker(driver_engine)
    with pytest.raises(ValueError, match="boom"):
        async with threadpool_session(maker) as sess:
            sess.add(User(name="ada"))
            await sess.flush()
            raise ValueError("boom")
    assert user_names(driver_engine) == set()
    assert driver_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
