"""No import cycle among mbdl_fast's modules: every import, at module level or inside a function, is an edge.

The graph is read from the source (``ast``), not from ``sys.modules``: a function-local import that would close a
cycle is still an edge. ``from pkg import name`` is an edge to ``pkg.name`` where that is a module, else to ``pkg``
(its ``__init__``). A backend-table entry ``"mbdl_fast.<module>:<function>"`` (an implementation loaded on first use,
mbdl_fast.backends.register) is an edge too. Importing a submodule runs its parent packages' ``__init__``; that is
Python's doing, not an edge.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from pathlib import Path

PACKAGE = "mbdl_fast"
_TABLE_ENTRY = re.compile(r"^(mbdl_fast(?:\.\w+)+):\w+$")

# Edges allowed to close a cycle, as (importer, imported): none. An entry here must name a real edge of a real
# cycle (the test fails if one outlives its cycle).
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def _package_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations, spec
    return Path(next(iter(spec.submodule_search_locations)))


def _modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of the package (kernels/ too: installed or symlinked in)."""
    found = {}
    for folder, _, files in os.walk(root, followlinks=True):
        rel = Path(folder).relative_to(root)
        if "__pycache__" in rel.parts:
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            parts = [PACKAGE, *rel.parts] + ([] if name == "__init__.py" else [name[:-3]])
            found[".".join(parts)] = Path(folder) / name
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of ``modules``."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules(_package_root())
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [_owner(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, is_package, node)
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    targets.append(full if full in modules else _owner(source, modules))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                match = _TABLE_ENTRY.match(node.value)
                targets = [_owner(match.group(1), modules)] if match else []
            graph[module].update(t for t in targets if t is not None and t != module)
    return graph


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (each one holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    inside = set(component)
    edges = sorted((a, b) for a in component for b in graph[a] if b in inside)
    return "\n    ".join(f"{a} -> {b}" for a, b in edges)


def test_the_walk_sees_the_package_and_function_level_imports():
    graph = import_graph()
    assert {"mbdl_fast.backends", "mbdl_fast.ops.dc_step", "mbdl_fast.physics.mri"} <= set(graph)
    assert "mbdl_fast.ops.dc_step" in graph["mbdl_fast.physics.mri"]
    # A backend-table entry: loaded on first use, an edge all the same.
    assert "mbdl_fast.kernels.mri_dc" in graph["mbdl_fast.ops.dc_step"]
    # Function-level imports count: mbdl_fast.cli imports its commands inside functions.
    assert graph["mbdl_fast.cli"], "mbdl_fast.cli imports nothing of mbdl_fast?"


def test_no_import_cycle_among_mbdl_fast_modules():
    graph = import_graph()
    stale = sorted(edge for edge in KNOWN_CYCLE_EDGES if edge[1] not in graph.get(edge[0], ()))
    assert not stale, f"KNOWN_CYCLE_EDGES lists edges that no longer exist; remove them: {stale}"
    allowed = {a: {b for b in targets if (a, b) not in KNOWN_CYCLE_EDGES} for a, targets in graph.items()}
    cycles = _strongly_connected(allowed)
    assert not cycles, "import cycles among mbdl_fast modules:\n" + "\n".join(
        f"  {' <-> '.join(c)}:\n    {_describe(allowed, c)}" for c in cycles
    )
