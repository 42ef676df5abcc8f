"""``shutdown()``: stop an application's database work within a bound, then dispose.

Meant for the end of a program or of an ASGI lifespan, after the server stopped taking new
requests: every session of the engine that still holds a connection has its unit of work
failed (its statement in flight cancelled on the server, its transaction rolled back, its
connection returned or invalidated), then the engine's pool is disposed, so no connection, no
server backend and no worker thread inside a session is left behind.
"""

from __future__ import annotations

import logging

import anyio
from sqlalchemy.engine import Engine

from ._admission import admitted_offloaders
from ._binds import engine_of
from ._maker import threadpool_sessionmaker
from ._worker_pool import WorkerPool, all_pools

__all__ = ["shutdown"]

logger = logging.getLogger(__name__)

_REASON = "shutdown() rolled its transaction back"


async def shutdown(
    target: threadpool_sessionmaker | Engine,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a grace period for other tasks' work
    dispose: bool = True,
) -> None:
    """Stop the work of every session on ``target``'s engine, wait at most ``timeout`` s, dispose.

    For each session that holds (or may hold) a connection of the engine, whatever maker made
    it:

    - a statement in flight is cancelled on the server (as for a cancelled task), and the task
      awaiting it gets :class:`TransactionInterruptedError` instead of a result;
    - an idle transaction is rolled back; its task's next call raises
      :class:`TransactionInterruptedError` (``rollback()`` acknowledges it);
    - connections whose statement does not stop by half of ``timeout`` have their socket shut
      down, so their worker leaves at once and the connection is invalidated.

    After ``timeout`` seconds it stops waiting, logs what is left, and disposes the engine's
    pool anyway (``dispose=False`` skips that). Then the idle threads of the worker pools
    concerned exit at once instead of after their idle timeout: given a maker, those of its
    :class:`WorkerPool` and of the pools of the sessions it stopped (another maker's pool,
    shared or not, keeps its threads); given an engine, whose makers it does not know, those
    of every pool in the process. It runs shielded from cancellation, so it can be awaited in
    a ``finally:`` block of a cancelled task, and it works on asyncio and trio.
    Sessions that start after it was called are not affected: stop taking requests first.
    """
    engine = _engine_of(target)
    with anyio.CancelScope(shield=True):
        victims = admitted_offloaders(engine)
        pools: set[WorkerPool | None] = {o._workers for o in victims}
        if isinstance(target, threadpool_sessionmaker):
            pools.add(target._workers)
        else:
            pools.update(all_pools())
        start = anyio.current_time()
        sever_at = start + timeout / 2
        with anyio.move_on_after(timeout) as scope:
            async with anyio.create_task_group() as group:
                for offloader in victims:
                    group.start_soon(offloader.shut_down, _REASON, sever_at)
        if scope.cancelled_caught:
            left = [o for o in admitted_offloaders(engine) if o.session.in_transaction()]
            logger.warning(
                "shutdown(): %d session(s) still held a transaction after %g s; disposing the "
                "engine anyway",
                len(left),
                timeout,
            )
        if dispose:
            # Closing pooled connections is network IO: keep it off the event-loop thread.
            # (Not session work, so it does not go through the offload path.)
            await anyio.to_thread.run_sync(engine.dispose)
        for pool in pools:  # idle dedicated threads exit now, not after their idle timeout
            if pool is not None:
                pool.stop_idle()


def _engine_of(target: threadpool_sessionmaker | Engine) -> Engine:
    if isinstance(target, Engine):
        return target
    if isinstance(target, threadpool_sessionmaker):
        engine = engine_of(target.sync_maker.kw.get("bind"))
        if engine is None:
            raise TypeError("shutdown() needs a maker bound to an engine; this one has no bind.")
        return engine
    raise TypeError(
        f"shutdown() takes a threadpool_sessionmaker or an Engine, not {type(target).__name__}."
    )
