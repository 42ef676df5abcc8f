"""The members ``ThreadpoolSession`` forwards to its sync ``Session``, generated as real methods.

The class body declares each forwarded member once, with the descriptor of its kind:
:class:`offloaded` (may do IO: awaited, runs in a worker), :class:`plain` (never does IO: the
sync session's own method, called on the loop), :class:`attribute` / :class:`settable` (an
attribute of the sync session). The descriptors carry the static types (a ``ParamSpec`` takes
SQLAlchemy's parameters as they are); :func:`generate_members`, the class decorator, replaces
each of them at runtime by a real function or property built from SQLAlchemy's method, as
``sqlalchemy.util.create_proxy_methods`` does for ``AsyncSession``: the same parameters (so a
wrong call raises ``TypeError`` at once, on the loop), SQLAlchemy's signature for
:func:`inspect.signature` and ``help()``, and its docstring under a line of ours.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Concatenate, Generic, TypeVar, overload

from sqlalchemy.orm import Session
from typing_extensions import ParamSpec, Self

if TYPE_CHECKING:
    from ._session import ThreadpoolSession

__all__ = ["attribute", "generate_members", "offloaded", "plain", "settable"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
C = TypeVar("C", bound=type)


class offloaded(Generic[P, R]):
    """Declares an IO member: the sync method, awaited, run in a worker, its result made safe."""

    __slots__ = ("method",)

    def __init__(self, method: Callable[Concatenate[Session, P], R]) -> None:
        self.method = method

    @overload
    def __get__(
        self, obj: None, owner: type[Any]
    ) -> Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]: ...
    @overload
    def __get__(
        self, obj: ThreadpoolSession, owner: type[Any]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    def __get__(self, obj: ThreadpoolSession | None, owner: type[Any]) -> Any:
        raise NotImplementedError  # replaced by generate_members()


class plain(Generic[P, R]):
    """Declares a member that never does IO: the sync session's own method, bound to it."""

    __slots__ = ("method",)

    def __init__(self, method: Callable[Concatenate[Session, P], R]) -> None:
        self.method = method

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Callable[Concatenate[Any, P], R]: ...
    @overload
    def __get__(self, obj: ThreadpoolSession, owner: type[Any]) -> Callable[P, R]: ...
    def __get__(self, obj: ThreadpoolSession | None, owner: type[Any]) -> Any:
        raise NotImplementedError  # replaced by generate_members()


class attribute(Generic[T]):
    """Declares a read-only attribute of the sync session (``getter`` only gives its type)."""

    __slots__ = ("getter",)

    def __init__(self, getter: Callable[[Session], T]) -> None:
        self.getter = getter

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, obj: ThreadpoolSession, owner: type[Any]) -> T: ...
    def __get__(self, obj: ThreadpoolSession | None, owner: type[Any]) -> Any:
        raise NotImplementedError  # replaced by generate_members()


class settable(attribute[T]):
    """Declares an attribute of the sync session that can also be set through the facade."""

    __slots__ = ()

    def __set__(self, obj: ThreadpoolSession, value: T) -> None:
        raise NotImplementedError  # replaced by generate_members()


def generate_members(cls: C) -> C:
    """Replace every declared member of ``cls`` by a real method or property (see above).

    ``cls._generated_members`` maps each name to its kind (``"offloaded"``, ``"plain"``,
    ``"attribute"``), for the docs.
    """
    generated: dict[str, str] = {}
    for name, declared in list(vars(cls).items()):
        if isinstance(declared, (offloaded, plain)):
            setattr(cls, name, _method(cls, name, declared))
            generated[name] = type(declared).__name__
        elif isinstance(declared, attribute):
            setattr(cls, name, _property(name, writable=isinstance(declared, settable)))
            generated[name] = "attribute"
    cls._generated_members = generated  # type: ignore[attr-defined]
    return cls


def _method(cls: type, name: str, declared: offloaded[Any, Any] | plain[Any, Any]) -> Any:
    """A function with ``declared.method``'s parameters that forwards them to it."""
    method = declared.method
    signature = inspect.signature(method)
    namespace: dict[str, Any] = {"_tp_method": method, "_tp_name": name}
    params: list[str] = []
    args: list[str] = []
    star = False
    for param in list(signature.parameters.values())[1:]:  # without ``self``
        text = param.name
        if param.kind is param.VAR_POSITIONAL:
            text, star = f"*{param.name}", True
            args.append(text)
        elif param.kind is param.VAR_KEYWORD:
            text = f"**{param.name}"
            args.append(text)
        else:
            if param.kind is param.KEYWORD_ONLY and not star:
                params.append("*")
                star = True
            if param.default is not param.empty:
                namespace[f"_tp_default_{param.name}"] = param.default
                text += f"=_tp_default_{param.name}"
            keyword = param.kind is param.KEYWORD_ONLY
            args.append(f"{param.name}={param.name}" if keyword else param.name)
        params.append(text)
        if param.kind is param.POSITIONAL_ONLY and _last_positional_only(signature, param):
            params.append("/")
    head = ", ".join(["self", *params])
    call = ", ".join(args)
    if isinstance(declared, offloaded):
        source = (
            f"async def {name}({head}):\n"
            f"    return await self._call_method(_tp_method, _tp_name, {call})\n"
        )
        summary = (
            f"Await :meth:`sqlalchemy.orm.Session.{name}`, run in the session's worker thread "
            "(a ``Result`` comes back fully buffered)."
        )
    else:
        source = f"def {name}({head}):\n    return _tp_method(self.sync_session, {call})\n"
        summary = (
            f"Proxy for :meth:`sqlalchemy.orm.Session.{name}`, called on the event loop "
            "(it does no IO)."
        )
    exec(source, namespace)
    function = namespace[name]
    function.__qualname__ = f"{cls.__qualname__}.{name}"
    function.__module__ = cls.__module__
    function.__signature__ = signature
    function.__doc__ = _doc(summary, method.__doc__)
    return function


def _last_positional_only(signature: inspect.Signature, param: inspect.Parameter) -> bool:
    kinds = [p.kind for p in signature.parameters.values()]
    after = kinds[list(signature.parameters).index(param.name) + 1 :]
    return inspect.Parameter.POSITIONAL_ONLY not in after


def _property(name: str, *, writable: bool) -> property:
    def fget(self: ThreadpoolSession) -> Any:
        return getattr(self.sync_session, name)

    def fset(self: ThreadpoolSession, value: Any) -> None:
        setattr(self.sync_session, name, value)

    static = inspect.getattr_static(Session, name, None)
    summary = f"Proxy for :attr:`sqlalchemy.orm.Session.{name}`."
    doc = _doc(summary, static.__doc__ if isinstance(static, property) else None)
    return property(fget, fset if writable else None, doc=doc)


def _doc(summary: str, original: str | None) -> str:
    if not original:
        return summary
    return f"{summary}\n\n{inspect.cleandoc(original)}"
