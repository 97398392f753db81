"""The lower packages (bgp/, ipip/, loadbalancer/, cni/) never import the application (fabric/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOWER = ("bgp", "ipip", "loadbalancer", "cni")


def _imports(path: Path) -> set[str]:
    mods: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


@pytest.mark.parametrize("package", LOWER)
def test_lower_package_does_not_import_the_application(package: str) -> None:
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / package).rglob("*.py")
           for m in _imports(p) if m == "fabric" or m.startswith("fabric.")}
    assert not bad, sorted(bad)


def test_the_cni_package_stays_small_at_import() -> None:
    """The agent imports cni/ for its server; nothing in it may pull in the heavy libraries."""
    heavy = {"pyroute2", "kubernetes", "pydantic", "exabgp", "yaml"}
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / "cni").rglob("*.py")
           for m in _imports(p) if m.split(".")[0] in heavy and p.name != "build.py"}
    assert not bad, sorted(bad)
