"""The package's import graph from its source (ast): stage-to-stage arrows, module circles, private names used outside.

    python benchmarks/import_graph.py            # the report as Markdown
    python benchmarks/import_graph.py --json F   # the graph as JSON as well

Every import counts, the deferred ones inside functions too: a deferred import holds a circle together, it does not
remove it. tests/test_architecture.py enforces the floors with these functions.
"""

from __future__ import annotations

import argparse
import ast
import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"craft_deploy": ROOT / "craft_deploy", "craft_deploy.cli": ROOT / "cli"}


@dataclass(frozen=True)
class Edge:
    """One import: `source` imports `target` (a module), naming `names` from it; `deferred` if inside a function."""

    source: str
    target: str
    names: tuple[str, ...]
    deferred: bool
    line: int


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (packages as their `__init__`)."""
    out = {}
    for prefix, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            if "edge_files" in path.parts:  # shipped to the device, never imported by the package
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def edges() -> list[Edge]:
    """Every import of one craft_deploy module by another."""
    mods = modules()
    out = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        deferred_nodes = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)
            if isinstance(n, (ast.Import, ast.ImportFrom))
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, ()) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                targets = []
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{base}.{a.name}"
                    targets.append((sub, ()) if sub in mods else (base, (a.name,)))
            else:
                continue
            for target, names in targets:
                if target.startswith("craft_deploy") and target != mod:
                    while target not in mods and "." in target:
                        target = target.rsplit(".", 1)[0]
                    out.append(Edge(mod, target, names, id(node) in deferred_nodes, node.lineno))
    return out


def stage(mod: str) -> str:
    """The stage (first-level package or module) a module belongs to: `compress`, `export`, `config`, ..."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "craft_deploy"


def stage_arrows(all_edges: list[Edge]) -> dict[str, set[str]]:
    """Stage -> the stages it imports."""
    out: dict[str, set[str]] = {}
    for e in all_edges:
        a, b = stage(e.source), stage(e.target)
        if a != b:
            out.setdefault(a, set()).add(b)
    return out


def circles(all_edges: list[Edge]) -> list[list[str]]:
    """The module-level import circles: strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in all_edges:
        graph.setdefault(e.source, set()).add(e.target)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def private_uses(all_edges: list[Edge]) -> list[Edge]:
    """Imports of a private name (`_x`) from a module of another package."""
    mods, out = modules(), []
    for e in all_edges:
        pkg_of = e.target if mods[e.target].name == "__init__.py" else e.target.rsplit(".", 1)[0]
        inside = e.source == pkg_of or e.source.startswith(pkg_of + ".")
        if not inside and any(n.startswith("_") and not n.startswith("__") for n in e.names):
            out.append(e)
    return out


def report(all_edges: list[Edge]) -> str:
    """The Markdown report: stage arrows, circles, private names used outside their package."""
    arrows = stage_arrows(all_edges)
    lines = ["# Import graph", "", "| stage | imports |", "|---|---|"]
    lines += [f"| {a} | {', '.join(sorted(b))} |" for a, b in sorted(arrows.items())]
    cs = circles(all_edges)
    lines += ["", f"Module circles: {len(cs)}", ""] + [f"- {' <-> '.join(c)}" for c in cs]
    priv = private_uses(all_edges)
    lines += ["", f"Private names imported from another package: {len(priv)}", ""]
    lines += [f"- {e.source}:{e.line} imports {', '.join(e.names)} from {e.target}" for e in priv]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="also write the edges as JSON")
    args = ap.parse_args()
    all_edges = edges()
    print(report(all_edges), end="")
    if args.json:
        args.json.write_text(json.dumps([e.__dict__ for e in all_edges], indent=1))


if __name__ == "__main__":
    main()
