"""The shape of the package: no import circle, a CLI whose help only changes on purpose, small CLI modules."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from cli_help_snapshot import help_content

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clover"
SNAPSHOT = Path(__file__).parent / "data" / "cli_help.json"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Every clover module -> the clover modules it imports, at module level or inside a function: a circle closed
    by an import at call time is still a circle (the two modules cannot be understood or moved apart)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import x` names a module; `from .m import f` names m
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_imports_at_call_time():
    graph = import_graph()
    assert "clover.cli.common" in graph["clover.cli.prune"]
    assert "clover.prune" in graph["clover.cli.prune"]  # `from ..prune import ...` inside the command function


def test_no_import_circle_in_the_package():
    assert cycles(import_graph()) == []


def test_cli_help_is_unchanged():
    """Regenerate with `python tests/cli_help_snapshot.py > tests/data/cli_help.json` after a deliberate change."""
    assert help_content() == json.loads(SNAPSHOT.read_text())


def test_cli_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "cli").glob("*.py")}
    assert len(sizes) >= 10
    assert {name: n for name, n in sizes.items() if n >= 300} == {}
