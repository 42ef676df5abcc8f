"""Plain trio: concurrent units of work on a blocking driver, an error and a cancellation.

Twenty tasks record page visits at once, each in its own ``threadpool_session`` (committed on
success, in a worker thread); a unit of work that raises and one that is cancelled are both
rolled back. The table ``satp_web_visit`` is re-created on every run.

Run it (any sync driver; SQLite by default)::

    pip install sqlalchemy-threadpool trio
    DATABASE_URL=postgresql+psycopg2://app@localhost/app python trio_script.py
"""

from __future__ import annotations

import os

import trio
from sqlalchemy import String, create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import QueuePool

from sqlalchemy_threadpool import current_session, threadpool_session, threadpool_sessionmaker


class Base(DeclarativeBase):
    pass


class Visit(Base):
    __tablename__ = "satp_web_visit"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    page: Mapped[str] = mapped_column(String(100))


async def save_visits(page: str, count: int) -> None:
    """Application code deep down: it uses whatever session its caller bound."""
    sess = current_session()
    sess.add_all(Visit(page=page) for _ in range(count))
    await sess.flush()


async def record(maker: threadpool_sessionmaker, page: str, count: int) -> None:
    async with threadpool_session(maker):  # commit on success, roll back otherwise
        await save_visits(page, count)


def reset_schema(engine: Engine) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)


async def main() -> None:
    engine = create_engine(os.environ.get("DATABASE_URL", "sqlite:///visits.db"))
    maker = threadpool_sessionmaker(engine)
    await trio.to_thread.run_sync(reset_schema, engine)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(record, maker, f"/page/{i % 4}", 5)

    try:
        async with threadpool_session(maker):
            await save_visits("/error", 3)
            raise LookupError("something went wrong after the flush")
    except LookupError:
        print("error: rolled back")

    with trio.move_on_after(0.2) as scope:
        async with threadpool_session(maker):
            await save_visits("/cancelled", 3)
            await trio.sleep_forever()  # the client went away, a deadline passed...
    print(f"cancelled: {scope.cancelled_caught}, rolled back")

    async with threadpool_session(maker) as sess:
        rows = await sess.execute(
            select(Visit.page, func.count()).group_by(Visit.page).order_by(Visit.page)
        )
        for page, count in rows:
            print(f"{page} {count}")

    pool = engine.pool
    if isinstance(pool, QueuePool):
        print(f"connections checked out: {pool.checkedout()}")
    engine.dispose()


if __name__ == "__main__":
    trio.run(main)
