"""``python -m sqlalchemy_threadpool``: the entry point; the commands are in ``.cli``."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
