"""The package's module graph: no two skipgpt modules import each other, not even through an
import inside a function (issue 15: patch.py and checkpoint.py used to)."""

from __future__ import annotations

import ast
from pathlib import Path

import skipgpt

PACKAGE = Path(skipgpt.__file__).resolve().parent


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The skipgpt modules that ``path`` imports anywhere in its body (top level or deferred)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                out.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                out.update(a.name for a in node.names)
            elif node.level == 0 and (node.module or "").startswith("skipgpt."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("skipgpt."))
    return out & modules


def _graph() -> dict[str, set[str]]:
    files = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path of module names, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            found = visit(nxt, path + [node])
            if found:
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_skipgpt_modules():
    graph = _graph()
    assert {"patch", "checkpoint", "skip_state", "calibration", "layer"} <= set(graph)
    assert "patch" in graph["calibration"] and "skip_state" in graph["checkpoint"]  # the parser sees imports
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_state_module_builds_on_nothing_above_it():
    """State lookups live with the state: skip_state imports no module that patches, loads or
    calibrates, so each of those can import it."""
    assert _graph()["skip_state"] <= {"adapters", "config", "sparsity", "gates", "router"}
