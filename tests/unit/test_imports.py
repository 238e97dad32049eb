"""fm's import graph has no circle: every ``import`` statement counts, also those inside functions (a lazy
import that only hides a circle is still one)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "fm").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _module_of(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:  # fm.models.registry.build_model -> fm.models.registry
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """``{module: the fm modules it imports}``; ``from pkg import sub`` imports ``pkg.sub``, not ``pkg``'s names."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                targets += [s for s in subs if s in modules] or [base]
        graph[name] = {m for t in targets if t.startswith("fm") and (m := _module_of(t, modules)) and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_fm_import_graph_has_no_circle():
    graph = import_graph()
    # it sees imports
    assert "fm.models.registry" in graph["fm.models"] and "fm.checkpoint.open" in graph["fm.export.hf"]
    found = circles(graph)
    assert not found, "\n".join("circle: " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
                                for c in found)


def test_fm_imports_no_test_code():
    """Test support (e.g. the BMTrain CPU backend, tests/support/bmtrain_cpu) is not shipped: fm never imports it."""
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{name} imports {t}" for t in targets if t == "tests" or t.startswith("tests.")]
    assert not found, found
