"""4-bit weights on the forum VGG: what PTQ loses on digits, and a short QAT that wins it back.

Cifar_VGG (width 0.25), unedited, trained on scikit-learn's digits. Weights 4-bit per
channel, activations 8-bit, on the ``fake`` backend (x86 int8 kernels have no 4-bit weights).

1. PTQ: ``qswap.quantize`` with a few calibration batches.
2. QAT: the same config with ``mode: qat``. ``prepare`` keeps each conv + BatchNorm + ReLU
   trainable (BatchNorm statistics keep updating, the weight is fake-quantized as BatchNorm
   will fold it), ``calibrate`` sets the starting ranges, a short fine-tune with
   straight-through gradients follows (BatchNorm statistics frozen for the last epoch:
   ``qswap.qat.freeze_bn_stats``), and ``convert`` folds and freezes everything like PTQ.

Prints float, PTQ and QAT accuracy (and test loss) and the QAT time.

    python examples/qat_digits.py
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from forum_models import DigitsData, accuracy, trained_vgg
from torch import nn

import qswap
from qswap.qat import freeze_bn_stats

QUICK = os.environ.get("QSWAP_EXAMPLE_QUICK") == "1"  # the test suite runs a shorter version

PTQ = {
    "version": 1,
    "backend": "fake",
    "mode": "static",
    "weight": {"bits": 4, "granularity": "per_channel", "axis": 0},
}
QAT = {**PTQ, "mode": "qat"}


@torch.no_grad()
def test_loss(model: nn.Module, data: DigitsData) -> float:
    """Mean cross-entropy on the test set."""
    return float(F.cross_entropy(model(data.x_test), data.y_test))


def fine_tune(model: nn.Module, data: DigitsData, epochs: int, lr: float) -> None:
    """Adam with cosine decay; BatchNorm statistics frozen for the last epoch (freeze-BN)."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n, batch = len(data.y_train), 64
    steps = epochs * ((n + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    for epoch in range(epochs):
        if epochs > 1 and epoch == epochs - 1:
            freeze_bn_stats(model)
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            optimizer.step()
            schedule.step()
    model.eval()


def main() -> None:
    data, model, calib, example = trained_vgg(quick=QUICK)
    results = {"float": (accuracy(model, data.x_test, data.y_test), test_loss(model, data))}

    ptq = qswap.quantize(model, PTQ, calib_data=calib, example_inputs=example, progress=False)
    results["PTQ"] = (accuracy(ptq, data.x_test, data.y_test), test_loss(ptq, data))

    wall, cpu = time.perf_counter(), time.process_time()
    prepared = qswap.prepare(model, QAT, example_inputs=example)
    qswap.calibrate(prepared, calib, progress=False)
    fine_tune(prepared, data, epochs=2 if QUICK else 3, lr=5e-4)
    qat = qswap.convert(prepared)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    results["QAT"] = (accuracy(qat, data.x_test, data.y_test), test_loss(qat, data))

    print("Cifar_VGG (width 0.25) on digits, 4-bit per-channel weights, 8-bit activations")
    for name, (acc, loss) in results.items():
        gap = acc - results["float"][0]
        print(f"  {name:5s}: accuracy {acc:6.2f} % ({gap:+5.2f} vs float), test loss {loss:.4f}")
    threads = torch.get_num_threads()
    print(
        f"QAT (prepare, calibrate, fine-tune, convert): {wall:.1f} s wall, {cpu:.1f} s CPU "
        f"({threads} threads)"
    )


if __name__ == "__main__":
    main()
