"""A small Starlette notes service on a blocking driver, served on asyncio *or* trio.

Every request gets a threadpool session from ``SessionMiddleware``; the transaction is
committed in a worker thread before the response starts (a failed commit becomes a 500) and
rolled back on any non-2xx status.

Run it (any sync driver; SQLite by default)::

    pip install sqlalchemy-threadpool starlette uvicorn hypercorn trio
    DATABASE_URL=postgresql+psycopg2://app@localhost/app uvicorn starlette_app:app
    DATABASE_URL=postgresql+psycopg2://app@localhost/app hypercorn -k trio starlette_app:app

    curl -X POST localhost:8000/notes -d '{"key": "a", "text": "hello"}'
    curl localhost:8000/notes/a
    curl localhost:8000/notes          # streamed, one note per line
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import QueuePool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sqlalchemy_threadpool import current_session, shutdown, threadpool_sessionmaker
from sqlalchemy_threadpool.integrations.asgi import SessionMiddleware


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "satp_web_note"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    text: Mapped[str] = mapped_column(String(500))


async def create_note(request: Request) -> Response:
    payload = await request.json()
    sess = current_session()  # bound by SessionMiddleware, like request.state.db_session
    sess.add(Note(key=str(payload["key"]), text=str(payload["text"])))
    if "spam" in payload["text"]:
        await sess.flush()  # the INSERT reached the database...
        # ...and a 4xx makes the middleware roll it back.
        return JSONResponse({"error": "looks like spam"}, status_code=422)
    # No flush here: the INSERT is flushed by the commit, which runs before this 201 is sent.
    # A duplicate key therefore fails at commit time, and the client gets a 500 instead.
    return JSONResponse({"key": payload["key"]}, status_code=201)


async def get_note(request: Request) -> Response:
    note = await request.state.db_session.get(Note, request.path_params["key"])
    if note is None:
        return JSONResponse({"error": "not found"}, status_code=404)
    return JSONResponse({"key": note.key, "text": note.text})


async def list_notes(request: Request) -> Response:
    async def lines() -> AsyncIterator[str]:
        # The body is sent after the response started; the session stays open until its end.
        sess = current_session()
        async with await sess.stream_scalars(select(Note).order_by(Note.key)) as notes:
            async for note in notes:
                yield f"{note.key}\t{note.text}\n"

    return StreamingResponse(lines(), media_type="text/plain")


async def health(request: Request) -> Response:
    pool = request.app.state.engine.pool  # create_app() sets it
    checked_out = pool.checkedout() if isinstance(pool, QueuePool) else None
    return JSONResponse({"status": "ok", "pool_checked_out": checked_out})


ROUTES = [
    Route("/notes", create_note, methods=["POST"]),
    Route("/notes", list_notes, methods=["GET"]),
    Route("/notes/{key}", get_note, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
]


def build_app(maker: threadpool_sessionmaker, **kwargs: Any) -> Starlette:
    """The app on a given maker: the tests pass the pytest plugin's ``threadpool_maker``."""
    middleware = [Middleware(SessionMiddleware, sessionmaker=maker)]
    return Starlette(routes=ROUTES, middleware=middleware, **kwargs)


def create_app(database_url: str) -> Starlette:
    engine = create_engine(database_url)
    maker = threadpool_sessionmaker(engine)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(Base.metadata.create_all, engine)
        yield
        # The server stopped taking requests: end what still runs, then dispose the engine.
        await shutdown(maker)

    app = build_app(maker, lifespan=lifespan)
    app.state.engine = engine
    return app


app = create_app(os.environ.get("DATABASE_URL", "sqlite:///notes.db"))
