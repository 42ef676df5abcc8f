"""A small Litestar notes service on a blocking driver.

``ThreadpoolSessionPlugin`` injects a threadpool session as ``db_session``, commits it in a
worker thread before the response starts (a failed commit becomes a 500) and rolls back on
error statuses; on shutdown it disposes the engine.

Run it (any sync driver; SQLite by default)::

    pip install sqlalchemy-threadpool litestar uvicorn
    DATABASE_URL=postgresql+psycopg2://app@localhost/app uvicorn litestar_app:app

    curl -X POST localhost:8000/notes -d '{"key": "a", "text": "hello"}'
    curl localhost:8000/notes/a
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from litestar import Litestar, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotFoundException
from litestar.params import FromPath, JSONBody
from litestar.response import Stream
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import QueuePool

from sqlalchemy_threadpool import threadpool_sessionmaker
from sqlalchemy_threadpool.integrations.litestar import DBSession, ThreadpoolSessionPlugin


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "satp_web_note"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    text: Mapped[str] = mapped_column(String(500))


@dataclass
class NoteData:
    key: str
    text: str


@post("/notes")  # 201 by default
async def create_note(data: JSONBody[NoteData], db_session: DBSession) -> dict[str, str]:
    db_session.add(Note(key=data.key, text=data.text))
    if "spam" in data.text:
        await db_session.flush()  # the INSERT reached the database; the 422 rolls it back
        raise HTTPException(status_code=422, detail="looks like spam")
    # Flushed by the commit, before the 201 goes out: a duplicate key becomes a 500.
    return {"key": data.key}


@get("/notes/{key:str}")
async def get_note(key: FromPath[str], db_session: DBSession) -> NoteData:
    note = await db_session.get(Note, key)
    if note is None:
        raise NotFoundException("not found")
    return NoteData(key=note.key, text=note.text)


@get("/notes")
async def list_notes(db_session: DBSession) -> Stream:
    async def lines() -> AsyncIterator[str]:
        # Runs after the response started; the session stays open until the last line.
        async with await db_session.stream_scalars(select(Note).order_by(Note.key)) as notes:
            async for note in notes:
                yield f"{note.key}\t{note.text}\n"

    return Stream(lines(), media_type="text/plain")


@get("/health")
async def health(state: State) -> dict[str, object]:
    pool = state.engine.pool
    return {
        "status": "ok",
        "pool_checked_out": pool.checkedout() if isinstance(pool, QueuePool) else None,
    }


def create_app(database_url: str) -> Litestar:
    engine = create_engine(database_url)

    async def create_schema() -> None:
        await anyio.to_thread.run_sync(Base.metadata.create_all, engine)

    return Litestar(
        route_handlers=[create_note, get_note, list_notes, health],
        plugins=[ThreadpoolSessionPlugin(threadpool_sessionmaker(engine))],  # disposes engine
        on_startup=[create_schema],
        state=State({"engine": engine}),
    )


app = create_app(os.environ.get("DATABASE_URL", "sqlite:///notes.db"))
