"""A backend of your own: int8 weights run by ``torch._weight_int8pack_mm``, chosen from YAML.

qswap's stages know no backend by name: a backend is a ``qswap.Backend`` in a registry -- a
name, the bits it runs, what it cannot run (``check``) and how it lowers (``lower``, a
``qswap.registry.Lowering``). This one stores each Linear's weight as int8 with one scale per
output channel and multiplies with torch's weight-only int8 kernel; activations stay float.
Registered in Python here (``backends:`` in a YAML pack declares the same), selected by a
config's ``backend: int8pack``, planned, calibrated and converted like the built-ins.

    python examples/custom_backend.py
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import qswap
from qswap.tree import replace_module


class Int8PackLinear(nn.Module):
    """``nn.Linear`` with an int8 weight (one scale per output channel) and float activations."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    @classmethod
    def from_float(cls, module: nn.Module, spec: Any) -> Int8PackLinear:
        """Round the float weight onto the grid calibration chose (``spec.qparams``)."""
        assert isinstance(module, nn.Linear)
        qp = spec.qparams["weight"]
        scales = qp.scale.reshape(-1).float()
        q = torch.round(module.weight.detach() / scales[:, None]).clamp(qp.quant_min, qp.quant_max)
        return cls(q.to(torch.int8), scales, module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        y = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def lower(
    model: nn.Module,
    layers: Mapping[str, Any],
    example_args: tuple[Any, ...],
    example_kwargs: Mapping[str, Any],
) -> nn.Module:
    """The backend's lowering: each of its layers becomes an ``Int8PackLinear``, at all its paths."""
    for name, spec in layers.items():
        new = Int8PackLinear.from_float(model.get_submodule(name), spec)
        model = replace_module(model, (name, *spec.aliases), new)
    return model


def check(layer: Any) -> str | None:
    """What this kernel cannot run: only per-channel (axis 0) weights, and no activations."""
    w = layer.weight
    if layer.mode != "weight_only":
        return "int8pack runs weight-only layers (activations stay float)"
    if w is None or w.granularity != "per_channel" or (w.axis or 0) != 0 or not w.signed:
        return "int8pack needs signed per-channel (axis 0) int8 weights"
    return None


def registry() -> qswap.Registry:
    """A registry with the ``int8pack`` backend and its one mapping, over the default one."""
    reg = qswap.Registry("int8pack", parent=qswap.default_registry())
    reg.register_backend(
        qswap.Backend(
            "int8pack",
            description="int8 weights through torch._weight_int8pack_mm; float activations",
            integer=True,
            weight_bits=(8, 8),
            activation_bits=(2, 16),
            lower=lower,
            check=check,
        )
    )
    reg.register_mapping(nn.Linear, Int8PackLinear, backend="int8pack", slots={"weight": 0})
    return reg


CONFIG = """
version: 1
backend: int8pack          # the backend registered above, chosen like a built-in
mode: weight_only
weight: {bits: 8, signed: true, scheme: symmetric, granularity: per_channel, axis: 0}
"""


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10)).eval()
    reg = registry()
    cfg = qswap.load_config(CONFIG, registry=reg)
    print(qswap.plan(model, cfg, registry=reg))
    qmodel = qswap.quantize(model, cfg, registry=reg)  # weight-only: no calibration data
    x = torch.randn(32, 64)
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    after = sum(t.numel() * t.element_size() for t in qmodel.state_dict().values())
    print(f"layers: {[type(m).__name__ for m in qmodel]}")
    print(f"output SQNR {sqnr:.1f} dB; {before} -> {after} bytes")


if __name__ == "__main__":
    main()
