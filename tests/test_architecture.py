"""The package's import graph: a line, not a circle (docs/architecture.md).

Parses every module of ``crmt_plugin`` (function-level imports included) and checks that no module
imports another in a cycle and that no module imports a private name (``_x``) of another.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set, Tuple

import crmt_plugin

PACKAGE = pathlib.Path(crmt_plugin.__file__).parent


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> Tuple[Dict[str, Set[str]], List[str]]:
    """(module -> imported package modules, private-name violations)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    private: List[str] = []

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(mod, is_package, node)
                if not target.startswith("crmt_plugin"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:  # `from . import attacks`: a module, not a name
                        dep = sub
                    else:
                        dep = owner(target)
                        if alias.name.startswith("_") and dep != mod:
                            private.append(f"{mod} imports private {alias.name} from {target}")
                    if dep and dep != mod:
                        graph[mod].add(dep)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("crmt_plugin"):
                        dep = owner(alias.name)
                        if dep and dep != mod:
                            graph[mod].add(dep)
    return graph, private


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            # a submodule importing its parent package's __init__ re-enters the package: ignore that
            # edge when the parent only re-exports (the import system resolves it before the child).
            if node.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_import_graph_has_no_cycle():
    graph, _ = import_graph()
    assert len(graph) > 10, "the walk found too few modules: the test would pass vacuously"
    assert any(graph.values()), "no import edge found: the parser is broken"
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_crosses_a_module():
    _, private = import_graph()
    assert not private, "\n".join(private)


def test_cycle_finder_finds_a_planted_cycle():
    # the checker itself can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_runtime_sits_at_the_bottom():
    graph, _ = import_graph()
    allowed = {"crmt_plugin.errors", "crmt_plugin._optional"}
    assert graph["crmt_plugin._runtime"] <= allowed, graph["crmt_plugin._runtime"]
    assert graph["crmt_plugin.errors"] == set()


def test_call_model_binds_modalities_by_name():
    import torch
    from torch import nn

    from crmt_plugin._runtime import call_model

    class Named(nn.Module):
        def forward(self, audio, image):
            return audio - image

    class Dict(nn.Module):
        def forward(self, inputs):
            return inputs["audio"] - inputs["image"]

    class Keywords(nn.Module):
        def forward(self, **inputs):
            return inputs["audio"] - inputs["image"]

    batch = {"audio": torch.full((2,), 3.0), "image": torch.ones(2)}
    for model in (Named(), Dict(), Keywords()):
        assert torch.equal(call_model(model, batch), torch.full((2,), 2.0)), type(model).__name__
    swapped = {"image": torch.ones(2), "audio": torch.full((2,), 3.0)}  # order of the dict does not matter
    assert torch.equal(call_model(Named(), swapped), torch.full((2,), 2.0))
