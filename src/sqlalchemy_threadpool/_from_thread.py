"""``anyio.from_thread`` inside the dedicated worker threads: the way back to the event loop.

Sync code that a session runs in a thread may call back into the event loop, as it may from
anyio's own worker threads: ``anyio.from_thread.run_sync(fn)``, ``anyio.from_thread.run(afn)``
and ``anyio.from_thread.check_cancelled()``. Called without ``token=``, those look for the way
back in a thread-local that only anyio's ``to_thread.run_sync`` sets, so a dedicated worker
thread sets it too, once, when it starts (:func:`claim_thread`): to a token whose backend,
:class:`_WorkerThreadBackend`, serves them for the call the thread is running (the
:class:`Link` its :class:`Host` holds while the call runs), through anyio's public ``token=``
arguments with the token of the loop the call came from.

The contract is that of a thread of ``anyio.to_thread.run_sync(..., abandon_on_cancel=True)``,
which ``offload="anyio"`` uses:

- ``run_sync(fn)`` runs ``fn`` on the loop thread and returns its value (or raises its error);
- ``run(afn)`` runs ``afn`` in a task on the loop, in a copy of the caller's context, and
  returns its value; it is cancelled when the awaiting task is (as on asyncio with anyio's
  threads; trio's run it on regardless), and then the worker gets the backend's cancellation
  exception, as from ``check_cancelled()``;
- ``check_cancelled()`` raises the backend's cancellation exception once the task awaiting the
  call has stopped waiting for it because it was cancelled, so a callable can stop early.

The loop keeps running while a cancelled task waits for its worker to leave (``_offload``
waits in a helper thread), so a worker calling back into it then is served and cannot
deadlock.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, NoReturn, Protocol, cast

import anyio
import anyio.from_thread
from anyio.abc import AsyncBackend
from anyio.lowlevel import EventLoopToken

__all__ = [
    "Host",
    "Link",
    "claim_thread",
    "interrupted",
    "raise_asyncio_cancelled",
    "trio_cancellation",
]


class Link(Protocol):
    """What a call in a worker thread knows of the task awaiting it (set on the loop thread)."""

    #: The awaiting task's event loop (:func:`anyio.lowlevel.current_token`).
    token: EventLoopToken | None
    #: Raises the backend's cancellation exception, once the awaiting task was cancelled.
    cancelled: Callable[[], NoReturn] | None
    #: The cancel scope of the ``from_thread.run()`` coroutine in progress, if any.
    scope: anyio.CancelScope | None


class Host(Protocol):
    """A worker thread, as seen from here."""

    #: The :class:`Link` of the call the thread is running, ``None`` between calls.
    @property
    def link(self) -> Link | None: ...


#: ``_current.host``: this thread's :class:`Host` (dedicated worker threads only).
_current = threading.local()


def raise_asyncio_cancelled() -> NoReturn:
    raise asyncio.CancelledError("the task awaiting this worker thread's call was cancelled")


def interrupted(link: Link, raise_cancel: Callable[[], NoReturn] | None) -> None:
    """The awaiting task stopped waiting (on the loop thread): a cancellation (``raise_cancel``)
    is seen by ``check_cancelled()`` and cancels the ``from_thread.run()`` coroutine."""
    if raise_cancel is None:
        return
    link.cancelled = raise_cancel
    scope = link.scope
    if scope is not None:
        scope.cancel()


async def trio_cancellation() -> Callable[[], NoReturn] | None:
    """How the worker raises ``trio.Cancelled`` for a task that trio cancelled out of a wait
    whose abort function is trio's own (``wait_readable``), so that gave us no
    ``raise_cancel``: trio has no public constructor for it, so a fresh one is taken from a
    checkpoint of the task, cancelled still (``None`` if it is not any more)."""
    trio = sys.modules["trio"]
    try:
        await trio.lowlevel.checkpoint_if_cancelled()
    except trio.Cancelled as exc:
        exc.__context__ = None  # (the cancellation being handled: it stays on the loop)
        return partial(_raise, exc.with_traceback(None))
    return None


def _raise(exc: BaseException) -> NoReturn:
    raise exc.with_traceback(None)


def claim_thread(host: Host) -> None:
    """Make ``anyio.from_thread`` calls made in this thread without ``token=`` come to ``host``.

    This is the one place that touches anyio's internals (checked in anyio 4.11 to 4.16):
    ``anyio._core._eventloop.threadlocals.current_token``, the thread-local that anyio's
    worker threads set (``claim_worker_thread``) and that ``from_thread.run()``,
    ``from_thread.run_sync()`` and ``from_thread.check_cancelled()`` read when called without
    ``token=``; they then call ``token.backend_class.run_async_from_thread(func, args,
    token=None)``, ``run_sync_from_thread(func, args, token=None)`` and ``check_cancelled()``.
    ``tests/test_from_thread.py`` fails, naming this function, if that changes. Without it,
    those calls raise anyio's ``NoEventLoopError``, as in any thread that is not anyio's.
    """
    _current.host = host
    threadlocals = _anyio_threadlocals()
    if threadlocals is not None:
        threadlocals.current_token = _TOKEN


def _anyio_threadlocals() -> Any:
    try:
        from anyio._core._eventloop import threadlocals
    except ImportError:
        return None
    return threadlocals


def _link() -> Link:
    host: Host | None = getattr(_current, "host", None)
    link = None if host is None else host.link
    if link is None or link.token is None:
        raise anyio.NoEventLoopError(
            "This sqlalchemy-threadpool worker thread is not running a call of a session, so "
            "there is no event loop to go back to; pass token=anyio.lowlevel.current_token() "
            "taken on the loop."
        )
    return link


class _Cancelled:
    """What the ``from_thread.run()`` coroutine returns when the awaiting task's cancellation
    cancelled it."""


_CANCELLED = _Cancelled()


async def _in_the_callers_scope(
    link: Link, func: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
) -> Any:
    """Run ``func(*args)`` on the loop, cancelled when the task awaiting ``link`` is."""
    with anyio.CancelScope() as scope:
        if link.cancelled is not None:
            scope.cancel()
        link.scope = scope
        try:
            return await func(*args)
        finally:
            link.scope = None
    return _CANCELLED


class _WorkerThreadBackend:
    """The ``backend_class`` of a dedicated worker thread's anyio token: serves the
    ``anyio.from_thread`` calls made without ``token=`` for the call the thread runs."""

    @classmethod
    def run_sync_from_thread(
        cls, func: Callable[..., Any], args: tuple[Any, ...], token: object
    ) -> Any:
        return anyio.from_thread.run_sync(func, *args, token=_link().token)

    @classmethod
    def run_async_from_thread(
        cls, func: Callable[..., Awaitable[Any]], args: tuple[Any, ...], token: object
    ) -> Any:
        link = _link()
        value = anyio.from_thread.run(_in_the_callers_scope, link, func, args, token=link.token)
        if value is _CANCELLED:
            cls.check_cancelled()
        return value

    @classmethod
    def check_cancelled(cls) -> None:
        raise_cancel = _link().cancelled
        if raise_cancel is not None:
            raise_cancel()


_TOKEN = EventLoopToken(cast("type[AsyncBackend]", _WorkerThreadBackend), None)
