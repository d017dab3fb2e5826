"""Per-layer report of a quantized model: what each layer got, how much error it adds, its size.

``qswap.report(float_model, qmodel, batches)`` runs both models on the same batches and
gives, per quantized layer: the decision and bits, the SQNR of the layer's output in the
quantized model against the same output in the float model (errors of earlier layers
included), the SQNR of the layer alone (fed the float model's input), its share of the
summed per-layer error, and its parameter bytes before and after. ``sensitivity=True``
also quantizes one layer at a time and records the model output's SQNR -- the usual way to
pick the layers to keep in float (``report.ranking()``, most damaging first).

The float side runs the float model with the plan's fusions applied (a copy), so its
module paths are the quantized model's; fusion folds BatchNorm, which changes float
results only at the float rounding level.

    >>> import torch, qswap
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = [torch.randn(16, 8)]
    >>> q = qswap.quantize(model, "w8a8_minmax", calib_data=x)
    >>> r = report(model, q, x)
    >>> [row.name for row in r.rows]
    ['0', '2']
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from qswap.exceptions import CalibrationError, PlanError

if TYPE_CHECKING:
    from qswap.config import QuantSpec
    from qswap.plan import Decision, LayerSpec, Plan
    from qswap.state import QSwapState

__all__ = ["LayerReport", "Report", "report", "sqnr_db"]

SortKey = Literal[
    "model", "sqnr", "local_sqnr", "error_share", "sensitivity", "params_before", "params_after"
]
_SORT_FIELDS: dict[str, str] = {
    "model": "index",
    "sqnr": "sqnr_db",
    "local_sqnr": "local_sqnr_db",
    "error_share": "error_share",
    "sensitivity": "sensitivity_db",
    "params_before": "params_before",
    "params_after": "params_after",
}


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference``, in dB.

    ``inf`` when they are equal.

    >>> round(sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.1])), 2)
    23.01
    """
    ref = reference.detach().to(torch.float64)
    noise = (ref - approx.detach().to(torch.float64)).pow(2).sum()
    return _db(float(ref.pow(2).sum()), float(noise))


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass(frozen=True)
class LayerReport:
    """One row of a :class:`Report`: a quantized (or skipped) layer and what quantization did to it.

    ``sqnr_db``: the layer's output in the quantized model against the float model (dB);
    ``local_sqnr_db``: the layer alone, fed the float model's input; ``error_share``: its
    local noise-to-signal ratio as a fraction of the sum over all layers; ``sensitivity_db``:
    the model output's SQNR when only this layer is quantized (``None`` unless asked for);
    ``params_before``/``params_after``: parameter bytes in float and as stored integers
    (bits/8 per element, plus scales and zero points).
    """

    index: int
    name: str
    module_type: str
    decision: str
    backend: str | None
    bits: str
    sqnr_db: float | None
    local_sqnr_db: float | None
    error_share: float | None
    params_before: int
    params_after: int
    sensitivity_db: float | None = None


@dataclass
class Report:
    """Per-layer results; ``print(report)`` is a table, ``to_json``/``to_csv`` export them.

    ``output_sqnr_db`` is the SQNR of the quantized model's output against the float
    model's over all batches; ``samples`` how many batches were measured.
    """

    rows: list[LayerReport]
    output_sqnr_db: float
    batches: int
    model_type: str = ""
    backend: str = ""
    notes: list[str] = field(default_factory=list)

    def sorted(self, by: SortKey = "model", *, descending: bool | None = None) -> Report:
        """A copy with rows sorted by ``by``; ``None`` values last.

        Defaults: ``model`` order ascending, SQNRs ascending (worst first), ``error_share``
        and bytes descending (largest first).
        """
        if by not in _SORT_FIELDS:
            raise PlanError(
                f"cannot sort a report by {by!r}; use one of {', '.join(map(repr, _SORT_FIELDS))}"
            )
        attr = _SORT_FIELDS[by]
        if descending is None:
            descending = by in ("error_share", "params_before", "params_after")
        present = [r for r in self.rows if getattr(r, attr) is not None]
        absent = [r for r in self.rows if getattr(r, attr) is None]
        present.sort(key=lambda r: getattr(r, attr), reverse=descending)
        return replace(self, rows=present + absent)

    def ranking(self) -> list[str]:
        """Layer names, most damaging first (lowest output SQNR when quantized alone).

        Needs ``report(..., sensitivity=True)``.
        """
        if not any(r.sensitivity_db is not None for r in self.rows):
            raise PlanError(
                "this report has no sensitivity results; call qswap.report(..., "
                "sensitivity=True) to quantize one layer at a time"
            )
        return [r.name for r in self.sorted("sensitivity").rows if r.sensitivity_db is not None]

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.rows:
            if r.name == name:
                return r
        raise PlanError(f"no layer named {name!r} in this report")

    # -- text and files --------------------------------------------------------------

    def __str__(self) -> str:
        show_sens = any(r.sensitivity_db is not None for r in self.rows)
        head = ["layer", "type", "decision", "bits", "SQNR dB", "alone dB", "error %"]
        if show_sens:
            head.append("sensitivity dB")
        head.append("bytes before -> after")
        rows = [head]
        for r in self.rows:
            row = [
                r.name or "(root)",
                r.module_type.rpartition(".")[2],
                r.decision,
                r.bits,
                _fmt(r.sqnr_db),
                _fmt(r.local_sqnr_db),
                "-" if r.error_share is None else f"{100 * r.error_share:.1f}",
            ]
            if show_sens:
                row.append(_fmt(r.sensitivity_db))
            row.append(f"{r.params_before} -> {r.params_after}")
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        before = sum(r.params_before for r in self.rows)
        after = sum(r.params_after for r in self.rows)
        title = (
            f"qswap report for {self.model_type or 'model'} (backend {self.backend!r}): output "
            f"SQNR {_fmt(self.output_sqnr_db)} dB over {self.batches} batch(es); parameters "
            f"{before} -> {after} bytes"
        )
        lines = [title]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``inf`` as ``None``) for JSON."""
        return {
            "model_type": self.model_type,
            "backend": self.backend,
            "output_sqnr_db": _finite(self.output_sqnr_db),
            "batches": self.batches,
            "notes": list(self.notes),
            "layers": [{k: _finite(v) for k, v in asdict(r).items()} for r in self.rows],
        }

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The report as JSON text (infinite SQNR -- no error -- as ``null``); written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            _write_text(path, text)
        return text

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """The rows as CSV text (one line per layer); written to ``path`` if given."""
        buffer = io.StringIO()
        names = [f for f in LayerReport.__dataclass_fields__]
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
        text = buffer.getvalue()
        if path is not None:
            _write_text(path, text)
        return text

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """A bar chart of per-layer SQNR (and sensitivity, if measured); saved to ``path`` if given.

        Needs matplotlib (``pip install 'qswap[plot]'``). Returns the figure.
        """
        try:
            import importlib

            matplotlib: Any = importlib.import_module("matplotlib")
            if path is not None:
                matplotlib.use("Agg")
            plt: Any = importlib.import_module("matplotlib.pyplot")
        except ImportError as exc:
            raise ImportError(
                "Report.plot() needs matplotlib; install it with: pip install 'qswap[plot]'"
            ) from exc
        names = [r.name or "(root)" for r in self.rows]
        cap = 100.0

        def values(attr: str) -> list[float]:
            out = []
            for r in self.rows:
                v = getattr(r, attr)
                out.append(math.nan if v is None else min(v, cap))
            return out

        series = [("output SQNR in the quantized model", "sqnr_db")]
        if any(r.sensitivity_db is not None for r in self.rows):
            series.append(("model SQNR, this layer alone quantized", "sensitivity_db"))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4.0))
        width = 0.8 / len(series)
        for k, (label, attr) in enumerate(series):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, values(attr), width=width, label=label)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel("SQNR (dB, higher is better)")
        ax.set_title(
            f"{self.model_type or 'model'}: per-layer SQNR (output {_fmt(self.output_sqnr_db)} dB)"
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        if path is not None:
            from qswap.persist.artifact import write_atomic

            kind = Path(path).suffix.lstrip(".").lower() or None  # matplotlib's default: png
            try:
                write_atomic(path, lambda fh: fig.savefig(fh, format=kind, dpi=120))
            finally:
                plt.close(fig)
        return fig


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.1f}"


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` through qswap's one atomic writer (a folder or bad path: ``FileError``)."""
    from qswap.persist.artifact import write_atomic

    write_atomic(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- measuring


def _bits(layer: LayerSpec) -> str:
    def short(spec: QuantSpec | None) -> str:
        if spec is None:
            return "-"
        gran = {"per_tensor": "", "per_channel": "/ch", "per_group": f"/g{spec.group_size}"}
        return f"{'' if spec.signed else 'u'}{spec.bits}{gran[spec.granularity]}"

    text = f"w{short(layer.weight)} in{short(layer.input)} out{short(layer.output)}"
    if layer.slots:
        text += " " + " ".join(f"{k}{short(v)}" for k, v in layer.slots.items())
    return text


def _float_bytes(params: Iterable[Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for p in params:
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def _sizes(
    float_model: nn.Module, fused: nn.Module, the_plan: Plan, name: str, layer: LayerSpec | None
) -> tuple[int, int]:
    """Parameter bytes of the layer's float modules, and of the layer as stored integers."""
    from qswap.slots import param_location

    decision = the_plan[name]
    paths = [name]
    if decision.group is not None:
        paths = list(the_plan.groups[decision.group])
    before_params: list[Tensor] = []
    for p in paths:
        with_suffix = float_model.get_submodule(p)
        before_params.extend(with_suffix.parameters())
    before = _float_bytes(before_params)
    module = fused.get_submodule(name)
    if layer is None:
        return before, before
    quantized: dict[int, QuantSpec] = {}
    for slot, spec in layer.param_specs().items():
        try:
            owner, pname = param_location(module, slot)
        except PlanError:
            continue
        value = getattr(owner, pname, None)
        if isinstance(value, Tensor):
            quantized[id(value)] = spec
    after = 0
    seen: set[int] = set()
    for param in module.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        found = quantized.get(id(param))
        if found is None:
            after += param.numel() * param.element_size() if param.is_floating_point() else 0
            continue
        after += math.ceil(param.numel() * found.bits / 8)
        qp = layer.qparams.get(_slot_of(layer, found))
        n = 1 if qp is None else qp.scale.numel()
        after += n * (4 + math.ceil(found.bits / 8))
    return before, after


def _slot_of(layer: LayerSpec, spec: QuantSpec) -> str:
    for slot, s in layer.param_specs().items():
        if s is spec:
            return slot
    return "weight"


def _first_float(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        if obj.is_quantized:
            return obj.dequantize()
        return obj if obj.is_floating_point() else None
    if isinstance(obj, (list, tuple)):
        for o in obj:
            found = _first_float(o)
            if found is not None:
                return found
    if isinstance(obj, Mapping):
        for o in obj.values():
            found = _first_float(o)
            if found is not None:
                return found
    return None


def _clone(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple):
        items = [_clone(o) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_clone(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


class _Recorder:
    """Forward hooks that keep (cloned) inputs and outputs of chosen modules, per call."""

    def __init__(self) -> None:
        self.inputs: dict[str, list[tuple[Any, Any]]] = {}
        self.outputs: dict[str, list[Tensor]] = {}
        self.handles: list[Any] = []
        self.active = True

    def watch(self, module: nn.Module, name: str, inputs: bool) -> None:
        def out_hook(mod: nn.Module, args: Any, output: Any) -> None:
            if self.active:
                found = _first_float(output)
                if found is not None:
                    self.outputs.setdefault(name, []).append(found.detach().clone())

        self.handles.append(module.register_forward_hook(out_hook))
        if inputs:

            def in_hook(mod: nn.Module, args: Any, kwargs: Any) -> None:
                if self.active:
                    self.inputs.setdefault(name, []).append((_clone(args), _clone(kwargs)))

            self.handles.append(
                module.register_forward_pre_hook(in_hook, with_kwargs=True, prepend=True)
            )

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _Dequantized(nn.Module):
    """Runs an integer module and hands its consumers a float tensor."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        return out.dequantize() if isinstance(out, Tensor) and out.is_quantized else out


def _set_path(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[attr] = module


def report(
    float_model: nn.Module,
    quantized_model: nn.Module,
    batches: Iterable[Any],
    *,
    sensitivity: bool = False,
    max_batches: int | None = None,
) -> Report:
    """Per-layer SQNR, error share and parameter bytes of ``quantized_model`` against ``float_model``.

    ``batches`` are model inputs as ``qswap.calibrate`` takes them (tensor, tuple of
    arguments or dict of keyword arguments per batch). ``sensitivity=True`` also runs the
    float model once per layer with only that layer quantized; ``report.ranking()`` then
    names the layers that hurt most first. Neither model is changed.

    >>> r = qswap.report(model, qmodel, test_batches, sensitivity=True)  # doctest: +SKIP
    >>> print(r.sorted("sensitivity"))  # doctest: +SKIP
    """
    from qswap.decompose import decompose_in_place
    from qswap.fuse import fuse_model
    from qswap.state import copy_model

    state = _compared_state(float_model, quantized_model)
    the_plan = state.plan
    layers = state.layers
    fused = copy_model(float_model)
    if decompose_in_place(fused, state.registry):  # the plan's paths are the decomposed ones
        float_model = copy_model(fused)
    fuse_model(fused, the_plan.fusion_groups, state.registry)
    fused.train(False)
    tally = _Tally(layers, fused, quantized_model, keep_references=sensitivity)
    flags = [(m, m.training) for m in [*float_model.modules(), *quantized_model.modules()]]
    float_model.train(False)
    quantized_model.train(False)
    try:
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and tally.count >= max_batches:
                    break
                tally.add(float_model, batch)
    finally:
        tally.remove()
        for m, flag in flags:
            m.training = flag
    if tally.count == 0:
        raise CalibrationError(
            "report() saw no batch: the iterable of batches was empty; pass at least one model "
            "input (a tensor, a tuple of positional arguments or a dict of keyword arguments)"
        )
    sens: dict[str, float] = {}
    if sensitivity:
        sens = _sensitivity(fused, tally.quant_modules, layers, tally.references)
    notes = [
        f"{n or '(root)'}: the float and quantized models call it a different number of times; "
        "not measured"
        for n in sorted(tally.mismatched)
    ]
    return Report(
        rows=_rows(the_plan, layers, float_model, fused, tally, sens),
        output_sqnr_db=_db(tally.out_signal, tally.out_noise),
        batches=tally.count,
        model_type=the_plan.model_type.__name__,
        backend=the_plan.backend.name,
        notes=notes,
    )


def _compared_state(float_model: nn.Module, quantized_model: nn.Module) -> QSwapState:
    """The quantized model's qswap state, after checking the two models belong together."""
    from qswap.state import state_of

    state = state_of(quantized_model)
    if state is None or state.stage != "converted":
        got = (
            "a prepared model that is not converted yet"
            if state
            else f"a {type(quantized_model).__name__} that qswap did not quantize"
        )
        raise PlanError(
            "qswap.report() compares a quantized model with its float model; its second "
            f"argument must be a model that qswap.convert() or qswap.quantize() returned, got {got}"
        )
    if state_of(float_model) is not None:
        raise PlanError(
            "qswap.report(float_model, quantized_model, batches): the first argument is a qswap "
            "model; pass the float model it was quantized from"
        )
    if state.plan.model_type is not type(float_model):
        raise PlanError(
            f"the quantized model was made from a {state.plan.model_type.__name__}, but the "
            f"float model is a {type(float_model).__name__}; pass the float model it was "
            "quantized from"
        )
    return state


class _Tally:
    """Signal and noise per layer and at the output, batch by batch."""

    def __init__(
        self,
        layers: Mapping[str, LayerSpec],
        fused: nn.Module,
        quantized_model: nn.Module,
        *,
        keep_references: bool,
    ) -> None:
        self.layers = layers
        self.fused = fused
        self.quantized_model = quantized_model
        self.keep_references = keep_references
        self.float_rec, self.quant_rec = _Recorder(), _Recorder()
        self.quant_modules: dict[str, nn.Module] = {}
        for name in layers:
            self.float_rec.watch(fused.get_submodule(name), name, inputs=True)
            module = quantized_model.get_submodule(name)
            self.quant_modules[name] = module
            self.quant_rec.watch(module, name, inputs=False)
        self.signal: dict[str, float] = dict.fromkeys(layers, 0.0)
        self.noise: dict[str, float] = dict.fromkeys(layers, 0.0)
        self.local_noise: dict[str, float] = dict.fromkeys(layers, 0.0)
        self.mismatched: set[str] = set()
        self.out_signal = self.out_noise = 0.0
        self.references: list[tuple[tuple[Any, ...], dict[str, Any], Tensor]] = []
        self.count = 0

    def add(self, float_model: nn.Module, batch: Any) -> None:
        """Run one batch through the float, fused and quantized models and add up the errors."""
        from qswap.plan import split_inputs

        split = split_inputs(batch)
        if split is None:
            raise CalibrationError(
                f"report batch {self.count} is None; each batch must be a tensor, a tuple of "
                "positional arguments or a dict of keyword arguments"
            )
        args, kwargs = split
        ref_out = _first_float(float_model(*args, **kwargs))
        self.fused(*args, **kwargs)
        q_out = _first_float(self.quantized_model(*args, **kwargs))
        twin = getattr(self.quantized_model, "torch_twin", None)
        if isinstance(twin, nn.Module):
            # a model run by another runtime (qswap.backends.ort): its layers are measured on
            # the torch model it was made from, its output as that runtime computes it
            twin(*args, **kwargs)
        if ref_out is None or q_out is None:
            raise PlanError("report() needs models whose output holds a float tensor")
        ref_out = ref_out.detach().clone()
        self.out_signal += float(ref_out.double().pow(2).sum())
        self.out_noise += float((ref_out.double() - q_out.double()).pow(2).sum())
        if self.keep_references:
            self.references.append((args, kwargs, ref_out))
        self.quant_rec.active = False
        for name in self.layers:
            self._add_layer(name)
        self.quant_rec.active = True
        self.float_rec.clear()
        self.quant_rec.clear()
        self.count += 1

    def _add_layer(self, name: str) -> None:
        ref_calls = self.float_rec.outputs.get(name, [])
        q_calls = self.quant_rec.outputs.get(name, [])
        if len(ref_calls) != len(q_calls):
            self.mismatched.add(name)
            return
        for ref, q in zip(ref_calls, q_calls, strict=True):
            r64 = ref.double()
            self.signal[name] += float(r64.pow(2).sum())
            self.noise[name] += float((r64 - q.double()).pow(2).sum())
        for (a, kw), ref in zip(self.float_rec.inputs.get(name, []), ref_calls, strict=False):
            local = _first_float(self.quant_modules[name](*a, **kw))
            if local is None or local.shape != ref.shape:
                self.mismatched.add(name)
                continue
            self.local_noise[name] += float((ref.double() - local.double()).pow(2).sum())

    def remove(self) -> None:
        self.float_rec.remove()
        self.quant_rec.remove()

    def ratios(self) -> dict[str, float]:
        """Each measured layer's local noise over its signal."""
        return {
            n: self.local_noise[n] / self.signal[n]
            for n in self.layers
            if n not in self.mismatched
            and self.signal[n] > 0
            and math.isfinite(self.local_noise[n])
        }


def _rows(
    the_plan: Plan,
    layers: Mapping[str, LayerSpec],
    float_model: nn.Module,
    fused: nn.Module,
    tally: _Tally,
    sens: Mapping[str, float],
) -> list[LayerReport]:
    """One row per quantized layer, and per skipped layer with float parameters of its own."""
    from qswap.registry import qualified_name

    ratios = tally.ratios()
    total_ratio = sum(ratios.values())
    rows: list[LayerReport] = []
    for d in the_plan:
        if d.shared_with is not None:
            continue
        layer = layers.get(d.name)
        if layer is None:
            row = _skipped_row(the_plan, d, float_model, fused, len(rows))
            if row is not None:
                rows.append(row)
            continue
        name = d.name
        before, after = _sizes(float_model, fused, the_plan, name, layer)
        ok = name not in tally.mismatched
        share: float | None = None
        if ok and name in ratios:
            share = ratios[name] / total_ratio if total_ratio > 0 else 0.0
        rows.append(
            LayerReport(
                index=len(rows),
                name=name,
                module_type=qualified_name(layer.module_type),
                decision=d.kind + (" (fallback)" if d.fallback else ""),
                backend=layer.backend,
                bits=_bits(layer),
                sqnr_db=_db(tally.signal[name], tally.noise[name]) if ok else None,
                local_sqnr_db=_db(tally.signal[name], tally.local_noise[name]) if ok else None,
                error_share=share,
                params_before=before,
                params_after=after,
                sensitivity_db=sens.get(name),
            )
        )
    return rows


def _skipped_row(
    the_plan: Plan, d: Decision, float_model: nn.Module, fused: nn.Module, index: int
) -> LayerReport | None:
    from qswap.registry import qualified_name

    if d.kind != "skip":
        return None
    module = float_model.get_submodule(d.name)
    if not any(p.is_floating_point() for p in module.parameters(recurse=False)):
        return None
    try:
        before, after = _sizes(float_model, fused, the_plan, d.name, None)
    except AttributeError:
        return None
    return LayerReport(
        index=index,
        name=d.name,
        module_type=qualified_name(d.module_type),
        decision="skip",
        backend=None,
        bits="float",
        sqnr_db=None,
        local_sqnr_db=None,
        error_share=None,
        params_before=before,
        params_after=after,
    )


def _sensitivity(
    fused: nn.Module,
    quant_modules: Mapping[str, nn.Module],
    layers: Mapping[str, LayerSpec],
    references: list[tuple[tuple[Any, ...], dict[str, Any], Tensor]],
) -> dict[str, float]:
    """Model output SQNR with only one layer quantized, for each layer."""
    out: dict[str, float] = {}
    for name, layer in layers.items():
        qmod = quant_modules[name]
        if not name:
            continue  # the whole model is one layer: nothing to compare it with
        original = fused.get_submodule(name)
        if qmod is original:
            continue
        swap_in = _Dequantized(qmod)  # an int8 module returns an integer tensor
        paths = [name, *[a for a in layer.aliases if a]]
        for p in paths:
            _set_path(fused, p, swap_in)
        signal = noise = 0.0
        try:
            with torch.no_grad():
                for args, kwargs, ref in references:
                    got = _first_float(fused(*args, **kwargs))
                    if got is None:
                        break
                    signal += float(ref.double().pow(2).sum())
                    noise += float((ref.double() - got.double()).pow(2).sum())
        finally:
            for p in paths:
                _set_path(fused, p, original)
        out[name] = _db(signal, noise)
    return out
