"""Quickstart: the forum's VGG, unedited, to real int8 with one call — no stubs, no fuse lists.

Trains Cifar_VGG (width 0.25) on scikit-learn's handwritten digits for a few seconds,
quantizes it with ``qswap.quantize(model, "x86_int8", ...)`` and prints the plan, float and
int8 accuracy, the SQNR of the int8 logits against the float logits, model size and latency.

    python examples/quickstart.py
"""

from __future__ import annotations

import io
import os
import statistics
import time

import torch
from forum_models import accuracy, load_digits_dataset, train, vgg

import qswap

QUICK = os.environ.get("QSWAP_EXAMPLE_QUICK") == "1"  # the test suite runs a shorter version


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference`` in dB."""
    noise = (reference - approx).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise))


def size_mb(model: torch.nn.Module) -> float:
    """Size of the model's serialized state_dict in MB."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6


@torch.no_grad()
def latency_ms(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    """Median wall time of one forward pass in milliseconds."""
    for _ in range(3):
        model(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    data = load_digits_dataset(seed=0)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = train(vgg(width=0.25), data, epochs=2 if QUICK else 6)
    print(f"trained Cifar_VGG (width 0.25) on digits in {time.perf_counter() - start:.1f} s")

    # 256 training images for calibration, one example input for the dataflow trace.
    calib = [data.x_train[i : i + 32] for i in range(0, 256, 32)]
    example = (data.x_test[:1],)

    plan = qswap.plan(model, "x86_int8", example_inputs=example)
    print(plan)

    qmodel = qswap.quantize(
        model, "x86_int8", calib_data=calib, example_inputs=example, progress=False
    )

    with torch.no_grad():
        ref = model(data.x_test)
        out = qmodel(data.x_test)
    print()
    print(f"float accuracy : {accuracy(model, data.x_test, data.y_test):6.2f} %")
    print(f"int8 accuracy  : {accuracy(qmodel, data.x_test, data.y_test):6.2f} %")
    print(f"SQNR int8/float: {sqnr_db(ref, out):6.2f} dB")
    print(f"size           : {size_mb(model):.2f} MB float -> {size_mb(qmodel):.2f} MB int8")
    runs = 10 if QUICK else 50
    torch.set_num_threads(1)
    x1 = data.x_test[:1]
    print(
        f"latency (1 thread, batch 1): float {latency_ms(model, x1, runs):.2f} ms, "
        f"int8 {latency_ms(qmodel, x1, runs):.2f} ms"
    )


if __name__ == "__main__":
    main()
