"""Plain asyncio: reuse existing synchronous SQLAlchemy code without blocking the loop.

``report()`` is ordinary sync ORM code (say, from an older code base); ``sess.run(report)``
runs it in a worker thread, lazy loads included, so the event loop keeps serving other
tasks. Units of work run concurrently with ``asyncio.gather``; one that exceeds its timeout is
cancelled and rolled back. The tables ``satp_web_author``/``satp_web_book`` are
re-created on every run.

Run it (any sync driver; SQLite by default)::

    pip install sqlalchemy-threadpool
    DATABASE_URL=postgresql+psycopg2://app@localhost/app python asyncio_script.py
"""

from __future__ import annotations

import asyncio
import os

from sqlalchemy import ForeignKey, String, create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.pool import QueuePool

from sqlalchemy_threadpool import threadpool_session, threadpool_sessionmaker


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "satp_web_author"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    books: Mapped[list[Book]] = relationship(back_populates="author")  # lazy="select"


class Book(Base):
    __tablename__ = "satp_web_book"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(200))
    author_id: Mapped[int] = mapped_column(ForeignKey("satp_web_author.id"))
    author: Mapped[Author] = relationship(back_populates="books")


def report(session: Session) -> list[str]:
    """Plain synchronous code: every ``author.books`` below is a lazy load (a query)."""
    authors = session.scalars(select(Author).order_by(Author.name))
    return [f"{a.name}: {', '.join(sorted(b.title for b in a.books))}" for a in authors]


def reset_schema(engine: Engine) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)


async def add_author(maker: threadpool_sessionmaker, name: str, titles: list[str]) -> None:
    async with threadpool_session(maker) as sess:
        sess.add(Author(name=name, books=[Book(title=t) for t in titles]))


async def main() -> None:
    engine = create_engine(os.environ.get("DATABASE_URL", "sqlite:///books.db"))
    maker = threadpool_sessionmaker(engine)
    await asyncio.to_thread(reset_schema, engine)

    await asyncio.gather(
        add_author(maker, "Le Guin", ["The Dispossessed", "The Lathe of Heaven"]),
        add_author(maker, "Lem", ["Solaris", "The Cyberiad"]),
        add_author(maker, "Jemisin", ["The Fifth Season"]),
    )

    async def slow_unit_of_work() -> None:
        async with threadpool_session(maker) as sess:
            sess.add(Author(name="Never committed"))
            await sess.flush()
            await asyncio.sleep(3600)  # far beyond the timeout below

    try:
        await asyncio.wait_for(slow_unit_of_work(), timeout=0.2)
    except asyncio.TimeoutError:
        print("timed out: rolled back")

    async with threadpool_session(maker) as sess:
        for line in await sess.run(report):
            print(line)

    pool = engine.pool
    if isinstance(pool, QueuePool):
        print(f"connections checked out: {pool.checkedout()}")
    engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
