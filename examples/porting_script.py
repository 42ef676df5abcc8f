"""Code written for ``AsyncSession``, run unchanged on a sync driver (docs/porting.md).

``tour()`` is ``AsyncSession`` code: only the maker passed to it is a threadpool one, and the
annotation says ``threadpool_sessionmaker`` where it said ``async_sessionmaker``. The test suite
runs this script on SQLite, PostgreSQL and MariaDB, and runs ``tour()`` on ``AsyncSession`` with
aiosqlite too, to check that it prints the same lines. The table ``satp_porting_user`` is
re-created on every run.

Run it (any sync driver; SQLite by default)::

    pip install sqlalchemy-threadpool
    DATABASE_URL=postgresql+psycopg2://app@localhost/app python porting_script.py
"""

from __future__ import annotations

import os

import anyio
from sqlalchemy import String, create_engine, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import QueuePool

from sqlalchemy_threadpool import threadpool_sessionmaker


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "satp_porting_user"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    active: Mapped[bool] = mapped_column(default=True)


async def tour(Session: threadpool_sessionmaker) -> list[str]:
    lines: list[str] = []
    async with Session.begin() as sess:  # commits on success, rolls back on error
        sess.add_all([User(name="ada"), User(name="grace", active=False)])

    async with Session() as sess:  # closes on exit; commits only when told to
        user = await sess.get_one(User, 1)
        users = (await sess.scalars(select(User).where(User.active))).all()
        lines.append(f"active: {', '.join(u.name for u in users)}")
        await sess.execute(update(User).where(User.name == "grace").values(active=True))
        sess.add(User(name="linus"))  # no IO: a plain call, as in AsyncSession
        await sess.flush()
        await sess.refresh(user)
        n = await sess.run_sync(lambda s: s.query(User).count())  # run_sync: same name
        lines.append(f"users: {n}")
        async with sess.begin_nested():  # SAVEPOINT, released at the end of the block
            sess.add(User(name="margaret"))
        await sess.commit()

        stream = await sess.stream_scalars(select(User.name).order_by(User.id))
        lines.append(f"streamed: {', '.join([name async for name in stream])}")
    return lines


def reset_schema(engine: Engine) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)


async def main() -> None:
    engine = create_engine(os.environ.get("DATABASE_URL", "sqlite:///porting.db"))
    await anyio.to_thread.run_sync(reset_schema, engine)
    for line in await tour(threadpool_sessionmaker(engine)):
        print(line)
    pool = engine.pool
    if isinstance(pool, QueuePool):
        print(f"connections checked out: {pool.checkedout()}")
    engine.dispose()


if __name__ == "__main__":
    anyio.run(main)
