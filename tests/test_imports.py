"""The dependency direction of the repository's Python packages, read from the source (every
import statement, those inside functions included): no cycle among the packages, and the
shared package `llamabridge` below both services, which never import each other."""

from __future__ import annotations

import ast
import graphlib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """What `path` imports, relative imports resolved: modules, and names inside modules."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # a module, or a name in `target`
    return found


def graph(level: str) -> dict[str, set[str]]:
    """Who imports whom among the repository's packages ("package") or their modules ("module")."""
    modules = {module_name(p): p for name in PACKAGES for p in (ROOT / name).rglob("*.py")}
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target in imports(path):
            while target and target not in modules:  # `from x import function` imports x
                target = target.rpartition(".")[0]
            if not target:
                continue
            a, b = (name.split(".")[0], target.split(".")[0]) if level == "package" else (name, target)
            if a != b:
                edges[a].add(b)
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_the_packages_import_each_other_in_one_direction():
    edges = graph("package")
    assert {"proxy", "collector", "llamabridge", "dashboard"} <= set(PACKAGES)
    assert cycle(edges) is None, f"import cycle among packages: {' -> '.join(cycle(edges))}"
    assert not edges["llamabridge"] & {"proxy", "collector"}, edges["llamabridge"]
    assert "collector" not in edges["proxy"] and "proxy" not in edges["collector"], (edges["proxy"], edges["collector"])
    assert not edges["dashboard"], edges["dashboard"]  # a page and its policy: it depends on nothing of ours


def test_no_module_imports_itself_round_a_cycle():
    edges = graph("module")
    assert edges["proxy.app"] and edges["collector.app"]  # the reading found the imports
    assert cycle(edges) is None, f"import cycle: {' -> '.join(cycle(edges))}"


def test_the_reading_sees_a_cycle_and_imports_inside_functions():
    """The checks above can fail: a cycle is found, and imports inside functions are read
    (collector/__main__.py imports its config only where it is used)."""
    assert cycle({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}) is not None
    assert graph("module")["collector.__main__"] >= {"llamabridge.serving", "collector.config"}
