"""Cost of preparing a model for int8 against its size: qswap against PyTorch's eager and FX flows.

Plain deep models of 100, 1000 and 4000 modules (``Sequential`` of Linear(16, 16) + ReLU
blocks, and of Conv2d + BatchNorm2d + ReLU blocks), min-max observers everywhere, x86
int8. Times fuse + prepare + convert per module (one small calibration batch in between
is timed separately), all in one process.

    python bench/bench_prepare.py           # FX up to 1000 modules (it grows quadratically)
    python bench/bench_prepare.py --full    # FX at 4000 modules too (minutes)
    python bench/bench_prepare.py --quick   # 100 and 1000 modules only

Each flow runs ``--repeat`` times (default 3) per size and the fastest run counts, so a
busy machine disturbs the ratios less.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers

from qswap.convert import convert
from qswap.observe import calibrate, prepare

with peers.torch_ao_quiet():
    import torch.ao.quantization as tq
    from torch.ao.quantization import quantize_fx

QSWAP_MINMAX = {
    "version": 1,
    "backend": "x86",
    "activation": {
        "bits": 8,
        "signed": False,
        "scheme": "affine",
        "reduce_range": True,
        "observer": "minmax",
    },
    "weight": {
        "bits": 8,
        "signed": True,
        "scheme": "symmetric",
        "granularity": "per_channel",
        "axis": 0,
        "observer": "minmax",
    },
}


def torch_minmax_qconfig() -> tq.QConfig:
    """PyTorch's x86 defaults with min-max instead of histogram activation observers."""
    return tq.QConfig(
        activation=tq.MinMaxObserver.with_args(reduce_range=True),
        weight=tq.default_per_channel_weight_observer,
    )


def linear_relu(modules: int) -> tuple[nn.Module, torch.Tensor, list[list[str]]]:
    """``modules`` leaf modules: Linear(16, 16) + ReLU blocks; with eager's fuse lists."""
    layers: list[nn.Module] = []
    for _ in range(modules // 2):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    fuse = [[str(i), str(i + 1)] for i in range(0, len(layers), 2)]
    return nn.Sequential(*layers).eval(), torch.randn(2, 16), fuse


def conv_bn_relu(modules: int) -> tuple[nn.Module, torch.Tensor, list[list[str]]]:
    """``modules`` leaf modules: Conv2d(4, 4, 3) + BatchNorm2d + ReLU blocks; with fuse lists."""
    layers: list[nn.Module] = []
    for _ in range(modules // 3):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    fuse = [[str(i), str(i + 1), str(i + 2)] for i in range(0, len(layers), 3)]
    return nn.Sequential(*layers).eval(), torch.randn(1, 4, 6, 6), fuse


def time_qswap(model: nn.Module, x: torch.Tensor, fuse: list[list[str]]) -> tuple[float, float]:
    """(plan + fuse + prepare + convert seconds, calibration seconds) for qswap."""
    start = time.perf_counter()
    prepared = prepare(model, QSWAP_MINMAX, example_inputs=(x,))
    prep = time.perf_counter() - start
    start = time.perf_counter()
    calibrate(prepared, [x], progress=False)
    calib = time.perf_counter() - start
    start = time.perf_counter()
    convert(prepared, inplace=True)
    return prep + time.perf_counter() - start, calib


def time_eager(model: nn.Module, x: torch.Tensor, fuse: list[list[str]]) -> tuple[float, float]:
    """(fuse + prepare + convert seconds, calibration seconds) for PyTorch eager mode."""
    with peers.torch_ao_quiet():
        start = time.perf_counter()
        work = copy.deepcopy(model)
        work = tq.fuse_modules(work, fuse)
        stubbed = peers.Stubbed(work).eval()
        stubbed.qconfig = torch_minmax_qconfig()  # type: ignore[assignment]
        prepared = tq.prepare(stubbed)
        prep = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            prepared(x)
        calib = time.perf_counter() - start
        start = time.perf_counter()
        tq.convert(prepared)
        return prep + time.perf_counter() - start, calib


def time_fx(model: nn.Module, x: torch.Tensor, fuse: list[list[str]]) -> tuple[float, float]:
    """(prepare_fx + convert_fx seconds, calibration seconds) for PyTorch FX."""
    with peers.torch_ao_quiet():
        start = time.perf_counter()
        work = copy.deepcopy(model)
        mapping = tq.QConfigMapping().set_global(torch_minmax_qconfig())
        prepared = quantize_fx.prepare_fx(work, mapping, (x,))
        prep = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            prepared(x)
        calib = time.perf_counter() - start
        start = time.perf_counter()
        quantize_fx.convert_fx(prepared)
        return prep + time.perf_counter() - start, calib


FLOWS: dict[str, Callable[[nn.Module, torch.Tensor, list[list[str]]], tuple[float, float]]] = {
    "qswap": time_qswap,
    "eager": time_eager,
    "fx": time_fx,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="run FX at 4000 modules too")
    parser.add_argument("--quick", action="store_true", help="100 and 1000 modules only")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per flow and size; the fastest counts"
    )
    args = parser.parse_args(argv)
    sizes = (100, 1000) if args.quick else (100, 1000, 4000)
    torch.set_num_threads(1)
    for flow in FLOWS.values():  # first use imports and compiles things: not part of the cost
        flow(*linear_relu(4))
    print(
        f"fuse + prepare + convert, ms per module, fastest of {args.repeat} runs "
        "(calibration of one batch not included)"
    )
    print("| model | modules | qswap | eager | FX | qswap/eager | qswap total s |")
    print("|---|---|---|---|---|---|---|")
    for label, build in (("linear-relu", linear_relu), ("conv-bn-relu", conv_bn_relu)):
        for size in sizes:
            torch.manual_seed(0)
            model, x, fuse = build(size)
            n = sum(1 for _ in model.children())
            per: dict[str, float] = {}
            for name, flow in FLOWS.items():
                if name == "fx" and size > 1000 and not args.full:
                    continue
                repeat = 1 if name == "fx" and size > 1000 else max(1, args.repeat)
                best = float("inf")
                for _ in range(repeat):  # the fastest run: the least disturbed by the machine
                    gc.collect()
                    best = min(best, flow(model, x, fuse)[0])
                per[name] = best / n * 1e3
            fx = f"{per['fx']:.3f}" if "fx" in per else "skipped"
            print(
                f"| {label} | {n} | {per['qswap']:.3f} | {per['eager']:.3f} | {fx} | "
                f"{per['qswap'] / per['eager']:.2f} | {per['qswap'] * n / 1e3:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
