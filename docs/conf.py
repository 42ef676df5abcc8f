"""Sphinx configuration: ``sphinx-build -n -W --keep-going -b html docs docs/_build/html``.

Intersphinx reads each project's live inventory first and falls back to the small inventory
shipped in ``docs/_inventories/`` (made by ``docs/_inventories/make.py``) when the site cannot
be reached, as in an offline CI runner: an unreachable inventory is then an info line, not a
warning, and the build stays deterministic.
"""

from __future__ import annotations

import inspect
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

from sphinx.ext.intersphinx import missing_reference
from sphinx.util.docutils import SphinxDirective

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "src"))  # autodoc without installing, if need be

project = "sqlalchemy-threadpool"
author = "sqlalchemy-threadpool developers"
copyright = "2026, sqlalchemy-threadpool developers"
try:
    release = _version("sqlalchemy-threadpool")
except PackageNotFoundError:  # a checkout on sys.path, not installed
    from sqlalchemy_threadpool import __version__ as release
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_inventories", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# -- cross-references --------------------------------------------------------------------

_INV = str(DOCS / "_inventories")
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", (None, f"{_INV}/python.inv")),
    "sqlalchemy": ("https://docs.sqlalchemy.org/en/20", (None, f"{_INV}/sqlalchemy.inv")),
    "anyio": ("https://anyio.readthedocs.io/en/stable", (None, f"{_INV}/anyio.inv")),
    "trio": ("https://trio.readthedocs.io/en/stable", (None, f"{_INV}/trio.inv")),
}
intersphinx_timeout = 5  # an offline runner fails fast, then reads the shipped inventory

# -- API reference -----------------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_preserve_defaults = True

nitpicky = True
nitpick_ignore_regex = [
    # Private names in signatures: type variables, aliases, SQLAlchemy's private typing.
    ("py:.*", r"(sqlalchemy_threadpool\.)?_.*"),
    ("py:.*", r"sqlalchemy\..*\._.*"),
    ("py:class", r"(P|R|T|_R|_T|_Ts)(\.args|\.kwargs)?"),
    ("py:class|py:obj", r"typing_extensions\..*"),
    # SQLAlchemy's typing aliases in its own signatures, undocumented there too.
    ("py:class", r"OrmExecuteOptionsParameter|TypedReturnsRows|RMKeyView|ScopedRegistry"),
    ("py:class", r"sqlalchemy\.engine\.row\.Row"),  # not in SQLAlchemy's inventory
    ("py:class", r"sqlalchemy\.exc\.ResourceClosedError"),  # not in SQLAlchemy's inventory
    ("py:class", r"Offloader"),  # ThreadpoolSession.__init__: sessions come from a maker
    ("py:class", r"sqlmodel\..*|SQLModelSession"),  # SQLModel's docs publish no inventory
    # SQLModel's exec() overloads name SQLAlchemy classes by modules its inventory lacks.
    (
        "py:class",
        r"sqlalchemy\.(sql\.dml\.UpdateBase|engine\.(result\.TupleResult|cursor\.CursorResult))",
    ),
    # Engine facade signatures: SQLAlchemy typing names not in its inventory, and the maker's
    # annotations left as strings (its bind names ThreadpoolEngine for type checkers only).
    ("py:class", r"Dialect|IsolationLevel|CoreExecuteOptionsParameter|URL|Pool"),
    ("py:class", r"GuardMode|OffloadMode"),
]

#: Where annotations name a class by its defining module, the name the docs use for it.
PUBLIC_NAMES = {
    "Executable": "sqlalchemy.sql.expression.Executable",
    "Session": "sqlalchemy.orm.Session",  # annotations autodoc cannot evaluate stay strings
    "Engine": "sqlalchemy.engine.Engine",
    "Connection": "sqlalchemy.engine.Connection",
    "ThreadpoolEngine": "sqlalchemy_threadpool.ThreadpoolEngine",
    "sqlalchemy.engine.base.Connection": "sqlalchemy.engine.Connection",
    "sqlalchemy.engine.base.Engine": "sqlalchemy.engine.Engine",
    "sqlalchemy.engine.result.FrozenResult": "sqlalchemy.engine.FrozenResult",
    "sqlalchemy.engine.result.Result": "sqlalchemy.engine.Result",
    "sqlalchemy.engine.result.ScalarResult": "sqlalchemy.engine.ScalarResult",
    "sqlalchemy.engine.row.RowMapping": "sqlalchemy.engine.RowMapping",
    "sqlalchemy.orm.session.Session": "sqlalchemy.orm.Session",
    "sqlalchemy.orm.session.SessionTransaction": "sqlalchemy.orm.SessionTransaction",
}


def _public_name(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """``missing-reference``: retry ``sqlalchemy.orm.session.Session`` as its public name."""
    target = PUBLIC_NAMES.get(node.get("reftarget", ""))
    if target is None:
        return None
    node["reftarget"] = target
    return missing_reference(app, env, node, contnode)


class SessionMembers(SphinxDirective):
    """``session-members``: the members ``ThreadpoolSession`` generates from ``Session``.

    Its IO methods (``get``, ``flush``, ``commit``, ...) and plain members (``add``, ``new``,
    ...) are generated from the sync ``Session``'s own, with SQLAlchemy's docstrings, whose
    cross-references point into SQLAlchemy's own docs; autodoc skips them
    (``_skip_generated``) and this lists each with its signature and a link to SQLAlchemy's.
    """

    def run(self) -> list[Any]:
        from sqlalchemy.orm import Session

        from sqlalchemy_threadpool import ThreadpoolSession

        lines = [".. py:currentmodule:: sqlalchemy_threadpool", ""]
        for name, kind in ThreadpoolSession._generated_members.items():
            target = f":meth:`Session.{name}() <sqlalchemy.orm.Session.{name}>`"
            if kind == "offloaded":
                lines += [
                    f".. py:method:: ThreadpoolSession.{name}{_signature(getattr(Session, name))}",
                    "   :async:",
                    "",
                    f"   Awaitable {target}, run in a worker thread; a result comes back",
                    "   buffered.",
                    "",
                ]
            elif kind == "plain":
                lines += [
                    f".. py:method:: ThreadpoolSession.{name}{_signature(getattr(Session, name))}",
                    "",
                    f"   {target} itself: no IO, so a plain call.",
                    "",
                ]
            else:
                lines += [
                    f".. py:attribute:: ThreadpoolSession.{name}",
                    "",
                    f"   ``Session.{name}`` of :attr:`sync_session`: no IO.",
                    "",
                ]
        return self.parse_text_to_nodes("\n".join(lines))


def _skip_generated(app: Any, what: str, name: str, obj: Any, skip: bool, options: Any) -> Any:
    """``autodoc-skip-member``: the generated members are listed by ``session-members``."""
    from sqlalchemy_threadpool import ThreadpoolSession

    forwarded = (*ThreadpoolSession._generated_members, "object_session", "identity_key")
    if name in forwarded and getattr(ThreadpoolSession, name, None) is obj:
        return True
    return None


def _signature(method: Any) -> str:
    """The method's signature without ``self`` and without annotations (SQLAlchemy's are
    private aliases that cannot be linked)."""
    signature = inspect.signature(method)
    parameters = [
        parameter.replace(annotation=inspect.Parameter.empty)
        for parameter in list(signature.parameters.values())[1:]
        if not parameter.name.startswith("_")  # SQLAlchemy's private keywords
    ]
    return str(signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty))


def setup(app: Any) -> None:
    app.connect("missing-reference", _public_name, priority=400)
    app.add_directive("session-members", SessionMembers)
    app.connect("autodoc-skip-member", _skip_generated)


# -- HTML --------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"sqlalchemy-threadpool {release}"
html_static_path: list[str] = []
