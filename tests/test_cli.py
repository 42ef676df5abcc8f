"""The command line: ``python -m sqlalchemy_threadpool`` dispatches, and ``demo`` runs.

The doctor has its own tests (``test_doctor.py``). The demo runs in-process through
``main(argv)`` on each test database, and once as the README's first command, in a subprocess
on its default embedded SQLite file. The figures it prints are not checked, only the report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect

from sqlalchemy_threadpool.cli import USAGE, main

#: A small load: the tests check that both variants run and are reported, not their speed.
SMALL = ["--requests", "20", "--concurrency", "4"]
#: The report's rows, one per variant.
VARIANTS = ("threadpool ", "naive (sync on the loop) ")


def check_demo_report(out: str, backend: str) -> None:
    lines = out.splitlines()
    assert lines[1] == f"event loop: {backend}; 20 requests, 4 at a time"
    assert lines[3].split() == ["variant", "req/s", "lag", "p50", "lag", "p99", "lag", "max"]
    rows = [line for line in lines if line.startswith(VARIANTS)]
    assert len(rows) == 2, out
    assert lines[-1].startswith("While the naive variant ran, other tasks waited up to ")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo_on_each_test_database(
    capsys: pytest.CaptureFixture[str], engine: Engine, db_url: str, backend: str
) -> None:
    status = main(["demo", "--url", db_url, "--backend", backend, *SMALL])
    out, _ = capsys.readouterr()
    assert status == 0, out
    assert out.splitlines()[0] == f"database: {engine.url.render_as_string()}"
    check_demo_report(out, backend)
    # A database the user named keeps none of the demo's tables.
    assert not {"satp_demo_user", "satp_demo_post"} & set(inspect(engine).get_table_names())


def test_readme_demo_command_runs_on_embedded_sqlite(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_threadpool", "demo", *SMALL],
        env={**os.environ, "TMPDIR": str(tmp_path)},  # where the demo makes its SQLite file
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"database: sqlite:///{tmp_path}/satp-demo-")
    check_demo_report(proc.stdout, "asyncio")


def test_demo_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--requests", "0"])
    assert info.value.code == 2
    assert "--requests and --concurrency must be at least 1" in capsys.readouterr().err


def test_no_command_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert capsys.readouterr().out == USAGE + "\n"


def test_help_prints_usage_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert capsys.readouterr().out == USAGE + "\n"


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["docter"]) == 2
    assert capsys.readouterr().out == (
        "error: unknown command 'docter'; try `python -m sqlalchemy_threadpool --help`\n"
    )
