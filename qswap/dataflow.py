"""Which values a quantized model can keep on an integer grid: facts of torch's quantized ops.

Some modules and functions run on a quantized tensor as they are and hand it on with the
same scale and zero point (ReLU, max pooling, flatten, view, dropout in eval...): an int8
value passes through them unchanged. Others combine integers (``add``, ``cat``). Both
``prepare`` (to observe each tensor once) and the integer backends (to place boundaries)
read these facts here; a counterpart class declares the same of its layer with
``keeps_grid = True``.

    >>> "torch.flatten" in GRID_FUNCTIONS
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from qswap.plan import LayerSpec
    from qswap.trace import Trace

__all__ = [
    "ADD_FUNCTIONS",
    "CAT_FUNCTIONS",
    "GRID_FUNCTIONS",
    "GRID_MODULES",
    "POOLS",
    "RELU_FUNCTIONS",
    "input_sources",
    "keeps_grid",
    "keeps_input_grid",
]


# Functions that torch runs on quantized tensors and that keep scale and zero point.
GRID_FUNCTIONS = frozenset(
    [
        "torch.flatten",
        "torch.reshape",
        "torch.squeeze",
        "torch.unsqueeze",
        "torch.relu",
        "torch.relu_",
        "torch.transpose",
        "torch.permute",
        "torch.chunk",
        "torch.split",
        "torch.nn.functional.relu",
        "torch.nn.functional.relu6",
        "torch.nn.functional.hardtanh",
        "torch.nn.functional.max_pool1d",
        "torch.nn.functional.max_pool2d",
        "torch.nn.functional.max_pool3d",
        "torch.nn.functional.adaptive_avg_pool1d",
        "torch.nn.functional.adaptive_avg_pool2d",
        "torch.nn.functional.adaptive_avg_pool3d",
        "torch.nn.functional.avg_pool1d",
        "torch.nn.functional.avg_pool2d",
        "torch.nn.functional.avg_pool3d",
        "torch.nn.functional.dropout",
        "torch.nn.functional.dropout1d",
        "torch.nn.functional.dropout2d",
        "torch.nn.functional.dropout3d",
    ]
    + [
        f"torch.Tensor.{m}"
        for m in (
            "view",
            "reshape",
            "flatten",
            "contiguous",
            "squeeze",
            "unsqueeze",
            "transpose",
            "permute",
            "relu",
            "relu_",
            "clone",
            "detach",
            "chunk",
            "split",
            "__getitem__",
            "size",
            "dim",
            "ndimension",
            "numel",
            "nelement",
            "stride",
            "is_contiguous",
            "element_size",
            "is_floating_point",
            "get_device",
            "__len__",
            "q_scale",
            "q_zero_point",
            "qscheme",
            "int_repr",
            "dequantize",
            "to",
            "cpu",
        )
    ]
)


RELU_FUNCTIONS = frozenset(
    [
        "torch.relu",
        "torch.relu_",
        "torch.nn.functional.relu",
        "torch.Tensor.relu",
        "torch.Tensor.relu_",
    ]
)


ADD_FUNCTIONS = frozenset(
    [
        "torch.add",
        "torch.Tensor.add",
        "torch.Tensor.add_",
        "torch.Tensor.__add__",
        "torch.Tensor.__iadd__",
        "torch.Tensor.__radd__",
    ]
)


CAT_FUNCTIONS = frozenset(["torch.cat", "torch.concat", "torch.concatenate"])


# Parameter-free modules whose result on a quantized tensor is exactly the quantized float
# result (they only select or clamp values). They run on integer tensors even where the plan
# left them out (e.g. the nn.Identity that fusion leaves behind, or a ReLU kept in place
# because it also runs after a skip connection), since that loses nothing.
GRID_MODULES: frozenset[type[nn.Module]] = frozenset(
    [
        nn.Identity,
        nn.ReLU,
        nn.ReLU6,
        nn.Hardtanh,
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.MaxPool3d,
        nn.Flatten,
        nn.Dropout,
    ]
)


#: pooling that averages integers: it keeps the grid (torch's quantized kernels requantize
#: to the input's scale and zero point)
POOLS: frozenset[type[nn.Module]] = frozenset(
    {
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AvgPool3d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
    }
)


def keeps_grid(counterpart: object) -> bool:
    """Whether a counterpart class runs its layer on quantized tensors as they are.

    It says so with a class attribute ``keeps_grid = True`` (the integer backends' pass-through
    counterpart of ReLU, pooling, flatten, dropout...), so the generic stages need no backend.
    """
    return bool(getattr(counterpart, "keeps_grid", False))


def input_sources(t: Trace, layers: Mapping[str, LayerSpec], producers: set[str]) -> dict[str, str]:
    """Layer -> the layer (one of ``producers``) whose quantized output it receives.

    A layer's input comes from a producer when every call of the layer gets the producer's
    output through grid-preserving calls only (ReLU, pooling, flatten, view..., and layers
    that int8 runs as they are, ``keeps_grid``, which keep their input's grid) and its
    input spec is the producer's output spec: an integer backend hands it the producer's
    int8 tensor as it is, and one set of qparams serves both.
    """
    modules, functions = GRID_MODULES | POOLS, GRID_FUNCTIONS
    producer_layer: dict[str, str] = {}
    for name, layer in layers.items():
        for path in (name, *layer.aliases):
            producer_layer[path] = name

    def source(vid: int, depth: int = 0) -> str | None:
        call = t.producer(vid)
        if call is None or depth > 16 or len(call.outputs) != 1:
            return None
        if call.kind == "module":
            name = next((producer_layer[p] for p in call.paths if p in producer_layer), None)
            if name is not None and not keeps_grid(layers[name].counterpart):
                return name if name in producers else None
            if call.module_type not in modules:  # an int8 pass-through layer is one of them
                return None
        elif call.target not in functions:
            return None
        feeds = [v for v in call.inputs if t.values[v].producer is not None or v in t.inputs]
        return source(feeds[0], depth + 1) if len(feeds) == 1 else None

    out: dict[str, str] = {}
    for name, layer in layers.items():
        calls = [c for p in (name, *layer.aliases) for c in t.calls_of(p)]
        found = {source(c.inputs[0]) if c.inputs else None for c in calls}
        if len(found) == 1 and None not in found:
            (producer,) = found
            if producer is not None and producer != name and layers[producer].output == layer.input:
                out[name] = producer
    return out


def keeps_input_grid(layer: LayerSpec) -> bool:
    """Whether ``layer``'s output needs no observer: it is on its chained input's grid.

    An int8 pass-through layer (pooling, flatten, dropout...: ``keeps_grid``) fed
    another layer's quantized output (``input_from``) hands its output on with its input's
    qparams. A ReLU keeps its own: lowering folds it into the layer before with the range
    it observed after the ReLU.
    """
    return (
        layer.input_from is not None
        and keeps_grid(layer.counterpart)
        and not issubclass(layer.module_type, nn.ReLU)
    )
