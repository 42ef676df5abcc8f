"""Smoke test of an installed distribution: ``python tests/smoke.py`` in a clean venv.

The ``build`` nox session installs the wheel and the sdist, each into a fresh virtual
environment with nothing else, and runs this script there (not pytest: nothing but the package
and its dependencies is installed). It checks the metadata, the typing marker, the command line
and one real unit of work on a SQLite file.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from importlib import metadata, resources
from pathlib import Path

from sqlalchemy import create_engine, text

import sqlalchemy_threadpool
from sqlalchemy_threadpool import threadpool_session, threadpool_sessionmaker


async def unit_of_work(url: str) -> list[str]:
    engine = create_engine(url)
    maker = threadpool_sessionmaker(engine)
    async with threadpool_session(maker) as sess:
        await sess.execute(text("CREATE TABLE t (name TEXT)"))
        await sess.execute(text("INSERT INTO t VALUES ('committed')"))
    try:
        async with threadpool_session(maker) as sess:
            await sess.execute(text("INSERT INTO t VALUES ('rolled back')"))
            raise LookupError
    except LookupError:
        pass
    async with threadpool_session(maker) as sess:
        names = list((await sess.scalars(text("SELECT name FROM t"))).all())
    engine.dispose()
    return names


def main() -> None:
    location = Path(sqlalchemy_threadpool.__file__).resolve()
    assert "site-packages" in location.parts, f"not the installed package: {location}"
    assert sqlalchemy_threadpool.__version__ == metadata.version("sqlalchemy-threadpool")
    assert resources.files("sqlalchemy_threadpool").joinpath("py.typed").is_file()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/smoke.db"
        assert asyncio.run(unit_of_work(url)) == ["committed"]
        doctor = subprocess.run(
            [sys.executable, "-m", "sqlalchemy_threadpool", "doctor", url, "--json", "-q"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert doctor.returncode == 0, doctor.stderr
        assert '"dialect": "sqlite"' in doctor.stdout
    print(f"smoke test passed: sqlalchemy-threadpool {sqlalchemy_threadpool.__version__}")


if __name__ == "__main__":
    main()
