"""qswap on the zoo beside the flow a user would pick instead: SQNR and latency against float.

For each model of the zoo (``tests/zoo_models.py``) and each preset, in one process and on the
same weights and data, it prints the SQNR of the main output (HF ``.logits``, else the tensor)
against the float model at the eval batch, and the median latency at batch 1 and at the eval
batch as a ratio to the float model's. The peer is what a user would pick instead of qswap:

* transformers models: ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear},
  dtype=torch.qint8)`` on a copy, beside qswap's ``x86_dynamic_int8``, ``x86_int8`` and
  ``w8a8_minmax`` (and ``w4_per_group`` for the language models). quantize_dynamic quantizes
  only ``nn.Linear`` layers: GPT-2's transformers ``Conv1D`` layers stay float in the peer.
* timm and torchvision models: PyTorch FX x86 int8 (``prepare_fx``/``convert_fx``,
  ``get_default_qconfig_mapping("x86")``, calibrated on the same batches; ``peers.fx_quantize``)
  beside qswap's ``x86_int8`` and ``w8a8_minmax``.

qswap runs as a user calls it: ``qswap.quantize(model, preset, calib_data=zm.calib,
example_inputs=zm.example)``. Timing: the float model, the float model again (a second entry:
the run's noise floor), the peer, every qswap model and the peer again (on a busy machine int8
models' times vary more than float's: peer/peer is their noise floor) are timed in the same
rounds -- a block of calls each, in ABBA order -- so a slow spell of the machine hits
them alike; each latency is the median over rounds of its blocks' medians, printed as a ratio to
float beside float/float and peer/peer. It ends with a markdown table and the targets missed
(printed, never asserted).

    python bench/zoo.py                    # all models, 1 thread (about 8 minutes on 2 cores)
    python bench/zoo.py --quick            # fewer and shorter rounds (about 2 minutes)
    python bench/zoo.py --only hf_gpt2 tv_resnet18 --threads 2 --json bench/results/zoo_peers.json
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import redirect_stderr
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import peers
import zoo_models
from measure import median_ms, write_json
from zoo_models import NAMES, ZooModel, batch1, call
from zoo_survey import (
    alarm,
    failure,
    fingerprint,
    first_float,
    plan_counts,
    presets_for,
    same_state,
    source_state,
    sqnr_db,
)

import qswap

PRESETS = {
    "transformers": ("x86_dynamic_int8", "x86_int8", "w8a8_minmax"),  # + w4_per_group for LMs
    "timm": ("x86_int8", "w8a8_minmax"),
    "torchvision": ("x86_int8", "w8a8_minmax"),
}
#: the preset held against the peer (SQNR and latency targets, qswap/peer ratios), by family
HEADLINE = {"transformers": "x86_dynamic_int8", "timm": "x86_int8", "torchvision": "x86_int8"}
PEER_NAME = {
    "transformers": "torch.ao quantize_dynamic({nn.Linear}, qint8)",
    "timm": "PyTorch FX x86 int8",
    "torchvision": "PyTorch FX x86 int8",
}
BATCHES = ("b1", "eval")
FLOAT, FLOAT_AGAIN, PEER, PEER_AGAIN = "float", "float again", "peer", "peer again"
TIMEOUT_S = 300  # building and checking one quantized model


@dataclass(frozen=True)
class Timing:
    """How each latency is measured: rounds of blocks of calls, each block about ``block_s``."""

    rounds: int  # ABBA rounds (even)
    block_s: float  # seconds of timed calls per runner and round
    min_calls: int  # timed calls per block at least
    warmup_s: float  # untimed calls per runner before the first round


FULL = Timing(rounds=8, block_s=0.13, min_calls=5, warmup_s=0.3)
QUICK = Timing(rounds=6, block_s=0.03, min_calls=3, warmup_s=0.1)


@dataclass
class Flow:
    """One quantized model of a zoo model (the peer or a qswap preset) and what it gave."""

    name: str  # PEER or the preset
    layers: str = ""  # how many layers it quantizes
    error: str | None = None  # "Type: message" when it could not be built or run
    sqnr_db: float | None = None  # at the eval batch, against float
    x_float: dict[str, float] = field(default_factory=dict)  # latency / float's, by batch


@dataclass
class ModelResult:
    """A zoo model: float latency, the noise floor, the peer and every qswap preset."""

    name: str
    family: str
    peer: str  # what the peer is and what it leaves float
    float_ms: dict[str, float] = field(default_factory=dict)  # by batch
    noise: dict[str, float] = field(default_factory=dict)  # float again / float, by batch
    peer_noise: dict[str, float] = field(default_factory=dict)  # peer again / peer, by batch
    flows: dict[str, Flow] = field(default_factory=dict)  # PEER first, then the presets
    warnings: list[str] = field(default_factory=list)  # qswap's, deduplicated
    float_model_changed: bool = False

    @property
    def presets(self) -> list[str]:
        return [name for name in self.flows if name != PEER]

    def vs_peer(self, preset: str) -> dict[str, float]:
        """qswap/peer latency by batch, for the headline preset when both were timed."""
        q, p = self.flows[preset], self.flows[PEER]
        if preset != HEADLINE[self.family] or not (q.x_float and p.x_float):
            return {}
        return {b: q.x_float[b] / p.x_float[b] for b in BATCHES}

    def tolerance(self, batch: str) -> float:
        """The noise floor at ``batch``: the larger of |float/float - 1| and |peer/peer - 1|."""
        return max(abs(self.noise[batch] - 1), abs(self.peer_noise.get(batch, 1.0) - 1))

    def noise_text(self) -> str:
        """float/float and peer/peer at batch 1 and the eval batch."""
        text = f"float/float {self.noise['b1']:.3f}, {self.noise['eval']:.3f}"
        if self.peer_noise:
            text += f"; peer/peer {self.peer_noise['b1']:.3f}, {self.peer_noise['eval']:.3f}"
        return text

    def targets(self, preset: str) -> dict[str, bool | None]:
        """works / sqnr >= peer / latency <= peer within the noise floor (None: not measured)."""
        q, p = self.flows[preset], self.flows[PEER]
        out: dict[str, bool | None] = {"works": q.error is None}
        if preset == HEADLINE[self.family]:
            qs, ps = q.sqnr_db, p.sqnr_db
            out["sqnr"] = qs >= ps if qs is not None and ps is not None else None
            ratio = self.vs_peer(preset)
            out["latency"] = (
                all(ratio[b] <= 1 + self.tolerance(b) for b in BATCHES) if ratio else None
            )
        return out


def warm(run: Callable[[], object], seconds: float) -> float:
    """Call ``run`` for about ``seconds`` (twice at least); the median seconds per call."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 2 or time.perf_counter() < end:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_ms(runners: Mapping[str, Callable[[], object]], t: Timing) -> dict[str, float]:
    """Median ms per call of each runner, from blocks of calls in rounds of alternating order.

    Each runner is warmed up for ``t.warmup_s``, which also sizes its block to ``t.block_s``.
    Each round runs every runner's block (one untimed call, then the timed ones) and keeps the
    block's median; odd rounds take the runners in reverse (ABBA), so the slot a runner runs in
    does not decide its time. The result is the median over rounds of the block medians.
    """
    calls = {
        name: max(t.min_calls, math.ceil(t.block_s / warm(run, t.warmup_s)))
        for name, run in runners.items()
    }
    names = list(runners)
    blocks: dict[str, list[float]] = {name: [] for name in names}
    for r in range(t.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            blocks[name].append(median_ms({name: runners[name]}, calls[name], 1)[name])
    return {name: statistics.median(b) for name, b in blocks.items()}


def quantized_layers(model: nn.Module) -> int:
    """How many of a torch.ao-converted model's modules are quantized layers with weights."""
    return sum(
        type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))
        and hasattr(m, "weight")
        for m in model.modules()
    )


def dynamic_peer(model: nn.Module) -> nn.Module:
    """torch.ao's ``quantize_dynamic`` of a copy of ``model``: its ``nn.Linear`` layers, qint8."""
    with peers.torch_ao_quiet():
        from torch.ao.quantization import quantize_dynamic

        quantized: nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )
    return quantized


def fx_peer(zm: ZooModel) -> nn.Module:
    """PyTorch FX x86 int8 of ``zm`` calibrated on its calibration batches (tensors only)."""
    assert isinstance(zm.example, torch.Tensor), "FX takes the image tensor"
    calib = [b for b in zm.calib if isinstance(b, torch.Tensor)]
    return peers.fx_quantize(zm.model, calib, zm.example)


def peer_description(zm: ZooModel) -> str:
    """The peer, and for quantize_dynamic which layers it leaves float."""
    if zm.family != "transformers":
        return PEER_NAME[zm.family]
    conv1d = sum(type(m).__name__ == "Conv1D" for m in zm.model.modules())
    note = f"; leaves {conv1d} transformers Conv1D float (it quantizes only nn.Linear)"
    return PEER_NAME[zm.family] + (note if conv1d else "")


def build_flow(zm: ZooModel, name: str, ref: torch.Tensor) -> tuple[Flow, nn.Module | None]:
    """Build the peer or the qswap model ``name``, run it at both batches, take its SQNR."""
    flow = Flow(name)
    try:
        # a failing FX GraphModule prints its own traceback to stderr: the error is kept here
        with torch.no_grad(), alarm(TIMEOUT_S), redirect_stderr(io.StringIO()):
            if name == PEER:
                model = dynamic_peer(zm.model) if zm.family == "transformers" else fx_peer(zm)
                flow.layers = f"{quantized_layers(model)} int8"
            else:
                counts = plan_counts(
                    zm.model, qswap.plan(zm.model, name, example_inputs=zm.example)
                )
                flow.layers = f"{counts['int']} int8, {counts['fake']} fake"
                model = qswap.quantize(
                    zm.model, name, calib_data=zm.calib, example_inputs=zm.example, progress=False
                )
            out = first_float(call(model, zm.example))
            call(model, batch1(zm.example))
        if out is None or out.shape != ref.shape:
            got = "no float tensor" if out is None else f"shape {tuple(out.shape)}"
            raise ValueError(f"output: {got}, float's {tuple(ref.shape)}")
        flow.sqnr_db = sqnr_db(ref, out)
        return flow, model
    except Exception as err:
        flow.error = failure(err).key
        return flow, None


def run_model(zm: ZooModel, t: Timing) -> ModelResult:
    """Build the peer and every qswap preset of ``zm``, then time them all beside float."""
    result = ModelResult(zm.name, zm.family, peer_description(zm))
    before = fingerprint(zm.model)
    with torch.no_grad():
        ref = first_float(call(zm.model, zm.example))
    assert ref is not None, f"{zm.name}: no float output to compare"
    models: dict[str, nn.Module] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in (PEER, *presets_for(zm, PRESETS[zm.family])):
            result.flows[name], model = build_flow(zm, name, ref)
            if model is not None:
                models[name] = model
    result.warnings = sorted(
        {
            f"{w.category.__name__}: {' '.join(str(w.message).split())[:160]}"
            for w in caught  # qswap warns with a stacklevel: its frames or the calls here
            if "/qswap/" in w.filename or w.filename.endswith("/bench/zoo.py")
        }
    )
    result.float_model_changed = not same_state(before, zm.model)
    # float at both ends of each round, the peer again just inside: the two noise floors
    again = {PEER_AGAIN: models[PEER]} if PEER in models else {}
    timed = {FLOAT: zm.model, **models, **again, FLOAT_AGAIN: zm.model}
    for batch, example in zip(BATCHES, (batch1(zm.example), zm.example), strict=True):
        runners = {name: partial(call, m, example) for name, m in timed.items()}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FX warns on every call of a quantized cat
            ms = interleaved_ms(runners, t)
        result.float_ms[batch] = ms[FLOAT]
        result.noise[batch] = ms[FLOAT_AGAIN] / ms[FLOAT]
        if PEER in models:
            result.peer_noise[batch] = ms[PEER_AGAIN] / ms[PEER]
        for name in models:
            result.flows[name].x_float[batch] = ms[name] / ms[FLOAT]
    return result


# --------------------------------------------------------------------------- output


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else ("inf" if math.isinf(v) else f"{v:.{digits}f}")


def _targets(m: ModelResult, preset: str) -> str:
    word = {True: "PASS", False: "MISS", None: "n/a"}
    return ", ".join(f"{k} {word[v]}" for k, v in m.targets(preset).items())


def model_block(m: ModelResult) -> str:
    """What one model gave: float latency, noise floor, and a row per flow."""
    lines = [
        (
            f"\n{m.name} ({m.family}): float {m.float_ms['b1']:.3f} ms at batch 1, "
            f"{m.float_ms['eval']:.3f} ms at the eval batch; noise floor (b1, eval) "
            f"{m.noise_text()}"
        ),
        f"  peer: {m.peer}",
        (
            f"  {'flow':17} {'layers':16} {'SQNR dB':>8} {'b1 xfloat':>10} {'eval xfloat':>11} "
            f"{'b1 xpeer':>9} {'eval xpeer':>10}  targets"
        ),
    ]
    for name, flow in m.flows.items():
        if flow.error:
            lines.append(f"  {name:17} FAILED: {flow.error}")
            continue
        ratio = m.vs_peer(name)
        lines.append(
            f"  {name:17} {flow.layers:16} {_f(flow.sqnr_db, 2):>8} "
            f"{_f(flow.x_float.get('b1')):>10} {_f(flow.x_float.get('eval')):>11} "
            f"{_f(ratio.get('b1')):>9} {_f(ratio.get('eval')):>10}  "
            f"{_targets(m, name) if name != PEER else ''}"
        )
    if m.float_model_changed:
        lines.append("  THE FLOAT MODEL CHANGED")
    return "\n".join(lines)


TABLE_HEAD = (
    "| model | preset | qswap SQNR | peer SQNR | qswap lat b1 (x float) | peer lat b1 (x float) "
    "| qswap/peer b1 | qswap lat eval (x float) | peer lat eval (x float) | qswap/peer eval "
    "| noise floor (b1, eval) | targets |\n" + "|---" * 12 + "|"
)


def table(results: list[ModelResult]) -> str:
    """The markdown summary: one row per (model, preset)."""
    rows = [TABLE_HEAD]
    for m in results:
        p = m.flows[PEER]
        peer_sqnr = f"FAIL ({p.error.split(':')[0]})" if p.error else _f(p.sqnr_db, 2)
        for preset in m.presets:
            q, ratio = m.flows[preset], m.vs_peer(preset)
            cells = [m.name, preset, "FAIL" if q.error else _f(q.sqnr_db, 2), peer_sqnr]
            for b in BATCHES:
                cells += [_f(q.x_float.get(b)), _f(p.x_float.get(b)), _f(ratio.get(b))]
            cells += [m.noise_text(), _targets(m, preset)]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def misses(results: list[ModelResult]) -> list[str]:
    """Every target missed, with the numbers behind it."""
    out = []
    for m in results:
        p = m.flows[PEER]
        for preset in m.presets:
            q, hit = m.flows[preset], m.targets(preset)
            where = f"{m.name} [{preset}]"
            if hit["works"] is False:
                out.append(f"{where} works: {q.error}")
            if hit.get("sqnr") is False:
                out.append(f"{where} sqnr: {_f(q.sqnr_db, 2)} dB < peer {_f(p.sqnr_db, 2)} dB")
            if hit.get("latency") is False:
                ratio = m.vs_peer(preset)
                out += [
                    f"{where} latency {b}: qswap/peer {ratio[b]:.3f} > 1 + noise "
                    f"{m.tolerance(b):.3f} (qswap {q.x_float[b]:.3f}, peer "
                    f"{p.x_float[b]:.3f} x float)"
                    for b in BATCHES
                    if ratio[b] > 1 + m.tolerance(b)
                ]
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="zoo models to run")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter timing rounds")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: 2 on a busy 2-core machine is noise)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    names = tuple(args.only) if args.only else NAMES
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise SystemExit(f"unknown zoo model(s) {unknown}; the zoo has {', '.join(NAMES)}")
    torch.set_num_threads(args.threads)
    timing = QUICK if args.quick else FULL
    try:
        import transformers

        transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    except ImportError:
        pass
    print(
        f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} thread(s), {'quick' if args.quick else 'full'} timing "
        f"{timing}\n{source_state()}",
        flush=True,
    )
    start = time.perf_counter()
    results: list[ModelResult] = []
    for name in names:
        try:
            zm = zoo_models.build(name)
        except ImportError as err:
            print(f"\n{name}: skipped: {err}", flush=True)
            continue
        results.append(run_model(zm, timing))
        print(model_block(results[-1]), flush=True)
    noise = [abs(m.noise[b] - 1) for m in results for b in BATCHES]
    peer_noise = [abs(v - 1) for m in results for v in m.peer_noise.values()]
    print(f"\n{table(results)}\n")
    for label, values in (("float/float", noise), ("peer/peer", peer_noise)):
        if values:
            print(
                f"noise floor |{label} - 1| over {len(values)} model x batch timings: median "
                f"{statistics.median(values):.3f}, max {max(values):.3f}"
            )
    print(
        "targets: works = quantizes and runs at both batches; sqnr = the headline preset "
        f"({', '.join(f'{f}: {p}' for f, p in HEADLINE.items())}) >= the peer's SQNR; latency "
        "= its qswap/peer <= 1 + that model's noise floor (the larger of |float/float - 1| and "
        "|peer/peer - 1|), at batch 1 and at the eval batch"
    )
    missed = misses(results)
    print(f"\n{len(missed)} target(s) missed" + (":" if missed else ""))
    print("\n".join(f"  {line}" for line in missed))
    warned: dict[str, list[str]] = {}
    for m in results:
        for text in m.warnings:
            warned.setdefault(text, []).append(m.name)
    if warned:
        print("\nqswap warnings:")
        for text, models in warned.items():
            print(f"  {text}\n    ({', '.join(models)})")
    timm = f"timm: {zoo_models.TIMM_STATUS}; " if zoo_models.TIMM_STATUS else ""
    print(f"\n{timm}{time.perf_counter() - start:.0f} s")
    write_json(
        args.json,
        {
            "run": {"torch": torch.__version__, "threads": args.threads, "quick": args.quick},
            "models": {
                m.name: {**asdict(m), "targets": {p: m.targets(p) for p in m.presets}}
                for m in results
            },
        },
    )


if __name__ == "__main__":
    main()
