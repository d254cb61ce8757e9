"""faceid/ has no import circle: no module imports, at module level or inside a function, one that
imports it back (directly or through others)."""

from __future__ import annotations

import ast
from pathlib import Path

import faceid

PACKAGE = Path(faceid.__file__).parent


def _graph() -> dict[str, set[str]]:
    """Each faceid module -> the faceid modules it imports anywhere in its source."""
    modules = {f"faceid.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if not node.level else f"faceid.{node.module}"
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of `graph` (its modules in order), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_the_graph_sees_function_level_imports():
    graph = _graph()
    assert "faceid.trainer" in graph["faceid.cli_train"]  # imported inside train_main only
    assert "faceid.cli_train" in graph["faceid.train"]  # under `if __name__ == "__main__"`


def test_no_import_circle():
    assert _cycle(_graph()) == []
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
