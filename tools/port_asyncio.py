"""Port code written for ``sqlalchemy.ext.asyncio`` to ``sqlalchemy_threadpool`` by renaming.

The rename table of issue 15 (and of ``docs/porting.md``), applied as plain text
substitutions on whole words, nothing else: no code is parsed or rewritten. ::

    python tools/port_asyncio.py SRC [SRC ...] --out DIR [--url URL]

copies each ``SRC`` file or directory into ``DIR`` with every ``.py`` file renamed (other files
are copied as they are). ``--url`` also replaces every database URL string literal (e.g.
``"postgresql+asyncpg://scott:tiger@localhost/test"``) with ``URL``, to run a program against
another database; without it only the driver part of a URL changes (``+asyncpg`` ->
``+psycopg2``, ...). ``python tools/port_asyncio.py --table`` prints the table.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

__all__ = ["MODULES", "NAMES", "URLS", "port_file", "port_text"]

#: Module paths, longest first (``sqlalchemy.ext.asyncio.session`` and the like map to the
#: package, which exports every public name).
MODULES: list[tuple[str, str]] = [
    (r"sqlmodel\.ext\.asyncio\.session", "sqlalchemy_threadpool.integrations.sqlmodel"),
    (r"sqlalchemy\.ext\.asyncio(?:\.[a-z_]+)?", "sqlalchemy_threadpool"),
]

#: ``sqlalchemy.ext.asyncio`` name -> ``sqlalchemy_threadpool`` name.
NAMES: dict[str, str] = {
    "create_async_engine": "create_threadpool_engine",
    "async_engine_from_config": "threadpool_engine_from_config",
    "AsyncEngine": "ThreadpoolEngine",
    "AsyncConnection": "ThreadpoolConnection",
    "AsyncTransaction": "ThreadpoolTransaction",
    "AsyncSession": "ThreadpoolSession",
    "async_sessionmaker": "threadpool_sessionmaker",
    "AsyncSessionTransaction": "ThreadpoolSessionTransaction",
    "AsyncAttrs": "ThreadpoolAttrs",
    "async_object_session": "threadpool_object_session",
    "async_scoped_session": "threadpool_scoped_session",
    "AsyncResult": "ThreadpoolResult",
    "AsyncScalarResult": "ThreadpoolScalarResult",
    "AsyncMappingResult": "ThreadpoolMappingResult",
    "AsyncTupleResult": "ThreadpoolTupleResult",
}

#: Names renamed only in a file that imports them from ``sqlalchemy.ext.asyncio`` (elsewhere
#: ``async_session`` is usually a variable holding a maker, and stays as it is).
IMPORTED_NAMES: dict[str, str] = {"async_session": "threadpool_session_of"}

#: In a file importing SQLModel's ``AsyncSession``, that name means SQLModel's.
SQLMODEL_NAMES: dict[str, str] = {"AsyncSession": "ThreadpoolSQLModelSession"}

#: URL driver renames: an asyncio driver -> the sync driver of the same database.
URLS: dict[str, str] = {
    "postgresql+asyncpg": "postgresql+psycopg2",
    "postgresql+psycopg_async": "postgresql+psycopg2",
    "sqlite+aiosqlite": "sqlite",
    "mysql+aiomysql": "mysql+pymysql",
    "mysql+asyncmy": "mysql+pymysql",
}

_URL_LITERAL = re.compile(r"""(["'])[a-z0-9_]+(?:\+[a-z0-9_]+)?://[^"']*\1""")


def _words(table: dict[str, str], text: str) -> str:
    if not table:
        return text
    pattern = re.compile(r"\b(" + "|".join(sorted(table, key=len, reverse=True)) + r")\b")
    return pattern.sub(lambda m: table[m.group(1)], text)


def _imports_from(module: str, name: str, text: str) -> bool:
    """Whether ``text`` has ``from <module> import ... name ...`` (parenthesised or not)."""
    pattern = rf"from\s+{module}\s+import\s+(\([^)]*\)|[^\n]*)"
    return any(re.search(rf"\b{name}\b", m.group(1)) for m in re.finditer(pattern, text))


def port_text(text: str, url: str | None = None) -> str:
    """``text`` with the rename table applied (and URL literals replaced by ``url``)."""
    names = dict(NAMES)
    sqlmodel_module = MODULES[0][0]
    if _imports_from(sqlmodel_module, "AsyncSession", text):
        names.update(SQLMODEL_NAMES)
    for name, new in IMPORTED_NAMES.items():
        if _imports_from(r"sqlalchemy\.ext\.asyncio", name, text):
            names[name] = new
    if url is not None:
        text = _URL_LITERAL.sub(lambda m: f"{m.group(1)}{url}{m.group(1)}", text)
    for old, new in URLS.items():
        text = text.replace(old + "://", new + "://")
    for pattern, module in MODULES:
        text = re.sub(rf"\b{pattern}\b", module, text)
    return _words(names, text)


def port_file(src: Path, dst: Path, url: str | None = None) -> None:
    """Copy ``src`` to ``dst``, renamed if it is a Python file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".py":
        dst.write_text(port_text(src.read_text(encoding="utf-8"), url), encoding="utf-8")
    else:
        shutil.copyfile(src, dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--url", help="replace every database URL literal with this one")
    parser.add_argument("--table", action="store_true", help="print the rename table")
    args = parser.parse_args(argv)
    if args.table:
        for old, new in [*NAMES.items(), *IMPORTED_NAMES.items(), *URLS.items()]:
            print(f"{old} -> {new}")
        return 0
    if not args.sources or args.out is None:
        parser.error("give SRC ... and --out DIR (or --table)")
    for src in args.sources:
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        for path in files:
            relative = path.name if src.is_file() else path.relative_to(src.parent)
            port_file(path, args.out / relative, args.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
