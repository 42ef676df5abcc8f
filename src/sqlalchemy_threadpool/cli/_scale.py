"""What ``doctor`` says about deploying at scale: PgBouncer in front, and the connection budget.

:func:`pgbouncer_facts` finds out whether a PostgreSQL URL reaches the server through a proxy,
and whether that proxy is PgBouncer, without any privilege on the server:

- the server reports the port it was reached on (``inet_server_port()``) and the client's port
  (``inet_client_port()``): when they differ from the URL's port or from our socket's own
  local port, something sits in between (PgBouncer, Pgpool, HAProxy, a NAT);
- PgBouncer answers on the same host and port for the database ``pgbouncer`` (its admin
  console): ``SHOW VERSION`` names it, ``SHOW CONFIG`` and ``SHOW DATABASES`` give its pool mode
  and the server connections it keeps per database and user. The console answers users in its
  ``admin_users`` or ``stats_users``; for anyone else the report says what it refused.

:func:`connection_budget` computes what ``--processes N`` workers need: ``N x (pool_size +
max_overflow)`` connections plus, per process and engine, the one a statement cancel opens
(psycopg2's cancel request, MySQL's ``KILL QUERY`` side connection), against what is allowed:
the server's ``max_connections`` (less the superuser reserve) and the account's limit, or,
behind PgBouncer, its ``max_client_conn`` for our connections and its pool for the server's.
``_doctor`` turns both into rows and advice.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from ._probe import first_line

__all__ = ["budget_advice", "connection_budget", "pgbouncer_facts"]

#: ``SHOW CONFIG`` settings the report keeps.
_SETTINGS = (
    "pool_mode",
    "default_pool_size",
    "reserve_pool_size",
    "max_client_conn",
    "max_db_connections",
    "max_user_connections",
)


def _local_port(dbapi_connection: Any) -> int | None:
    """The local TCP port of a DBAPI connection with a ``fileno()`` (psycopg2, psycopg)."""
    fileno = getattr(dbapi_connection, "fileno", None)
    if fileno is None:
        return None
    try:
        with socket.socket(fileno=os.dup(fileno())) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return None
            port: int = sock.getsockname()[1]
            return port
    except (OSError, TypeError, ValueError):
        return None


def _admin_console(engine: Engine, timeout: int) -> dict[str, Any]:
    """PgBouncer's ``SHOW VERSION``, ``SHOW CONFIG`` and our database's row of ``SHOW DATABASES``.

    A plain DBAPI connection (SQLAlchemy's first-connect queries are not admin commands), in
    autocommit mode (the console knows no transactions). Raises what the driver raises.
    """
    url = engine.url.set(database="pgbouncer")
    cargs, cparams = engine.dialect.create_connect_args(url)
    if engine.dialect.driver in ("psycopg2", "psycopg"):
        cparams.setdefault("connect_timeout", timeout)
    conn = engine.dialect.loaded_dbapi.connect(*cargs, **cparams)
    try:
        conn.autocommit = True

        def show(what: str) -> list[dict[str, Any]]:
            cursor = conn.cursor()
            try:
                cursor.execute(f"SHOW {what}")
                names = [column[0] for column in cursor.description or ()]
                return [dict(zip(names, row, strict=False)) for row in cursor.fetchall()]
            finally:
                cursor.close()

        version = str(next(iter(show("VERSION")[0].values())))
        config = {row["key"]: row["value"] for row in show("CONFIG") if row["key"] in _SETTINGS}
        database = next(
            (row for row in show("DATABASES") if row["name"] == engine.url.database), None
        )
    finally:
        conn.close()
    facts: dict[str, Any] = {"version": version}
    for key in _SETTINGS:
        value = config.get(key)
        facts[key] = int(value) if isinstance(value, str) and value.isdigit() else value
    if database is not None:  # a database's own settings win over the defaults
        if database.get("pool_size") is not None:
            facts["default_pool_size"] = int(database["pool_size"])
        if database.get("pool_mode"):
            facts["pool_mode"] = database["pool_mode"]
        if database.get("max_connections"):
            facts["max_db_connections"] = int(database["max_connections"])
    return facts


def pgbouncer_facts(engine: Engine, timeout: int = 5) -> dict[str, Any] | None:
    """Is there a proxy between us and PostgreSQL, and is it PgBouncer? ``None`` if not PG."""
    if engine.dialect.name != "postgresql":
        return None
    facts: dict[str, Any] = {
        "proxy": False,
        "detected": False,
        "version": None,
        "pool_mode": None,
        "pool_size": None,
        "max_client_conn": None,
        "error": None,
    }
    url_port = engine.url.port or 5432
    try:
        with engine.connect() as conn:
            server_port, client_port = conn.execute(
                text("SELECT inet_server_port(), inet_client_port()")
            ).one()
            local = _local_port(conn.connection.dbapi_connection)
    except Exception as exc:  # a server that hides them; the console may still answer
        facts["error"] = first_line(exc)
    else:
        seen_elsewhere = server_port is not None and int(server_port) != url_port
        relayed = None not in (local, client_port) and int(client_port) != local
        facts["proxy"] = seen_elsewhere or relayed
    try:
        console = _admin_console(engine, timeout)
    except Exception as exc:  # PostgreSQL itself ("database pgbouncer does not exist"), a refusal
        if facts["proxy"]:
            facts["error"] = f"PgBouncer's admin console did not answer: {first_line(exc)}"
        return facts
    if not console["version"].lower().startswith("pgbouncer"):
        return facts
    facts.update(
        detected=True,
        proxy=True,
        version=console["version"],
        pool_mode=console["pool_mode"],
        pool_size=console["default_pool_size"],
        max_client_conn=console["max_client_conn"],
        error=None,
        settings=console,
    )
    return facts


def _pool_capacity(report: dict[str, Any]) -> int | None:
    pool = report["pool"]
    return int(pool["capacity"]) if pool["bounded"] else None


def connection_budget(report: dict[str, Any], processes: int) -> dict[str, Any]:
    """Connections ``processes`` copies of this engine need, against what they may open."""
    per_process = _pool_capacity(report)
    cancel = report.get("cancel") or {}
    side = 1 if cancel.get("mechanism") and report["dialect"] != "sqlite" else 0
    needed = None if per_process is None else processes * (per_process + side)
    budget: dict[str, Any] = {
        "processes": processes,
        "per_process": per_process,
        "cancel_connections": processes * side,
        "needed": needed,
        "limit": None,
        "limited_by": None,
        "fits": None,
    }
    bouncer = report.get("pgbouncer") or {}
    limits = report.get("server_limits") or {}
    if bouncer.get("detected") and bouncer.get("max_client_conn"):
        budget["limit"], budget["limited_by"] = int(bouncer["max_client_conn"]), "max_client_conn"
    elif limits and not limits.get("error"):
        known = [
            (int(n), name)
            for name, n in (
                ("max_connections", limits.get("max_connections")),
                ("account limit", limits.get("account_limit")),
            )
            if n is not None
        ]
        if known:
            budget["limit"], budget["limited_by"] = min(known)
    if budget["limit"] is not None:
        budget["fits"] = needed is not None and needed <= budget["limit"]
    return budget


def budget_advice(report: dict[str, Any]) -> list[str]:
    """What to change when the processes need more connections than they may open."""
    budget, bouncer = report["budget"], report.get("pgbouncer") or {}
    advice: list[str] = []
    n = budget["processes"]
    if budget["fits"] is False:
        limit = budget["limit"]
        need = "unlimited" if budget["needed"] is None else str(budget["needed"])
        side = 1 if budget["cancel_connections"] else 0
        biggest = max(0, math.floor(limit / n) - side)
        fix = (
            f"give each process create_engine(url, pool_size={biggest}, max_overflow=0)"
            if biggest >= 1
            else "run fewer processes"
        )
        other = (
            f"raise PgBouncer's max_client_conn to at least {need}"
            if budget["limited_by"] == "max_client_conn"
            else "put PgBouncer (pool_mode = transaction) in front of the server"
        )
        advice.append(
            f"{n} processes need {need} connections ({n} x {budget['per_process']} pooled + "
            f"{budget['cancel_connections']} for statement cancel), but {budget['limited_by']} "
            f"allows {limit}: sessions beyond it fail with 'too many connections' instead of "
            f"waiting. Either {fix}, or {other}."
        )
    if bouncer.get("detected"):
        advice.append(_pgbouncer_advice(bouncer, budget))
    elif bouncer.get("proxy"):
        why = f" ({bouncer['error']})" if bouncer.get("error") else ""
        advice.append(
            "Something sits between this client and PostgreSQL (the server sees other ports "
            f"than ours){why}. If it is PgBouncer, let doctor read its settings: add this user "
            "to its admin_users or stats_users. In pool_mode = transaction the server "
            "connections are PgBouncer's pool, not pool_size; psycopg2's statement cancel "
            "goes to PgBouncer, which forwards it."
        )
    return advice


def _pgbouncer_advice(bouncer: dict[str, Any], budget: dict[str, Any]) -> str:
    mode, size = bouncer["pool_mode"], bouncer["pool_size"]
    head = f"PgBouncer ({bouncer['version']}, pool_mode = {mode}) is in front of PostgreSQL. "
    if mode == "statement":
        return head + (
            "Statement mode refuses transactions of more than one statement: use "
            "pool_mode = transaction for threadpool sessions."
        )
    if mode == "session":
        return head + (
            "In session mode every client connection holds a server connection while it is "
            "open, as without PgBouncer: count processes x pool_size against "
            "default_pool_size, or use pool_mode = transaction."
        )
    clients = "" if budget["needed"] is None else f" ({budget['needed']} client connections)"
    return head + (
        f"Each database and user gets {size} server connections however many client "
        f"connections the processes open{clients}: a transaction beyond {size} waits in "
        "PgBouncer's queue after our admission let it in (for at most query_wait_timeout: "
        "keep it longer than your request timeouts), so size default_pool_size to what the "
        "server allows and pool_size + max_overflow to the concurrency each process needs. "
        "Statement cancel goes to PgBouncer, which forwards it to the server "
        "connection running the statement. Session state does not survive a transaction "
        "(SET, advisory locks, WITH HOLD cursors, LISTEN); psycopg2 uses no server-side "
        "prepared statements, so there is nothing to configure for them."
    )
