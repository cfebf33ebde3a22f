"""House rules a tool checks: imports point down the layers, and every package has its floor.

LAYERS is the one place the order is written (ARCHITECTURE.md draws it). A package may import the packages
listed before it, never one after it; scripts and benchmarks sit above every package. Lazy imports inside
functions count too: they are still a dependency.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top.
LAYERS = ("core", "data", "series", "models", "evaluation", "training", "deploy", "serving", "review", "pacs",
          "archive", "ops")
ABOVE_ALL = ("benchmarks", "tests")  # may import any package; no package imports them
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}


def packages_on_disk() -> set[str]:
    return {p.parent.name for p in ROOT.glob("*/__init__.py")}


def imported_top_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def upward_imports(package: str) -> list[str]:
    floor = LAYERS.index(package)
    allowed_above = set(LAYERS[floor + 1:]) | set(ABOVE_ALL) | SCRIPTS
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(imported_top_names(path) & allowed_above):
            found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_every_package_has_a_place_in_the_layer_order():
    unplaced = packages_on_disk() - set(LAYERS) - set(ABOVE_ALL)
    assert not unplaced, f"add {sorted(unplaced)} to LAYERS in tests/test_architecture.py (and ARCHITECTURE.md)"


@pytest.mark.parametrize("package", [p for p in LAYERS if (ROOT / p / "__init__.py").is_file()])
def test_a_package_imports_only_the_layers_below_it(package):
    assert upward_imports(package) == []


def test_every_package_says_what_lives_there_and_what_it_may_import():
    for package in packages_on_disk() - {"tests"}:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
        assert doc, f"{package}/__init__.py has no docstring"
        if package in LAYERS:
            assert "May import:" in doc, f"{package}/__init__.py does not say what it may import"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule itself: a lower package importing a higher one is reported (lazy imports included)."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text('"""May import: nothing."""\n')
    (tmp_path / "core" / "bad.py").write_text("def f():\n    from deploy.registry import connect\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert upward_imports("core") == ["core/bad.py imports deploy"]
