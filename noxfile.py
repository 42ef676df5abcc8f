"""Developer task runner: ``nox -l`` lists the sessions.

The tests need the PostgreSQL and MariaDB test servers (see README.md); each ``tests`` session
runs against one database, selected through ``SATP_TEST_DATABASES``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typecheck", "tests"]

DATABASES = ["sqlite", "postgresql", "mysql"]
PYPROJECT = nox.project.load_toml("pyproject.toml")


def _pip_supports_groups(session: nox.Session) -> bool:
    help_text = session.run("python", "-m", "pip", "install", "--help", silent=True)
    return isinstance(help_text, str) and "--group" in help_text


def install(session: nox.Session, *groups: str, project: bool = True) -> None:
    """Install the project (``.``) and PEP 735 dependency groups from pyproject.toml."""
    session.install("--upgrade", "pip")
    args = ["."] if project else []
    if _pip_supports_groups(session):
        for group in groups:
            args += ["--group", group]
    else:
        for group in groups:
            args += nox.project.dependency_groups(PYPROJECT, group)
    if args:
        session.install(*args)


@nox.session
@nox.parametrize("database", DATABASES)
def tests(session: nox.Session, database: str) -> None:
    install(session, "test")
    session.run("python", "-m", "pytest", *session.posargs, env={"SATP_TEST_DATABASES": database})


@nox.session
@nox.parametrize("database", DATABASES)
def tests_lowest(session: nox.Session, database: str) -> None:
    """The tests and mypy on the lowest supported runtime dependencies (``.ci/lowest.txt``)."""
    session.install("--upgrade", "pip")
    groups = ["--group", "test", "--group", "lint"]
    if not _pip_supports_groups(session):
        groups = [*nox.project.dependency_groups(PYPROJECT, "test", "lint")]
    session.install("-c", ".ci/lowest.txt", ".", *groups)
    session.run("mypy")
    session.run("python", "-m", "pytest", *session.posargs, env={"SATP_TEST_DATABASES": database})


@nox.session
def lint(session: nox.Session) -> None:
    install(session, "lint", project=False)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    install(session, "lint")
    session.run("mypy", *session.posargs)


DOCS_COMMAND = [
    "sphinx-build",
    "-n",
    "-W",
    "--keep-going",
    "-b",
    "html",
    "docs",
    "docs/_build/html",
]


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx + MyST + furo docs into docs/_build/html (warnings are errors).

    Works offline: intersphinx falls back to the inventories shipped in docs/_inventories/.
    """
    install(session, "docs")
    session.run(*DOCS_COMMAND, *session.posargs)


@nox.session
def verifytypes(session: nox.Session) -> None:
    """The public API's type completeness, as pyright sees it: must stay at 100%."""
    install(session, "verifytypes")
    session.install(".[trio,fastapi,litestar]")  # the integrations' base classes must be known
    session.run("pyright", "--verifytypes", "sqlalchemy_threadpool", "--ignoreexternal")


@nox.session
def build(session: nox.Session) -> None:
    """Build the sdist and wheel, then install each into a clean venv and smoke-test it."""
    install(session, project=False)
    session.install("build")
    dist = Path(session.create_tmp()) / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist))
    for artifact in sorted(dist.glob("sqlalchemy_threadpool-*")):
        venv = dist / f"venv-{artifact.suffix.lstrip('.')}"
        session.run("python", "-m", "venv", "--clear", str(venv))
        python = str(venv / "bin" / "python")
        session.run(python, "-m", "pip", "install", "-q", str(artifact), external=True)
        session.run(python, str(Path("tests") / "smoke.py"), external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (issue 5) against the local test servers: ``nox -s bench -- --quick``.

    Arguments after ``--`` go to bench/bench.py (``--help`` lists them); see bench/README.md.
    """
    install(session, "bench")
    session.run("python", "bench/bench.py", *session.posargs)
