"""Packaging facts a fresh install relies on: the Python floor matches what the dependencies require, no undeclared
import (the old ``tomli`` fallback), and dependency floors that exclude known-vulnerable versions."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _floor(spec: SpecifierSet) -> Version:
    floors = [Version(s.version) for s in spec if s.operator in (">=", "==", "~=")]
    assert floors, f"no lower bound in {spec}"
    return max(floors)


def test_requires_python_is_what_the_dependencies_need():
    """Our ``requires-python`` floor is at least every installed dependency's own floor (transformers 5.x, numpy,
    pandas and matplotlib need 3.11), and this interpreter satisfies it."""
    ours = SpecifierSet(PROJECT["requires-python"])
    floor = _floor(ours)
    assert Version(".".join(map(str, sys.version_info[:3]))) in ours
    for requirement in map(Requirement, PROJECT["dependencies"]):
        needs = importlib.metadata.metadata(requirement.name).get("Requires-Python")
        if needs:
            assert floor >= _floor(SpecifierSet(needs)), (requirement.name, needs, str(ours))
    assert _floor(SpecifierSet(importlib.metadata.metadata("transformers")["Requires-Python"])) == floor, \
        "the floor is transformers' (raise it with transformers, not past it)"


def test_no_undeclared_imports_and_safe_floors():
    declared = {Requirement(r).name.lower() for r in PROJECT["dependencies"]}
    for path in (ROOT / "src").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+tomli\b", path.read_text(encoding="utf-8"), re.M), path
    assert "pyarrow" in declared
    pyarrow = next(Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "pyarrow")
    assert "14.0.0" not in pyarrow.specifier and "15.0.0" in pyarrow.specifier  # CVE-2023-47248
    assert Version(importlib.metadata.version("pyarrow")) in pyarrow.specifier
