"""DuckDB from asyncio: an analytical database with no async driver at all.

``duckdb-engine`` is a sync-only SQLAlchemy dialect. Through a threadpool maker, concurrent
tasks load and query a DuckDB file without blocking the event loop; each session runs on its
own pooled connection, one thread at a time, which is what DuckDB requires. The database file
``events.duckdb`` is re-created on every run.

Run it::

    pip install sqlalchemy-threadpool duckdb-engine
    python duckdb_script.py
"""

from __future__ import annotations

import asyncio
import os

from sqlalchemy import String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import QueuePool

from sqlalchemy_threadpool import threadpool_session, threadpool_sessionmaker

PATH = "events.duckdb"


class Base(DeclarativeBase):
    pass


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)  # no SERIAL in DuckDB
    kind: Mapped[str] = mapped_column(String(20))
    amount: Mapped[int]


async def load(maker: threadpool_sessionmaker, batch: int) -> None:
    async with threadpool_session(maker) as sess:
        sess.add_all(
            Event(id=batch * 1000 + i, kind=("sale", "refund")[i % 2], amount=i)
            for i in range(250)
        )


async def total(maker: threadpool_sessionmaker, kind: str) -> tuple[str, int]:
    async with threadpool_session(maker) as sess:
        amount = await sess.scalar(select(func.sum(Event.amount)).where(Event.kind == kind))
        return kind, int(amount or 0)


def reset() -> None:
    if os.path.exists(PATH):
        os.remove(PATH)


async def main() -> None:
    reset()  # before the loop has work to do; a real app would do this at start-up
    engine = create_engine(f"duckdb:///{PATH}")  # a file: QueuePool, 5 + 10 connections
    await asyncio.to_thread(Base.metadata.create_all, engine)
    maker = threadpool_sessionmaker(engine)

    await asyncio.gather(*(load(maker, batch) for batch in range(8)))
    for kind, amount in await asyncio.gather(total(maker, "sale"), total(maker, "refund")):
        print(f"{kind}: {amount}")

    pool = engine.pool
    if isinstance(pool, QueuePool):
        print(f"connections checked out: {pool.checkedout()}")
    engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
