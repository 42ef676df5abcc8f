"""Tracing and context: what a task set in its context reaches the worker thread's SQL.

Each call runs in a copy of the awaiting task's :mod:`contextvars` context, so with
``opentelemetry-instrumentation-sqlalchemy`` on the sync engine the span of each statement is a
child of the span the task was in when it awaited the call, and a logging / structlog context
variable bound in the task is seen by the worker (and by SQLAlchemy's events in it). Both
offload modes, every database, both loops.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import anyio
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

from sqlalchemy_threadpool import threadpool_session, threadpool_sessionmaker

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

#: What a structlog / logging filter would bind per request (structlog.contextvars does this).
request_id: ContextVar[str] = ContextVar("request_id", default="-")

OFFLOADS = pytest.mark.parametrize("offload", ["worker", "anyio"])


@pytest.fixture
def traced(engine: Engine) -> Iterator[tuple[Any, InMemorySpanExporter]]:
    """The test engine instrumented with a tracer provider of its own, exporting in memory."""
    exporter = InMemorySpanExporter()
    provider = otel_sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = SQLAlchemyInstrumentor()
    # skip_dep_check: the instrumentation declares SQLAlchemy < 2.1, but only uses its events.
    instrumentor.instrument(engine=engine, tracer_provider=provider, skip_dep_check=True)
    try:
        yield provider.get_tracer("test"), exporter
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


@pytest.mark.anyio
@OFFLOADS
async def test_sql_spans_made_in_workers_are_children_of_the_awaiting_span(
    engine: Engine, traced: tuple[Any, InMemorySpanExporter], offload: str
) -> None:
    tracer, exporter = traced
    maker = threadpool_sessionmaker(engine, offload=offload)  # type: ignore[arg-type]
    loop_thread = threading.get_ident()
    statement_threads: list[int] = []

    @event.listens_for(engine, "before_cursor_execute")
    def where(*args: object) -> None:
        statement_threads.append(threading.get_ident())

    async with threadpool_session(maker) as sess:
        with tracer.start_as_current_span("first") as first:
            assert await sess.scalar(text("SELECT 1")) == 1
        with tracer.start_as_current_span("second") as second:  # same session, same thread
            assert await sess.scalar(text("SELECT 2")) == 2
    event.remove(engine, "before_cursor_execute", where)
    assert statement_threads
    assert loop_thread not in statement_threads
    sql = {
        span.attributes["db.statement"]: span
        for span in exporter.get_finished_spans()
        if span.attributes and "db.statement" in span.attributes
    }
    for statement, parent in (("SELECT 1", first), ("SELECT 2", second)):
        child = sql[statement]
        assert child.parent is not None, f"{statement!r} has no parent span"
        assert child.parent.span_id == parent.get_span_context().span_id
        assert child.context is not None
        assert child.context.trace_id == parent.get_span_context().trace_id


@pytest.mark.anyio
@OFFLOADS
async def test_a_context_variable_bound_in_the_task_is_seen_in_the_worker(
    engine: Engine, offload: str
) -> None:
    maker = threadpool_sessionmaker(engine, offload=offload)  # type: ignore[arg-type]
    seen_by_events: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def log_context(*args: object) -> None:
        seen_by_events.append(request_id.get())

    def read_and_rebind(session: Session) -> str:
        session.execute(text("SELECT 1"))
        value = request_id.get()
        request_id.set("changed in the worker")  # a copy: never reaches the task
        return value

    async def request(name: str) -> str:
        request_id.set(name)
        async with threadpool_session(maker, new=True) as sess:
            return await sess.run(read_and_rebind)

    try:
        results: dict[str, str] = {}

        async def run(name: str) -> None:
            results[name] = await request(name)

        async with anyio.create_task_group() as group:
            for name in ("req-1", "req-2", "req-3"):
                group.start_soon(run, name)
        assert results == {"req-1": "req-1", "req-2": "req-2", "req-3": "req-3"}
        assert sorted(seen_by_events) == ["req-1", "req-2", "req-3"]
        request_id.set("task")
        async with threadpool_session(maker) as sess:
            await sess.run(read_and_rebind)
            assert request_id.get() == "task"  # the worker's change stayed in its copy
            assert await sess.run(lambda s: request_id.get()) == "task"  # a fresh copy each call
    finally:
        event.remove(engine, "before_cursor_execute", log_context)
