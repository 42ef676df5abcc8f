"""``threadpool_scoped_session``: one session per scope, as ``async_scoped_session``.

A registry of sessions keyed by ``scopefunc()`` (typically the current task:
``scopefunc=lambda: anyio.get_current_task().id``, or ``asyncio.current_task``).
``scoped()`` returns the current scope's session, creating it with the session factory;
``await scoped.remove()`` closes it and forgets it. Every public member of
:class:`ThreadpoolSession` is also a member of the scoped session, acting on the current
scope's session (``await scoped.execute(...)``, ``scoped.add(obj)``, ``scoped.new``):
the proxies are generated from ``ThreadpoolSession``'s members when this module is imported,
so a member added to the session is proxied without an edit here.

For the type checker the proxied members are ``Any`` (``__getattr__`` / ``__setattr__``
declared for it only); ``scoped()`` is typed as the factory's session class, so
``sess = scoped()`` keeps every member's exact type.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic

from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.util import ScopedRegistry
from typing_extensions import TypeVar

from ._exceptions import ConfigurationWarning
from ._session import ThreadpoolSession

if TYPE_CHECKING:
    from ._maker import threadpool_sessionmaker

__all__ = ["threadpool_scoped_session"]

_S = TypeVar("_S", bound=ThreadpoolSession, default=ThreadpoolSession)

#: Dunder members of the session that the scoped session forwards too (as SQLAlchemy does).
_FORWARDED_DUNDERS = ("__contains__", "__iter__")


class threadpool_scoped_session(Generic[_S]):
    """Scoped management of :class:`ThreadpoolSession` objects: ``async_scoped_session``'s twin.

    :param session_factory: makes the sessions, usually a :func:`threadpool_sessionmaker`.
    :param scopefunc: returns a hashable key for the current scope, e.g.
        ``lambda: anyio.get_current_task().id`` or ``asyncio.current_task``.

    Members of :class:`ThreadpoolSession` (``execute``, ``add``, ``commit``, ``new``, ...)
    act on the current scope's session. Remove the session at the end of the scope with
    ``await scoped.remove()``: nothing removes it for you, as with ``async_scoped_session``.
    """

    session_factory: threadpool_sessionmaker[_S]
    """The factory given to the constructor, for a session outside the registry."""

    registry: ScopedRegistry[_S]
    """The SQLAlchemy ``ScopedRegistry`` holding one session per scope key."""

    def __init__(
        self, session_factory: threadpool_sessionmaker[_S], scopefunc: Callable[[], Any]
    ) -> None:
        self.session_factory = session_factory
        self.registry = ScopedRegistry(session_factory, scopefunc)

    def __call__(self, **kw: Any) -> _S:
        """The current scope's session, created by the factory (with ``kw``) if there is none.

        Passing ``kw`` when the scope already has a session raises
        :class:`~sqlalchemy.exc.InvalidRequestError`, as in SQLAlchemy.
        """
        if not kw:
            return self.registry()
        if self.registry.has():
            raise InvalidRequestError(
                "Scoped session is already present; no new arguments may be specified. "
                "Call `await scoped.remove()` first to start a new session with these arguments."
            )
        sess = self.session_factory(**kw)
        self.registry.set(sess)
        return sess

    def configure(self, **kwargs: Any) -> None:
        """Reconfigure the session factory (see ``threadpool_sessionmaker.configure``).

        Sessions already created keep their configuration; a warning says so if the current
        scope has one.
        """
        if self.registry.has():
            warnings.warn(
                "At least one scoped session is already present; configure() does not affect "
                "sessions already created. Call configure() before the first session.",
                ConfigurationWarning,
                stacklevel=2,
            )
        self.session_factory.configure(**kwargs)

    async def remove(self) -> None:
        """Close the current scope's session, if any (awaited), and forget it."""
        if self.registry.has():
            await self.registry().close()
        self.registry.clear()

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any:
            """Every member of :class:`ThreadpoolSession`, on the current scope's session."""

        def __setattr__(self, name: str, value: Any) -> None:
            """Settable members (``autoflush``, ...) set on the current scope's session."""

        def __contains__(self, instance: object) -> bool:
            """Whether ``instance`` is in the current scope's session."""

        def __iter__(self) -> Iterator[object]:
            """The objects in the current scope's session."""


def _proxy(name: str, member: Any) -> Any:
    """A class attribute of the scoped session forwarding ``name`` to the current session."""
    if isinstance(member, property) or not callable(member) or isinstance(member, type):
        getter = functools.partial(_get, name)
        setter = functools.partial(_set, name) if getattr(member, "fset", None) else None
        return property(getter, setter, doc=getattr(member, "__doc__", None))
    if not inspect.isfunction(member):  # a classmethod: no session needed, as in SQLAlchemy
        return staticmethod(getattr(ThreadpoolSession, name))
    if inspect.iscoroutinefunction(member):

        async def forward_async(self: threadpool_scoped_session[Any], *a: Any, **kw: Any) -> Any:
            return await getattr(self.registry(), name)(*a, **kw)

        return functools.update_wrapper(forward_async, member)

    def forward(self: threadpool_scoped_session[Any], *a: Any, **kw: Any) -> Any:
        return getattr(self.registry(), name)(*a, **kw)

    return functools.update_wrapper(forward, member)


def _get(name: str, scoped: threadpool_scoped_session[Any]) -> Any:
    return getattr(scoped.registry(), name)


def _set(name: str, scoped: threadpool_scoped_session[Any], value: Any) -> None:
    setattr(scoped.registry(), name, value)


def _install_proxies() -> None:
    """Give the scoped session every public member of ``ThreadpoolSession`` it lacks."""
    for name in dir(ThreadpoolSession):
        if name.startswith("_") and name not in _FORWARDED_DUNDERS:
            continue
        if name in vars(threadpool_scoped_session):
            continue  # the scoped session's own member (there is none of the same name today)
        member = inspect.getattr_static(ThreadpoolSession, name)
        if isinstance(member, classmethod):
            member = getattr(ThreadpoolSession, name)
        setattr(threadpool_scoped_session, name, _proxy(name, member))


_install_proxies()
