"""Developer task runner: ``nox -l`` lists the sessions.

The tests need the PostgreSQL and MariaDB test servers (see README.md); each ``tests`` session
runs against one database, selected through ``SATP_TEST_DATABASES``.
"""

from __future__ import annotations

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
def lint(session: nox.Session) -> None:
    install(session, "lint", project=False)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    install(session, "lint")
    session.run("mypy", *session.posargs)


# @nox.session
# def docs(session: nox.Session) -> None:
#     """Build the Sphinx + MyST + furo docs into docs/_build (warnings are errors)."""
#     install(session, "docs")
#     session.run("sphinx-build", "-W", "-b", "html", "docs", "docs/_build/html")


# @nox.session
# def bench(session: nox.Session) -> None:
#     """Run the benchmarks in bench/ against the local test servers."""
#     install(session, "bench")
#     session.run("python", "-m", "bench", *session.posargs)
