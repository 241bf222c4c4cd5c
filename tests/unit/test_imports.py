"""The import graph between unmask's parts has no circle.

Nodes are subpackages (`unmask.train`) and top-level modules (`unmask.config`, `unmask.cli`, ...); an edge is any
import, at module level or inside a function (a lazy import is still a dependency). A circle means two parts cannot
be understood, tested or moved apart, so the failure names every circle with the imports that close it."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "unmask"


def _node(module: str) -> str | None:
    """`unmask.train.loop` -> `unmask.train`; `unmask.config` -> `unmask.config`; outside unmask -> None."""
    parts = module.split(".")
    if parts[0] != "unmask":
        return None
    return "unmask" if len(parts) == 1 else f"unmask.{parts[1]}"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from unmask import config` imports the module unmask.config.
            out += [(f"{base}.{alias.name}" if base == "unmask" else base, node.lineno) for alias in node.names]
    return out


def import_graph() -> dict[str, dict[str, list[str]]]:
    """{node: {imported node: ["file:line", ...]}} between different nodes."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(ROOT.rglob("*.py")):
        src = _node(_module_name(path))
        for module, line in _imported(path):
            dst = _node(module)
            if dst and dst != src:
                graph[src][dst].append(f"{path.relative_to(ROOT.parent)}:{line}")
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """One shortest circle through each node that lies on any circle (deduplicated)."""
    found: dict[frozenset, list[str]] = {}
    for start in sorted(graph):
        # Breadth-first from start's successors back to start: the shortest circle through it.
        paths = {dst: [start, dst] for dst in graph[start]}
        frontier = list(paths)
        while frontier and start not in paths:
            nxt = []
            for node in frontier:
                for dst in graph.get(node, {}):
                    if dst not in paths:
                        paths[dst] = paths[node] + [dst]
                        nxt.append(dst)
            frontier = nxt
        if start in paths:
            cycle = paths[start]
            found.setdefault(frozenset(cycle), cycle)
    return list(found.values())


def describe(cycle: list[str], graph) -> str:
    steps = [f"{a} -> {b} ({', '.join(sorted(set(graph[a][b]))[:2])})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " ; ".join(steps)


def test_the_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert "unmask.engines" in graph["unmask.train"]  # the loop's module-level import
    assert "unmask.parallel" in graph["unmask.engines"]  # the engines' lazy (function-level) imports


# What the mechanisms and the engines may build on: nothing above them (train, distill, eval, cli) ever, so no circle
# can pass through them whatever happens elsewhere. Config and model are leaves in the intended layering.
LOWER = {
    "unmask.parallel": {"unmask.config", "unmask.errors", "unmask.model", "unmask.core"},
    "unmask.engines": {"unmask.config", "unmask.errors", "unmask.model", "unmask.core", "unmask.diffusion",
                       "unmask.data", "unmask.parallel"},
}


def test_engines_and_parallel_import_only_lower_layers():
    graph = import_graph()
    bad = [f"{src} -> {dst} ({', '.join(graph[src][dst])})" for src, allowed in LOWER.items()
           for dst in graph[src] if dst not in allowed]
    assert not bad, "imports upward from the parallel mechanisms or the engines:\n" + "\n".join(bad)


def test_no_import_circle_between_unmask_parts():
    graph = import_graph()
    found = [describe(c, graph) for c in cycles(graph)]
    assert not found, f"{len(found)} import circle(s); break each by moving the shared code down a layer:\n" + \
        "\n".join(found)
