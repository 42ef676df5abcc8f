"""Tests for ``starlette_app`` with the pytest plugin: each test is rolled back at its end.

The app commits (the middleware commits every 2xx), yet the database stays clean: the
plugin's maker joins the test's outer transaction and turns each commit into a SAVEPOINT
release. Requests made in the test's task join ``threadpool_db_session``, so the test sees
their writes through it.

Run it (the plugin is opt-in; this directory's ``conftest.py`` would hold the first line)::

    echo 'pytest_plugins = ["sqlalchemy_threadpool.pytest_plugin"]' > conftest.py
    pip install sqlalchemy-threadpool starlette httpx trio pytest
    pytest test_starlette_app.py --threadpool-db-url=postgresql+psycopg2://app@localhost/app_test
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import Engine, func, select
from starlette_app import Base, Note, build_app

from sqlalchemy_threadpool import ThreadpoolSession, threadpool_sessionmaker

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture(scope="session", autouse=True)
def schema(threadpool_engine: Engine) -> None:
    Base.metadata.create_all(threadpool_engine)


@pytest.fixture
async def client(threadpool_maker: threadpool_sessionmaker) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(threadpool_maker))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_created_note_is_visible_to_the_test(
    client: httpx.AsyncClient, threadpool_db_session: ThreadpoolSession
) -> None:
    response = await client.post("/notes", json={"key": "a", "text": "hello"})
    assert response.status_code == 201
    note = await threadpool_db_session.get(Note, "a")
    assert note is not None
    assert note.text == "hello"


async def test_each_test_starts_from_a_clean_database(
    threadpool_db_session: ThreadpoolSession,
) -> None:
    assert await threadpool_db_session.scalar(select(func.count()).select_from(Note)) == 0


async def test_refused_note_is_rolled_back(
    client: httpx.AsyncClient, threadpool_db_session: ThreadpoolSession
) -> None:
    assert (await client.post("/notes", json={"key": "b", "text": "spam!"})).status_code == 422
    assert (await client.post("/notes", json={"key": "c", "text": "fine"})).status_code == 201
    keys = await threadpool_db_session.scalars(select(Note.key))
    assert keys.all() == ["c"]
