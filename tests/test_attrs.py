"""``ThreadpoolAttrs``, ``threadpool_object_session`` and ``threadpool_session_of``.

``await obj.awaitable_attrs.name`` loads in the worker of the session that owns ``obj`` (the
SQL is recorded with the thread it ran on); the guard still catches plain access before it.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from sqlalchemy import Engine, ForeignKey, String, Text, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.orm.exc import DetachedInstanceError

from sqlalchemy_threadpool import (
    LazyLoadOnEventLoopError,
    NoSessionError,
    ThreadpoolAttrs,
    ThreadpoolSession,
    threadpool_object_session,
    threadpool_session,
    threadpool_session_of,
    threadpool_sessionmaker,
)

pytestmark = pytest.mark.anyio


class Base(ThreadpoolAttrs, DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "satp_attrs_author"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    bio: Mapped[str | None] = mapped_column(Text, deferred=True)
    books: Mapped[list[Book]] = relationship(back_populates="author", lazy="select")


class Book(Base):
    __tablename__ = "satp_attrs_book"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey("satp_attrs_author.id"))
    author: Mapped[Author] = relationship(back_populates="books")


@pytest.fixture
def tables(engine: Engine) -> Iterator[Engine]:
    """The engine, with this module's tables created and one author with two books."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as sess, sess.begin():
        sess.add(Author(name="ada", bio="countess", books=[Book(title="a"), Book(title="b")]))
    try:
        yield engine
    finally:
        Base.metadata.drop_all(engine)


class SQLThreads:
    """The thread idents every statement on ``engine`` ran on, in order."""

    def __init__(self, engine: Engine) -> None:
        self.idents: list[int] = []
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, *args: Any) -> None:
        self.idents.append(threading.get_ident())


async def _author(sess: ThreadpoolSession) -> Author:
    return (await sess.scalars(select(Author))).one()


async def test_a_relationship_loads_in_the_owning_sessions_worker(tables: Engine) -> None:
    sql = SQLThreads(tables)
    loop = threading.get_ident()
    async with threadpool_session(threadpool_sessionmaker(tables)) as sess:
        author = await _author(sess)
        [session_worker] = set(sql.idents)
        with pytest.raises(LazyLoadOnEventLoopError, match="books"):
            author.books  # noqa: B018
        before = len(sql.idents)
        with anyio.fail_after(30):
            books = await author.awaitable_attrs.books
        assert sorted(b.title for b in books) == ["a", "b"]
        loaded_on = set(sql.idents[before:])
        assert loaded_on == {session_worker}  # its session's own dedicated worker
        assert loop not in loaded_on
        after = len(sql.idents)
        assert author.books is books  # plain access now: loaded, no IO
        assert len(sql.idents) == after


@pytest.mark.parametrize("offload", ["worker", "anyio"])
async def test_a_deferred_column_loads_off_the_loop(tables: Engine, offload: str) -> None:
    sql = SQLThreads(tables)
    maker = threadpool_sessionmaker(tables, offload=offload)  # type: ignore[arg-type]
    async with threadpool_session(maker) as sess:
        author = await _author(sess)
        with pytest.raises(LazyLoadOnEventLoopError, match="bio"):
            author.bio  # noqa: B018
        before = len(sql.idents)
        assert await author.awaitable_attrs.bio == "countess"
        assert sql.idents[before:]
        assert threading.get_ident() not in sql.idents
        after = len(sql.idents)
        assert author.bio == "countess"
        assert len(sql.idents) == after


async def test_an_expired_attribute_is_refreshed_off_the_loop(tables: Engine) -> None:
    sql = SQLThreads(tables)
    async with threadpool_session(threadpool_sessionmaker(tables)) as sess:
        author = await _author(sess)
        sess.expire(author, ["name"])
        with pytest.raises(LazyLoadOnEventLoopError):
            author.name  # noqa: B018
        assert await author.awaitable_attrs.name == "ada"
        assert threading.get_ident() not in sql.idents
        assert author.name == "ada"


async def test_loads_take_turns_with_the_sessions_other_calls(tables: Engine) -> None:
    """Two tasks sharing one session: the loads and the queries never overlap in the session."""
    inside = 0
    overlapped = False

    def enter(*args: Any) -> None:
        nonlocal inside, overlapped
        inside += 1
        overlapped = overlapped or inside > 1

    def leave(*args: Any) -> None:
        nonlocal inside
        inside -= 1

    event.listen(tables, "before_cursor_execute", enter)
    event.listen(tables, "after_cursor_execute", leave)
    async with threadpool_session(threadpool_sessionmaker(tables)) as sess:
        authors = [await _author(sess) for _ in range(1)]

        async def load() -> None:
            for _ in range(5):
                sess.expire(authors[0], ["books", "bio"])
                await authors[0].awaitable_attrs.books
                await authors[0].awaitable_attrs.bio

        async def query() -> None:
            for _ in range(5):
                await sess.scalars(select(Book))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(load)
                tg.start_soon(query)
    assert not overlapped


async def test_object_session_and_session_of_find_the_facade(tables: Engine) -> None:
    maker = threadpool_sessionmaker(tables)
    async with maker() as sess:
        author = await _author(sess)
        assert threadpool_object_session(author) is sess
        assert threadpool_session_of(sess.sync_session) is sess
        assert threadpool_session_of(sess.sync_session) is sess  # the same object every time
        assert threadpool_object_session(Author(name="transient")) is None
        async with maker() as other:
            assert threadpool_session_of(other.sync_session) is other
            assert threadpool_object_session(author) is sess
    assert threadpool_object_session(author) is None  # closed: detached
    with Session(tables) as plain:
        assert threadpool_session_of(plain) is None


async def test_the_back_reference_keeps_no_facade_alive(tables: Engine) -> None:
    maker = threadpool_sessionmaker(tables)
    sess = maker()
    sync_session = sess.sync_session
    ref = weakref.ref(sess)
    del sess
    gc.collect()
    assert ref() is None
    assert threadpool_session_of(sync_session) is None


async def test_a_detached_object_raises_sqlalchemys_error_with_the_fix(tables: Engine) -> None:
    async with threadpool_session(threadpool_sessionmaker(tables)) as sess:
        author = await _author(sess)
        await author.awaitable_attrs.books  # loaded while the session was open
    assert [b.title for b in sorted(await author.awaitable_attrs.books, key=lambda b: b.id)] == [
        "a",
        "b",
    ]  # loaded values are returned, as AsyncAttrs does
    with pytest.raises(DetachedInstanceError, match=r"not bound to a Session.*sess\.merge"):
        await author.awaitable_attrs.bio
    assert await Author(name="new").awaitable_attrs.books == []  # transient: no IO, as there


async def test_an_object_of_a_plain_session_raises_no_session_error(tables: Engine) -> None:
    with Session(tables) as plain:
        author = await anyio.to_thread.run_sync(lambda: plain.scalars(select(Author)).one())
        with pytest.raises(NoSessionError, match="no ThreadpoolSession wraps"):
            await author.awaitable_attrs.books
