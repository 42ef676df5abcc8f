"""A small FastAPI notes service on a blocking driver.

``SessionMiddleware`` gives every request a threadpool session and commits it in a worker
thread before the response starts (a failed commit becomes a 500, never a 201 the client
already saw); ``DBSession`` injects it. Endpoints stay ``async def`` and never block the loop.

Run it (any sync driver; SQLite by default)::

    pip install sqlalchemy-threadpool fastapi uvicorn
    DATABASE_URL=postgresql+psycopg2://app@localhost/app uvicorn fastapi_app:app

    curl -X POST localhost:8000/notes -H 'content-type: application/json' \\
         -d '{"key": "a", "text": "hello"}'
    curl localhost:8000/notes/a
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import QueuePool

from sqlalchemy_threadpool import current_session, shutdown, threadpool_sessionmaker
from sqlalchemy_threadpool.integrations.asgi import SessionMiddleware
from sqlalchemy_threadpool.integrations.fastapi import DBSession


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "satp_web_note"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    text: Mapped[str] = mapped_column(String(500))


class NoteIn(BaseModel):
    key: str
    text: str


class NoteOut(BaseModel):
    key: str
    text: str


async def count_notes() -> int:
    """Deep inside the application: the request's session, without passing it around."""
    return await current_session().scalar(select(func.count()).select_from(Note)) or 0


def create_app(database_url: str) -> FastAPI:
    engine = create_engine(database_url)
    maker = threadpool_sessionmaker(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(Base.metadata.create_all, engine)
        yield
        # The server stopped taking requests: end what still runs, then dispose the engine.
        await shutdown(maker)

    app = FastAPI(lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(SessionMiddleware, sessionmaker=maker)

    @app.post("/notes", status_code=201)
    async def create_note(note: NoteIn, sess: DBSession) -> dict[str, str]:
        sess.add(Note(key=note.key, text=note.text))
        if "spam" in note.text:
            await sess.flush()  # the INSERT reached the database; the 422 rolls it back
            raise HTTPException(status_code=422, detail="looks like spam")
        # Flushed by the commit, before the 201 goes out: a duplicate key becomes a 500.
        return {"key": note.key}

    @app.get("/notes/{key}")
    async def get_note(key: str, sess: DBSession) -> NoteOut:
        note = await sess.get(Note, key)
        if note is None:
            raise HTTPException(status_code=404, detail="not found")
        return NoteOut(key=note.key, text=note.text)

    @app.get("/notes")
    async def list_notes(sess: DBSession) -> StreamingResponse:
        async def lines() -> AsyncIterator[str]:
            # Runs after the response started; the session stays open until the last line.
            yield f"# {await count_notes()} notes\n"
            async with await sess.stream_scalars(select(Note).order_by(Note.key)) as notes:
                async for note in notes:
                    yield f"{note.key}\t{note.text}\n"

        return StreamingResponse(lines(), media_type="text/plain")

    @app.get("/health")
    async def health() -> dict[str, object]:
        pool = engine.pool
        return {
            "status": "ok",
            "pool_checked_out": pool.checkedout() if isinstance(pool, QueuePool) else None,
        }

    return app


app = create_app(os.environ.get("DATABASE_URL", "sqlite:///notes.db"))
