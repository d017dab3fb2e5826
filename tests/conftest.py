"""Shared fixtures: the repo's examples folder is importable (it doubles as fixtures).

Also the helpers several test modules use (``from conftest import ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
#: the plugin distributions are installed by the tests that use them, never imported here
#: (--doctest-modules would import every module it finds)
collect_ignore_glob = ["plugin_dist/*"]
EXAMPLES = REPO / "examples"

if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


def snapshot(model: nn.Module) -> dict[str, Any]:
    """What a user would notice changing on a model."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [id(p) for p in model.parameters()],
        "types": [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "training": [m.training for m in model.modules()],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()],
    }


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    """``model`` still matches its ``snapshot`` ``before``: types, parameters, modes, hooks, values."""
    after = snapshot(model)
    for key in ("types", "params", "training", "hooks"):
        assert before[key] == after[key], key
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), k


class TwoInputs(nn.Module):
    """A tiny model whose forward takes two inputs (one may come by keyword) and returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": self.a(x) + self.b(y), "a": self.a(x)}


def forum_model(build: Any) -> nn.Module:
    """A width-0.25 forum model with BatchNorm statistics from random batches, in eval mode."""
    torch.manual_seed(0)
    model: nn.Module = build(width=0.25)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32))
    return model.eval()


#: forum-model images (random, fixed): the first 32 calibrate, the rest are held out
FORUM_X = torch.rand(96, 3, 32, 32, generator=torch.Generator().manual_seed(4))
FORUM_CALIB = [FORUM_X[:32]]
#: x86 int8 with min-max activation observers: the preset's histograms are slow to calibrate
INT8_MINMAX = {"extends": ["x86_int8"], "activation": {"observer": "minmax"}}


def ort_saturates() -> bool:
    """CPU-dependent: ONNX Runtime's u8 x s8 kernels add pairs in 16 bits here (no VNNI)."""
    from qswap.export.onnx import onnxruntime_saturates

    return onnxruntime_saturates()


def fake_for_ort() -> object:
    """The fake 8-bit config whose export ONNX Runtime's integer kernels run exactly here.

    ``w8a8_minmax`` (8-bit activations, 8-bit weights) on a CPU with VNNI; without VNNI the
    same with 7-bit weights, as ``weight: {reduce_range: true}`` gives them (``qswap.cpu``).
    """
    if ort_saturates():
        return {"extends": ["w8a8_minmax"], "weight": {"reduce_range": True}}
    return "w8a8_minmax"


def quantized_forum(build: Any, config: object) -> nn.Module:
    """The ``forum_model`` quantized with ``config``, calibrated on ``FORUM_CALIB``."""
    import qswap

    return qswap.quantize(
        forum_model(build),
        config,
        calib_data=FORUM_CALIB,
        example_inputs=(FORUM_X[:1],),
        progress=False,
    )
