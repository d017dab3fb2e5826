"""qswap's modules form layers: imports point down only, no cycle, no private name crosses.

Every import counts, function-level and ``if TYPE_CHECKING:`` ones included (a cycle broken
by a function-level import is still a cycle). ``python tools/import_graph.py`` prints the
graph this checks.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools" / "import_graph.py"
_spec = importlib.util.spec_from_file_location("import_graph", TOOLS)
assert _spec is not None and _spec.loader is not None
import_graph = importlib.util.module_from_spec(_spec)
sys.modules["import_graph"] = import_graph
_spec.loader.exec_module(import_graph)

#: bottom to top; a module may import only modules of its own layer or below
LAYERS: list[tuple[str, ...]] = [
    ("exceptions", "cpu", "tree", "version", "_yaml", "progress"),
    ("pack", "trace"),
    ("registry",),
    ("config", "decompose"),
    ("quantizers",),
    ("observers",),
    ("methods", "weight_methods", "rounding"),
    ("fuse",),
    ("plan",),
    ("state", "dataflow", "slots"),
    ("bias_correction", "qat", "distributed", "backends.fake"),
    ("prepare", "calibrate", "qparams", "sequential"),
    ("persist.artifact",),
    ("backends.torch_int8", "backends.packed", "convert"),
    ("persist.model_file", "export.onnx", "report"),
    ("backends.ort",),
    ("cli", "__main__", ""),
]
#: the stages every backend shares: they reach backends only through the registry
GENERIC = ("plan", "prepare", "calibrate", "qparams", "convert", "dataflow", "slots", "state")


def _level() -> dict[str, int]:
    out = {}
    for i, names in enumerate(LAYERS):
        for name in names:
            out[f"qswap.{name}" if name else "qswap"] = i
    return out


def test_every_module_has_a_layer() -> None:
    """A new module is placed in LAYERS (package __init__ files of subpackages excepted)."""
    edges, _ = import_graph.graph()
    level = _level()
    unplaced = [
        m
        for m in edges
        if m not in level and m not in ("qswap.backends", "qswap.export", "qswap.persist")
    ]
    assert unplaced == []


def test_imports_point_down_only() -> None:
    """No module imports one from a layer above its own."""
    edges, _ = import_graph.graph()
    level = _level()
    upward = [
        f"{a} (layer {level[a]}) imports {b} (layer {level[b]})"
        for a, targets in edges.items()
        for b in targets
        if a in level and b in level and level[b] > level[a]
    ]
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    """No two modules import each other, at any depth."""
    edges, _ = import_graph.graph()
    assert import_graph.cycles(edges) == []


def test_no_private_name_crosses_a_module() -> None:
    """A name starting with '_' is imported only inside its own module or subpackage."""
    _, private = import_graph.graph()
    assert private == []


def test_generic_stages_know_no_backend() -> None:
    """plan, prepare, calibrate, convert... import no backend, exporter or model-file module."""
    edges, _ = import_graph.graph()
    leaks = [
        f"{m} imports {t}"
        for m in (f"qswap.{g}" for g in GENERIC)
        for t in edges[m]
        if t.startswith(("qswap.backends", "qswap.export", "qswap.persist.model_file"))
    ]
    assert leaks == []
