"""Your own quantization method: a log2 quantizer, registered by decorator, chosen per layer in YAML.

A quantizer is a ``qswap.Quantizer``: ``set_qparams(qparams)`` receives what the observer
calibrated, ``forward(x)`` fake-quantizes (float in, float out, straight-through gradient so
QAT can train through it), and ``options_model`` is a pydantic model that validates the
options a config gives it. ``@reg.register_quantizer("log2")`` makes it available by name to
every config used with ``reg``; ``configs/custom_quantizer.yaml`` picks it for the conv
weights and keeps the first conv uniform. No layer class is touched.

qswap ships a fuller ``log2`` built-in (``qswap.methods.Log2Quantizer``); this file writes a
compact one from scratch to show the protocol and registers it under the same name in its
own child registry, which shadows the default registry's entry for the models quantized with
``reg`` and nobody else's.

    python examples/custom_quantizer.py
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from forum_models import accuracy, trained_vgg
from pydantic import BaseModel, ConfigDict, Field

import qswap

QUICK = os.environ.get("QSWAP_EXAMPLE_QUICK") == "1"  # the test suite runs a shorter version
CONFIG = Path(__file__).resolve().parent / "configs" / "custom_quantizer.yaml"

reg = qswap.Registry("custom_quantizer", parent=qswap.default_registry())


class Log2Options(BaseModel):
    """Options of this log2 quantizer (validated where the config names it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    levels: int = Field(7, ge=1, le=15, description="How many powers of two below the top one.")


@reg.register_quantizer("log2")
class Log2(qswap.Quantizer):
    """Rounds each value to ``0`` or ``±2**e``, ``e`` within ``levels`` exponents of the top."""

    options_model = Log2Options

    def set_qparams(self, qparams: qswap.QParams) -> None:
        """Keep the qparams; the top exponent comes from the calibrated range (per channel)."""
        super().set_qparams(qparams)
        biggest = (qparams.quant_max - qparams.zero_point) * qparams.scale
        self.top = torch.round(torch.log2(biggest.clamp_min(2.0**-126)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qp = self.qparams
        if qp is None:  # the protocol: identity until set_qparams
            return x
        top = self.top
        if qp.axis is not None:  # per channel: one top exponent per slice along the axis
            shape = [1] * x.dim()
            shape[qp.axis] = -1
            top = top.reshape(shape)
        bottom = top - (self.options.levels - 1)  # type: ignore[attr-defined]
        with torch.no_grad():
            e = torch.round(torch.log2(x.abs().clamp_min(2.0**-126)))
            kept = (e >= bottom) & (x != 0)
            y = torch.sign(x) * torch.exp2(e.clamp(max=top)) * kept
        return x + (y - x).detach()  # straight-through gradient


def main() -> None:
    data, model, calib, example = trained_vgg(quick=QUICK)

    cfg = qswap.load_config(CONFIG, registry=reg)  # options checked by Log2Options
    plan = qswap.plan(model, cfg, example_inputs=example, registry=reg)
    print(plan.explain("features.4"))
    qmodel = qswap.quantize(
        model, cfg, calib_data=calib, example_inputs=example, registry=reg, progress=False
    )

    print()
    for name in ("features.0", "features.4", "features.8"):
        spec = qmodel._qswap.layers[name].weight  # what the plan resolved for this layer
        w = qmodel.get_submodule(name)[0].weight.detach()  # parametrized: the quantized weight
        e = torch.log2(w[w != 0].abs())
        powers = bool(torch.equal(e, e.round()))
        most = max(int(row[row != 0].abs().unique().numel()) for row in w.flatten(1))
        print(
            f"{name} ({spec.quantizer.name}, {spec.bits}-bit): nonzero weights all powers of "
            f"two: {powers}; at most {most} magnitudes per output channel"
        )
    print(f"\nfloat accuracy            : {accuracy(model, data.x_test, data.y_test):6.2f} %")
    print(f"log2 4-bit conv weights   : {accuracy(qmodel, data.x_test, data.y_test):6.2f} %")

    bad = CONFIG.read_text().replace("levels: 7", "levels: 99")
    try:
        qswap.load_config(bad, registry=reg)
    except qswap.ConfigError as exc:
        print(f"\na bad option is refused by the quantizer's own model:\n  {exc}")


if __name__ == "__main__":
    main()
