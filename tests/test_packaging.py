"""Packaging: the lowest versions CI tests (``.ci/lowest.txt``) are the ones pyproject declares.

``.ci/run`` runs the suite a second time with the runtime dependencies pinned by
``.ci/lowest.txt``; if a lower bound in ``[project].dependencies`` moved without the pins (or the
other way round), CI would test versions that are not the declared floor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def _declared_lower_bounds() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds: dict[str, Version] = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{line!r} needs exactly one `>=` lower bound for CI to test"
        bounds[canonicalize_name(requirement.name)] = Version(lower[0])
    return bounds


def _lowest_pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in (ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        assert len(exact) == 1, f".ci/lowest.txt: {raw!r} must pin one version with `==`"
        pins[canonicalize_name(requirement.name)] = Version(exact[0])
    return pins


def test_lowest_pins_equal_the_declared_lower_bounds() -> None:
    assert _lowest_pins() == _declared_lower_bounds()


def test_declared_sqlalchemy_range_spans_both_lines() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (sqlalchemy,) = [
        Requirement(line)
        for line in project["dependencies"]
        if canonicalize_name(Requirement(line).name) == "sqlalchemy"
    ]
    assert "2.0.22" in sqlalchemy.specifier  # Session.get_one() and Session.reset()
    assert "2.1.0" in sqlalchemy.specifier
    assert "2.0.21" not in sqlalchemy.specifier
