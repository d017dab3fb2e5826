"""Your own layer, quantized three ways — and its class is never edited.

``TransposedLinear`` keeps its weight as ``kernel``, stored ``(in, out)`` (so its output
channels are axis 1), next to a per-output ``gain``; ``Swish`` is a custom activation.

1. **Nothing to register.** qswap fake-quantizes every floating-point weight as a named slot
   (``kernel``; the 1-d ``gain`` stays float unless a rule's ``slots:`` names it) and
   inputs/outputs through hooks; a rule addresses the slot by name and sets its channel axis.
2. **A mapping.** ``@reg.register_mapping(TransposedLinear, ...)`` on a counterpart with
   ``from_float(module, spec)``: here it stores the kernel as int8 with one scale per output
   column (``slots={"kernel": 1}`` makes axis 1 the default, no rule needed).
3. **A fusion pattern.** ``reg.register_fusion((TransposedLinear, Swish), fuser)``: the dataflow
   trace finds the pair like it finds conv+bn+relu, and the fused module is quantized as one.

    python examples/custom_layer.py
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from forum_models import accuracy, load_digits_dataset
from torch import nn

import qswap

QUICK = os.environ.get("QSWAP_EXAMPLE_QUICK") == "1"  # the test suite runs a shorter version


class TransposedLinear(nn.Module):
    """A linear layer written the other way round: ``x @ kernel * gain`` with ``kernel`` (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.gain = nn.Parameter(torch.ones(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.kernel) * self.gain


class Swish(nn.Module):
    """``x * sigmoid(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class TinyNet(nn.Module):
    """8x8 digits -> TransposedLinear -> Swish -> TransposedLinear -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = TransposedLinear(64, 64)
        self.act = Swish()
        self.fc2 = TransposedLinear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------- way 2: a mapping


class Int8TransposedLinear(nn.Module):
    """Counterpart of ``TransposedLinear``: an int8 kernel with one scale per output column."""

    q_kernel: torch.Tensor
    kernel_scale: torch.Tensor

    def __init__(self, q_kernel: torch.Tensor, kernel_scale: torch.Tensor, gain: torch.Tensor):
        super().__init__()
        self.register_buffer("q_kernel", q_kernel)
        self.register_buffer("kernel_scale", kernel_scale)
        self.gain = nn.Parameter(gain.detach().clone(), requires_grad=False)

    @classmethod
    def from_float(cls, module: TransposedLinear, spec: Any) -> Int8TransposedLinear:
        """Round the float kernel with the calibrated per-column qparams (``spec.qparams``)."""
        qp = spec.qparams["kernel"]  # scale [out]: the mapping's slots put the axis at 1
        q = torch.round(module.kernel.detach() / qp.scale) + qp.zero_point
        q_kernel = q.clamp(qp.quant_min, qp.quant_max).to(torch.int8)
        return cls(q_kernel, qp.scale.clone(), module.gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ (self.q_kernel.float() * self.kernel_scale)) * self.gain


# --------------------------------------------------------------------------- way 3: fusion


class TransposedLinearSwish(TransposedLinear):
    """What the fuser makes of ``TransposedLinear`` followed by ``Swish``: one module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y * torch.sigmoid(y)


class Int8TransposedLinearSwish(Int8TransposedLinear):
    """Counterpart of the fused ``TransposedLinearSwish``: the int8 layer, then swish."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y * torch.sigmoid(y)


def fuse_transposed_linear_swish(linear: TransposedLinear, act: Swish) -> nn.Module:
    """Fuser: a ``TransposedLinearSwish`` with copies of the linear layer's parameters."""
    fused = TransposedLinearSwish(*linear.kernel.shape)
    fused.load_state_dict(linear.state_dict())
    return fused.train(linear.training)


# --------------------------------------------------------------------------- the run


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as 64 features (the 8x8 images) for train and test."""
    data = load_digits_dataset(seed=0)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x[:, :1], 8).flatten(1)

    return flat(data.x_train), data.y_train, flat(data.x_test), data.y_test


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    """A few epochs of Adam, deterministic."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for start in range(0, len(y), 64):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[start : start + 64]), y[start : start + 64])
            loss.backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(0)
    model = fit(TinyNet(), x_train, y_train, epochs=2 if QUICK else 15)
    calib = [x_train[i : i + 64] for i in range(0, 256, 64)]
    example = (x_test[:1],)
    print(f"float accuracy: {accuracy(model, x_test, y_test):.2f} %")

    # 1. Nothing registered: every float parameter is a slot; the rule gives `kernel` its axis.
    cfg = {
        "version": 1,
        "backend": "fake",
        "mode": "static",
        "fusion": "off",
        "rules": [
            {
                "match": {"type": "TransposedLinear"},
                "slots": {"kernel": {"granularity": "per_channel", "axis": 1, "bits": 4}},
            }
        ],
    }
    plan = qswap.plan(model, cfg, example_inputs=example)
    print("\n1. zero registration")
    print(plan)
    q1 = qswap.quantize(model, cfg, calib_data=calib, example_inputs=example, progress=False)
    scale = q1._qswap.layers["fc1"].qparams["kernel"].scale
    steps = q1.fc1.kernel / scale  # parametrized: reading it gives the fake-quantized kernel
    on_grid = bool(torch.allclose(steps, steps.round(), atol=1e-3))
    print(
        f"fc1.kernel: 4-bit, {scale.numel()} scales (one per output column, axis 1), "
        f"on its grid: {on_grid}, {int(steps.round().unique().numel())} distinct levels"
    )
    print(f"accuracy with 4-bit kernels, 8-bit activations: {accuracy(q1, x_test, y_test):.2f} %")

    # 2. A mapping to a counterpart of our own.
    reg = qswap.Registry("custom_layer", parent=qswap.default_registry())
    reg.register_mapping(TransposedLinear, Int8TransposedLinear, slots={"kernel": 1})
    mapped = {"version": 1, "backend": "fake", "mode": "weight_only", "fusion": "off"}
    q2 = qswap.quantize(model, mapped, calib_data=calib, registry=reg, progress=False)
    print("\n2. registered counterpart")
    print(f"fc1 is now {type(q2.fc1).__name__}, kernel dtype {q2.fc1.q_kernel.dtype}")
    print(f"accuracy with int8 kernels: {accuracy(q2, x_test, y_test):.2f} %")

    # 3. A fusion pattern made of two custom modules, found by the dataflow trace.
    reg.register_fusion((TransposedLinear, Swish), fuse_transposed_linear_swish)
    reg.register_mapping(TransposedLinearSwish, Int8TransposedLinearSwish, slots={"kernel": 1})
    fused_cfg = {"version": 1, "backend": "fake", "mode": "weight_only", "fusion": "auto"}
    plan3 = qswap.plan(model, fused_cfg, example_inputs=example, registry=reg)
    print("\n3. custom fusion pattern")
    print(plan3)
    q3 = qswap.quantize(
        model, fused_cfg, calib_data=calib, example_inputs=example, registry=reg, progress=False
    )
    print(f"fc1 is now {type(q3.fc1).__name__}, act is {type(q3.act).__name__}")
    print(f"accuracy with the fused int8 layer: {accuracy(q3, x_test, y_test):.2f} %")


if __name__ == "__main__":
    main()
