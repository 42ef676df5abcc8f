"""Throwaway scale-out servers: a PgBouncer, and a PostgreSQL primary with a hot standby.

:class:`ThrowawayPgBouncer` runs ``pgbouncer`` (Debian package ``pgbouncer``) on a free loopback
port in front of a PostgreSQL server, in transaction pooling mode, with ``auth_type = trust``
(the test servers trust loopback connections) and an admin console (database ``pgbouncer``)
that the ``postgres`` user may use. :func:`start_replica_pair` starts a throwaway primary
(``tests/servers.py``) and a standby cloned from it with ``pg_basebackup -R``, streaming from
it. Started as root, both run as the ``postgres`` system user, as the servers of
``tests/servers.py`` do. Every step has a timeout; ``close()`` stops the process at once and
deletes its directory, so a fixture's finaliser always leaves nothing behind.

:func:`serve_example` starts ``examples/scale_app.py`` (or another example) under a server
command (uvicorn or gunicorn, several worker processes) in a process group of its own,
:func:`wait_until_serving` waits for its first answer and :func:`stop_group` stops the group.

Used by ``tests/test_pgbouncer.py``, ``test_replicas.py``, ``test_processes.py``,
``test_doctor.py`` and ``bench/processes.py``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import anyio
import httpx
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from servers import (
    PG_BIN,
    STEP_TIMEOUT_S,
    ServerError,
    ThrowawayServer,
    _run,
    _system_user,
    _tail,
    free_port,
    start_server,
)

__all__ = [
    "PGBOUNCER",
    "ThrowawayPgBouncer",
    "ThrowawayStandby",
    "start_pgbouncer",
    "start_replica_pair",
]

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class ThrowawayPgBouncer:
    """A ``pgbouncer`` process in front of ``upstream`` (a URL), until ``close()``.

    ``pool_size`` is PgBouncer's ``default_pool_size``: the server connections it opens per
    database and user, whatever the number of clients.
    """

    def __init__(self, upstream: str, pool_size: int = 4, max_client_conn: int = 200) -> None:
        self.upstream = make_url(upstream)
        self.port = free_port()
        self.pool_size = pool_size
        self.dir = Path(tempfile.mkdtemp(prefix="satp-pgbouncer-"))
        self.user = _system_user("postgres")  # pgbouncer refuses to run as root
        self.log = self.dir / "pgbouncer.log"
        self.config = self.dir / "pgbouncer.ini"
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        self.config.write_text(
            "[databases]\n"
            f"* = host={self.upstream.host or '127.0.0.1'} port={self.upstream.port or 5432}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'users.txt'}\n"
            "admin_users = postgres\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "reserve_pool_size = 0\n"
            f"max_client_conn = {max_client_conn}\n"
            "server_reset_query =\n"
            # a client waiting for a server connection gives up after this, not never
            "query_wait_timeout = 60\n"
            f"logfile = {self.log}\n"
            f"pidfile = {self.dir / 'pgbouncer.pid'}\n"
        )
        if self.user is not None:
            for path in (self.dir, *self.dir.iterdir()):
                shutil.chown(path, self.user)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def direct_url(self) -> str:
        """The upstream URL: the same database, seen directly (not through PgBouncer)."""
        return self.upstream.render_as_string(hide_password=False)

    def url(self, database: str | None = None) -> str:
        """The upstream URL (its database, or ``database``), through PgBouncer."""
        url = self.upstream.set(host="127.0.0.1", port=self.port)
        if database is not None:
            url = url.set(database=database)
        return url.render_as_string(hide_password=False)

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console (database ``pgbouncer``), as dicts."""
        psycopg2 = importlib.import_module("psycopg2")  # untyped: no stubs installed
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="pgbouncer"
        )
        try:
            conn.autocommit = True  # the admin console knows no transactions
            with conn.cursor() as cur:
                cur.execute(f"SHOW {what}")
                names = [column[0] for column in cur.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def servers_in_use(self, database: str) -> int:
        """Server connections PgBouncer has linked to a client of ``database`` right now."""
        pools = [pool for pool in self.show("POOLS") if pool["database"] == database]
        return sum(int(pool["sv_active"]) for pool in pools)

    def start(self) -> None:
        try:
            self._process = subprocess.Popen(
                [PGBOUNCER, str(self.config)],
                # itself, not through runuser: close() signals pgbouncer, not a wrapper
                user=self.user,
                group=self.user,
                extra_groups=[] if self.user is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise ServerError(f"cannot start {PGBOUNCER}: {exc}") from exc
        deadline = time.monotonic() + STEP_TIMEOUT_S
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(
                    f"pgbouncer exited with {self._process.returncode} at start{_tail(self.log)}"
                )
            engine = create_engine(
                self.url(), poolclass=NullPool, connect_args={"connect_timeout": 2}
            )
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return
            except Exception as exc:  # not listening yet
                last = exc
                time.sleep(0.1)
            finally:
                engine.dispose()
        raise ServerError(f"pgbouncer did not come up within {STEP_TIMEOUT_S} s: {last}")

    def close(self) -> None:
        """Stop PgBouncer at once and delete its directory."""
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGINT)  # PgBouncer: immediate shutdown
                try:
                    process.wait(STEP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(STEP_TIMEOUT_S)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def start_pgbouncer(upstream: str, pool_size: int = 4) -> ThrowawayPgBouncer:
    """A running :class:`ThrowawayPgBouncer`; closed again if it cannot start."""
    if shutil.which(PGBOUNCER) is None:
        raise ServerError(f"{PGBOUNCER} not found: apt-get install pgbouncer")
    bouncer = ThrowawayPgBouncer(upstream, pool_size=pool_size)
    try:
        bouncer.start()
    except BaseException:
        bouncer.close()
        raise
    return bouncer


class ThrowawayStandby(ThrowawayServer):
    """A hot standby of ``primary``: cloned with ``pg_basebackup -R``, streaming from it."""

    def __init__(self, primary: ThrowawayServer) -> None:
        super().__init__("postgresql")
        self.primary = primary

    def init(self) -> None:
        _run(
            self._as_user(
                [
                    str(PG_BIN / "pg_basebackup"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.primary.port),
                    "-U",
                    "postgres",
                    "-D",
                    str(self.data),
                    "-R",  # standby.signal and primary_conninfo: a standby from the start
                    "-X",
                    "stream",
                    "--checkpoint=fast",
                    "--no-sync",
                ]
            ),
            "pg_basebackup",
        )
        self.initialised = True

    def _create_database(self) -> None:
        """The database comes from the primary (a standby is read-only)."""


def start_replica_pair() -> tuple[ThrowawayServer, ThrowawayStandby]:
    """A running primary and a hot standby of it; both closed again if either cannot start.

    PostgreSQL's defaults (``wal_level = replica``, ``max_wal_senders = 10``) and the
    ``pg_hba.conf`` of ``initdb --auth=trust`` (which trusts replication connections from
    loopback) are all a streaming standby needs.
    """
    primary = start_server("postgresql")
    try:
        standby = ThrowawayStandby(primary)
        try:
            standby.start()
        except BaseException:
            standby.close()
            raise
    except BaseException:
        primary.close()
        raise
    return primary, standby


# -- an example app served by several processes -----------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SRC = EXAMPLES.parent / "src"


def serve_example(
    argv: list[str], url: str, pool_size: int, output: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (a server command naming an example app) in ``examples/``, in a process
    group of its own, with ``DATABASE_URL`` and ``POOL_SIZE`` set and this tree's ``src`` first
    on ``PYTHONPATH``; its output goes to ``output`` (default: inherited)."""
    env = {**os.environ, "DATABASE_URL": url, "POOL_SIZE": str(pool_size)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH"), "."]))
    return subprocess.Popen(
        argv, cwd=EXAMPLES, env=env, stdout=output, stderr=subprocess.STDOUT if output else None,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (master and workers); kill it if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(STEP_TIMEOUT_S)


async def wait_until_serving(
    base: str, process: subprocess.Popen[bytes], log: Path | None = None
) -> None:
    """Wait until the app at ``base`` answers ``GET /items/none`` with 404; fail with the tail
    of ``log`` if the server exits first."""
    async with httpx.AsyncClient(base_url=base) as client:
        with anyio.fail_after(STEP_TIMEOUT_S):
            while True:
                if process.poll() is not None:
                    output = await anyio.Path(log).read_text(errors="replace") if log else ""
                    raise ServerError(f"{process.args!r} exited:\n{output[-3000:]}")
                try:
                    if (await client.get("/items/none")).status_code == 404:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)
