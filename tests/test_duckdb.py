"""DuckDB through ``duckdb-engine``: a driver with no async counterpart at all.

A DuckDB connection refuses to be used by two threads at once ("connection is busy with
another call"); used by one thread at a time, as every connection of a threadpool session is,
it works from any thread. So DuckDB needs no thread affinity, only the right pool: a database
file or a named in-memory database (``duckdb:///:memory:NAME``) with the default ``QueuePool``,
or one shared connection (``StaticPool``). The anonymous in-memory URLs give each connection a
private database, and the maker refuses them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from sqlalchemy import Engine, ForeignKey, String, create_engine, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.pool import QueuePool, StaticPool

from sqlalchemy_threadpool import (
    ConfigurationError,
    LazyLoadOnEventLoopError,
    threadpool_session,
    threadpool_sessionmaker,
)

pytest.importorskip("duckdb_engine")

pytestmark = pytest.mark.anyio


class Base(DeclarativeBase):
    pass


class Author(Base):
    # DuckDB has no SERIAL: the tests give explicit ids.
    __tablename__ = "satp_duck_author"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(100))
    books: Mapped[list[Book]] = relationship(back_populates="author", lazy="select")


class Book(Base):
    __tablename__ = "satp_duck_book"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey("satp_duck_author.id"))
    author: Mapped[Author] = relationship(back_populates="books")


def _prepared(url: str, **kwargs: object) -> Engine:
    engine = create_engine(url, **kwargs)
    Base.metadata.create_all(engine)
    return engine


@pytest.fixture
def duck(tmp_path: Path) -> Iterator[Engine]:
    """A DuckDB database file with the default pool (QueuePool, 5 + 10 connections)."""
    engine = _prepared(f"duckdb:///{tmp_path}/test.duckdb")
    try:
        yield engine
    finally:
        engine.dispose()


def _names(engine: Engine) -> set[str]:
    with Session(engine) as session:
        return set(session.scalars(select(Author.name)))


async def test_commit_is_visible_to_other_connections(duck: Engine) -> None:
    maker = threadpool_sessionmaker(duck)
    async with threadpool_session(maker) as sess:
        sess.add(Author(id=1, name="ada"))
        await sess.flush()
        assert await sess.scalar(select(Author.name).where(Author.id == 1)) == "ada"
    assert _names(duck) == {"ada"}
    assert duck.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_error_rolls_back(duck: Engine) -> None:
    maker = threadpool_sessionmaker(duck)
    with pytest.raises(ValueError, match="boom"):
        async with threadpool_session(maker) as sess:
            sess.add(Author(id=1, name="ada"))
            await sess.flush()
            raise ValueError("boom")
    assert _names(duck) == set()
    assert duck.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_concurrent_sessions_never_share_a_connection_at_once(duck: Engine) -> None:
    """DuckDB raises if a connection is used by two threads at once: none may."""
    assert isinstance(duck.pool, QueuePool)
    maker = threadpool_sessionmaker(duck)
    assert maker.limiter.total_tokens == 15  # pool_size 5 + max_overflow 10

    async def one(i: int) -> None:
        async with threadpool_session(maker) as sess:
            sess.add(Author(id=i, name=f"author {i}"))
            await sess.flush()
            count = await sess.scalar(select(func.count()).select_from(Author))
            assert count is not None
            assert count >= 1

    async with anyio.create_task_group() as tg:
        for i in range(60):
            tg.start_soon(one, i)
    assert len(_names(duck)) == 60
    assert duck.pool.checkedout() == 0


async def test_lazy_load_on_the_loop_is_caught(duck: Engine) -> None:
    maker = threadpool_sessionmaker(duck)
    async with threadpool_session(maker) as sess:
        sess.add(Author(id=1, name="ada"))
        sess.add(Book(id=1, title="notes", author_id=1))
    async with threadpool_session(maker) as sess:
        author = await sess.get(Author, 1)
        assert author is not None
        with pytest.raises(LazyLoadOnEventLoopError, match=r"Author\.books"):
            _ = author.books
        books = await sess.load(author, "books")
        assert [book.title for book in books] == ["notes"]


async def test_stream_fetches_in_workers(duck: Engine) -> None:
    maker = threadpool_sessionmaker(duck)
    async with threadpool_session(maker) as sess:
        sess.add_all(Author(id=i, name=f"author {i}") for i in range(25))
    async with threadpool_session(maker) as sess:
        result = await sess.stream_scalars(select(Author.id).order_by(Author.id))
        seen = [author_id async for author_id in result]
    assert seen == list(range(25))


async def test_named_in_memory_database_is_shared_by_sessions() -> None:
    engine = _prepared(f"duckdb:///:memory:satp_{uuid.uuid4().hex}")
    try:
        assert isinstance(engine.pool, QueuePool)
        maker = threadpool_sessionmaker(engine)
        async with threadpool_session(maker) as sess:
            sess.add(Author(id=1, name="ada"))
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(_expect_ada, maker)
    finally:
        engine.dispose()


async def _expect_ada(maker: threadpool_sessionmaker) -> None:
    async with threadpool_session(maker) as sess:
        assert (await sess.scalars(select(Author.name))).all() == ["ada"]


async def test_one_shared_in_memory_connection() -> None:
    engine = _prepared("duckdb:///:memory:", poolclass=StaticPool)
    try:
        maker = threadpool_sessionmaker(engine)
        assert maker.limiter.total_tokens == 1
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(_add_author, maker, i)
        async with threadpool_session(maker) as sess:
            assert await sess.scalar(text("SELECT count(*) FROM satp_duck_author")) == 10
    finally:
        engine.dispose()


async def _add_author(maker: threadpool_sessionmaker, i: int) -> None:
    async with threadpool_session(maker) as sess:
        sess.add(Author(id=i, name=f"author {i}"))


@pytest.mark.parametrize("url", ["duckdb://", "duckdb:///:memory:"])
def test_private_in_memory_databases_are_refused(url: str) -> None:
    engine = create_engine(url)
    try:
        with pytest.raises(ConfigurationError, match=r"duckdb:///:memory:app"):
            threadpool_sessionmaker(engine)
    finally:
        engine.dispose()


async def test_a_long_query_is_interrupted_by_a_timeout(duck: Engine) -> None:
    """``interrupt()`` from a helper thread stops the query; the unit of work is rolled back."""
    maker = threadpool_sessionmaker(duck)
    endless = text("SELECT count(*) FROM range(100000000000) t(x) WHERE x % 7 = 3")  # minutes
    outcome: list[str] = []

    def long_query(session: Session) -> None:
        try:
            session.execute(endless)
        except Exception as exc:
            outcome.append(type(exc.__cause__ or exc).__name__)
            raise
        outcome.append("returned")

    start = anyio.current_time()
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.5):
            async with threadpool_session(maker) as sess:
                sess.add(Author(id=1, name="ada"))
                await sess.flush()
                await sess.run(long_query)
    assert anyio.current_time() - start < 10  # the query alone runs for minutes
    assert outcome == ["InterruptException"]  # stopped by interrupt(), not run to its end
    assert _names(duck) == set()  # rolled back
    assert duck.pool.checkedout() == 0  # type: ignore[attr-defined]
    async with threadpool_session(maker) as sess:  # the connection went back clean
        assert await sess.scalar(text("SELECT 42")) == 42
        sess.add(Author(id=2, name="bob"))
    assert _names(duck) == {"bob"}
    assert duck.pool.checkedout() == 0  # type: ignore[attr-defined]
