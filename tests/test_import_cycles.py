"""No import cycles among `edgeserve` and `updater` modules; every CLI command module imports
alone. A circular import is a design bug (STYLE.md), not an import-order puzzle.

The graph follows what runs when a module is first imported: module-level imports, also
inside module-level `if`/`try` blocks, but not those inside functions (they run when the
function is called, after every module has loaded) nor under `if TYPE_CHECKING:` (never
run). Importing `a.b.c` first runs `a/__init__.py` and `a/b/__init__.py`, so those are
edges too, except for the packages that contain the importing module: they are already
being imported when it runs (unless it takes a name, not a submodule, from one of them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edgeserve", "updater")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "grpc_gen" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time_statements(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run at import time: module level, through if/try/with blocks."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _import_time_statements(node.body)
            found += _import_time_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                found += _import_time_statements(block)
            for handler in node.handlers:
                found += _import_time_statements(handler.body)
        elif isinstance(node, ast.With):
            found += _import_time_statements(node.body)
    return found


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _edges(module: str, path: Path) -> set[str]:
    """The modules (of ours) that importing `module` imports first."""
    is_package = path.name == "__init__.py"
    own_packages = set(_prefixes(module)) if is_package else set(_prefixes(module)[:-1])
    targets: set[str] = set()

    def reach(name: str) -> None:
        targets.update(p for p in _prefixes(name) if p in MODULES and p not in own_packages)

    for node in _import_time_statements(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                reach(alias.name)
            continue
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        reach(base)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in MODULES:
                reach(submodule)
            elif base in own_packages:  # a name from a package that is still initialising
                targets.add(base)
    targets.discard(module)
    return targets


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_one_cycle(graph, set(c), c[0]) for c in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside the component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in previous:
                    previous[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {start}")


def import_graph() -> dict[str, set[str]]:
    return {module: _edges(module, path) for module, path in MODULES.items()}


def test_modules_import_without_cycles() -> None:
    cycles = [" -> ".join(cycle) for cycle in _cycles(import_graph())]
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(cycles)


def test_the_cycle_finder_names_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


def _command_modules() -> list[str]:
    """Modules that define CLI commands: `<package>.cli`, `*_cli`, the CLI package's own."""
    return sorted(
        name
        for name in MODULES
        if name.startswith("edgeserve.")
        and any(part == "cli" or part.endswith("_cli") for part in name.split(".")[1:])
    )


@pytest.mark.parametrize("module", _command_modules())
def test_command_module_imports_alone(module: str) -> None:
    """In a fresh interpreter, so that nothing imported before hides a cycle."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"import {module} alone failed:\n{done.stderr[-2000:]}"
