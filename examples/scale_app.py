"""A Starlette service for many worker processes: one write endpoint, one read endpoint.

The engine and the maker are made when the module is imported, so with ``--preload`` they are
made in gunicorn's master, before it forks its workers; the library resets its threads and
locks in each child after the fork, and each child's pool opens its own connections on first
use (SQLAlchemy's pool is not shared across a fork: nothing connects at import).

Run it with four worker processes, through PgBouncer (``pool_mode = transaction``)::

    DATABASE_URL=postgresql+psycopg2://app@127.0.0.1:6432/app POOL_SIZE=5 \\
        uvicorn scale_app:app --workers 4
    DATABASE_URL=... gunicorn scale_app:app --preload -w 4 -k uvicorn.workers.UvicornWorker

    python scale_app.py create-tables      # once, before the workers start
    curl -X POST localhost:8000/items -d '{"key": "a", "value": "1"}'
    curl localhost:8000/items/a

Each process holds at most ``POOL_SIZE`` connections (``max_overflow=0``), so N processes hold
at most ``N x POOL_SIZE`` client connections; ``python -m sqlalchemy_threadpool doctor URL
--processes N --pool-size POOL_SIZE --max-overflow 0`` checks that against the server or
PgBouncer (see the "Deploying at scale" guide).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sqlalchemy_threadpool import current_session, shutdown, threadpool_sessionmaker
from sqlalchemy_threadpool.integrations.asgi import SessionMiddleware


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "satp_scale_item"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))


DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite:///scale.db")
POOL_SIZE = int(os.environ.get("POOL_SIZE", "5"))

engine = create_engine(DATABASE_URL, pool_size=POOL_SIZE, max_overflow=0, pool_pre_ping=True)
Session = threadpool_sessionmaker(engine)
#: The process that made the maker: gunicorn's master under --preload, else the worker.
MADE_IN = os.getpid()


async def write_item(request: Request) -> Response:
    payload = await request.json()
    current_session().add(Item(key=str(payload["key"]), value=str(payload["value"])))
    # SessionMiddleware commits before this 201 goes out: a 201 means the row is durable.
    return JSONResponse({"key": payload["key"], "pid": os.getpid()}, status_code=201)


async def read_item(request: Request) -> Response:
    item = await current_session().get(Item, request.path_params["key"])
    if item is None:
        return JSONResponse({"error": "not found"}, status_code=404)
    return JSONResponse(
        {"key": item.key, "value": item.value, "pid": os.getpid(), "maker_made_in": MADE_IN}
    )


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    await shutdown(Session)  # this worker stops: end what still runs, dispose its pool


app = Starlette(
    routes=[
        Route("/items", write_item, methods=["POST"]),
        Route("/items/{key}", read_item, methods=["GET"]),
    ],
    middleware=[Middleware(SessionMiddleware, sessionmaker=Session)],
    lifespan=lifespan,
)


if __name__ == "__main__" and sys.argv[1:] == ["create-tables"]:
    Base.metadata.create_all(engine)
