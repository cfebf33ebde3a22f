"""House rules a tool checks: imports point down the layers, every package has its floor, and no module
imports itself through others.

LAYERS is the one place the order is written (ARCHITECTURE.md draws it). A package may import the packages
listed before it, never one after it, nor one FORBIDDEN to it; scripts and benchmarks sit above every package.
Lazy imports inside functions and imports for type checking count too: they are still a dependency.
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
# Below in the order, and still not to be imported: the DICOM node reaches the worklist through the service's hooks,
# so it runs (and is tested) without the review page.
FORBIDDEN = {"pacs": ("review",)}
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
    allowed_above = set(LAYERS[floor + 1:]) | set(ABOVE_ALL) | SCRIPTS | set(FORBIDDEN.get(package, ()))
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


def module_imports(root: Path) -> dict[str, set[str]]:
    """{module: the project modules it imports} over every package (lazy imports included)."""
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for package in packages_on_disk() - set(ABOVE_ALL) for p in (root / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from package import module
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each set of modules that import one another in a circle (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, loops = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return loops


def test_no_module_imports_itself_through_others():
    assert import_loops(module_imports(ROOT)) == []


def test_the_check_sees_an_import_loop_and_a_forbidden_import(tmp_path, monkeypatch):
    for package in ("data", "pacs", "review"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text('"""May import: core."""\n')
    (tmp_path / "data" / "cache.py").write_text("from data.manifest import Split\n")
    (tmp_path / "data" / "manifest.py").write_text("def f():\n    from data.cache import usable_cpus\n")
    (tmp_path / "pacs" / "node.py").write_text("from review.station import ReviewStation\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert import_loops(module_imports(tmp_path)) == [["data.cache", "data.manifest"]]
    assert upward_imports("pacs") == ["pacs/node.py imports review"]


def classes_by_name(root: Path) -> dict[str, list[str]]:
    """{class name: the modules that define a class of that name}, over every package."""
    found: dict[str, list[str]] = {}
    for package in sorted(packages_on_disk() - set(ABOVE_ALL)):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.parse(path.read_text(), str(path)).body:
                if isinstance(node, ast.ClassDef):
                    found.setdefault(node.name, []).append(str(path.relative_to(root)))
    return found


def test_no_two_classes_share_a_name():
    """One name, one thing: two classes named alike (a DicomFile that decodes, a DicomFile that counts frames)
    are read as one."""
    assert {name: where for name, where in classes_by_name(ROOT).items() if len(where) > 1} == {}


def many_parameters(root: Path, limit: int = 8) -> list[str]:
    """Functions with `limit` or more parameters (self and cls aside), in every package, script and benchmark."""
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in ("tests", ".venv") or parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs) if x.arg not in ("self", "cls")]
                if len(names) >= limit:
                    found.append(f"{path.relative_to(root)}: {node.name} takes {len(names)}")
    return found


def test_no_function_takes_eight_or_more_parameters():
    """ARCHITECTURE.md's rule: such a function takes the objects it needs instead."""
    assert many_parameters(ROOT) == []
