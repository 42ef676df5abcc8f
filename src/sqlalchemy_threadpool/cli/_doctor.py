"""``python -m sqlalchemy_threadpool doctor URL``: is this database ready for threadpool sessions?

It connects (and only reads: ``SELECT`` statements and a server-side ``sleep``), then reports
what a :class:`threadpool_sessionmaker` would do with the engine and what it costs:

- dialect, driver and the DBAPI's declared ``threadsafety``;
- the pool class and capacity, against the limiter a maker would use (and what goes wrong if
  they differ);
- whether server-side statement cancel works, tried on a ``sleep`` statement cancelled after a
  moment, and what is missing if it does not;
- the cost of one hop to a worker thread (a no-op call of a session inside a transaction), a
  point query with and without offloading, and the event loop's lag under a small load,
  offloaded and with the same queries run on the loop;
- concrete recommendations.

``--json`` prints the same as one JSON object. A bad URL, an unreachable server, a missing
driver or a missing database file is one ``error:`` line on stderr and exit status 1, never a
traceback. Exit status 0 means the report was printed; 3 that it was printed but a
``threadpool_sessionmaker`` refuses this engine (the report says why); 2 is a usage error.
Progress goes to stderr (``--quiet`` silences it).

This module is the command: advice, the table, JSON and exit status. What it measures, and
everything that touches the database, is in ``_probe``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import anyio
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

from ._probe import (
    DoctorError,
    engine_facts,
    first_line,
    maker_for,
    measure,
    open_engine,
    progress,
    server_limits,
    sqlite_journal_mode,
)
from ._scale import budget_advice, connection_budget, pgbouncer_facts

__all__ = ["main"]

#: How to bound statements on the server when the driver has no canceller.
_SERVER_TIMEOUTS = {
    "postgresql": "Bound statements on the server with statement_timeout.",
    "mysql": "Bound statements on the server with max_execution_time (MySQL) or "
    "max_statement_time (MariaDB).",
    "mariadb": "Bound statements on the server with max_statement_time.",
}
#: Exit status when the report is printed but a maker refuses the engine.
EXIT_REFUSED = 3


# -- advice and output ---------------------------------------------------------------------


def _recommendations(report: dict[str, Any], journal_mode: str | None) -> list[str]:
    """What to do about the report; ``journal_mode`` is a SQLite file's (else ``None``)."""
    advice: list[str] = []
    limiter, pool = report["limiter"], report["pool"]
    if limiter["error"]:
        advice.append(limiter["error"])
    elif not pool["bounded"]:
        advice.append(
            f"{pool['class']} does not bound connections, so a maker admits "
            f"{limiter['tokens']} sessions at once (anyio's default). Bound the pool to what the "
            "server allows, e.g. create_engine(url, pool_size=10, max_overflow=0); the maker's "
            "limiter then follows it."
        )
    if not (report.get("pgbouncer") or {}).get("detected"):
        advice += _limit_advice(report)  # behind PgBouncer, budget_advice says what counts
    for step in ("cancel", "timings", "loop_lag"):
        error = (report.get(step) or {}).get("error")
        if error:
            advice.append(f"Measuring {step.replace('_', ' ')} failed: {error}")
    if report["dbapi"]["threadsafety"] == 0:
        advice.append(
            "The driver declares threadsafety 0. Use one connection for the whole process "
            "(poolclass=StaticPool, so the maker's limiter is 1) and test it under load."
        )
    cancel = report.get("cancel") or {}
    if cancel.get("error"):
        pass  # reported above
    elif cancel and not cancel.get("mechanism"):
        advice.append(
            f"No server-side cancel for {report['dialect']}+{report['driver']}: a cancelled "
            "or timed-out await waits for its statement to finish. "
            + _SERVER_TIMEOUTS.get(
                report["dialect"],
                "Keep statements short, or bound them with the database's own timeout.",
            )
        )
    elif cancel.get("tested") and not cancel.get("works"):
        problems = " ".join(cancel.get("problems") or [])
        first = (cancel.get("problems") or ["no error was reported"])[0]
        hint = f"the driver reported: {first}"
        if "1095" in problems or "not owner" in problems.lower():
            hint = "grant CONNECTION ADMIN (MariaDB >= 10.5 / MySQL 8) or SUPER to the user"
        elif "1203" in problems or "1226" in problems or "max_user_connections" in problems:
            hint = "KILL QUERY needs one more connection: raise max_user_connections by one"
        advice.append(f"Statement cancel did not stop the sleep statement: {hint.rstrip('.')}.")
    timings = report.get("timings")
    if timings and not timings.get("error"):
        hop, direct = timings["session_hop_us"], timings["point_query_direct_us"]
        if hop > direct:  # the figure of the "thread hop" line, quoted as it is shown there
            advice.append(
                f"A thread hop ({hop:.0f} us per call) costs more than a point query here "
                f"({direct:.0f} us): group short statements into one `await sess.run(fn)` "
                "instead of awaiting each."
            )
    lag = (report.get("loop_lag") or {}).get("threadpool")
    if lag and lag["p99_ms"] > 10:
        advice.append(
            f"The loop lagged {lag['p99_ms']} ms (p99) even with offloading: something holds "
            "the event loop or the GIL (CPU-heavy work, a sync call on the loop, a driver that "
            "keeps the GIL while it waits); on a busy machine run doctor again to be sure."
        )
    if journal_mode is not None and journal_mode.lower() != "wal":
        advice.append(
            f"SQLite journal_mode is {journal_mode}: with concurrent sessions enable WAL and a "
            "busy timeout on connect (PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000), or "
            "writers fail with 'database is locked'."
        )
    if report["budget"]["processes"] > 1 or (report.get("pgbouncer") or {}).get("proxy"):
        advice += budget_advice(report)
    if report["dialect"] == "duckdb":
        advice.append(
            "DuckDB lets one process write: concurrent sessions writing the same rows fail "
            "with a conflict error; retry them, or serialise writers with a separate maker "
            "(limiter=1)."
        )
    return advice


def _limit_advice(report: dict[str, Any]) -> list[str]:
    """Advice when the pool may open more connections than the server lets this account."""
    limits, pool = report.get("server_limits"), report["pool"]
    if not limits or limits["error"]:
        return []
    known = [n for n in (limits["max_connections"], limits["account_limit"]) if n is not None]
    if not known:
        return []
    allowed = min(known)
    # KILL QUERY keeps one connection more than the pool, from the first cancel on.
    side = (
        1
        if report["dialect"] in ("mysql", "mariadb") and report.get("cancel", {}).get("mechanism")
        else 0
    )
    wanted = (pool["capacity"] if pool["bounded"] else math.inf) + side
    if wanted <= allowed:
        return []
    whose = "this account" if allowed == limits["account_limit"] else "the server"
    extra = " plus 1 for KILL QUERY" if side else ""
    opens = _plural(pool["capacity"], "connection") if pool["bounded"] else "unlimited connections"
    if allowed - side < 1:
        fix = (
            f"Let the account open at least {1 + side} connections (MAX_USER_CONNECTIONS), "
            "or turn statement cancel off with threadpool_sessionmaker(engine, "
            "cancel_statements=False)."
        )
    else:
        fix = (
            f"Bound the pool, e.g. create_engine(url, pool_size={allowed - side}, "
            "max_overflow=0) (the maker's limiter follows it), and count every process: each "
            "has its own pool."
        )
    return [
        f"The pool may open {opens}{extra}, but {whose} allows {allowed}: sessions beyond "
        f"that fail with 'too many connections' instead of waiting. {fix}"
    ]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _table(report: dict[str, Any]) -> str:
    dbapi, pool, limiter = report["dbapi"], report["pool"], report["limiter"]
    rows = [
        (
            "database",
            f"{report['dialect']} {report['server_version'] or ''} (driver {report['driver']})",
        ),
        ("DBAPI", f"{dbapi['module']}, threadsafety {dbapi['threadsafety']}: {dbapi['meaning']}"),
    ]
    detail = f" ({pool['size']} + {pool['max_overflow']} overflow)" if "size" in pool else ""
    shown = _plural(pool["capacity"], "connection") if pool["bounded"] else "unbounded"
    rows.append(("pool", f"{pool['class']}: {shown}{detail}"))
    limits = report.get("server_limits")
    if limits:
        if limits["error"]:
            text_ = f"unknown: {limits['error']}"
        else:
            account = limits["account_limit"]
            text_ = f"max_connections {limits['max_connections']}; this account: " + (
                "no limit of its own" if account is None else str(account)
            )
        rows.append(("server limits", text_))
    bouncer = report.get("pgbouncer")
    if bouncer and bouncer["detected"]:
        rows.append(
            (
                "pgbouncer",
                f"{bouncer['version']}, pool_mode {bouncer['pool_mode']}, "
                f"{_plural(bouncer['pool_size'], 'server connection')} per database and user, "
                f"max_client_conn {bouncer['max_client_conn']}",
            )
        )
    elif bouncer and bouncer["proxy"]:
        rows.append(("pgbouncer", f"a proxy is in between; {bouncer['error'] or 'not PgBouncer'}"))
    budget = report["budget"]
    if budget["needed"] is not None and (budget["processes"] > 1 or (bouncer or {}).get("proxy")):
        verdict = (
            ""
            if budget["limit"] is None
            else f" of {budget['limit']} ({budget['limited_by']}): "
            + ("fits" if budget["fits"] else "TOO MANY")
        )
        rows.append(
            (
                "connection budget",
                f"{budget['processes']} x {budget['per_process']} pooled + "
                f"{budget['cancel_connections']} for cancel = {budget['needed']}{verdict}",
            )
        )
    if limiter["error"]:
        rows.append(("maker limiter", "refused: " + limiter["error"].split(":")[0]))
    else:
        note = (
            "follows the pool; a larger limiter= is refused (threads would block in pool "
            "checkout), a smaller one leaves connections idle"
            if limiter["follows_pool"]
            else "the pool is unbounded: anyio's default"
        )
        sessions = _plural(limiter["tokens"], "session")
        rows.append(("maker limiter", f"{sessions} at once; {note}"))
    cancel = report.get("cancel")
    if cancel is not None:
        if cancel.get("error"):
            text_ = f"not measured: {cancel['error']}"
        elif not cancel["mechanism"]:
            text_ = "none for this driver: a cancelled await waits for the statement"
        elif not cancel["tested"]:
            text_ = "available, not tried (no sleep statement known for this dialect)"
        else:
            verdict = "works" if cancel["works"] else "DID NOT stop the statement"
            text_ = (
                f"{verdict}: a cancelled await returned "
                f"{cancel['returned_after_deadline_s'] * 1000:.0f} ms after its deadline"
            )
        rows.append(("statement cancel", text_))
    timings = report.get("timings")
    if timings and timings.get("error"):
        rows.append(("thread hop", f"not measured: {timings['error']}"))
    elif timings:
        rows.append(
            (
                "thread hop",
                f"{timings['session_hop_us']:.0f} us per call through a session, inside a "
                f"transaction (bare anyio.to_thread: {timings['to_thread_hop_us']:.0f} us)",
            )
        )
        rows.append(
            (
                "point query",
                f"{timings['point_query_direct_us']:.0f} us direct, "
                f"{timings['point_query_offloaded_us']:.0f} us awaited through a session",
            )
        )
    lag = report.get("loop_lag")
    if lag and lag.get("error"):
        rows.append(("event-loop lag", f"not measured: {lag['error']}"))
    elif lag:
        ours, naive = lag["threadpool"], lag["sync_on_the_loop"]
        rows.append(
            (
                "event-loop lag",
                f"p99 {ours['p99_ms']} ms (max {ours['max_ms']}) offloaded vs p99 "
                f"{naive['p99_ms']} ms (max {naive['max_ms']}) sync on the loop; "
                f"{lag['load']}",
            )
        )
    width = max(len(name) for name, _ in rows)
    lines = [f"sqlalchemy-threadpool doctor: {report['url']}", ""]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    lines += ["", "Recommendations:"]
    advice = report["recommendations"] or ["none: this engine is ready for threadpool sessions."]
    lines += [f"  {n}. " + item.replace("\n", "\n     ") for n, item in enumerate(advice, 1)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Examine ``args.url``; raise :class:`DoctorError` for anything that stops it early."""
    progress(args.quiet, f"connecting to {args.url_shown} ...")
    engine = open_engine(args)
    try:
        report = engine_facts(engine)
        report["server_limits"] = server_limits(engine)
        report["pgbouncer"] = bouncer = pgbouncer_facts(engine, args.connect_timeout)
        if bouncer and bouncer["detected"] and bouncer["pool_size"]:
            args.server_connections = int(bouncer["pool_size"])
        maker, report["limiter"] = maker_for(engine)
        if maker is not None:
            report.update(anyio.run(measure, maker, engine, args, backend=args.backend))
        report["backend"] = args.backend
        report["budget"] = connection_budget(report, args.processes)
        report["recommendations"] = _recommendations(report, sqlite_journal_mode(engine))
    finally:
        engine.dispose()
    return report


def main(argv: list[str] | None = None) -> int:
    """``doctor URL [options]``: print the report; return the exit status (see above)."""
    parser = argparse.ArgumentParser(
        prog="python -m sqlalchemy_threadpool doctor",
        description="Check a database URL for use with threadpool sessions (read-only).",
    )
    parser.add_argument("url", help="SQLAlchemy URL with a sync driver, e.g. sqlite:///app.db")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--pool-size", type=int, help="create_engine(pool_size=...)")
    parser.add_argument("--max-overflow", type=int, help="create_engine(max_overflow=...)")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="worker processes that each make this engine (the connection budget)",
    )
    parser.add_argument("--connect-timeout", type=int, default=5, help="seconds (default 5)")
    parser.add_argument("--samples", type=int, default=200, help="timed calls per measurement")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    try:
        args.url_shown = make_url(args.url).render_as_string(hide_password=True)
    except ArgumentError:
        args.url_shown = args.url
    try:
        report = run(args)
    except DoctorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for whatever else a driver may raise
        print(f"error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return EXIT_REFUSED if report["limiter"]["error"] else 0
