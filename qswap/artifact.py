"""Calibration artifacts: every layer's quantization parameters in one file, reusable without data.

``save_calibration(model, path)`` writes the per-slot ``QParams`` (scales, zero points,
integer ranges, layout) of a calibrated or converted model, with the config, the qswap and
torch versions, a hash of the model's structure, the specs each layer was calibrated with
and a summary of each observer's state. ``qswap.convert(prepared, calibration=path)``
reuses it instead of the observers, giving exactly the model that calibrating again gives.

The file is what ``torch.save`` writes for a dict of JSON text and plain tensors, so it loads
with ``torch.load(path, weights_only=True)``: reading an artifact never runs code.

    >>> import torch, qswap, tempfile, os
    >>> prepared = qswap.prepare(torch.nn.Linear(4, 2), "w8a8_minmax")
    >>> _ = qswap.calibrate(prepared, [torch.randn(8, 4)], progress=False)
    >>> path = os.path.join(tempfile.mkdtemp(), "linear.qcal")
    >>> _ = save_calibration(prepared, path)
    >>> sorted(load_calibration(path).qparams[""])
    ['input', 'output', 'weight']
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qswap.exceptions import CalibrationError, PlanError
from qswap.quantizers import QParams

if TYPE_CHECKING:
    from qswap.config import QuantSpec
    from qswap.observe import QSwapState
    from qswap.walker import LayerSpec, Plan

__all__ = [
    "FORMAT_VERSION",
    "Calibration",
    "calibrated_layers",
    "load_calibration",
    "save_calibration",
    "structure_hash",
    "write_atomic",
]

FORMAT_VERSION = 1
_KIND = "qswap-calibration"


# --------------------------------------------------------------------------- files


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    A reader never sees a half-written file, and an existing ``path`` stays intact when
    writing fails.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def _torch_bytes(payload: Mapping[str, Any]) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    return buffer.getvalue()


def read_payload(path: str | os.PathLike[str], kind: str, what: str) -> dict[str, Any]:
    """Load a qswap file of ``kind`` with ``weights_only=True``; clear errors for bad files."""
    p = Path(path)
    if not p.exists():
        raise CalibrationError(
            f"{what} {str(p)!r} does not exist; check the path, or write one with "
            f"{'qswap.save_calibration' if kind == _KIND else 'qswap.save'}"
        )
    if p.is_dir():
        raise CalibrationError(f"{what} {str(p)!r} is a folder, not a file; pass the file in it")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(
            f"{what} {str(p)!r} cannot be read ({first[:200]}); it is truncated, corrupt or "
            "not a qswap file. Write it again"
        ) from exc
    except Exception as exc:  # weights_only refuses anything but tensors and plain data
        if "global" in str(exc).lower():
            raise CalibrationError(
                f"{what} {str(p)!r} holds Python objects other than tensors and plain data, so "
                "it is not a qswap file and loading it could run code; refusing to read it. "
                "Write it again with qswap"
            ) from exc
        raise CalibrationError(
            f"{what} {str(p)!r} cannot be read ({type(exc).__name__}); it is truncated, "
            "corrupt or not a qswap file. Write it again"
        ) from exc
    if not isinstance(payload, dict) or payload.get("qswap") != kind:
        found = payload.get("qswap") if isinstance(payload, dict) else type(payload).__name__
        raise CalibrationError(
            f"{what} {str(p)!r} is not a {kind} file (found {found!r}); pass a file written "
            f"by {'qswap.save_calibration' if kind == _KIND else 'qswap.save'}"
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CalibrationError(
            f"{what} {str(p)!r} has format version {version!r}, newer than this qswap reads "
            f"({FORMAT_VERSION}); upgrade qswap (it was written by qswap "
            f"{_meta(payload).get('qswap_version', '?')})"
        )
    return payload


def _meta(payload: Mapping[str, Any]) -> dict[str, Any]:
    text = payload.get("meta")
    if not isinstance(text, str):
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


# --------------------------------------------------------------------------- structure


def _structure(the_plan: Plan) -> list[str]:
    from qswap.registry import qualified_name

    return [f"{d.name}:{qualified_name(d.module_type)}" for d in the_plan]


def structure_hash(the_plan: Plan) -> str:
    """SHA-256 over every module path and class of the model a plan was made for.

    >>> import torch, qswap
    >>> len(structure_hash(qswap.plan(torch.nn.Linear(2, 2), "w8a8_minmax")))
    64
    """
    text = f"{the_plan.model_type.__module__}.{the_plan.model_type.__qualname__}\n"
    text += "\n".join(_structure(the_plan))
    return hashlib.sha256(text.encode()).hexdigest()


def _first_difference(saved: list[str], now: list[str]) -> str:
    for i, (a, b) in enumerate(zip(saved, now)):
        if a != b:
            pa, _, ta = a.rpartition(":")
            pb, _, tb = b.rpartition(":")
            if pa == pb:
                return f"module {pa or '(root)'!r} is a {ta} in the artifact's model, a {tb} here"
            return (
                f"module #{i} is {pa or '(root)'!r} ({ta}) in the artifact's model but "
                f"{pb or '(root)'!r} ({tb}) here"
            )
    if len(saved) > len(now):
        path, _, kind = saved[len(now)].rpartition(":")
        return f"module {path!r} ({kind}) of the artifact's model is missing here"
    path, _, kind = now[len(saved)].rpartition(":")
    return f"module {path!r} ({kind}) is not in the artifact's model"


def _module_device(module: nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    for buf in module.buffers():
        return buf.device
    return torch.device("cpu")


def _slot_tensor(module: nn.Module, slot: str) -> torch.Tensor | None:
    """The float value of a parameter slot before quantization, where the model still has it."""
    from qswap.backends.fake import original_of, param_location, parametrizations_of

    try:
        owner, pname = param_location(module, slot)
    except PlanError:
        value = getattr(module, slot, None)
        if callable(value) and not isinstance(value, nn.Module):
            with contextlib.suppress(Exception):
                value = value()
        if isinstance(value, torch.Tensor):
            return value.dequantize() if value.is_quantized else value
        return None
    if parametrizations_of(owner, pname):
        return original_of(owner, pname)
    value = getattr(owner, pname, None)
    return value if isinstance(value, torch.Tensor) else None


def _digest(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(str(data.dtype).encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()[:16]


def _spec_json(spec: QuantSpec | None) -> dict[str, Any] | None:
    return None if spec is None else spec.model_dump(mode="json")


def _layer_specs(layer: LayerSpec) -> dict[str, dict[str, Any] | None]:
    specs: dict[str, dict[str, Any] | None] = {
        "weight": _spec_json(layer.weight),
        "input": _spec_json(layer.input),
        "output": _spec_json(layer.output),
    }
    for slot, spec in layer.slots.items():
        specs[slot] = _spec_json(spec)
    return specs


# --------------------------------------------------------------------------- observers


def _observer_summary(observer: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"class": type(observer).__name__}
    spec = getattr(observer, "spec", None)
    if spec is not None:
        out["name"] = spec.observer.name
    for name, buf in observer.state_dict().items():
        if not isinstance(buf, torch.Tensor) or name.endswith("layout"):
            continue
        if buf.numel() == 1:
            out[name] = buf.item()
        elif buf.numel() > 1 and (
            buf.is_floating_point() or buf.dtype in (torch.int32, torch.int64)
        ):
            v = buf.detach().float()
            out[name] = {
                "shape": list(buf.shape),
                "min": float(v.min()),
                "max": float(v.max()),
            }
    return out


def _observers(model: nn.Module, layer: LayerSpec) -> dict[str, dict[str, Any]]:
    """Summaries of the observers of a prepared layer, by slot (empty after convert)."""
    from qswap.backends.fake import activation_slot, param_location, parametrizations_of
    from qswap.observe import WeightObserver

    out: dict[str, dict[str, Any]] = {}
    module = model.get_submodule(layer.name)
    for slot in layer.param_specs():
        with contextlib.suppress(PlanError):
            owner, pname = param_location(module, slot)
            for p in parametrizations_of(owner, pname):
                if isinstance(p, WeightObserver):
                    out[slot] = _observer_summary(p.observer)
    for which in ("input", "output"):
        found = activation_slot(module, which)
        if found is not None and found.observer is not None:
            out[which] = _observer_summary(found.observer)
    if layer.input_from is not None:  # one observer per tensor: the producer's output one
        out["input"] = {"observed_as": f"{layer.input_from} output"}
    return out


# --------------------------------------------------------------------------- the artifact


@dataclass
class Calibration:
    """A loaded calibration artifact: per layer and slot the ``QParams``, plus what made them.

    ``qparams[layer][slot]`` are the parameters; ``meta`` holds the config (YAML text in
    ``meta["config"]``), versions, structure hash, specs and observer summaries.
    ``print(calibration)`` shows one row per slot.
    """

    qparams: dict[str, dict[str, QParams]]
    meta: dict[str, Any]
    source: str = "<memory>"
    layers_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per layer, what bias correction subtracts from its bias (``bias_correction: true``)
    bias_shifts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def config_text(self) -> str:
        """The config the model was calibrated with, as YAML text."""
        return str(self.meta.get("config", ""))

    def __str__(self) -> str:
        rows = [("layer", "slot", "range", "layout", "scale", "zero point", "observer")]
        for name, slots in self.qparams.items():
            for slot, qp in slots.items():
                layout: str = qp.granularity
                if qp.axis is not None:
                    layout += f"(axis={qp.axis})"
                s = qp.scale
                z = qp.zero_point
                scale = f"{s.item():.4g}" if s.numel() == 1 else f"{s.min():.3g}..{s.max():.3g}"
                zp = f"{z.item()}" if z.numel() == 1 else f"{int(z.min())}..{int(z.max())}"
                obs = self.layers_meta.get(name, {}).get("observers", {}).get(slot, {})
                producer = obs.get("observed_as")
                observer = obs.get("name", f"as {producer}" if producer else "-")
                rows.append(
                    (
                        name or "(root)",
                        slot,
                        f"[{qp.quant_min}, {qp.quant_max}]",
                        layout,
                        scale,
                        zp,
                        str(observer),
                    )
                )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        head = (
            f"qswap calibration {self.source}: model {self.meta.get('model_type', '?')}, "
            f"backend {self.meta.get('backend', '?')!r}, qswap {self.meta.get('qswap_version', '?')}, "
            f"torch {self.meta.get('torch_version', '?')}"
        )
        lines = [head]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _state(model: nn.Module, what: str) -> QSwapState:
    from qswap.observe import state_of

    state = state_of(model)
    if state is None:
        raise CalibrationError(
            f"{what} needs a model that qswap.prepare() (and calibrate()) or qswap.convert() "
            f"returned, got a {type(model).__name__} that qswap did not prepare"
        )
    return state


def calibration_payload(model: nn.Module) -> dict[str, Any]:
    """The artifact of a calibrated (prepared) or converted model, as ``torch.save`` takes it."""
    from qswap import __version__
    from qswap.config import dump_config
    from qswap.registry import qualified_name

    state = _state(model, "save_calibration()")
    the_plan = state.plan
    observers: dict[str, dict[str, dict[str, Any]]] = {}
    if state.stage == "prepared":
        from qswap.convert import _collect_qparams, chain_inputs

        for name, layer in state.layers.items():
            observers[name] = _observers(model, layer)
        # the qparams convert will use: fake layers fed by a quantized layer take its output's
        layers = chain_inputs(model, state, _collect_qparams(model, the_plan, state.layers))
    else:
        layers = state.layers
    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    for index, (name, layer) in enumerate(layers.items()):
        planned = the_plan.layers.get(name, layer)
        module: nn.Module | None
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        slots: dict[str, Any] = {}
        for slot, qp in layer.qparams.items():
            key = f"{index}.{slot}"
            tensors[f"{key}.scale"] = qp.scale.detach().to("cpu").clone()
            tensors[f"{key}.zero_point"] = qp.zero_point.detach().to("cpu").clone()
            slots[slot] = {
                "tensor": key,
                "quant_min": qp.quant_min,
                "quant_max": qp.quant_max,
                "axis": qp.axis,
                "group_size": qp.group_size,
                "granularity": qp.granularity,
                "shape": list(qp.scale.shape),
                "scale_min": float(qp.scale.min()),
                "scale_max": float(qp.scale.max()),
                "zero_point_min": int(qp.zero_point.min()),
                "zero_point_max": int(qp.zero_point.max()),
            }
        shapes: dict[str, list[int]] = {}
        digests: dict[str, str] = {}
        if module is not None:
            for slot in layer.param_specs():
                value = _slot_tensor(module, slot)
                if value is None:
                    continue
                shapes[slot] = list(value.shape)
                if state.stage == "prepared" or not getattr(model, "_qswap_int8", None):
                    digests[slot] = _digest(value)
        dropped = [
            which
            for which in ("input", "output")
            if getattr(planned, which) is not None and getattr(layer, which) is None
        ]
        bias_shift = None
        if layer.bias_shift is not None:
            bias_shift = f"{index}.bias_shift"
            tensors[bias_shift] = layer.bias_shift.detach().to("cpu").clone()
        entries.append(
            {
                "name": name,
                "module_type": qualified_name(layer.module_type),
                "backend": layer.backend,
                "specs": _layer_specs(planned),
                "slots": slots,
                "dropped": dropped,
                "param_shapes": shapes,
                "weight_digests": digests,
                "observers": observers.get(name, {}),
                "bias_shift": bias_shift,
            }
        )
    example = _example_specs(state)
    meta = {
        "kind": _KIND,
        "qswap_version": __version__,
        "torch_version": torch.__version__,
        "model_type": qualified_name(the_plan.model_type),
        "structure_hash": structure_hash(the_plan),
        "structure": _structure(the_plan),
        "fusion_groups": [list(g) for g in the_plan.groups],
        "backend": the_plan.backend.name,
        "mode": the_plan.config.mode,
        "config": dump_config(the_plan.config),
        "example_inputs": example,
        "layers": entries,
    }
    return {
        "qswap": _KIND,
        "format_version": FORMAT_VERSION,
        "meta": json.dumps(meta, sort_keys=True),
        "tensors": tensors,
    }


def _example_specs(state: QSwapState) -> dict[str, Any] | None:
    """Shapes and dtypes of the example inputs (never their values), where all are tensors."""
    if state.example_args is None:
        return None
    out: dict[str, Any] = {"args": [], "kwargs": {}}
    for a in state.example_args:
        if not isinstance(a, torch.Tensor):
            return None
        out["args"].append({"shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch.")})
    for k, a in state.example_kwargs.items():
        if not isinstance(a, torch.Tensor):
            return None
        out["kwargs"][k] = {"shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch.")}
    return out


def example_inputs_from(
    spec: Mapping[str, Any] | None,
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Zero tensors with the recorded shapes and dtypes (for tracing), or ``None``."""
    if not spec:
        return None

    def make(entry: Mapping[str, Any]) -> torch.Tensor:
        dtype = getattr(torch, str(entry["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CalibrationError(
                f"unknown dtype {entry['dtype']!r} in the recorded example inputs"
            )
        return torch.zeros([int(s) for s in entry["shape"]], dtype=dtype)

    args = tuple(make(e) for e in spec.get("args", []))
    kwargs = {str(k): make(e) for k, e in dict(spec.get("kwargs", {})).items()}
    return args, kwargs


def save_calibration(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the calibration of ``model`` (calibrated by ``qswap.calibrate``, or converted) to ``path``.

    The file holds every layer's ``QParams`` and what made them (config, versions,
    structure hash, specs, observer summaries); it is written to a temporary name and
    renamed. Returns ``path``.

    >>> import torch, qswap, tempfile, os
    >>> q = qswap.quantize(torch.nn.Linear(4, 2), "w8a8_minmax", calib_data=[torch.randn(8, 4)])
    >>> save_calibration(q, os.path.join(tempfile.mkdtemp(), "c.qcal")).name
    'c.qcal'
    """
    return write_atomic(path, _torch_bytes(calibration_payload(model)))


def _decode(payload: Mapping[str, Any], source: str) -> Calibration:
    meta = _meta(payload)
    tensors = payload.get("tensors")
    layers = meta.get("layers")
    if (
        not isinstance(tensors, dict)
        or not isinstance(layers, list)
        or "structure_hash" not in meta
    ):
        raise CalibrationError(
            f"calibration artifact {source!r} is incomplete (no layer table or tensors); it was "
            "not written by qswap.save_calibration or was edited. Write it again"
        )
    qparams: dict[str, dict[str, QParams]] = {}
    shifts: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, dict[str, Any]] = {}
    try:
        for entry in layers:
            name = str(entry["name"])
            slots: dict[str, QParams] = {}
            for slot, info in entry["slots"].items():
                key = info["tensor"]
                slots[slot] = QParams(
                    tensors[f"{key}.scale"],
                    tensors[f"{key}.zero_point"],
                    int(info["quant_min"]),
                    int(info["quant_max"]),
                    None if info["axis"] is None else int(info["axis"]),
                    None if info["group_size"] is None else int(info["group_size"]),
                )
            qparams[name] = slots
            key = entry.get("bias_shift")
            if key is not None:
                shifts[name] = tensors[key]
            layers_meta[name] = entry
    except (KeyError, TypeError, ValueError, PlanError) as exc:
        raise CalibrationError(
            f"calibration artifact {source!r} is corrupt ({type(exc).__name__}: {exc}); "
            "write it again with qswap.save_calibration"
        ) from exc
    return Calibration(
        qparams=qparams, meta=meta, source=source, layers_meta=layers_meta, bias_shifts=shifts
    )


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    """Read an artifact written by :func:`save_calibration` (weights-only: never runs code).

    >>> cal = load_calibration("vgg.qcal")  # doctest: +SKIP
    >>> print(cal)  # doctest: +SKIP
    """
    return _decode(read_payload(path, _KIND, "calibration artifact"), str(path))


# --------------------------------------------------------------------------- reuse


def calibrated_layers(
    prepared: nn.Module,
    the_plan: Plan,
    calibration: Calibration | str | os.PathLike[str],
    *,
    check_weights: bool = True,
) -> dict[str, LayerSpec]:
    """Each layer's spec with the qparams of ``calibration``, after checking it fits ``prepared``.

    Used by ``qswap.convert(prepared, calibration=...)``. Refuses (``PlanError``) an artifact
    made for another model (naming the first module that differs), for another config
    (naming the layer and slot), for other parameter shapes, or -- with ``check_weights`` --
    for other weights. When ``prepared`` has no example inputs yet, the recorded shapes
    give zero tensors for tracing.
    """
    cal = calibration if isinstance(calibration, Calibration) else load_calibration(calibration)
    src = cal.source
    meta = cal.meta
    here = _structure(the_plan)
    if meta.get("structure_hash") != structure_hash(the_plan):
        saved = [str(s) for s in meta.get("structure", [])]
        model_type = meta.get("model_type", "?")
        raise PlanError(
            f"calibration artifact {src!r} was made for another model ({model_type}, "
            f"{len(saved)} modules; this {the_plan.model_type.__name__} has {len(here)}): "
            f"{_first_difference(saved, here)}. Calibrate this model and save a new artifact"
        )
    saved_groups = [list(g) for g in meta.get("fusion_groups", [])]
    groups = [list(g) for g in the_plan.groups]
    if "fusion_groups" in meta and saved_groups != groups:
        only_saved = [g for g in saved_groups if g not in groups]
        only_here = [g for g in groups if g not in saved_groups]
        what = (
            f"the artifact's model fused {' + '.join(only_saved[0])}"
            if only_saved
            else f"this plan fuses {' + '.join(only_here[0])}"
        )
        raise PlanError(
            f"calibration artifact {src!r} was calibrated with other fusion groups: {what}, "
            f"this plan does not ({len(saved_groups)} groups there, {len(groups)} here). Prepare "
            "with the same config and example_inputs as when calibrating (fusion follows a "
            "trace of the example inputs)"
        )
    out: dict[str, LayerSpec] = {}
    missing = [name for name in the_plan.layers if name not in cal.qparams]
    if missing:
        raise PlanError(
            f"calibration artifact {src!r} has no parameters for layer {missing[0]!r}, which "
            "this config quantizes: it was calibrated with another config. Use the artifact's "
            "config (qswap.load_calibration(path).config_text) or calibrate again"
        )
    extra = [name for name in cal.qparams if name not in the_plan.layers]
    if extra:
        raise PlanError(
            f"calibration artifact {src!r} has parameters for layer {extra[0]!r}, which this "
            "config does not quantize: it was calibrated with another config. Use the "
            "artifact's config (qswap.load_calibration(path).config_text) or calibrate again"
        )
    for name, layer in the_plan.layers.items():
        entry = cal.layers_meta[name]
        saved_specs = entry.get("specs", {})
        for slot, spec in _layer_specs(layer).items():
            before = saved_specs.get(slot)
            if before != spec:
                raise PlanError(
                    f"calibration artifact {src!r}: layer {name or '(root)'!r} slot {slot!r} was "
                    f"calibrated as {_describe(before)}, but this config says {_describe(spec)}. "
                    "Use the artifact's config or calibrate again"
                )
        module = prepared.get_submodule(name)
        for slot, shape in dict(entry.get("param_shapes", {})).items():
            value = _slot_tensor(module, slot)
            if value is not None and list(value.shape) != list(shape):
                raise PlanError(
                    f"calibration artifact {src!r}: layer {name or '(root)'!r} has a {slot} of "
                    f"shape {list(value.shape)} here but {list(shape)} in the artifact's model; "
                    "calibrate this model and save a new artifact"
                )
        if check_weights:
            for slot, digest in dict(entry.get("weight_digests", {})).items():
                value = _slot_tensor(module, slot)
                if value is not None and _digest(value) != digest:
                    raise PlanError(
                        f"calibration artifact {src!r}: the {slot} of layer {name or '(root)'!r} "
                        "differs from the one it was calibrated with (the model was trained or "
                        "loaded since); its ranges would not fit. Calibrate again and save a new "
                        "artifact"
                    )
        device = _module_device(module)
        qparams = {
            slot: qp if qp.scale.device == device else qp.to(device)
            for slot, qp in cal.qparams[name].items()
        }
        changes: dict[str, Any] = {"qparams": qparams}
        shift = cal.bias_shifts.get(name)
        if shift is not None:
            changes["bias_shift"] = shift.to(device)
        changes.update((str(which), None) for which in entry.get("dropped", []))
        out[name] = dataclasses.replace(layer, **changes)
    from qswap.observe import state_of

    state = state_of(prepared)
    if state is not None and state.example_args is None:
        found = example_inputs_from(meta.get("example_inputs"))
        if found is not None:
            state.example_args, state.example_kwargs = found
    return out


def _describe(spec: Mapping[str, Any] | None) -> str:
    if spec is None:
        return "not quantized"
    bits = f"{'int' if spec.get('signed') else 'uint'}{spec.get('bits')}"
    gran = str(spec.get("granularity"))
    observer = spec.get("observer")
    name = observer if isinstance(observer, str) else (observer or {}).get("name")
    extra = " reduce_range" if spec.get("reduce_range") else ""
    return f"{bits} {spec.get('scheme')} {gran}{extra} observer={name}"
