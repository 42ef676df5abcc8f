"""Finding the ``ThreadpoolSession`` that owns an ORM object, and awaitable attributes through it.

The counterparts of ``sqlalchemy.ext.asyncio``'s :class:`~sqlalchemy.ext.asyncio.AsyncAttrs`,
``sqlalchemy.ext.asyncio.async_object_session`` and
``sqlalchemy.ext.asyncio.async_session``::

    class Base(ThreadpoolAttrs, DeclarativeBase):
        pass

    posts = await user.awaitable_attrs.posts      # loaded in the owning session's worker
    sess = threadpool_object_session(user)        # that ThreadpoolSession, or None

Each sync session knows its facade through one weak reference (:data:`_facades`), set when the
facade is made: the facade stays collectable (a session dropped without being closed is still
found by the lost-session finalizer), and a lost facade is simply ``None`` here.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, object_session
from sqlalchemy.orm.exc import DetachedInstanceError

from ._exceptions import NoSessionError

if TYPE_CHECKING:
    from ._session import ThreadpoolSession

__all__ = [
    "ThreadpoolAttrs",
    "remember_facade",
    "threadpool_object_session",
    "threadpool_session_of",
]

#: Each sync session's facade, weakly both ways: neither keeps the other alive. Only the event
#: loop thread writes it (a facade's constructor); a forked child inherits it unchanged, which
#: is right, since the facades it maps are the child's own copies.
_facades: weakref.WeakKeyDictionary[Session, weakref.ref[ThreadpoolSession]] = (
    weakref.WeakKeyDictionary()
)


def remember_facade(sync_session: Session, facade: ThreadpoolSession) -> None:
    """Record that ``facade`` is the :class:`ThreadpoolSession` over ``sync_session``."""
    _facades[sync_session] = weakref.ref(facade)


def threadpool_session_of(session: Session) -> ThreadpoolSession | None:
    """The :class:`ThreadpoolSession` over a sync :class:`~sqlalchemy.orm.Session`, if any.

    The counterpart of ``sqlalchemy.ext.asyncio.async_session``: the same object every
    time, or ``None`` for a session that no ``ThreadpoolSession`` wraps (one made with a plain
    :class:`~sqlalchemy.orm.sessionmaker`) or whose facade has been garbage-collected. Handy
    in SQLAlchemy event listeners, which receive the sync session.
    """
    ref = _facades.get(session)
    return None if ref is None else ref()


def threadpool_object_session(instance: object) -> ThreadpoolSession | None:
    """The :class:`ThreadpoolSession` that ``instance`` belongs to, or ``None``.

    The counterpart of ``sqlalchemy.ext.asyncio.async_object_session``: it looks up the
    sync session with ``sqlalchemy.orm.object_session``, then its facade with
    :func:`threadpool_session_of`. ``None`` for a transient or detached object. An object that
    is not mapped raises ``sqlalchemy.orm.exc.UnmappedInstanceError``, as there.
    """
    session = object_session(instance)
    return None if session is None else threadpool_session_of(session)


class ThreadpoolAttrs:
    """Mixin for declarative classes: ``await obj.awaitable_attrs.name`` loads without blocking.

    The counterpart of :class:`sqlalchemy.ext.asyncio.AsyncAttrs`::

        class Base(ThreadpoolAttrs, DeclarativeBase):
            pass

        for post in await user.awaitable_attrs.posts:
            ...

    Awaiting ``obj.awaitable_attrs.name`` reads ``obj.name`` in the worker thread of the
    :class:`ThreadpoolSession` that owns ``obj``: a lazy relationship, a deferred column or an
    expired attribute is loaded there, with that session's connection, in turn with its other
    calls, exactly like ``await sess.load(obj, "name")``. Afterwards plain ``obj.name`` reads
    the loaded value with no IO; before, it raises
    :class:`~sqlalchemy_threadpool.LazyLoadOnEventLoopError` as usual.

    An object without a session (transient or detached) is read as ``AsyncAttrs`` reads it:
    loaded and transient values are returned, and an attribute that would need loading raises
    ``sqlalchemy.orm.exc.DetachedInstanceError``. An object whose session is not a
    ``ThreadpoolSession``'s (a plain ``Session``) raises
    :class:`~sqlalchemy_threadpool.NoSessionError`: its IO would block the event loop.
    """

    class _ThreadpoolAttrGetitem:
        __slots__ = ("_instance",)

        def __init__(self, _instance: Any) -> None:
            self._instance = _instance

        def __getattr__(self, name: str) -> Awaitable[Any]:
            return _load_attribute(self._instance, name)

    @property
    def awaitable_attrs(self) -> ThreadpoolAttrs._ThreadpoolAttrGetitem:
        """A namespace of every attribute of this object, each as an awaitable.

        ``await obj.awaitable_attrs.posts`` is ``await sess.load(obj, "posts")`` with ``sess``
        the session that owns ``obj``.
        """
        return ThreadpoolAttrs._ThreadpoolAttrGetitem(self)


async def _load_attribute(instance: object, name: str) -> Any:
    """``getattr(instance, name)`` in the worker of the session that owns ``instance``."""
    session = object_session(instance)
    if session is None:
        # No session, no IO: what is loaded (or transient) is returned, as AsyncAttrs does.
        try:
            return getattr(instance, name)
        except DetachedInstanceError as exc:
            raise DetachedInstanceError(
                f"{exc.args[0]}. `await obj.awaitable_attrs.{name}` loads through the "
                "ThreadpoolSession that owns the object, and this one has none (it was "
                "expunged, or its session was closed). Load the attribute while the session "
                f"is open (`await obj.awaitable_attrs.{name}`, or "
                "`.options(selectinload(...))` in the query), or attach the object to an "
                "open session first: `obj = await sess.merge(obj)`.",
                code=exc.code,
            ) from exc
    facade = threadpool_session_of(session)
    if facade is None:
        raise NoSessionError(
            f"{instance!r} belongs to a Session that no ThreadpoolSession wraps (or whose "
            "ThreadpoolSession was garbage-collected), so "
            f"`awaitable_attrs.{name}` has no worker thread to load it in (loading it here "
            "would block the event loop). Load objects through a ThreadpoolSession (a "
            "threadpool_sessionmaker's session), or read the attribute inside "
            "`await sess.run(...)` of the session that owns it."
        )
    return await facade.load(instance, name)
