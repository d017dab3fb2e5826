"""Two host frameworks embed qswap in one process and never see each other's entries.

Host A owns a child of the default registry, fills it from its own YAML pack
(``embedding_pack.yaml``: a custom layer, its counterpart and a fusion pattern) and
registers a quantization function in one line. Host B, in the same process, owns a
sibling registry and sees none of it. The default registry stays frozen throughout.

Run: ``python examples/embedding.py`` (prints what each host sees; exits 1 if isolation breaks).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qswap.exceptions import FrozenRegistryError
from qswap.registry import Registry, default_registry

__all__ = [
    "HostFramework",
    "QuantizedScaledLinear",
    "ScaledLinear",
    "ScaledLinearReLU",
    "fuse_scaled_linear_relu",
    "main",
    "round_to_power_of_two",
]

PACK = Path(__file__).resolve().with_name("embedding_pack.yaml")


class ScaledLinear(nn.Module):
    """Host A's own layer: a linear map stored as ``kernel`` with a learned per-output ``gain``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.gain = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.kernel) * self.gain


class ScaledLinearReLU(ScaledLinear):
    """What host A's fuser makes of ``ScaledLinear`` followed by ``ReLU``: one module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class QuantizedScaledLinear(nn.Module):
    """Host A's counterpart: the kernel as symmetric per-row integers, dequantized on the fly."""

    def __init__(
        self, q_kernel: torch.Tensor, row_scale: torch.Tensor, gain: torch.Tensor, relu: bool
    ) -> None:
        super().__init__()
        self.register_buffer("q_kernel", q_kernel)
        self.register_buffer("row_scale", row_scale)
        self.register_buffer("gain", gain)
        self.relu = relu

    @classmethod
    def from_float(cls, module: nn.Module, spec: Any) -> QuantizedScaledLinear:
        """Quantize ``module.kernel`` with the bits of the spec's ``kernel`` slot (8 if unset)."""
        slot = spec.slots.get("kernel") if spec is not None else None
        bits = slot.bits if slot is not None else 8
        qmax = 2 ** (bits - 1) - 1
        kernel = module.kernel.detach()
        scale = kernel.abs().amax(dim=1).clamp_min(1e-12) / qmax
        q = torch.round(kernel / scale[:, None]).clamp(-qmax - 1, qmax).to(torch.int16)
        return cls(q, scale, module.gain.detach().clone(), isinstance(module, ScaledLinearReLU))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.q_kernel.float() * self.row_scale[:, None]) * self.gain
        return F.relu(y) if self.relu else y


def fuse_scaled_linear_relu(layer: nn.Module, relu: nn.Module) -> nn.Module:
    """Host A's fuser: ``ScaledLinear`` + ``ReLU`` -> one ``ScaledLinearReLU`` (same parameters)."""
    fused = ScaledLinearReLU(layer.kernel.shape[1], layer.kernel.shape[0])
    fused.load_state_dict(layer.state_dict())
    return fused


def round_to_power_of_two(x: torch.Tensor) -> torch.Tensor:
    """Host A's quantization method, a plain function: signed powers of two (and zero)."""
    return torch.sign(x) * torch.exp2(torch.round(torch.log2(x.abs().clamp_min(2.0**-8))))


class HostFramework:
    """A library that embeds qswap: it owns a child registry and never writes to the default."""

    def __init__(self, name: str, pack: Path | None = None) -> None:
        self.registry = Registry(name, parent=default_registry())
        if pack is not None:
            # Relative dotted paths in the pack (".ScaledLinear") resolve against this module.
            self.registry.load_pack(pack, package=__name__)


def main() -> int:
    """Build both hosts, show what each one sees and does, and return 1 if either sees the other."""
    torch.manual_seed(0)
    host_a = HostFramework("host_a", pack=PACK)
    host_a.registry.register_quantizer("host_a_pow2", round_to_power_of_two)
    host_b = HostFramework("host_b")

    for host in (host_a, host_b):
        reg = host.registry
        print(f"== {reg.name} ==")
        print("entries matching *Scaled*:", reg.list("*Scaled*"))
        print("quantizers:", reg.names("quantizer"))
        print(reg.explain(ScaledLinear, backend="fake"))
        print()

    # The same float model, quantized through each host's registry.
    model = nn.Sequential(ScaledLinear(16, 8), nn.ReLU(), ScaledLinear(8, 4)).eval()
    batches = [torch.randn(32, 16) for _ in range(4)]
    x = batches[0]
    with torch.no_grad():
        reference = model(x)
    swapped: dict[str, list[str]] = {}
    for host in (host_a, host_b):
        qmodel = qswap_quantize(model, batches, host.registry)
        with torch.no_grad():
            error = (qmodel(x) - reference).abs().max().item()
        swapped[host.registry.name] = [type(m).__name__ for m in qmodel.children()]
        print(
            f"{host.registry.name}: quantized layers {swapped[host.registry.name]}, "
            f"max |quantized - float| = {error:.4f}"
        )

    try:
        default_registry().register_quantizer("host_a_pow2", round_to_power_of_two)
    except FrozenRegistryError as exc:
        print("writing to the default registry is refused:", str(exc).split(". ")[0])

    problems = []
    if "QuantizedScaledLinear" not in swapped["host_a"]:
        problems.append("host_a did not swap ScaledLinear for its counterpart")
    if "QuantizedScaledLinear" in swapped["host_b"]:
        problems.append("host_b used host_a's mapping")
    if host_b.registry.find_mapping(ScaledLinear, "fake") is not None:
        problems.append("host_b sees host_a's mapping")
    if "host_a_pow2" in host_b.registry.names("quantizer"):
        problems.append("host_b sees host_a's quantizer")
    if default_registry().find_mapping(ScaledLinear, "fake") is not None:
        problems.append("the default registry was changed")
    for problem in problems:
        print("ERROR:", problem, file=sys.stderr)
    return 1 if problems else 0


def qswap_quantize(model: nn.Module, batches: list[torch.Tensor], registry: Registry) -> nn.Module:
    """Quantize ``model`` (w8a8, min-max) with ``registry``; the float model is left untouched."""
    from qswap.convert import quantize

    return quantize(
        model, "w8a8_minmax", calib_data=batches, example_inputs=(batches[0],), registry=registry
    )


if __name__ == "__main__":
    sys.exit(main())
