"""The pytest plugin, exercised as its users meet it: inner pytest runs through ``pytester``.

Each inner run is a small test suite of its own that opts in to the plugin, points it at this
process's test database, and runs its async tests on asyncio and trio. The outer test then
checks the inner outcome and, through its own engine, that nothing the inner tests committed
is left in the database.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from sqlalchemy_threadpool.pytest_plugin import URL_ENV_VAR
from webhelpers import EXAMPLES, drop_web_tables

CONFTEST = """
    import pytest
    from sqlalchemy import Column, Integer, MetaData, String, Table

    {opt_in}

    metadata = MetaData()
    items = Table(
        "satp_plugin_item",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String(50), unique=True),
    )


    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(request):
        return request.param


    @pytest.fixture(scope="session", autouse=True)
    def schema(threadpool_engine):
        # Created here, dropped by the outer test after it looked inside.
        metadata.drop_all(threadpool_engine)
        metadata.create_all(threadpool_engine)
"""

OPT_IN = 'pytest_plugins = ["sqlalchemy_threadpool.pytest_plugin"]'

# The inner runs are in-process (fast); this process has imported the plugin already, so
# pytest warns that it cannot assert-rewrite it: a warning a user's own run never sees.
INI = """
    [pytest]
    filterwarnings =
        error
        ignore:Module already imported:pytest.PytestAssertRewriteWarning
    {extra}
"""


def rows_left(db_url: str) -> int:
    """Rows in the inner suite's table, seen from a fresh connection after the inner run."""
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            assert inspect(conn).has_table("satp_plugin_item"), "the inner suite did not run"
            count: int = conn.scalar(text("SELECT count(*) FROM satp_plugin_item"))
            return count
    finally:
        engine.dispose()


@pytest.fixture
def suite(pytester: pytest.Pytester, db_url: str) -> Iterator[pytest.Pytester]:
    """An inner suite that opts in through ``pytest_plugins`` and finds the URL in the env."""
    pytester.makeini(textwrap.dedent(INI.format(extra="")))
    pytester.makeconftest(textwrap.dedent(CONFTEST.format(opt_in=OPT_IN)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(URL_ENV_VAR, db_url)
        yield pytester
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS satp_plugin_item"))
    finally:
        engine.dispose()


def inner_tests(body: str) -> str:
    header = """
        import pytest
        from sqlalchemy import select, func, insert, text
        from sqlalchemy_threadpool import current_session, threadpool_session

        from conftest import items

        pytestmark = pytest.mark.anyio
    """
    return textwrap.dedent(header) + textwrap.dedent(body)


# -- rollback per test --------------------------------------------------------------------


def test_commits_in_a_test_are_rolled_back_after_it(suite: pytest.Pytester, db_url: str) -> None:
    suite.makepyfile(
        inner_tests(
            """
            async def count(sess):
                return await sess.scalar(select(func.count()).select_from(items))


            @pytest.mark.parametrize("name", ["first", "second"])
            async def test_commit_then_see_only_your_own_rows(threadpool_db_session, name):
                sess = threadpool_db_session
                assert await count(sess) == 0  # what earlier tests committed is gone
                await sess.execute(insert(items), [{"name": name}])
                await sess.commit()  # releases a SAVEPOINT only
                await sess.execute(insert(items), [{"name": name + "-2"}])
                await sess.commit()
                with pytest.raises(Exception, match="(?i)unique|duplicate"):
                    await sess.execute(insert(items), [{"name": name}])
                await sess.rollback()  # back to the last commit (SAVEPOINT), not to nothing
                assert await count(sess) == 2
            """
        )
    )
    result = suite.runpytest()
    result.assert_outcomes(passed=4)  # two tests x asyncio, trio
    assert rows_left(db_url) == 0  # the four commits never reached the database


def test_code_under_test_finds_the_bound_session(suite: pytest.Pytester, db_url: str) -> None:
    suite.makepyfile(
        inner_tests(
            """
            async def application_code(name):
                # what an application does: its own scope, committing on success
                async with threadpool_session() as sess:
                    await sess.execute(insert(items), [{"name": name}])


            async def test_app_code_joins_the_test_session(threadpool_db_session):
                assert current_session() is threadpool_db_session
                await application_code("ada")
                names = await threadpool_db_session.scalars(select(items.c.name))
                assert names.all() == ["ada"]


            async def test_a_failing_unit_rolls_back_only_itself(threadpool_db_session):
                await application_code("ada")
                with pytest.raises(Exception) as caught:
                    await application_code("ada")  # unique violation
                assert "IntegrityError" in type(caught.value).__name__
                await threadpool_db_session.rollback()
                names = await threadpool_db_session.scalars(select(items.c.name))
                assert names.all() == []
            """
        )
    )
    result = suite.runpytest()
    result.assert_outcomes(passed=4)
    assert rows_left(db_url) == 0


def test_an_asgi_app_called_in_the_test_joins_its_session(
    suite: pytest.Pytester, db_url: str
) -> None:
    suite.makepyfile(
        inner_tests(
            """
            import httpx
            from sqlalchemy_threadpool.integrations.asgi import SessionMiddleware


            def make_app(maker):
                async def app(scope, receive, send):
                    if scope["type"] != "http":
                        return
                    name = scope["path"].strip("/")
                    await current_session().execute(insert(items), [{"name": name}])
                    status = 422 if name.startswith("bad") else 201
                    await send({"type": "http.response.start", "status": status, "headers": []})
                    await send({"type": "http.response.body", "body": b""})

                return SessionMiddleware(app, maker)


            async def test_requests_run_in_savepoints_of_the_test_session(
                threadpool_maker, threadpool_db_session
            ):
                transport = httpx.ASGITransport(app=make_app(threadpool_maker))
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    assert (await c.post("/ada")).status_code == 201
                    assert (await c.post("/bad-bob")).status_code == 422
                names = await threadpool_db_session.scalars(select(items.c.name))
                assert names.all() == ["ada"]  # the 422 rolled back its SAVEPOINT only
            """
        )
    )
    result = suite.runpytest()
    result.assert_outcomes(passed=2)
    assert rows_left(db_url) == 0


# -- where the URL comes from ---------------------------------------------------------------


URL_PROBE = """
    def test_url(threadpool_db_url):
        print("URL=" + threadpool_db_url)
"""


@pytest.fixture
def probe(pytester: pytest.Pytester) -> Iterator[pytest.Pytester]:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(URL_ENV_VAR, raising=False)
        pytester.makepyfile(URL_PROBE)
        yield pytester


PLUGIN = "sqlalchemy_threadpool.pytest_plugin"


@pytest.mark.parametrize(
    ("args", "ini", "env", "expected"),
    [
        (["--threadpool-db-url=sqlite:///opt.db"], "sqlite:///ini.db", "sqlite:///env.db", "opt"),
        ([], "sqlite:///ini.db", "sqlite:///env.db", "ini"),
        ([], None, "sqlite:///env.db", "env"),
    ],
    ids=["option", "ini", "env"],
)
def test_url_precedence(
    probe: pytest.Pytester, args: list[str], ini: str | None, env: str, expected: str
) -> None:
    extra = f"threadpool_db_url = {ini}" if ini else ""
    probe.makeini(textwrap.dedent(INI.format(extra=extra)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(URL_ENV_VAR, env)
        result = probe.runpytest("-p", PLUGIN, "-s", *args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*URL=sqlite:///{expected}.db"])


def test_no_url_fails_with_the_three_ways_to_give_one(probe: pytest.Pytester) -> None:
    probe.makeini(textwrap.dedent(INI.format(extra="")))
    result = probe.runpytest("-p", PLUGIN)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [f"*--threadpool-db-url=URL*threadpool_db_url = URL*{URL_ENV_VAR}=URL*"]
    )


# -- opt-in ---------------------------------------------------------------------------------


def test_the_plugin_is_opt_in(probe: pytest.Pytester) -> None:
    probe.makeini(textwrap.dedent(INI.format(extra="")))
    result = probe.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'threadpool_db_url' not found*"])
    assert "--threadpool-db-url" not in probe.runpytest("--help").stdout.str()
    help_text = probe.runpytest("-p", PLUGIN, "--help").stdout.str()
    assert "--threadpool-db-url" in help_text


# -- the documented example -----------------------------------------------------------------


def test_the_starlette_example_tests(pytester: pytest.Pytester, db_url: str) -> None:
    """``examples/test_starlette_app.py``, run as its docstring says (plus the ini above)."""
    pytester.makeini(textwrap.dedent(INI.format(extra="")))
    pytester.makeconftest(OPT_IN)
    for name in ("starlette_app.py", "test_starlette_app.py"):
        (pytester.path / name).write_text((EXAMPLES / name).read_text())
    drop_web_tables(db_url)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DATABASE_URL", db_url)  # the module-level app, unused by the tests
            result = pytester.runpytest(f"--threadpool-db-url={db_url}")
        result.assert_outcomes(passed=6)  # three tests x asyncio, trio
        engine = create_engine(db_url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT count(*) FROM satp_web_note")) == 0
        finally:
            engine.dispose()
    finally:
        drop_web_tables(db_url)
