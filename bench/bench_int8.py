"""qswap's x86 int8 against PyTorch's eager and FX int8 flows, on the same trained forum models.

Trains the forum VGG and ResNet-18 (width 0.25) on scikit-learn digits, calibrates every flow
on the same 256 training images, and prints accuracy, SQNR of int8 logits against float
logits, median latency (batch 1 and 64, 1 and 2 threads) and the ratios qswap/FX and
qswap/eager -- all in one process, so the ratios are comparable on a noisy machine.

    python bench/bench_int8.py            # full run (a few minutes on 2 cores)
    python bench/bench_int8.py --quick    # fewer epochs and repetitions (about a minute)
"""

from __future__ import annotations

import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

import peers
from forum_models import accuracy, load_digits_dataset, resnet18, train, vgg
from measure import median_ms, parse_options, write_json

import qswap
from qswap.backends.torch_int8 import describe_lowering
from qswap.convert import quantize

FLOWS = ("float", "eager", "fx", "qswap")


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref``, in dB."""
    noise = (ref - out).pow(2).mean()
    return float(10 * torch.log10(ref.pow(2).mean() / noise))


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch: int = 120) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def latency_ms(
    models: dict[str, nn.Module], x: torch.Tensor, threads: int, reps: int, warmup: int
) -> dict[str, float]:
    """Median ms per call for each model, in blocks of ``reps`` calls taken in ABBA order.

    Each round runs every model ``warmup`` + ``reps`` times in a row and keeps the median of
    the timed calls; rounds alternate the order of the models (drift hits all alike) and the
    result is the median over rounds. Calling the models one after another instead lets the
    slot a model runs in decide its time: the same FX model timed in two consecutive slots
    differed by up to 12 % on 2 cores. ``fx_again`` (FX timed a second time) shows the noise.
    """
    torch.set_num_threads(threads)
    runners = {name: functools.partial(model, x) for name, model in models.items()}
    if "fx" in runners:
        runners["fx_again"] = runners["fx"]
    names = list(runners)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(4):
        for name in names if round_index % 2 == 0 else names[::-1]:
            per_round[name].append(median_ms({name: runners[name]}, reps, warmup)[name])
    return {name: statistics.median(times) for name, times in per_round.items()}


def build_flows(
    model: nn.Module, calib: list[torch.Tensor], example: torch.Tensor
) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """The float model and the three int8 flows, with how long each took to build (s)."""
    built: dict[str, nn.Module] = {"float": model}
    seconds: dict[str, float] = {}
    steps: dict[str, Callable[[], nn.Module]] = {
        "eager": lambda: peers.eager_quantize(model, calib),
        "fx": lambda: peers.fx_quantize(model, calib, example),
        "qswap": lambda: quantize(
            model, "x86_int8", calib_data=calib, example_inputs=(example,), progress=False
        ),
    }
    for name, step in steps.items():
        start = time.perf_counter()
        built[name] = step()
        seconds[name] = time.perf_counter() - start
    return built, seconds


def main(argv: list[str] | None = None) -> int:
    options = parse_options(__doc__, argv)
    epochs, reps, warmup = options.epochs, options.reps, options.warmup

    torch.manual_seed(0)
    data = load_digits_dataset(seed=0)
    calib_images = data.x_train[:256]
    calib = list(calib_images.split(32))
    print(
        f"torch {torch.__version__}, qswap {qswap.__version__}, {platform.processor() or platform.machine()}, "
        f"engine {torch.backends.quantized.engine}, {torch.get_num_threads()} threads available; "
        f"{epochs} epochs, calibration on {len(calib_images)} training images"
    )
    results: dict[str, dict[str, object]] = {}
    with peers.torch_ao_quiet():
        for label, build in (("VGG", vgg), ("ResNet-18", resnet18)):
            torch.manual_seed(0)
            torch.set_num_threads(2)
            model = build(width=0.25)
            start = time.perf_counter()
            train(model, data, epochs=epochs)
            model.eval()
            trained_s = time.perf_counter() - start
            flows, build_s = build_flows(model, calib, data.x_test[:1])
            ref = logits(model, data.x_test)
            row: dict[str, object] = {"train_s": round(trained_s, 1), "build_s": build_s}
            for name, m in flows.items():
                out = logits(m, data.x_test)
                row[f"acc_{name}"] = accuracy(m, data.x_test, data.y_test)
                if name != "float":
                    row[f"sqnr_{name}"] = sqnr_db(ref, out)
            # what bias correction (on in the preset) adds: the same flow without it
            plain = quantize(
                model,
                {"extends": ["x86_int8"], "bias_correction": False},
                calib_data=calib,
                example_inputs=(data.x_test[:1],),
                progress=False,
            )
            row["sqnr_qswap_no_bc"] = sqnr_db(ref, logits(plain, data.x_test))
            row["acc_qswap_no_bc"] = accuracy(plain, data.x_test, data.y_test)
            for threads in (1, 2):
                for batch in (1, 64):
                    x = data.x_test[:batch]
                    row[f"ms_t{threads}_b{batch}"] = latency_ms(
                        flows, x, threads, reps[batch], warmup
                    )
            results[label] = row
            if label == "ResNet-18":
                ops = [
                    line
                    for line in describe_lowering(flows["qswap"]).splitlines()
                    if "quantized." in line
                ]
                print(
                    f"qswap ResNet-18 lowering: {len(ops)} skip connections run as quantized add_relu"
                )
    report(results)
    write_json(options.json, results)
    return 0


def report(results: dict[str, dict[str, object]]) -> None:
    print("\nQuality (test set, 360 images)")
    print(
        "| model | float acc | eager acc | FX acc | qswap acc | SQNR eager | SQNR FX | SQNR qswap "
        "| SQNR qswap without bias correction (acc) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(
            f"| {label} | {r['acc_float']:.2f} | {r['acc_eager']:.2f} | {r['acc_fx']:.2f} | "
            f"{r['acc_qswap']:.2f} | {r['sqnr_eager']:.2f} | {r['sqnr_fx']:.2f} | {r['sqnr_qswap']:.2f} "
            f"| {r['sqnr_qswap_no_bc']:.2f} ({r['acc_qswap_no_bc']:.2f}) |"
        )
    print("\nLatency, median ms per call (ratios < 1: qswap is faster; FX/FX: the noise floor)")
    print(
        "| model | threads | batch | float | eager | FX | qswap | qswap/FX | qswap/eager | FX/FX |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        for threads in (1, 2):
            for batch in (1, 64):
                ms = r[f"ms_t{threads}_b{batch}"]
                assert isinstance(ms, dict)
                print(
                    f"| {label} | {threads} | {batch} | {ms['float']:.2f} | {ms['eager']:.2f} | "
                    f"{ms['fx']:.2f} | {ms['qswap']:.2f} | {ms['qswap'] / ms['fx']:.2f} | "
                    f"{ms['qswap'] / ms['eager']:.2f} | {ms['fx_again'] / ms['fx']:.2f} |"
                )
    print("\nTime to build each int8 model (calibration included), s")
    for label, r in results.items():
        b = r["build_s"]
        assert isinstance(b, dict)
        print(f"  {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in b.items()))


if __name__ == "__main__":
    raise SystemExit(main())
