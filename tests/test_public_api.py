"""The public API: ``__all__`` lists exactly what the package exports, and all of it works."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import sqlalchemy_threadpool
from sqlalchemy_threadpool import ThreadpoolSessionError


def _public_names(module: object) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }


def test_all_lists_every_public_name() -> None:
    # The package's public names are its re-exports (and __version__, which is dunder).
    assert set(sqlalchemy_threadpool.__all__) == _public_names(sqlalchemy_threadpool)


def test_all_is_sorted_and_unique() -> None:
    names = sqlalchemy_threadpool.__all__
    assert len(set(names)) == len(names)
    assert list(names) == sorted(names, key=lambda name: (not name[0].isupper(), name))


def test_every_name_in_all_exists_and_is_documented() -> None:
    for name in sqlalchemy_threadpool.__all__:
        value = getattr(sqlalchemy_threadpool, name)
        assert inspect.getdoc(value), f"{name} has no docstring"


def test_every_private_module_export_is_reexported_or_internal() -> None:
    """A name a private module puts in its ``__all__`` and that users need must be exported.

    Private modules also list internal helpers (used by sibling modules); what must reach the
    package is every exception, warning and public class or function defined in one.
    """
    exported = set(sqlalchemy_threadpool.__all__)
    path = sqlalchemy_threadpool.__path__
    for info in pkgutil.iter_modules(path, prefix="sqlalchemy_threadpool."):
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, (ThreadpoolSessionError, Warning)):
                assert name in exported, f"{info.name}.{name} is an error or warning users see"


def test_errors_share_one_base_class() -> None:
    for name in sqlalchemy_threadpool.__all__:
        value = getattr(sqlalchemy_threadpool, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, (ThreadpoolSessionError, Warning)), name
            if issubclass(value, Warning):
                assert issubclass(value, UserWarning), name


def test_reexports_keep_their_module_private() -> None:
    """Objects are defined in private modules; the package is the one place to import from."""
    for name in sqlalchemy_threadpool.__all__:
        value = getattr(sqlalchemy_threadpool, name)
        module = getattr(value, "__module__", "")
        assert module.startswith("sqlalchemy_threadpool._"), (name, module)


def test_version_matches_the_distribution() -> None:
    from importlib.metadata import version

    assert sqlalchemy_threadpool.__version__ == version("sqlalchemy-threadpool")


def test_typed_marker_is_shipped() -> None:
    from importlib.resources import files

    assert files("sqlalchemy_threadpool").joinpath("py.typed").is_file()
