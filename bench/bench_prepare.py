"""Cost of preparing a model for int8 against its size: qswap against PyTorch's eager and FX flows.

Plain deep models of 100, 1000 and 4000 modules (``Sequential`` of Linear(16, 16) + ReLU
blocks, and of Conv2d + BatchNorm2d + ReLU blocks), min-max observers everywhere, x86
int8. Times fuse + prepare + convert per module (one small calibration batch in between
is timed separately), all in one process.

    python bench/bench_prepare.py           # FX up to 1000 modules (it grows quadratically)
    python bench/bench_prepare.py --full    # FX at 4000 modules too (minutes)
    python bench/bench_prepare.py --quick   # 100 and 1000 modules only

The ``floor`` column makes only the torch calls that a flow built the way qswap is
(``parametrize`` on weights, hooks on activations, torch.ao's int8 modules, the user's
model copied) cannot avoid, with no decisions, checks or bookkeeping of its own: a
lower bound for qswap's design, printed beside it.

Each flow runs ``--repeat`` times (default 3) per size, in rounds of all flows in turn, and
its fastest run counts, so a busy machine disturbs the ratios less.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers

from qswap.backends import torch_int8
from qswap.calibrate import calibrate
from qswap.convert import convert
from qswap.plan import gc_paused
from qswap.prepare import prepare
from qswap.state import copy_model

with peers.torch_ao_quiet():
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.quantized as nniq
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


def _timed(
    build: Callable[[], Any], calibrate_it: Callable[[Any], object], finish: Callable[[Any], object]
) -> tuple[float, float]:
    """(``build`` + ``finish`` seconds, ``calibrate_it`` seconds): one flow's phases, timed."""
    start = time.perf_counter()
    prepared = build()
    prep = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        calibrate_it(prepared)
    calib = time.perf_counter() - start
    start = time.perf_counter()
    finish(prepared)
    return prep + time.perf_counter() - start, calib


def time_qswap(model: nn.Module, x: torch.Tensor, fuse: list[list[str]]) -> tuple[float, float]:
    """(plan + fuse + prepare + convert seconds, calibration seconds) for qswap."""
    return _timed(
        lambda: prepare(model, QSWAP_MINMAX, example_inputs=(x,)),
        lambda prepared: calibrate(prepared, [x], progress=False),
        lambda prepared: convert(prepared, inplace=True),
    )


def time_eager(model: nn.Module, x: torch.Tensor, fuse: list[list[str]]) -> tuple[float, float]:
    """(fuse + prepare + convert seconds, calibration seconds) for PyTorch eager mode."""

    def build() -> nn.Module:
        work = tq.fuse_modules(copy.deepcopy(model), fuse)
        stubbed = peers.Stubbed(work).eval()
        stubbed.qconfig = torch_minmax_qconfig()  # type: ignore[assignment]
        return tq.prepare(stubbed)

    with peers.torch_ao_quiet():
        return _timed(build, lambda prepared: prepared(x), tq.convert)


def time_fx(model: nn.Module, x: torch.Tensor, fuse: list[list[str]]) -> tuple[float, float]:
    """(prepare_fx + convert_fx seconds, calibration seconds) for PyTorch FX."""
    mapping = tq.QConfigMapping().set_global(torch_minmax_qconfig())
    with peers.torch_ao_quiet():
        return _timed(
            lambda: quantize_fx.prepare_fx(copy.deepcopy(model), mapping, (x,)),
            lambda prepared: prepared(x),
            quantize_fx.convert_fx,
        )


class _RangeObserver(nn.Module):
    """The least an activation observer is: a module with min and max buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def hook(self, module: nn.Module, args: object, output: torch.Tensor) -> None:
        self.min_val, self.max_val = torch.aminmax(output.detach())


def time_floor(model: nn.Module, x: torch.Tensor, fuse: list[list[str]]) -> tuple[float, float]:
    """(seconds, calibration seconds) of the torch calls qswap's design must make, alone.

    One forward with a pre- and a post-hook on every leaf (the trace), a copy
    (qswap's structural copy, the fastest one here), fusion with torch's own helpers, one
    ``register_parametrization`` per weight and one hooked observer per layer output;
    after calibration, each layer's weight quantized per channel and packed once into
    torch.ao's int8 module. No rule cascade, dataflow analysis, checks or clean-up. The
    cyclic garbage collector pauses throughout, and its catch-up comes after the clock
    stops: a floor on the low side.
    """
    layers: list[tuple[int, nn.Module, _RangeObserver]] = []

    def build() -> nn.Module:
        handles = []
        for leaf in model.children():
            handles.append(leaf.register_forward_pre_hook(lambda m, a: None))
            handles.append(leaf.register_forward_hook(lambda m, a, y: None))
        with torch.no_grad():
            model(x)
        for handle in handles:
            handle.remove()
        work = copy_model(model)
        for group in fuse:
            first, *rest = (int(i) for i in group)
            core = work[first]
            bn = work[first + 1]
            if isinstance(bn, nn.BatchNorm2d):  # folded into the copy's own conv, as qswap does
                core.weight, core.bias = fuse_conv_bn_weights(
                    core.weight,
                    core.bias,
                    bn.running_mean,
                    bn.running_var,
                    bn.eps,
                    bn.weight,
                    bn.bias,
                )
            relu = work[first + len(rest)]
            fused = (
                nni.ConvReLU2d(core, relu)
                if isinstance(core, nn.Conv2d)
                else nni.LinearReLU(core, relu)
            )
            work[first] = fused
            for i in rest:
                work[i] = nn.Identity()
            parametrize.register_parametrization(core, "weight", _RangeObserver(), unsafe=True)
            observer = _RangeObserver()
            fused.add_module("observer", observer)
            fused.register_forward_hook(observer.hook)
            layers.append((first, core, observer))
        return work

    def finish(work: nn.Module) -> None:
        for index, core, observer in layers:
            weight = core.parametrizations.weight.original.detach()
            rows = weight.reshape(weight.shape[0], -1)
            scale = torch.maximum(rows.amin(1).neg(), rows.amax(1)) / 127.5
            zero = torch.zeros(weight.shape[0], dtype=torch.int64)
            qweight = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
            # the weight packed once into torch.ao's module, as qswap's lowering builds it
            if isinstance(core, nn.Conv2d):
                qmodule: Any = torch_int8._new_conv(nniq.ConvReLU2d, core, qweight)
            else:
                qmodule = torch_int8._new_linear(nniq.LinearReLU, core, qweight)
            qmodule.scale = float((observer.max_val - observer.min_val) / 255)
            qmodule.zero_point = 0
            work[index] = qmodule

    with peers.torch_ao_quiet(), gc_paused():
        return _timed(build, lambda work: work(x), finish)


FLOWS: dict[str, Callable[[nn.Module, torch.Tensor, list[list[str]]], tuple[float, float]]] = {
    "qswap": time_qswap,
    "eager": time_eager,
    "fx": time_fx,
    "floor": time_floor,
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
    print(
        "| model | modules | qswap | eager | FX | floor | qswap/eager | qswap/floor | qswap total s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, build in (("linear-relu", linear_relu), ("conv-bn-relu", conv_bn_relu)):
        for size in sizes:
            torch.manual_seed(0)
            model, x, fuse = build(size)
            n = sum(1 for _ in model.children())
            per: dict[str, float] = {}
            # rounds of every flow in turn, so a slow spell of the machine hits them alike;
            # each flow's fastest run counts (the least disturbed)
            for round_ in range(max(1, args.repeat)):
                for name, flow in FLOWS.items():
                    if name == "fx" and size > 1000 and (not args.full or round_ > 0):
                        continue
                    gc.collect()
                    seconds = flow(model, x, fuse)[0] / n * 1e3
                    per[name] = min(per.get(name, float("inf")), seconds)
            fx = f"{per['fx']:.3f}" if "fx" in per else "skipped"
            print(
                f"| {label} | {n} | {per['qswap']:.3f} | {per['eager']:.3f} | {fx} | "
                f"{per['floor']:.3f} | {per['qswap'] / per['eager']:.2f} | "
                f"{per['qswap'] / per['floor']:.2f} | {per['qswap'] * n / 1e3:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
