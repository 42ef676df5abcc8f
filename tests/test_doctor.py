"""``python -m sqlalchemy_threadpool doctor URL``: a report on real databases, clean failures.

The command is run in-process through ``main(argv)`` (its output captured), and once as a
subprocess to show that what a user sees on a failure is one line, not a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from scaleout import ThrowawayPgBouncer
from sqlalchemy_threadpool.cli import main
from sqlalchemy_threadpool.cli._doctor import _recommendations, _table

#: Few samples: the tests check the report's shape and verdicts, not the figures.
FAST = ["--samples", "5", "--quiet"]

#: The documented keys of ``--json`` (docs/doctor.md lists them).
TOP_KEYS = {
    "url",
    "dialect",
    "driver",
    "server_version",
    "dbapi",
    "pool",
    "server_limits",
    "limiter",
    "cancel",
    "timings",
    "loop_lag",
    "backend",
    "recommendations",
    "pgbouncer",
    "budget",
}


def test_documented_json_keys_are_the_report_keys() -> None:
    """docs/doctor.md lists the ``--json`` keys in a table; it must list exactly these."""
    page = Path(__file__).resolve().parent.parent / "docs" / "doctor.md"
    table = page.read_text().split("(doctor-json)=", 1)[1]
    documented: set[str] = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            cell = line.split("|")[1]
            documented |= {name for name in cell.split("`")[1::2]}
    assert documented == TOP_KEYS


def doctor(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["doctor", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def doctor_json(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> dict[str, Any]:
    status, out, err = doctor(capsys, url, "--json", *FAST, *argv)
    assert status == 0, err
    assert err == ""  # --quiet: no progress lines
    report: dict[str, Any] = json.loads(out)
    return report


def check_report_shape(report: dict[str, Any]) -> None:
    assert set(report) == TOP_KEYS
    assert set(report["dbapi"]) == {"module", "threadsafety", "meaning"}
    assert {"class", "capacity", "bounded", "timeout_s"} <= set(report["pool"])
    assert set(report["limiter"]) == {"tokens", "follows_pool", "error"}
    assert {"mechanism", "tested", "works"} <= set(report["cancel"])
    assert set(report["timings"]) == {
        "samples",
        "to_thread_hop_us",
        "session_hop_us",
        "point_query_direct_us",
        "point_query_offloaded_us",
    }
    assert report["timings"]["samples"] == 5
    assert all(value > 0 for value in report["timings"].values())
    for side in ("threadpool", "sync_on_the_loop"):
        assert set(report["loop_lag"][side]) == {"p50_ms", "p99_ms", "max_ms"}
    assert all(isinstance(item, str) for item in report["recommendations"])


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_report_on_each_test_database(
    capsys: pytest.CaptureFixture[str], engine: Engine, db_url: str, backend: str
) -> None:
    report = doctor_json(capsys, db_url, "--backend", backend, "--pool-size", "4")
    check_report_shape(report)
    assert report["backend"] == backend
    assert report["dialect"] == engine.dialect.name
    assert report["driver"] == engine.dialect.driver
    assert report["pool"] == {
        "class": "QueuePool",
        "capacity": 14,
        "bounded": True,
        "timeout_s": 30.0,
        "size": 4,
        "max_overflow": 10,
    }
    assert report["limiter"] == {"tokens": 14, "follows_pool": True, "error": None}
    if report["dialect"] == "sqlite":
        assert report["server_limits"] is None
    else:  # the test servers' accounts have no limit of their own
        limits = report["server_limits"]
        assert limits["error"] is None
        assert limits["max_connections"] > 14
        assert limits["account_limit"] is None
    # psycopg2 cancel(), KILL QUERY and sqlite3 interrupt() all stop the sleep statement.
    assert report["cancel"]["mechanism"] is True
    assert report["cancel"]["tested"] is True
    assert report["cancel"]["works"] is True, report["cancel"]
    assert report["cancel"]["returned_after_deadline_s"] < 1.5
    assert not any("Statement cancel did not stop" in item for item in report["recommendations"])
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_readable_table(capsys: pytest.CaptureFixture[str], engine: Engine, db_url: str) -> None:
    status, out, err = doctor(capsys, db_url, "--samples", "5")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("sqlalchemy-threadpool doctor: ")
    labels = {line.split("  ")[1] for line in lines if line.startswith("  ") and "  " in line[2:]}
    assert {"database", "DBAPI", "pool", "maker limiter", "statement cancel"} <= labels
    assert {"thread hop", "point query", "event-loop lag"} <= labels
    assert "Recommendations:" in lines
    # progress went to stderr, one line per step
    progress = err.splitlines()
    assert progress[0].startswith("doctor: connecting to ")
    assert len(progress) == 4
    assert all(line.startswith("doctor: ") for line in progress)


def test_the_hop_figure_is_the_same_in_the_table_and_the_advice(
    capsys: pytest.CaptureFixture[str], engine: Engine, db_url: str
) -> None:
    """One figure for the thread hop: the JSON value, the table's line and the advice's quote.

    Whether the advice appears depends on the machine (a hop costlier than a point query), so
    the measured report is given a point query cheaper than its hop to make it appear.
    """
    report = doctor_json(capsys, db_url)
    timings = report["timings"]
    hop = timings["session_hop_us"]
    timings["point_query_direct_us"] = hop / 2
    timings["point_query_offloaded_us"] = hop / 2 + hop + 1000  # any other figure would differ
    advice = [item for item in _recommendations(report, None) if "thread hop" in item]
    assert advice == [
        f"A thread hop ({hop:.0f} us per call) costs more than a point query here "
        f"({hop / 2:.0f} us): group short statements into one `await sess.run(fn)` instead of "
        "awaiting each."
    ]
    report["recommendations"] = advice
    row = next(line for line in _table(report).splitlines() if "  thread hop  " in line)
    assert f"  {hop:.0f} us per call through a session, inside a transaction (" in row


def test_the_password_is_never_shown(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql+psycopg2://someone:s3cret@127.0.0.1:1/nowhere"
    status, out, err = doctor(capsys, url, "--connect-timeout", "2", "-q")
    assert status == 1
    assert "s3cret" not in out + err
    assert "someone:***@127.0.0.1:1" in err


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_duckdb_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, backend: str) -> None:
    pytest.importorskip("duckdb_engine")
    path = tmp_path / "app.duckdb"
    engine = create_engine(f"duckdb:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    engine.dispose()
    report = doctor_json(capsys, f"duckdb:///{path}", "--backend", backend)
    check_report_shape(report)
    assert report["dialect"] == "duckdb"
    assert report["dbapi"]["module"] == "duckdb"
    assert report["server_version"] != "8.0"  # duckdb's version, not the PostgreSQL it mimics
    assert report["limiter"]["follows_pool"] is True
    assert report["cancel"] == {"mechanism": True, "tested": False, "works": None}  # interrupt()
    assert report["server_limits"] is None
    assert not any("No server-side cancel" in item for item in report["recommendations"])
    assert any("DuckDB lets one process write" in item for item in report["recommendations"])


def test_sqlite_journal_mode_advice(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    advice = doctor_json(capsys, f"sqlite:///{path}")["recommendations"]
    assert any("journal_mode is delete" in item for item in advice)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    engine.dispose()
    advice = doctor_json(capsys, f"sqlite:///{path}")["recommendations"]
    assert not any("journal_mode" in item for item in advice)


def test_a_refused_engine_is_reported_with_exit_status_3(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = doctor(capsys, "sqlite://", *FAST)
    assert status == 3
    assert "maker limiter  refused: This SQLite engine is in memory" in out
    assert "poolclass=StaticPool" in out


# -- failures: one line on stderr, exit status 1, no traceback ------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("not a url", "error: not a database URL: 'not a url'", id="bad-url"),
        pytest.param(
            "postgresql+psycopg2://postgres@127.0.0.1:1/test",
            "error: cannot connect to postgresql+psycopg2://postgres@127.0.0.1:1/test: ",
            id="unreachable-server",
        ),
        pytest.param(
            "mysql+pymysql://root@127.0.0.1:1/test",
            "error: cannot connect to mysql+pymysql://root@127.0.0.1:1/test: ",
            id="unreachable-mysql",
        ),
        pytest.param(
            "mssql+pymssql://u@127.0.0.1/db",
            "error: the driver for mssql+pymssql is not installed: no module 'pymssql' "
            "(pip install pymssql)",
            id="missing-driver",
        ),
        pytest.param(
            "postgresql+nosuchdriver://u@127.0.0.1/db",
            "error: unknown dialect or driver 'postgresql+nosuchdriver'",
            id="unknown-driver",
        ),
        pytest.param(
            "nosuchdialect://u@127.0.0.1/db",
            "error: unknown dialect 'nosuchdialect'",
            id="unknown-dialect",
        ),
        pytest.param(
            "sqlite:////nonexistent/dir/app.db",
            "error: no database file '/nonexistent/dir/app.db'",
            id="missing-sqlite-file",
        ),
        pytest.param(
            "duckdb:////nonexistent/dir/app.duckdb",
            "error: no database file '/nonexistent/dir/app.duckdb'",
            id="missing-duckdb-file",
        ),
    ],
)
def test_failures_are_one_line(
    capsys: pytest.CaptureFixture[str], url: str, expected: str
) -> None:
    status, out, err = doctor(capsys, url, "--connect-timeout", "2", "-q")
    assert status == 1
    assert out == ""
    assert err.startswith(expected)
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_missing_sqlite_file_is_not_created(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "typo.db"
    status, _, err = doctor(capsys, f"sqlite:///{path}", "-q")
    assert status == 1
    assert "doctor does not create one" in err
    assert not path.exists()


def test_async_driver_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("psycopg")  # psycopg 3 is both sync and async; the test group has it
    status, _, err = doctor(capsys, "postgresql+psycopg_async://postgres@127.0.0.1/test", "-q")
    assert status == 1
    assert err.startswith("error: postgresql+psycopg_async is an async driver: ")
    assert "AsyncSession" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["doctor", "sqlite://", "--samples", "0"])
    assert info.value.code == 2
    assert "--samples must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["doctor", "sqlite://", "--processes", "0"])
    assert info.value.code == 2
    assert "--processes must be at least 1" in capsys.readouterr().err


def test_failure_from_a_subprocess_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    proc = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_threadpool", "doctor", f"sqlite:///{missing}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"doctor: connecting to sqlite:///{missing} ...",
        f"error: no database file '{missing}' (doctor does not create one)",
    ]


# -- a MariaDB account limited to one connection, on a throwaway server ------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def limited_mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of account ``app`` (``MAX_USER_CONNECTIONS 1``) on a MariaDB server of our own.

    The shared test server is never reconfigured: this one lives in a temporary directory on a
    free port, for this module only.
    """
    install, server = shutil.which("mariadb-install-db"), shutil.which("mariadbd")
    server = server or ("/usr/sbin/mariadbd" if os.path.exists("/usr/sbin/mariadbd") else None)
    if install is None or server is None:
        message = "mariadb-install-db / mariadbd not found (apt-get install mariadb-server)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    base = tmp_path_factory.mktemp("mariadb")
    as_root = ["--user=root"] if os.geteuid() == 0 else []
    subprocess.run(
        [install, "--no-defaults", f"--datadir={base}/data", *as_root, "--skip-test-db",
         "--auth-root-authentication-method=normal"],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    port = _free_port()
    proc = subprocess.Popen(
        [server, "--no-defaults", f"--datadir={base}/data", *as_root, f"--port={port}",
         "--bind-address=127.0.0.1", f"--socket={base}/sock", f"--pid-file={base}/pid",
         f"--log-error={base}/error.log", "--skip-log-bin", "--innodb-buffer-pool-size=16M"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        root = create_engine(f"mysql+pymysql://root@127.0.0.1:{port}/mysql")
        deadline = time.monotonic() + 60
        while True:
            try:
                with root.begin() as conn:
                    conn.execute(text("CREATE DATABASE app"))
                    conn.execute(text("CREATE USER app@'%' WITH MAX_USER_CONNECTIONS 1"))
                    conn.execute(text("GRANT SELECT ON app.* TO app@'%'"))
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        root.dispose()
        yield f"mysql+pymysql://app@127.0.0.1:{port}/app"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_account_connection_limit_below_the_pool(
    capsys: pytest.CaptureFixture[str], limited_mariadb: str
) -> None:
    report = doctor_json(capsys, limited_mariadb)
    assert report["server_limits"]["account_limit"] == 1
    advice = report["recommendations"]
    assert advice[0].startswith(
        "The pool may open 15 connections plus 1 for KILL QUERY, but this account allows 1: "
    )
    assert "create_engine(url, pool_size=" not in advice[0]  # 1 - 1: no pool size fits
    assert "MAX_USER_CONNECTIONS" in advice[0]
    # The 8 concurrent sessions of the lag measurement hit the limit: reported, not fatal.
    assert "max_user_connections" in report["loop_lag"]["error"]
    assert any(item.startswith("Measuring loop lag failed: ") for item in advice)
    assert report["timings"]["samples"] == 5  # the other measurements still ran


def test_kill_query_without_a_spare_connection_is_diagnosed(
    capsys: pytest.CaptureFixture[str], limited_mariadb: str
) -> None:
    report = doctor_json(capsys, limited_mariadb, "--pool-size", "1", "--max-overflow", "0")
    cancel = report["cancel"]
    assert cancel["mechanism"] is True
    assert cancel["tested"] is True
    assert cancel["works"] is False  # the side connection for KILL QUERY was refused
    assert any("1226" in problem for problem in cancel["problems"])
    assert (
        "Statement cancel did not stop the sleep statement: KILL QUERY needs one more "
        "connection: raise max_user_connections by one." in report["recommendations"]
    )
    assert "loop_lag" in report
    assert "error" not in report["loop_lag"]


# -- deploying at scale: PgBouncer and --processes ----------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_pgbouncer_is_recognised_and_explained(
    capsys: pytest.CaptureFixture[str], pgbouncer: ThrowawayPgBouncer, backend: str
) -> None:
    """Through the tests' PgBouncer: found, its pool read, cancel works, the lag is measured.

    Measuring the lag with queries run on the loop used to hang behind PgBouncer: with more
    tasks than its server connections, a blocked loop could not end the transactions the
    others waited for.
    """
    report = doctor_json(
        capsys, pgbouncer.url(), "--backend", backend, "--processes", "4", "--pool-size", "5"
    )
    check_report_shape(report)
    bouncer = report["pgbouncer"]
    assert bouncer["detected"] is True
    assert bouncer["proxy"] is True
    assert bouncer["version"].startswith("PgBouncer ")
    assert (bouncer["pool_mode"], bouncer["pool_size"]) == ("transaction", 4)
    assert bouncer["max_client_conn"] == 200
    assert report["cancel"]["works"] is True  # psycopg2's cancel, forwarded by PgBouncer
    assert report["budget"] == {
        "processes": 4,
        "per_process": 15,
        "cancel_connections": 4,
        "needed": 64,
        "limit": 200,
        "limited_by": "max_client_conn",
        "fits": True,
    }
    advice = [item for item in report["recommendations"] if item.startswith("PgBouncer")]
    assert len(advice) == 1
    assert "pool_mode = transaction" in advice[0]
    assert "4 server connections" in advice[0]
    assert "forwards it" in advice[0]  # what it means for cancel
    assert "prepared statements" in advice[0]


def test_pgbouncer_row_in_the_table(
    capsys: pytest.CaptureFixture[str], pgbouncer: ThrowawayPgBouncer
) -> None:
    status, out, _ = doctor(capsys, pgbouncer.url(), *FAST, "--processes", "100")
    assert status == 0
    rows = {line.split("  ")[1]: line for line in out.splitlines() if line.startswith("  ")}
    assert "pool_mode transaction, 4 server connections" in rows["pgbouncer"]
    assert (
        "100 x 15 pooled + 100 for cancel = 1600 of 200 (max_client_conn): TOO MANY"
        in (rows["connection budget"])
    )
    assert "raise PgBouncer's max_client_conn to at least 1600" in out


def test_the_budget_of_many_processes_against_max_connections(
    capsys: pytest.CaptureFixture[str], postgresql_url: str
) -> None:
    """Directly on PostgreSQL: no proxy, and more processes than max_connections allows."""
    report = doctor_json(capsys, postgresql_url, "--processes", "50", "--pool-size", "10")
    assert report["pgbouncer"] == {
        "proxy": False,
        "detected": False,
        "version": None,
        "pool_mode": None,
        "pool_size": None,
        "max_client_conn": None,
        "error": None,
    }
    budget = report["budget"]
    limit = report["server_limits"]["max_connections"]
    assert limit < 50 * 21
    assert budget == {
        "processes": 50,
        "per_process": 20,
        "cancel_connections": 50,
        "needed": 50 * 21,
        "limit": limit,
        "limited_by": "max_connections",
        "fits": False,
    }
    (advice,) = [item for item in report["recommendations"] if "50 processes need" in item]
    size = limit // 50 - 1
    if size >= 1:
        assert f"pool_size={size}, max_overflow=0" in advice
        assert 50 * (size + 1) <= limit  # the advice fits
    else:
        assert "run fewer processes" in advice
    assert "put PgBouncer (pool_mode = transaction) in front" in advice


def test_one_process_that_fits_says_nothing_about_the_budget(
    capsys: pytest.CaptureFixture[str], engine: Engine, db_url: str
) -> None:
    report = doctor_json(capsys, db_url, "--pool-size", "2")
    budget = report["budget"]
    assert budget["processes"] == 1
    assert budget["needed"] == 12 + budget["cancel_connections"]
    assert budget["fits"] in (True, None)  # None: SQLite, no limit
    assert report["pgbouncer"] is None or report["pgbouncer"]["detected"] is False
    assert not any("processes need" in item for item in report["recommendations"])
