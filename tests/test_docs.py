"""What the docs state about the code, checked against the code, so it cannot silently rot.

The docs' runnable examples are run by ``test_examples.py``; here are the statements that are
not examples: the causes of ``ConfigurationError`` listed on the errors page, the modules the
docs name (as loggers, say), and the behaviour the guides' short snippets promise.
"""

from __future__ import annotations

import ast
import gc
import importlib
import logging
import re
from pathlib import Path

import anyio
import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from helpers import user_names
from models import User
from sqlalchemy_threadpool import threadpool_session, threadpool_sessionmaker

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "sqlalchemy_threadpool"


def _section(page: str, label: str) -> str:
    """The text of a docs page from the ``(label)=`` target to the next target."""
    text = (DOCS / page).read_text()
    return text.split(f"({label})=", 1)[1].split("\n(", 1)[0]


def _configuration_errors() -> list[tuple[str, str]]:
    """``(where, message start)`` of every ``raise ConfigurationError(...)`` in the package."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            func, args = node.exc.func, node.exc.args
            if not (isinstance(func, ast.Name) and func.id == "ConfigurationError" and args):
                continue
            first = args[0].values[0] if isinstance(args[0], ast.JoinedStr) else args[0]
            start = first.value if isinstance(first, ast.Constant) else ""
            found.append((f"{path.relative_to(ROOT)}:{node.lineno}", str(start)))
    return found


def test_every_configuration_error_cause_is_on_the_errors_page() -> None:
    """docs/errors.md lists every case in which a maker raises ``ConfigurationError``.

    A message about an argument (``"offload must be ..."``, ``"limiter=3 is larger ..."``) must
    have the argument, as ``offload=``, in the page's section; one about an engine (``"This
    SQLite engine ..."``) the database's name.
    """
    section = _section("errors.md", "error-configurationerror")
    sites = _configuration_errors()
    assert len(sites) >= 8  # the parser still finds them
    missing = []
    for where, start in sites:
        argument = re.match(r"(\w+)(?: must|=)", start)
        engine = re.match(r"This (\w+) engine", start)
        method = re.match(r"(\w+)\(\) cannot", start)
        if argument:
            expected = f"`{argument[1]}=`"
        elif method:
            expected = f"`{method[1]}()`"
        elif engine:
            expected = engine[1]
        else:
            pytest.fail(f"{where}: cannot tell what {start!r} is about; extend this test")
        if expected not in section:
            missing.append(f"{where}: {expected}")
    assert missing == []


def test_modules_named_in_the_docs_exist() -> None:
    """A module the docs name (a logger, say) survives renames and splits of the package."""
    named = set()
    for page in DOCS.rglob("*.md"):
        named |= set(re.findall(r"`(sqlalchemy_threadpool(?:\.\w+)+)`", page.read_text()))
    assert named  # the pattern still matches what the docs write
    for name in sorted(named):
        module, _, attribute = name.rpartition(".")
        try:
            importlib.import_module(name)
        except ImportError:
            assert hasattr(importlib.import_module(module), attribute), name


async def _begin_and_drop(maker: threadpool_sessionmaker) -> None:
    sess = maker()  # never closed
    sess.add(User(name="lost"))
    await sess.flush()  # holds a transaction, a connection and a limiter token


@pytest.mark.anyio
async def test_the_lost_session_warning_comes_from_the_module_the_docs_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/guides/lifecycle.md names the logger of the "garbage-collected" WARNING."""
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{tmp_path}/lost.db")
    User.metadata.create_all(engine)
    maker = threadpool_sessionmaker(engine)
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_threadpool"):
        await _begin_and_drop(maker)
        with anyio.fail_after(10):
            while maker.limiter.borrowed_tokens:
                gc.collect()
                await anyio.sleep(0.01)
    engine.dispose()
    records = [r for r in caplog.records if "garbage-collected" in r.getMessage()]
    assert len(records) == 1
    guide = (DOCS / "guides" / "lifecycle.md").read_text()
    documented = re.findall(r"WARNING from\s+`(sqlalchemy_threadpool\.\w+)`", guide)
    assert documented == [records[0].name]


@pytest.mark.anyio
async def test_the_savepoint_example_of_the_lifecycle_guide(
    engine: Engine, other_engine: Engine
) -> None:
    """docs/guides/lifecycle.md, "Transactions and savepoints": a failed SAVEPOINT rolls back
    only itself, and the outer transaction commits."""
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as setup:
        setup.add(User(name="taken"))
    async with maker() as sess, sess.begin():  # commit on success
        sess.add(User(name="order"))
        try:
            async with sess.begin_nested():  # SAVEPOINT
                sess.add(User(name="taken"))
        except IntegrityError:
            pass  # rolled back to the savepoint only
    assert user_names(other_engine) == {"taken", "order"}


# -- docs/porting.md: every example runs -----------------------------------------------------

PORTING = DOCS / "porting.md"


def _porting_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PORTING.read_text(), re.S)


def test_every_example_of_the_porting_guide_is_run_by_a_test() -> None:
    """The two snippets run below; the tour is ``examples/porting_script.py``, which
    ``test_examples.py`` runs on every database and on ``AsyncSession``. A new example fails
    here until a test runs it."""
    text = PORTING.read_text()
    assert re.findall(r"```(\S+)", text) == ["python", "python", "{literalinclude}"]
    assert "```{literalinclude} ../examples/porting_script.py\n:language: python\n" in text
    assert len(_porting_snippets()) == 2


@pytest.mark.anyio
async def test_the_porting_guides_threadpool_snippet_runs(db_url: str, engine: Engine) -> None:
    after = _porting_snippets()[1]
    placeholder = '"postgresql+psycopg2://app@db/app"'
    assert placeholder in after
    namespace: dict[str, object] = {}
    exec(after.replace(placeholder, repr(db_url)), namespace)
    maker = namespace["Session"]
    assert isinstance(maker, threadpool_sessionmaker)
    try:
        async with maker() as sess:
            user = User(name="ported")
            sess.add(user)
            await sess.commit()
            assert sess.sync_session.expire_on_commit is False  # as the snippet's comment says
            assert user.name == "ported"  # read after commit, no refresh (the guard is on)
        assert user_names(engine) == {"ported"}
    finally:
        engine_made = namespace["engine"]
        assert isinstance(engine_made, Engine)
        engine_made.dispose()


def test_the_porting_guides_asyncsession_snippet_runs(tmp_path: Path) -> None:
    """The "before" snippet, on aiosqlite (asyncio only: AsyncSession does not run on trio)."""
    pytest.importorskip("aiosqlite")  # the bench group installs it; the lowest-versions venv not
    pytest.importorskip("greenlet")
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
    from sqlalchemy.pool import AsyncAdaptedQueuePool

    before = _porting_snippets()[0]
    placeholder = '"postgresql+asyncpg://app@db/app"'
    assert placeholder in before
    url = f"sqlite+aiosqlite:///{tmp_path}/before.db"
    # a queue pool, as asyncpg's, takes the snippet's pool_size (SQLAlchemy 2.0 gives aiosqlite
    # files a NullPool)
    namespace: dict[str, object] = {"AsyncAdaptedQueuePool": AsyncAdaptedQueuePool}
    exec(before.replace(placeholder, f"{url!r}, poolclass=AsyncAdaptedQueuePool"), namespace)
    maker, engine = namespace["Session"], namespace["engine"]
    assert isinstance(maker, async_sessionmaker)
    assert isinstance(engine, AsyncEngine)

    async def main() -> object:
        try:
            async with maker() as sess:
                return await sess.scalar(text("SELECT 1"))
        finally:
            await engine.dispose()

    assert anyio.run(main, backend="asyncio") == 1


def test_the_porting_guide_states_the_expire_on_commit_default() -> None:
    text = PORTING.read_text()
    assert (
        "Session = threadpool_sessionmaker(engine)  # expire_on_commit=False is the default"
        in text
    )
    assert "**`expire_on_commit=False` is our default**" in text
