"""What the event-loop guard costs on the hot path: ``guard="raise"`` against ``guard="off"``.

Times ``N`` calls of ``await sess.run(lambda s: s.execute(select(User).where(User.id == 1))
.scalar_one())`` for each mode, interleaved in chunks of ``CHUNK`` calls (raise then off, then
off then raise, ...), over several rounds; reports the median over all pairs of adjacent chunks
of the ratio raise/off (wall-clock and process CPU time), on asyncio and trio. A second
scenario opens a short session per call (begin, one query, commit, close), which adds the
guard's once-per-transaction bookkeeping.

``bench/bench.py`` runs this (workload ``G``) on every database it benchmarks; run alone, it
uses a temporary SQLite file:

    python bench/guard_cost.py [--n 5000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_threadpool import ThreadpoolSession, threadpool_sessionmaker
from sqlalchemy_threadpool._guard import GuardMode

MODES: tuple[GuardMode, GuardMode] = ("raise", "off")
#: Calls timed back to back before switching modes: fine-grained interleaving cancels drift.
CHUNK = 100

#: Per mode: (wall-clock seconds, CPU seconds of the whole process, worker threads included).
Timings = dict[GuardMode, tuple[float, float]]
#: (wall-clock raise/off, CPU raise/off) of one pair of adjacent chunks.
Ratio = tuple[float, float]


class _Clock:
    """Wall-clock and process CPU time: CPU time is less disturbed by other processes."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _ratio(seconds: Timings) -> Ratio:
    (wall, cpu), (wall_off, cpu_off) = seconds["raise"], seconds["off"]
    return wall / wall_off, cpu / cpu_off


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "bench_user"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


def _one(session: Session) -> User:
    return session.execute(select(User).where(User.id == 1)).scalar_one()


async def _calls(sess: ThreadpoolSession, n: int) -> tuple[float, float]:
    clock = _Clock()
    for _ in range(n):
        await sess.run(_one)
    return clock.elapsed()


async def _one_session(makers: dict[GuardMode, threadpool_sessionmaker], n: int) -> list[Ratio]:
    """Both modes' sessions stay open; their calls alternate in chunks, one ratio per pair."""
    ratios = []
    async with makers["raise"]() as guarded, makers["off"]() as unguarded:
        sessions = {"raise": guarded, "off": unguarded}
        for sess in sessions.values():
            await sess.run(_one)  # warm up: the connection and the compiled statement
        for pair in range(max(1, n // CHUNK)):
            seconds = {}
            for mode in MODES if pair % 2 == 0 else MODES[::-1]:
                seconds[mode] = await _calls(sessions[mode], CHUNK)
            ratios.append(_ratio(seconds))
    return ratios


async def _session_per_call(
    makers: dict[GuardMode, threadpool_sessionmaker], n: int
) -> list[Ratio]:
    ratios = []
    for pair in range(max(1, n // CHUNK)):
        seconds = {}
        for mode in MODES if pair % 2 == 0 else MODES[::-1]:
            clock = _Clock()
            for _ in range(CHUNK):
                async with makers[mode].begin() as sess:
                    await sess.run(_one)
            seconds[mode] = clock.elapsed()
        ratios.append(_ratio(seconds))
    return ratios


Scenario = Callable[[dict[GuardMode, threadpool_sessionmaker], int], Awaitable[list[Ratio]]]


async def _ratios(url: str, scenario: Scenario, n: int, rounds: int) -> list[Ratio]:
    """Every pair of adjacent chunks of every round: (wall raise/off, CPU raise/off)."""
    # One engine per mode: the guard's engine-level listeners must not slow the "off" side.
    engines = {mode: create_engine(url) for mode in MODES}
    makers = {mode: threadpool_sessionmaker(engines[mode], guard=mode) for mode in MODES}
    ratios = []
    try:
        await scenario(makers, 2 * CHUNK)  # warm-up round, not counted
        for _ in range(rounds):
            ratios += await scenario(makers, n)
    finally:
        for engine in engines.values():
            engine.dispose()
    return ratios


SCENARIOS: dict[str, Scenario] = {
    "run() x N, one session": _one_session,
    "a session per call": _session_per_call,
}


def measure(url: str, backend: str, n: int, rounds: int) -> dict[str, list[Ratio]]:
    """Every scenario on one loop: label -> (wall, CPU) ratios raise/off, one per chunk pair.

    ``url`` must hold a ``bench_user`` table (``id``, ``name``) with a row ``id = 1``.
    """
    return {
        label: anyio.run(_ratios, url, scenario, n, rounds, backend=backend)
        for label, scenario in SCENARIOS.items()
    }


def seed(url: str) -> None:
    """Create ``bench_user`` with the row the scenarios read (a fresh database)."""
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(User(id=1, name="ada"))
        session.commit()
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved repetitions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        seed(url)
        for backend in ("asyncio", "trio"):
            for label, ratios in measure(url, backend, args.n, args.rounds).items():
                wall, cpu = ([ratio[i] for ratio in ratios] for i in (0, 1))
                print(
                    f"{backend:8} {label:23} raise/off median: wall {statistics.median(wall):.3f}x"
                    f" (min {min(wall):.3f}, max {max(wall):.3f}), CPU "
                    f"{statistics.median(cpu):.3f}x (min {min(cpu):.3f}, max {max(cpu):.3f}); "
                    f"{len(ratios)} chunk pairs of {CHUNK} calls"
                )


if __name__ == "__main__":
    main()
