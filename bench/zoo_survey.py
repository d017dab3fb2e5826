"""Survey: quantize every model of the zoo (tests/zoo_models.py) with qswap and record what breaks.

For each zoo model and preset (``x86_int8``, ``w8a8_minmax``, and ``w4_per_group`` for the
transformers language models) it runs, each step on its own: ``qswap.plan`` (how many modules
run int8, fake-quantized or stay float), ``qswap.quantize``, the quantized model at the eval
batch (SQNR of its output against the float model's) and at batch 1, and ``generate`` for
decoders. A failing step records its exception, message and innermost frames in qswap or the
model's library; a cell that runs past ``--timeout`` seconds is stopped (SIGALRM). It prints one
row per (model, preset) and then the failures grouped by exception type and message.

    python bench/zoo_survey.py                                 # all models (several minutes)
    python bench/zoo_survey.py --only tv_resnet18 hf_gpt2 --presets w8a8_minmax
    python bench/zoo_survey.py --json bench/results/zoo.json   # also write the records

Runs on one torch thread unless ``--threads N``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import peers
import zoo_models
from measure import write_json
from zoo_models import NAMES, ZooModel, batch1, call, generate_inputs

import qswap

PRESETS = ("x86_int8", "w8a8_minmax")
LM_PRESETS = ("w4_per_group",)  # transformers language models only
LOW_SQNR_DB = 10.0  # a cell that ran below this is listed after the failures
#: path fragments of frames worth showing: qswap and the models' own libraries
LIBRARIES = ("/qswap/", "/transformers/", "/timm/", "zoo_models.py")


class CellTimeout(Exception):
    """A (model, preset) cell ran past its time budget."""


@dataclass
class Failure:
    """One failed step: the exception, its message and where it was raised."""

    type: str
    message: str
    frames: list[str]  # innermost relevant frames, outermost first: "file:line in func"
    raised_at: str  # the innermost frame of all, wherever it is

    @property
    def key(self) -> str:
        return f"{self.type}: {self.message[:80]}"


@dataclass
class Cell:
    """What happened to one model under one preset."""

    model: str
    family: str
    preset: str
    status: dict[str, str] = field(default_factory=dict)  # step -> ok / FAIL / - / skipped
    failures: dict[str, Failure] = field(default_factory=dict)
    plan: dict[str, int] = field(default_factory=dict)
    sqnr_db: float | None = None
    sqnr_b1_db: float | None = None
    fx_sqnr_db: float | None = None  # PyTorch FX x86 int8 of the same model (x86_int8 cells)
    fx_error: str | None = None  # why the FX baseline did not run, when it did not
    same_tokens: bool | None = None  # generate: the quantized model chose the float's tokens
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # qswap's warnings, deduplicated
    float_model_changed: bool = False


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def failure(err: BaseException) -> Failure:
    """``err`` as a :class:`Failure`: type, first 300 characters, innermost relevant frames.

    Comprehension frames are dropped and a run of frames of one function (recursion) is
    shown once, with its count, so the six frames shown reach back to the model's code.
    """
    frames = traceback.extract_tb(err.__traceback__)
    rows: list[str] = []
    last = ("", "")
    repeats = 1
    for f in frames:
        if not any(x in f.filename for x in LIBRARIES) or f.name.startswith("<"):
            continue
        if (f.filename, f.name) == last:
            repeats += 1
            rows[-1] = f"{_short(f.filename)}:{f.lineno} in {f.name} (x{repeats}, innermost shown)"
            continue
        last, repeats = (f.filename, f.name), 1
        rows.append(f"{_short(f.filename)}:{f.lineno} in {f.name}")
    raised = frames[-1] if frames else None
    at = f"{_short(raised.filename)}:{raised.lineno} in {raised.name}" if raised else ""
    message = " ".join(str(err).split())  # one line
    return Failure(type(err).__name__, message[:300], rows[-6:], at)


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Raise :class:`CellTimeout` in the main thread after ``seconds`` (0: never)."""

    def fire(signum: int, frame: object) -> None:
        raise CellTimeout(f"cell ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def first_float(out: Any) -> torch.Tensor | None:
    """The tensor to compare: ``.logits`` of an HF output, else the first float tensor found."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for item in items:
        found = first_float(item)
        if found is not None:
            return found
    return None


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref``, in dB (inf when equal)."""
    ref, out = ref.detach().double(), out.detach().double()
    noise = (ref - out).pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(ref.pow(2).sum().item() / noise)


def plan_counts(model: nn.Module, plan: qswap.Plan) -> dict[str, int]:
    """How the plan treats the model's modules (each module object counted once).

    ``int``: layers with parameters that run on the integer backend; ``ops``: parameter-free
    modules that do (dropout, activations, pooling); ``fake``: modules fake-quantized (on an
    integer backend: fallbacks); ``fused``: members folded into a fusion group's head;
    ``float``: modules with parameters of their own that the plan leaves float;
    ``uncovered``: modules with float parameters no registry entry covers.
    """
    from qswap.decompose import decomposed

    # the plan's paths are those of the model with timm's BatchNormAct2d & co. decomposed
    modules = dict(decomposed(model, plan.registry).named_modules(remove_duplicate=False))
    out = dict.fromkeys(("int", "ops", "fake", "fused", "float"), 0)
    out["uncovered"] = len(plan.uncovered)
    for d in plan:
        if d.shared_with is not None:
            continue
        has_params = next(modules[d.name].parameters(recurse=False), None) is not None
        if d.kind in ("quantize", "wrap"):
            backend = d.layer.backend if d.layer is not None else d.backend
            out["fake" if backend in (None, "fake") else "int" if has_params else "ops"] += 1
        elif d.kind == "fuse":
            out["fused"] += 1
        elif has_params:
            out["float"] += 1
    return out


def fingerprint(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A copy of everything in the model's state, to tell whether anything changed it."""
    return [(k, v.detach().clone()) for k, v in model.state_dict().items()]


def same_state(before: list[tuple[str, torch.Tensor]], model: nn.Module) -> bool:
    after = model.state_dict()
    return [k for k, _ in before] == list(after) and all(
        torch.equal(v, after[k]) for k, v in before
    )


def presets_for(zm: ZooModel, presets: tuple[str, ...]) -> tuple[str, ...]:
    """``presets``, plus the weight-only 4-bit preset for transformers language models."""
    lm = zm.family == "transformers" and zm.modality != "image"
    return presets + (LM_PRESETS if lm else ())


def survey_cell(
    zm: ZooModel, preset: str, ref: dict[str, Any], timeout: int, fx: bool = True
) -> Cell:
    """Plan, quantize, run (eval batch, batch 1) and generate ``zm`` under ``preset``."""
    cell = Cell(zm.name, zm.family, preset)
    before = fingerprint(zm.model)
    qmodel: nn.Module | None = None
    timed_out = False

    def step(name: str, fn: Callable[[], Any], needs: str | None = None) -> Any:
        nonlocal timed_out
        if timed_out:
            cell.status[name] = "t/o"  # an earlier step of the cell timed out
            return None
        if needs is not None and cell.status.get(needs) != "ok":
            cell.status[name] = "-"
            return None
        start = time.perf_counter()
        try:
            with torch.no_grad():
                result = fn()
        except Exception as err:
            timed_out = isinstance(err, CellTimeout)
            cell.status[name] = "TIMEOUT" if timed_out else "FAIL"
            cell.failures[name] = failure(err)
            return None
        finally:
            cell.seconds[name] = round(time.perf_counter() - start, 3)
        cell.status[name] = "ok"
        return result

    with warnings.catch_warnings(record=True) as caught, alarm(timeout):
        warnings.simplefilter("always")
        if fx and preset == "x86_int8" and isinstance(zm.example, torch.Tensor):
            fx_baseline(cell, zm, ref)
        plan = step("plan", lambda: qswap.plan(zm.model, preset, example_inputs=zm.example))
        if plan is not None:
            cell.plan = plan_counts(zm.model, plan)
        qmodel = step(
            "quantize",
            lambda: qswap.quantize(
                zm.model, preset, calib_data=zm.calib, example_inputs=zm.example, progress=False
            ),
        )
        out = step("eval", lambda: call(qmodel, zm.example), needs="quantize")
        out1 = step("batch1", lambda: call(qmodel, batch1(zm.example)), needs="quantize")
        if zm.generate:
            tokens = step("generate", lambda: generate(qmodel, zm), needs="quantize")
            if tokens is not None and ref.get("tokens") is not None:
                cell.same_tokens = torch.equal(tokens, ref["tokens"])
        else:
            cell.status["generate"] = ""
    for got, key, attr in ((out, "out", "sqnr_db"), (out1, "out1", "sqnr_b1_db")):
        q, f = first_float(got), ref.get(key)
        if q is not None and f is not None and q.shape == f.shape:
            setattr(cell, attr, round(sqnr_db(f, q), 2))
    cell.warnings = sorted(
        {
            f"{w.category.__name__}: {' '.join(str(w.message).split())[:160]}"
            for w in caught  # qswap warns with a stacklevel: its frames or the callers here
            if "/qswap/" in w.filename or w.filename.endswith(("zoo_survey.py", "zoo_models.py"))
        }
    )
    cell.float_model_changed = not same_state(before, zm.model)
    return cell


def fx_baseline(cell: Cell, zm: ZooModel, ref: dict[str, Any]) -> None:
    """PyTorch's own FX x86 int8 flow on the same model and data: what int8 costs this model."""
    try:  # a failing FX GraphModule prints its own traceback to stderr: keep it out
        with torch.no_grad(), redirect_stderr(io.StringIO()):
            x = zm.example
            assert isinstance(x, torch.Tensor)
            calib = [b for b in zm.calib if isinstance(b, torch.Tensor)]
            out = peers.fx_quantize(zm.model, calib, x)(x)
        cell.fx_sqnr_db = round(sqnr_db(ref["out"], out), 2)
    except CellTimeout:
        raise
    except Exception as err:
        cell.fx_error = f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"


def generate(model: nn.Module | None, zm: ZooModel) -> torch.Tensor:
    """Four greedy tokens from ``model`` on ``zm``'s first example row (with its attention mask)."""
    assert model is not None
    tokens: torch.Tensor = model.generate(  # type: ignore[operator]
        **generate_inputs(zm), max_new_tokens=4, do_sample=False
    )
    return tokens


@dataclass
class Built:
    """A zoo model's build record: size, build time, float forward time, or why it was skipped."""

    name: str
    family: str
    params: int = 0
    build_s: float = 0.0
    forward_ms: float = 0.0
    skipped: str | None = None


def reference(zm: ZooModel) -> dict[str, Any]:
    """The float model's outputs at the eval batch and batch 1, and its generated tokens."""
    with torch.no_grad():
        ref: dict[str, Any] = {
            "out": first_float(call(zm.model, zm.example)),
            "out1": first_float(call(zm.model, batch1(zm.example))),
        }
        if zm.generate:
            ref["tokens"] = generate(zm.model, zm)
    return ref


def forward_ms(zm: ZooModel, reps: int = 7) -> float:
    """Median ms of the float model at the eval batch (after one untimed call)."""
    times = []
    with torch.no_grad():
        call(zm.model, zm.example)
        for _ in range(reps):
            start = time.perf_counter()
            call(zm.model, zm.example)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _fmt_sqnr(v: float | None) -> str:
    return "-" if v is None else ("inf" if math.isinf(v) else f"{v:.1f}")


HEADER = (
    f"{'model':27} {'preset':12} {'plan':4} {'int/ops/fake/fuse/flt/unc':>25} {'quantize':8} "
    f"{'eval':5} {'batch1':6} {'generate':8} {'sqnr':>6} {'sqnr1':>6} {'fx':>6} {'q_s':>5}"
)


def row(c: Cell) -> str:
    p = c.plan
    keys = ("int", "ops", "fake", "fused", "float", "uncovered")
    counts = "/".join(str(p[k]) for k in keys) if p else "-"
    gen = c.status.get("generate", "")
    if gen == "ok" and c.same_tokens is not None:
        gen = "ok=" if c.same_tokens else "ok~"
    fx = "FAIL" if c.fx_error else _fmt_sqnr(c.fx_sqnr_db)
    line = (
        f"{c.model:27} {c.preset:12} {c.status.get('plan', '-'):4} {counts:>25} "
        f"{c.status.get('quantize', '-'):8} {c.status.get('eval', '-'):5} "
        f"{c.status.get('batch1', '-'):6} {gen:8} {_fmt_sqnr(c.sqnr_db):>6} "
        f"{_fmt_sqnr(c.sqnr_b1_db):>6} {fx:>6} {c.seconds.get('quantize', 0.0):5.1f}"
    )
    if c.float_model_changed:
        line += "  FLOAT MODEL CHANGED"
    return line


def summary(cells: list[Cell]) -> str:
    """Failures grouped by exception type and message prefix, each with one full example."""
    groups: dict[str, list[tuple[Cell, str, Failure]]] = {}
    for c in cells:
        for step_name, f in c.failures.items():
            groups.setdefault(f.key, []).append((c, step_name, f))
    lines = [f"{len(groups)} failure class(es)"]
    for i, (key, hits) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1])), 1):
        cell, step_name, f = hits[0]
        where = ", ".join(f"{c.model}[{c.preset}:{s}]" for c, s, _ in hits)
        lines += [
            "",
            f"[{i}] {key}",
            f"    {len(hits)} hit(s): {where}",
            f"    example {cell.model} / {cell.preset} / {step_name}:",
            f"    message: {f.message}",
            f"    raised at: {f.raised_at}",
            *(f"      {frame}" for frame in f.frames),
        ]
    low = [c for c in cells if c.sqnr_db is not None and c.sqnr_db < LOW_SQNR_DB]
    lines += ["", f"{len(low)} cell(s) ran with an output SQNR below {LOW_SQNR_DB:g} dB:"]
    for c in low:
        fx = f"PyTorch FX x86 {_fmt_sqnr(c.fx_sqnr_db)} dB" if c.fx_sqnr_db is not None else ""
        fx = f"PyTorch FX x86 failed ({c.fx_error})" if c.fx_error else fx
        lines.append(
            f"  {c.model}[{c.preset}]: {_fmt_sqnr(c.sqnr_db)} dB (batch 1: "
            f"{_fmt_sqnr(c.sqnr_b1_db)} dB){'; ' + fx if fx else ''}"
        )
    return "\n".join(lines)


def source_state() -> str:
    """Which qswap ran: the commit, files changed since, and a hash of qswap/ and registry/."""
    root = HERE.parent

    def git(*cmd: str) -> str:
        try:
            done = subprocess.run(
                ["git", *cmd], check=False, cwd=root, capture_output=True, text=True
            )
        except OSError:
            return "?"
        return done.stdout.strip() or "-"

    digest = hashlib.sha256()
    for path in sorted([*root.glob("qswap/**/*.py"), *root.glob("qswap/**/*.yaml")]) + sorted(
        root.glob("registry/*.yaml")
    ):
        digest.update(path.read_bytes())
    status = git("status", "--porcelain", "--", "qswap", "registry")
    dirty = ", ".join(line.strip() for line in status.splitlines())
    return (
        f"qswap at {git('rev-parse', '--short', 'HEAD')}, changed since: {dirty}; "
        f"sources sha256 {digest.hexdigest()[:12]}"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="zoo models to survey")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="presets for all")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per (model, preset)")
    parser.add_argument("--json", type=Path, help="also write every record to this JSON file")
    parser.add_argument(
        "--fx",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="PyTorch FX x86 int8 baseline SQNR for x86_int8 cells of image models",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: two threads on a busy 2-core machine spin in OpenMP "
        "barriers and a 1 ms forward takes 100 ms)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    names = tuple(args.only) if args.only else NAMES
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise SystemExit(f"unknown zoo model(s) {unknown}; the zoo has {', '.join(NAMES)}")
    torch.set_num_threads(args.threads)
    try:
        import transformers

        # generation-config chatter on every generate call
        transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    except ImportError:
        pass
    print(
        f"torch {torch.__version__}, qswap {qswap.__version__}, {torch.get_num_threads()} threads, "
        f"cpu {torch.backends.cpu.get_cpu_capability()}\n{source_state()}",
        flush=True,
    )
    built: list[Built] = []
    cells: list[Cell] = []
    print(HEADER, flush=True)
    for name in names:
        record = Built(name, zoo_models.family_of(name))
        built.append(record)
        start = time.perf_counter()
        try:
            zm = zoo_models.build(name)
        except ImportError as err:
            record.skipped = f"{type(err).__name__}: {err}"
            print(f"{name:27} skipped: {record.skipped}", flush=True)
            continue
        record.build_s = round(time.perf_counter() - start, 2)
        record.params = sum(p.numel() for p in zm.model.parameters())
        try:
            record.forward_ms = round(forward_ms(zm), 2)
            ref = reference(zm)
        except Exception as err:
            record.skipped = f"the float model fails: {failure(err).key}"
            print(f"{name:27} skipped: {record.skipped}", flush=True)
            continue
        for preset in presets_for(zm, tuple(args.presets)):
            cell = survey_cell(zm, preset, ref, args.timeout, fx=args.fx)
            cells.append(cell)
            print(row(cell), flush=True)
    print(
        "\nplan columns: layers with parameters run int8 / parameter-free modules run int8 / "
        "fake-quantized (on x86: fallbacks) / fused members / modules with parameters left "
        "float / uncovered by the registry; generate 'ok=' same tokens as float, 'ok~' other "
        "tokens; sqnr (dB) at the eval batch and sqnr1 at batch 1 against the float model; fx "
        "the SQNR of PyTorch's FX x86 int8 flow on the same model and data; q_s seconds to "
        "quantize"
    )
    print(f"timm: {zoo_models.TIMM_STATUS}")
    print("\nmodels:")
    for b in built:
        if b.skipped:
            print(f"  {b.name:28} {b.family:12} skipped: {b.skipped}")
        else:
            print(
                f"  {b.name:28} {b.family:12} {b.params:>10,} params  build {b.build_s:5.2f} s  "
                f"forward {b.forward_ms:7.2f} ms"
            )
    warned = sorted({(w, c.model) for c in cells for w in c.warnings})
    if warned:
        print("\nqswap warnings:")
        by_text: dict[str, list[str]] = {}
        for text, model in warned:
            by_text.setdefault(text, []).append(model)
        for text, models in by_text.items():
            print(f"  {text}\n    ({', '.join(sorted(set(models)))})")
    print("\n" + summary(cells))
    write_json(
        args.json,
        {
            "models": {b.name: asdict(b) for b in built},
            "cells": {f"{c.model}/{c.preset}": asdict(c) for c in cells},
        },
    )


if __name__ == "__main__":
    main()
