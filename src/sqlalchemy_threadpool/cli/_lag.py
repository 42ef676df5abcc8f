"""Event-loop lag, as the ``demo`` and ``doctor`` commands measure it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

__all__ = ["recording_lag"]

#: The ticker's period: lag is how much later than this the loop wakes it up.
TICK = 0.001


@asynccontextmanager
async def recording_lag() -> AsyncIterator[list[float]]:
    """Record, while the block runs, how late (in ms) the event loop wakes a 1 ms ticker."""
    lags: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await anyio.sleep(TICK)
            lags.append(max(0.0, time.perf_counter() - start - TICK) * 1000)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        try:
            yield lags
        finally:
            done.set()
