"""ThreadpoolSession has every public member of AsyncSession, with SQLAlchemy's signatures.

Compared with the installed SQLAlchemy's ``AsyncSession``, so a SQLAlchemy release that adds a
member fails here until we add it too (or list it below, with the reason).
"""

from __future__ import annotations

import inspect
import pydoc
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sqlalchemy_threadpool import ThreadpoolSession

#: AsyncSession members that have no meaning here, and why.
NOT_APPLICABLE = {
    # Deprecated since SQLAlchemy 2.0 (close_all_sessions()); ``shutdown(engine)`` ends ours.
    "close_all",
    # The AsyncEngine / AsyncConnection behind a bind: ours are sync engines, see get_bind().
    "get_async_bind",
}

#: Members written out rather than generated: they return our transaction objects, have
#: our semantics, or take AsyncSession's parameters where Session's differ (``get_bind``).
WRITTEN_OUT = {
    "__aenter__",
    "__aexit__",
    "begin",
    "begin_nested",
    "get_bind",
    "get_nested_transaction",
    "get_transaction",
    "run_sync",
}

#: Dunder members AsyncSession has that ports use (``in``, ``for``, ``async with``).
DUNDERS = ["__contains__", "__iter__", "__aenter__", "__aexit__"]


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def _methods(cls: type) -> list[str]:
    """The methods of ``cls`` (not properties or classes), dunders of :data:`DUNDERS` included."""
    names = sorted(_public(cls) - NOT_APPLICABLE) + DUNDERS
    return [
        name
        for name in names
        if not isinstance(inspect.getattr_static(cls, name), (property, type))
        and callable(getattr(cls, name))
    ]


def test_every_public_member_of_async_session_exists() -> None:
    assert _public(AsyncSession) - NOT_APPLICABLE - _public(ThreadpoolSession) == set()
    for name in DUNDERS:
        assert hasattr(ThreadpoolSession, name)


def test_members_of_one_sqlalchemy_line_exist_exactly_there() -> None:
    for name in ("merge_all", "delete_all"):  # SQLAlchemy 2.1's Session (and AsyncSession)
        assert hasattr(ThreadpoolSession, name) == hasattr(Session, name)
    for name in ("binds", "execution_options"):  # SQLAlchemy 2.1's AsyncSession
        assert hasattr(ThreadpoolSession, name) == hasattr(AsyncSession, name)


@pytest.mark.parametrize("name", _methods(AsyncSession))
def test_methods_take_async_sessions_parameters(name: str) -> None:
    """Each method accepts AsyncSession's parameters, the same way, with the same defaults.

    A keyword parameter of ours that AsyncSession lacks is allowed (it is the sync method's:
    ``get(bind_arguments=)`` on SQLAlchemy 2.0, the private ones of ``execute()``), as is a
    missing ``**kw`` that AsyncSession only passes on to the sync method. A member that is a
    coroutine function on AsyncSession is one on ours, and the other way round.
    """
    theirs_fn, ours_fn = getattr(AsyncSession, name), getattr(ThreadpoolSession, name)
    assert inspect.iscoroutinefunction(ours_fn) == inspect.iscoroutinefunction(theirs_fn)
    theirs = inspect.signature(theirs_fn).parameters
    ours = inspect.signature(ours_fn).parameters
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def shape(params: Any) -> list[tuple[Any, ...]]:
        return [(p.default,) for p in params.values() if p.kind in positional]

    assert shape(ours) == shape(theirs)
    if not name.startswith("__"):  # the exit's argument names do not matter
        assert [p for p in ours if ours[p].kind in positional] == [
            p for p in theirs if theirs[p].kind in positional
        ]
    for param in theirs.values():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            assert param.name in ours, param.name
            assert ours[param.name].kind is param.kind
            assert ours[param.name].default == param.default
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            assert any(p.kind is param.kind for p in ours.values())


@pytest.mark.parametrize(
    "name", sorted(n for n in _methods(ThreadpoolSession) if callable(getattr(Session, n, None)))
)
def test_forwarded_methods_show_sqlalchemys_signature_and_docstring(name: str) -> None:
    ours = getattr(ThreadpoolSession, name)
    if name in WRITTEN_OUT:
        return
    sync = getattr(Session, name)
    if inspect.ismethod(sync):  # a classmethod, as AsyncSession forwards it
        assert inspect.signature(ours) == inspect.signature(sync)
    elif name not in ("execute", "scalar", "scalars"):
        assert inspect.signature(ours) == inspect.signature(sync)
        assert ours.__qualname__ == f"ThreadpoolSession.{name}"
    assert ours.__doc__
    assert name in pydoc.render_doc(ours)


def test_io_members_are_coroutines_and_the_rest_plain() -> None:
    for name in ("get", "flush", "commit", "refresh", "merge", "delete", "connection", "close"):
        assert inspect.iscoroutinefunction(getattr(ThreadpoolSession, name)), name
    for name in ("add", "expunge", "expire", "is_modified", "get_bind", "in_transaction"):
        assert not inspect.iscoroutinefunction(getattr(ThreadpoolSession, name)), name
    for name in ("new", "dirty", "deleted", "identity_map", "info", "is_active", "no_autoflush"):
        assert isinstance(inspect.getattr_static(ThreadpoolSession, name), property), name


def test_a_wrong_call_raises_type_error_at_once() -> None:
    """The generated methods have the real parameters: no session or thread is needed."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        get: Any = ThreadpoolSession.get
        get(object(), object(), 1, nope=True)


def test_run_sync_is_run() -> None:
    assert ThreadpoolSession.run_sync is ThreadpoolSession.run
