"""Print qswap's import graph, its cycles and the private names modules take from each other.

    python tools/import_graph.py            # edges, cycles, private imports
    python tools/import_graph.py --dot      # Graphviz

Every ``import``/``from ... import`` in ``qswap/`` counts, at any depth (function-level and
``if TYPE_CHECKING:`` imports included): a cycle broken by a function-level import is still a
cycle. ``tests/test_layers.py`` asserts what this prints.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "qswap"


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    out: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, level: int, here: str, is_package: bool) -> str:
    if level == 0:
        return name
    base = here.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import in one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    bound: dict[str, str] = {}  # local names bound to qswap modules (`import ... as ti`)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qswap":
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.module or "", node.level, name, is_package)
            if target.split(".")[0] != "qswap":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # `from qswap.backends import fake`: the module itself
                    bound[alias.asname or alias.name] = sub
                    yield sub, "", node.lineno
                else:
                    yield target, alias.name, node.lineno
    # a private name reached through a module (`ti._foo`) crosses modules as an import does
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
        ):
            yield bound[node.value.id], node.attr, node.lineno


def top(name: str) -> str:
    """The top-level unit a module belongs to: ``qswap.x`` (a subpackage counts as one unit)."""
    return ".".join(name.split(".")[:2])


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str, int]]]:
    """Module edges (package ``__init__`` re-exports left out) and cross-module private imports."""
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private: list[tuple[str, str, str, int]] = []
    for name, path in mods.items():
        for target, item, line in imports(name, path, known):
            if target == name or target not in known:
                continue
            if name == "qswap":  # the public facade imports everything: not a layer edge
                continue
            edges[name].add(target)
            if item.startswith("_") and not item.startswith("__") and top(target) != top(name):
                private.append((name, target, item, line))
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main() -> None:
    edges, private = graph()
    if "--dot" in sys.argv:
        print("digraph qswap {")
        for a in sorted(edges):
            for b in sorted(edges[a]):
                print(f'  "{a}" -> "{b}";')
        print("}")
        return
    for a in sorted(edges):
        print(f"{a} -> {', '.join(sorted(edges[a])) or '-'}")
    found = cycles(edges)
    print(f"\n{len(found)} import cycle(s)")
    for comp in found:
        print("  " + " <-> ".join(comp))
    print(f"\n{len(private)} private name(s) imported across modules")
    for name, target, item, line in private:
        print(f"  {name}:{line} takes {target}.{item}")


if __name__ == "__main__":
    main()
