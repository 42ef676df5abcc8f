"""The command line, ``python -m sqlalchemy_threadpool {demo,doctor} ...``: dispatch to a command.

Not part of the library's API: the commands use the library through its public names (and,
for the doctor's probe, two named internals), and nothing in the core imports this package.
Each command's module is imported only when that command runs.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

USAGE = """\
usage: python -m sqlalchemy_threadpool COMMAND [OPTIONS]

commands:
  demo    concurrent ORM requests through threadpool sessions vs a sync session
          on the event loop: requests/s and event-loop lag side by side
          python -m sqlalchemy_threadpool demo [--url URL] [--backend {asyncio,trio}]
              [--requests N] [--concurrency N]
  doctor  check a database URL for threadpool sessions (read-only): driver thread
          safety, pool vs limiter, statement cancel, hop cost, loop lag, advice
          python -m sqlalchemy_threadpool doctor URL [--json] [--backend {asyncio,trio}]

`python -m sqlalchemy_threadpool COMMAND --help` describes every option."""


def main(argv: list[str] | None = None) -> int:
    """Run a command (``argv`` defaults to ``sys.argv[1:]``); return the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from ._demo import main as demo

        return demo(rest)
    if command == "doctor":
        from ._doctor import main as doctor

        return doctor(rest)
    print(f"error: unknown command {command!r}; try `python -m sqlalchemy_threadpool --help`")
    return 2
