"""Throwaway PostgreSQL and MariaDB servers, for tests that restart or stop the server.

The shared test servers (5432, 3306) are never restarted. A test that needs to take a server
down starts one of its own: ``initdb`` + ``pg_ctl`` or ``mariadb-install-db`` + ``mariadbd``,
with its data directory and socket in a fresh temporary directory and a free loopback port.
Started as root, the server runs as the ``postgres`` / ``mysql`` system user (both refuse to
run as root). Every step has a timeout and fails with the server's own log in the message.

Used by ``tests/test_faults.py`` (one instance per kind per test session) and by
``bench/soak.py``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

__all__ = ["ServerError", "ThrowawayServer", "free_port", "start_server"]


def _pg_bin() -> Path:
    """``SATP_PG_BIN``, else the newest ``/usr/lib/postgresql/<version>/bin``, else ``PATH``."""
    if os.environ.get("SATP_PG_BIN"):
        return Path(os.environ["SATP_PG_BIN"])
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
MARIADB_INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"

#: Seconds one step (init, start, stop) may take before the fixture gives up.
STEP_TIMEOUT_S = 60
DATABASE = "satp"


class ServerError(RuntimeError):
    """A throwaway server could not be initialised, started or stopped."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _system_user(name: str) -> str | None:
    """The user to run the server as: ``name`` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError as exc:
        raise ServerError(f"running as root, but there is no {name!r} user to run as") from exc
    return name


def _run(argv: list[str], what: str, log: Path | None = None) -> None:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerError(f"{what} failed: {exc}{_tail(log)}") from exc
    if done.returncode != 0:
        raise ServerError(
            f"{what} exited with {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            f"{_tail(log)}"
        )


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return f"\n--- {log} ---\n" + log.read_text(errors="replace")[-3000:]


class ThrowawayServer:
    """One private server: ``start()``, ``stop()``, ``restart()``, ``close()``; ``url``."""

    def __init__(self, kind: str) -> None:
        if kind not in ("postgresql", "mysql"):
            raise ValueError(f"unknown server kind {kind!r}")
        self.kind = kind
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"satp-{kind}-"))
        self.user = _system_user("postgres" if kind == "postgresql" else "mysql")
        if self.user is not None:
            shutil.chown(self.dir, self.user)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.initialised = False

    @property
    def url(self) -> str:
        if self.kind == "postgresql":
            return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{DATABASE}"
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def server_url(self) -> str:
        """The URL of the server's maintenance database (for admin statements)."""
        if self.kind == "postgresql":
            return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/mysql"

    def _as_user(self, argv: list[str]) -> list[str]:
        if self.user is None:
            return argv
        return ["runuser", "-u", self.user, "--", *argv]

    # -- lifecycle -------------------------------------------------------------------------

    def init(self) -> None:
        if self.kind == "postgresql":
            _run(
                self._as_user(
                    [
                        str(PG_BIN / "initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--no-sync",
                        "--no-instructions",
                    ]
                ),
                "initdb",
            )
        else:
            argv = [
                MARIADB_INSTALL_DB,
                "--no-defaults",
                f"--datadir={self.data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ]
            if self.user is not None:
                argv.append(f"--user={self.user}")
            _run(argv, "mariadb-install-db")
        self.initialised = True

    def start(self) -> None:
        if not self.initialised:
            self.init()
        if self.kind == "postgresql":
            options = (
                f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60"
            )
            _run(
                self._as_user(
                    [
                        str(PG_BIN / "pg_ctl"),
                        "-D",
                        str(self.data),
                        "-l",
                        str(self.log),
                        "-w",
                        "-t",
                        str(STEP_TIMEOUT_S),
                        "-o",
                        options,
                        "start",
                    ]
                ),
                "pg_ctl start",
                self.log,
            )
        else:
            argv = [
                MARIADBD,
                "--no-defaults",
                f"--datadir={self.data}",
                f"--socket={self.dir / 'mysqld.sock'}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={self.dir / 'mysqld.pid'}",
                f"--log-error={self.log}",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
                "--innodb-flush-log-at-trx-commit=0",
                "--max-connections=100",
            ]
            if self.user is not None:
                argv.append(f"--user={self.user}")
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._wait_until_up()
        self._create_database()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise ServerError(
                    f"mariadbd exited with {self._process.returncode} at start{_tail(self.log)}"
                )
            try:
                self._admin(None)
                return
            except Exception as exc:  # not accepting connections yet
                last = exc
                time.sleep(0.1)
        raise ServerError(
            f"{self.kind} server on port {self.port} did not come up within "
            f"{STEP_TIMEOUT_S} s: {last}{_tail(self.log)}"
        )

    def _admin(self, statement: str | None) -> None:
        args = {"connect_timeout": 2}
        engine = create_engine(
            self.server_url, poolclass=NullPool, isolation_level="AUTOCOMMIT", connect_args=args
        )
        try:
            with engine.connect() as conn:
                if statement is not None:
                    conn.execute(text(statement))
        finally:
            engine.dispose()

    def _create_database(self) -> None:
        if self.kind == "postgresql":
            try:
                self._admin(f"CREATE DATABASE {DATABASE}")
            except Exception as exc:
                if "already exists" not in str(exc):
                    raise
        else:
            self._admin(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")

    def stop(self) -> None:
        """Stop the server (a fast, clean shutdown: clients are disconnected)."""
        if self.kind == "postgresql":
            if not (self.data / "postmaster.pid").exists():
                return
            _run(
                self._as_user(
                    [
                        str(PG_BIN / "pg_ctl"),
                        "-D",
                        str(self.data),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        str(STEP_TIMEOUT_S),
                        "stop",
                    ]
                ),
                "pg_ctl stop",
                self.log,
            )
            return
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STEP_TIMEOUT_S)
            raise ServerError(f"mariadbd did not stop within {STEP_TIMEOUT_S} s") from None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server at once (its data is thrown away) and delete its directory."""
        try:
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
                self._process.wait(STEP_TIMEOUT_S)
            if self.kind == "postgresql" and (self.data / "postmaster.pid").exists():
                subprocess.run(
                    self._as_user(
                        [
                            str(PG_BIN / "pg_ctl"),
                            "-D",
                            str(self.data),
                            "-m",
                            "immediate",
                            "-w",
                            "stop",
                        ]
                    ),
                    capture_output=True,
                    timeout=STEP_TIMEOUT_S,
                    check=False,
                )
        finally:
            self._process = None
            shutil.rmtree(self.dir, ignore_errors=True)


def start_server(kind: str) -> ThrowawayServer:
    """Initialise and start a throwaway server of ``kind``; close it if that fails."""
    server = ThrowawayServer(kind)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server
