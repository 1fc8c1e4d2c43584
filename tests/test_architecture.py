"""The package map of kd/README.md holds: imports go one way, at the top of modules.

The import graph is read with ``ast`` from every module of ``kd``, counting imports inside
functions too, so a cycle held together by a function-local import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

KD = ROOT / "kd"
# Layers, top to bottom: a module may import its own layer and the layers before it.
# kd.units (number formatting) comes first: it imports nothing of kd and every layer may use it.
LAYERS = ("kd.units", "kd.errors", "kd.config", "kd.data", "kd.core", "kd.tools", "kd.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in KD.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The kd module an imported name lives in (``kd.core.trainer.Trainer`` → its module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> list[tuple[str, int, bool]]:
    """``(imported kd module, line, inside a function)`` for each kd import of ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    local = {id(node) for f in ast.walk(tree)
             if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        targets = {resolve(n) for n in names if n == "kd" or n.startswith("kd.")}
        for target in sorted(t for t in targets if t and t != module and t != "kd"):
            found.append((target, node.lineno, id(node) in local))
    return found


GRAPH = {m: imports(m) for m in MODULES}


def layer(module: str) -> int:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return -1  # kd itself (the version)


def test_no_import_cycles() -> None:
    edges = {m: {t for t, _, _ in GRAPH[m]} for m in GRAPH}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append([*path[path.index(t):], t])
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_kd_modules_are_imported_at_the_top() -> None:
    local = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}"
             for m in GRAPH for t, line, inside in GRAPH[m] if inside]
    assert local == []


def test_imports_follow_the_layers_of_the_package_map() -> None:
    upward = [f"{m} imports {t} (line {line})" for m in GRAPH for t, line, _ in GRAPH[m]
              if layer(t) > layer(m)]
    assert upward == []


def test_tools_use_public_names_of_the_core_only() -> None:
    private = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kd"):
                private += [f"{m} imports {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and a.name != "__version__"]
    assert private == []


def test_the_package_map_names_every_subpackage() -> None:
    readme = (KD / "README.md").read_text()
    for prefix in LAYERS:
        assert f"`{prefix}`" in readme
