"""The plain-script examples of the docs run as written (on every test database if they can).

``examples/asyncio_script.py``, ``trio_script.py`` and ``duckdb_script.py`` are pulled into
the docs with ``literalinclude``; here each runs as a user would run it (a subprocess,
``DATABASE_URL`` in the environment) and prints what the docs say it prints.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, url: str, cwd: Path) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env={**os.environ, "DATABASE_URL": url},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout.splitlines()


def test_asyncio_script(engine: Engine, db_url: str, tmp_path: Path) -> None:
    assert run_example("asyncio_script.py", db_url, tmp_path) == [
        "timed out: rolled back",
        "Jemisin: The Fifth Season",
        "Le Guin: The Dispossessed, The Lathe of Heaven",
        "Lem: Solaris, The Cyberiad",
        "connections checked out: 0",
    ]


def test_trio_script(engine: Engine, db_url: str, tmp_path: Path) -> None:
    pytest.importorskip("trio")
    assert run_example("trio_script.py", db_url, tmp_path) == [
        "error: rolled back",
        "cancelled: True, rolled back",
        "/page/0 25",
        "/page/1 25",
        "/page/2 25",
        "/page/3 25",
        "connections checked out: 0",
    ]


def test_duckdb_script(tmp_path: Path) -> None:
    pytest.importorskip("duckdb_engine")
    assert run_example("duckdb_script.py", "unused", tmp_path) == [
        "sale: 124000",
        "refund: 125000",
        "connections checked out: 0",
    ]
