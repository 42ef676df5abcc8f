"""Write the fallback intersphinx inventories shipped in this directory.

``conf.py`` reads each project's live ``objects.inv`` first and falls back to these files when
the site cannot be reached (an offline CI runner), so the build stays warning-free and
deterministic. They hold only the objects these docs reference; add a line to ``OBJECTS`` when a
page references a new one, then run ``python docs/_inventories/make.py`` and commit the result.
"""

from __future__ import annotations

import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: project -> (name, domain:role, document#anchor; "$" stands for the name)
OBJECTS: dict[str, list[tuple[str, str, str]]] = {
    "python": [
        ("collections.abc.AsyncIterator", "py:class", "library/collections.abc.html#$"),
        ("collections.abc.Awaitable", "py:class", "library/collections.abc.html#$"),
        ("collections.abc.Callable", "py:class", "library/collections.abc.html#$"),
        ("collections.abc.Coroutine", "py:class", "library/collections.abc.html#$"),
        ("collections.abc.Generator", "py:class", "library/collections.abc.html#$"),
        ("collections.abc.Iterator", "py:class", "library/collections.abc.html#$"),
        ("collections.abc.Mapping", "py:class", "library/collections.abc.html#$"),
        ("collections.abc.Sequence", "py:class", "library/collections.abc.html#$"),
        ("contextlib.aclosing", "py:function", "library/contextlib.html#$"),
        ("contextvars.ContextVar", "py:class", "library/contextvars.html#$"),
        ("warnings", "py:module", "library/warnings.html#module-warnings"),
        ("LookupError", "py:exception", "library/exceptions.html#$"),
        ("TimeoutError", "py:exception", "library/exceptions.html#$"),
        ("UserWarning", "py:exception", "library/exceptions.html#$"),
        ("ValueError", "py:exception", "library/exceptions.html#$"),
        ("Exception", "py:exception", "library/exceptions.html#$"),
    ],
    "sqlalchemy": [
        ("sqlalchemy.create_engine", "py:function", "core/engines.html#$"),
        ("sqlalchemy.engine.Connection", "py:class", "core/connections.html#$"),
        ("sqlalchemy.engine.Connection.info", "py:attribute", "core/connections.html#$"),
        ("sqlalchemy.engine.Engine", "py:class", "core/connections.html#$"),
        ("sqlalchemy.engine.Engine.clear_compiled_cache", "py:method", "core/connections.html#$"),
        ("sqlalchemy.engine.Engine.dispose", "py:method", "core/connections.html#$"),
        ("sqlalchemy.engine.Engine.get_execution_options", "py:method", "core/connections.html#$"),
        (
            "sqlalchemy.engine.Engine.update_execution_options",
            "py:method",
            "core/connections.html#$",
        ),
        ("sqlalchemy.engine_from_config", "py:function", "core/engines.html#$"),
        ("sqlalchemy.engine.FrozenResult", "py:class", "core/connections.html#$"),
        ("sqlalchemy.engine.Result", "py:class", "core/connections.html#$"),
        ("sqlalchemy.engine.Result.yield_per", "py:method", "core/connections.html#$"),
        ("sqlalchemy.engine.Result.unique", "py:method", "core/connections.html#$"),
        ("sqlalchemy.engine.RowMapping", "py:class", "core/connections.html#$"),
        ("sqlalchemy.engine.ScalarResult", "py:class", "core/connections.html#$"),
        ("sqlalchemy.exc.IntegrityError", "py:exception", "core/exceptions.html#$"),
        ("sqlalchemy.exc.InvalidRequestError", "py:exception", "core/exceptions.html#$"),
        ("sqlalchemy.exc.MissingGreenlet", "py:exception", "core/exceptions.html#$"),
        ("sqlalchemy.ext.asyncio.AsyncSession", "py:class", "orm/extensions/asyncio.html#$"),
        (
            "sqlalchemy.ext.asyncio.async_sessionmaker",
            "py:class",
            "orm/extensions/asyncio.html#$",
        ),
        ("sqlalchemy.orm.Session", "py:class", "orm/session_api.html#$"),
        ("sqlalchemy.orm.Session.no_autoflush", "py:attribute", "orm/session_api.html#$"),
        ("sqlalchemy.orm.Session.bind_mapper", "py:method", "orm/session_api.html#$"),
        ("sqlalchemy.orm.Session.bind_table", "py:method", "orm/session_api.html#$"),
        ("sqlalchemy.orm.Session.delete_all", "py:method", "orm/session_api.html#$"),
        ("sqlalchemy.orm.Session.get_bind", "py:method", "orm/session_api.html#$"),
        ("sqlalchemy.orm.Session.get_nested_transaction", "py:method", "orm/session_api.html#$"),
        ("sqlalchemy.orm.Session.get_transaction", "py:method", "orm/session_api.html#$"),
        ("sqlalchemy.orm.Session.merge_all", "py:method", "orm/session_api.html#$"),
        ("sqlalchemy.orm.SessionTransaction", "py:class", "orm/session_api.html#$"),
        ("sqlalchemy.orm.sessionmaker", "py:class", "orm/session_api.html#$"),
        ("sqlalchemy.orm.sessionmaker.configure", "py:method", "orm/session_api.html#$"),
        ("sqlalchemy.pool.NullPool", "py:class", "core/pooling.html#$"),
        ("sqlalchemy.pool.QueuePool", "py:class", "core/pooling.html#$"),
        ("sqlalchemy.pool.SingletonThreadPool", "py:class", "core/pooling.html#$"),
        ("sqlalchemy.pool.StaticPool", "py:class", "core/pooling.html#$"),
        ("sqlalchemy.sql.expression.Executable", "py:class", "core/selectable.html#$"),
    ],
    "anyio": [
        ("anyio.CancelScope", "py:class", "api.html#$"),
        ("anyio.CapacityLimiter", "py:class", "api.html#$"),
        ("anyio.fail_after", "py:function", "api.html#$"),
        ("anyio.sleep", "py:function", "api.html#$"),
        ("anyio.to_thread.run_sync", "py:function", "api.html#$"),
    ],
    "trio": [
        ("trio.CapacityLimiter", "py:class", "reference-core.html#$"),
        ("trio.run", "py:function", "reference-core.html#$"),
        ("trio.to_thread.run_sync", "py:function", "reference-core.html#$"),
    ],
}
#: Objects the guides by other authors are likely to reference.
OBJECTS["python"] += [
    ("asyncio.CancelledError", "py:exception", "library/asyncio-exceptions.html#$"),
    ("asyncio.TaskGroup", "py:class", "library/asyncio-task.html#$"),
    ("asyncio.run", "py:function", "library/asyncio-runner.html#$"),
    ("asyncio.timeout", "py:function", "library/asyncio-task.html#$"),
    ("asyncio.to_thread", "py:function", "library/asyncio-task.html#$"),
    ("asyncio.wait_for", "py:function", "library/asyncio-task.html#$"),
    ("logging.getLogger", "py:function", "library/logging.html#$"),
    ("warnings.warn", "py:function", "library/warnings.html#$"),
]
OBJECTS["sqlalchemy"] += [
    *(
        (f"sqlalchemy.orm.{name}", "py:function", "orm/queryguide/relationships.html#$")
        for name in ("selectinload", "joinedload", "subqueryload", "lazyload", "raiseload")
    ),
    *(
        (f"sqlalchemy.orm.{name}", "py:function", "orm/queryguide/columns.html#$")
        for name in ("defer", "undefer", "load_only")
    ),
    ("sqlalchemy.orm.relationship", "py:function", "orm/relationship_api.html#$"),
    ("sqlalchemy.event.listens_for", "py:function", "core/event.html#$"),
    ("sqlalchemy.exc.DBAPIError", "py:exception", "core/exceptions.html#$"),
    ("sqlalchemy.exc.OperationalError", "py:exception", "core/exceptions.html#$"),
    ("sqlalchemy.ext.asyncio.AsyncAttrs", "py:class", "orm/extensions/asyncio.html#$"),
    (
        "sqlalchemy.ext.asyncio.AsyncSession.run_sync",
        "py:method",
        "orm/extensions/asyncio.html#$",
    ),
    (
        "sqlalchemy.ext.asyncio.async_scoped_session",
        "py:class",
        "orm/extensions/asyncio.html#$",
    ),
    (
        "sqlalchemy.ext.asyncio.create_async_engine",
        "py:function",
        "orm/extensions/asyncio.html#$",
    ),
]
OBJECTS["anyio"] += [
    ("anyio.Lock", "py:class", "api.html#$"),
    ("anyio.create_task_group", "py:function", "api.html#$"),
    ("anyio.from_thread.run", "py:function", "api.html#$"),
    ("anyio.get_cancelled_exc_class", "py:function", "api.html#$"),
    ("anyio.move_on_after", "py:function", "api.html#$"),
    ("anyio.run", "py:function", "api.html#$"),
    ("anyio.to_thread.current_default_thread_limiter", "py:function", "api.html#$"),
]
OBJECTS["trio"] += [
    ("trio.CancelScope", "py:class", "reference-core.html#$"),
    ("trio.Cancelled", "py:exception", "reference-core.html#$"),
    ("trio.fail_after", "py:function", "reference-core.html#$"),
    ("trio.from_thread.run", "py:function", "reference-core.html#$"),
    ("trio.move_on_after", "py:function", "reference-core.html#$"),
    ("trio.open_nursery", "py:function", "reference-core.html#$"),
]

#: Session methods the API page links to (ThreadpoolSession's generated members).
SESSION_METHODS = [
    *("add", "add_all", "begin", "begin_nested", "close", "commit", "connection", "delete"),
    *("execute", "expire", "expire_all", "expunge", "expunge_all", "flush", "get", "get_one"),
    *("in_nested_transaction", "in_transaction", "invalidate", "is_modified", "merge"),
    *("refresh", "reset", "rollback", "scalar", "scalars"),
]
OBJECTS["sqlalchemy"] += [
    (f"sqlalchemy.orm.Session.{name}", "py:method", "orm/session_api.html#$")
    for name in SESSION_METHODS
]
TITLES = {"python": "Python", "sqlalchemy": "SQLAlchemy", "anyio": "AnyIO", "trio": "Trio"}


def inventory(project: str) -> bytes:
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {TITLES[project]}\n"
        "# Version: \n"
        "# The remainder of this file is compressed using zlib.\n"
    ).encode()
    body = "".join(
        f"{name} {role} 1 {uri} -\n" for name, role, uri in sorted(OBJECTS[project])
    ).encode()
    return header + zlib.compress(body, 9)


def main() -> None:
    for project in OBJECTS:
        (HERE / f"{project}.inv").write_bytes(inventory(project))


if __name__ == "__main__":
    main()
