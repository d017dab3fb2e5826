"""Save and load quantized models: state, config and plan in one file that loads weights-only.

``qswap.save(qmodel, path)`` writes the converted model's ``state_dict`` (quantized tensors
stored as their integers, scales and zero points), its config, its plan and its calibration.
``qswap.load(path, model)`` rebuilds it on a freshly built float ``model`` of the same
class -- plan, fusion, convert with the saved calibration, then the saved state -- so the
loaded model reproduces the saved one's outputs bit for bit. Only tensors and plain data are
read (``torch.load(weights_only=True)``): loading a file never runs code from it; the
model's code is the caller's.

    >>> import torch, qswap, tempfile, os
    >>> x = torch.randn(8, 4)
    >>> q = qswap.quantize(torch.nn.Linear(4, 2), "w8a8_minmax", calib_data=[x])
    >>> path = save(q, os.path.join(tempfile.mkdtemp(), "linear.qswap"))
    >>> q2 = load(path, torch.nn.Linear(4, 2))
    >>> torch.equal(q(x), q2(x))
    True
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qswap.exceptions import ConfigError, PlanError
from qswap.persist.artifact import (
    MODEL_FILE,
    _decode,
    _Fields,
    _is_int,
    _meta,
    _shown,
    calibration_payload,
    example_inputs_from,
    make_payload,
    read_payload,
    save_payload,
)
from qswap.registry import Registry, qualified_name

__all__ = ["load", "save"]

_KIND = "qswap-model"


# --------------------------------------------------------------------------- state encoding


def _encode(
    value: Any,
    key: str,
    tensors: dict[str, torch.Tensor],
    seen: dict[tuple[Any, ...], tuple[str, torch.Tensor]],
) -> Any:
    """A JSON description of one ``state_dict`` value; its tensors go into ``tensors``.

    A tensor several entries share (a tied embedding and lm_head holding the same packed
    bytes) is written once: ``seen`` maps a view's identity to the name it was stored under,
    and holds the tensor, so that a temporary's memory is not reused by a later one.
    """

    def put(t: torch.Tensor) -> str:
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device)
        if t.data_ptr() and ident in seen:
            return seen[ident][0]
        name = f"s{len(tensors)}"
        tensors[name] = t.detach().to("cpu").clone()
        if t.data_ptr():
            seen[ident] = (name, t)
        return name

    if isinstance(value, torch.Tensor):
        if not value.is_quantized:
            return {"t": put(value)}
        scheme = value.qscheme()
        entry: dict[str, Any] = {
            "q": put(value.int_repr()),
            "dtype": str(value.dtype).removeprefix("torch."),
        }
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            entry.update(scale=float(value.q_scale()), zero_point=int(value.q_zero_point()))
        elif scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
            entry.update(
                scales=put(value.q_per_channel_scales()),
                zero_points=put(value.q_per_channel_zero_points()),
                axis=int(value.q_per_channel_axis()),
            )
        else:
            raise PlanError(
                f"cannot save state entry {key!r}: quantized tensors with qscheme {scheme} "
                "are not supported"
            )
        return entry
    if isinstance(value, (tuple, list)):
        return {
            "seq": [_encode(v, f"{key}[{i}]", tensors, seen) for i, v in enumerate(value)],
            "tuple": isinstance(value, tuple),
        }
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"v": value}
    raise PlanError(
        f"cannot save state entry {key!r} of type {type(value).__name__}: a saved qswap model "
        "holds tensors and plain values only"
    )


@contextlib.contextmanager
def _quantized_quiet() -> Iterator[None]:
    """Silence torch's deprecation notice for quantized tensor creation (int8 models only)."""
    from qswap.backends.torch_int8 import torch_ao_quiet

    with torch_ao_quiet():
        yield


# the integer dtype each quantized dtype stores, and its range
_QUANTIZED = {
    "qint8": (torch.int8, -128, 127),
    "quint8": (torch.uint8, 0, 255),
    "qint32": (torch.int32, -(2**31), 2**31 - 1),
}


def _decode_value(entry: Any, tensors: Mapping[str, torch.Tensor], key: str, f: _Fields) -> Any:
    """The ``state_dict`` value one JSON entry describes, after checking every field of it."""
    where = f"state entry {key!r}"
    if not isinstance(entry, dict):
        raise f.fail(where, f"is {_shown(entry)}, not a table")

    def tensor(field: str) -> torch.Tensor:
        found = tensors.get(entry[field]) if isinstance(entry.get(field), str) else None
        if found is None:
            raise f.fail(
                where, f"names the tensor {_shown(entry.get(field))}, which is not in the file"
            )
        return found

    if "t" in entry:
        return tensor("t")
    if "q" in entry:
        return _decode_quantized(entry, tensor("q"), tensor, where, f)
    if "seq" in entry:
        items = entry["seq"]
        if not isinstance(items, list):
            raise f.fail(where, f"has the sequence {_shown(items)}, not a list")
        values = [_decode_value(e, tensors, f"{key}[{i}]", f) for i, e in enumerate(items)]
        return tuple(values) if entry.get("tuple") else values
    if "dtype" in entry:
        dtype = getattr(torch, str(entry["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise f.fail(where, f"has the dtype {_shown(entry['dtype'])}, not a torch dtype")
        return dtype
    if "v" in entry:
        value = entry["v"]
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise f.fail(where, f"holds {_shown(value)}, not a plain value")
        return value
    raise f.fail(where, f"is {_shown(entry)}, which is no kind of state entry qswap writes")


def _decode_quantized(
    entry: dict[str, Any],
    ints: torch.Tensor,
    tensor: Any,
    where: str,
    f: _Fields,
) -> torch.Tensor:
    """A quantized tensor from its integers, scale(s) and zero point(s), each checked."""
    kind = _QUANTIZED.get(str(entry.get("dtype")))
    if kind is None:
        raise f.fail(
            where,
            f"has the quantized dtype {_shown(entry.get('dtype'))}, not one of {', '.join(_QUANTIZED)}",
        )
    storage, low, high = kind
    if ints.dtype != storage:
        raise f.fail(
            where, f"stores {ints.dtype} integers for a {entry['dtype']} tensor ({storage})"
        )
    if "scale" in entry:
        scale, zero_point = entry.get("scale"), entry.get("zero_point")
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
            or scale <= 0
        ):
            raise f.fail(where, f"has the scale {_shown(scale)}, not a positive finite number")
        if not _is_int(zero_point) or not low <= zero_point <= high:
            raise f.fail(
                where, f"has the zero point {_shown(zero_point)}, not an integer in [{low}, {high}]"
            )
        with _quantized_quiet():
            return torch._make_per_tensor_quantized_tensor(ints, float(scale), int(zero_point))
    scales, zero_points, axis = tensor("scales"), tensor("zero_points"), entry.get("axis")
    if not _is_int(axis) or not 0 <= axis < ints.dim():
        raise f.fail(
            where,
            f"has the axis {_shown(axis)}, not one of the {ints.dim()} axes of its "
            f"integers (shape {list(ints.shape)})",
        )
    channels = ints.shape[axis]
    if not scales.is_floating_point() or list(scales.shape) != [channels]:
        raise f.fail(
            where,
            f"has scales of shape {list(scales.shape)} ({scales.dtype}), not {channels} "
            f"floating-point numbers, one per channel along axis {axis}",
        )
    finite = torch.isfinite(scales)
    if not bool(finite.all()) or not bool((scales > 0).all()):
        raise f.fail(where, "has scales that are not all positive finite numbers")
    if (
        zero_points.is_floating_point()
        or zero_points.dtype == torch.bool
        or list(zero_points.shape) != [channels]
    ):
        raise f.fail(
            where,
            f"has zero points of shape {list(zero_points.shape)} ({zero_points.dtype}), "
            f"not {channels} integers",
        )
    if bool(((zero_points < low) | (zero_points > high)).any()):
        raise f.fail(where, f"has zero points outside [{low}, {high}]")
    with _quantized_quiet():
        return torch._make_per_channel_quantized_tensor(
            ints, scales.to(torch.float64), zero_points.to(torch.int64), int(axis)
        )


def _saved_state(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], f: _Fields) -> Any:
    """The saved ``state_dict`` (with its per-module versions), every entry checked."""
    entries = f.table(meta.get("state"), "its state ('state')")
    state_tensors = {
        k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")
    }
    state: Any = OrderedDict((k, _decode_value(e, state_tensors, k, f)) for k, e in entries.items())
    versions = f.table(meta.get("state_versions", {}), "its state versions")
    state._metadata = OrderedDict(
        (k, dict(f.table(v, f"the state version of {k!r}"))) for k, v in versions.items()
    )
    return state


def _check_quantization_buffers(qmodel: nn.Module, state: Mapping[str, Any], f: _Fields) -> None:
    """Refuse saved scales and zero points of qswap's and torch's quantized modules that are unusable.

    Only modules of those two libraries are checked: there a buffer named ``scale`` or
    ``*_scale`` is a quantization step (positive, finite) and ``zero_point`` an integer. A
    model's own parameter of that name (a norm's scale) may hold anything.
    """
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        is_scale = leaf == "scale" or leaf.endswith("_scale")
        is_zero = leaf == "zero_point" or leaf.endswith("_zero_point")
        if not (is_scale or is_zero) or not isinstance(value, torch.Tensor) or value.is_quantized:
            continue
        try:
            owner = qmodel.get_submodule(prefix)
        except AttributeError:
            continue
        if not type(owner).__module__.startswith(("qswap.", "torch.ao.nn.")):
            continue
        v = value.detach()
        if is_scale and not (
            v.is_floating_point() and bool(torch.isfinite(v).all()) and bool((v > 0).all())
        ):
            raise f.fail(
                f"state entry {key!r}", "is a quantization scale that is not positive and finite"
            )
        if is_zero and v.is_floating_point() and not bool((v == v.round()).all()):
            raise f.fail(f"state entry {key!r}", "is a zero point that is not whole numbers")


def _decisions(the_plan: Any) -> list[list[str]]:
    return [
        [
            d.name,
            d.kind,
            d.backend or "",
            qualified_name(d.counterpart) if d.counterpart is not None else "",
        ]
        for d in the_plan
    ]


# --------------------------------------------------------------------------- save / load


def save(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write a converted qswap model (state, config, plan, calibration) to ``path``.

    The file loads with ``torch.load(path, weights_only=True)``; it is written to a
    temporary name and renamed. Returns ``path``. Rebuild the model with :func:`load`.

    >>> qswap.save(qmodel, "vgg_int8.qswap")  # doctest: +SKIP
    """
    from qswap.state import state_of

    state = state_of(model)
    if state is None or state.stage != "converted":
        raise PlanError(
            f"qswap.save() needs a model that qswap.convert() or qswap.quantize() returned, got "
            f"{'a prepared model that is not converted yet' if state else 'a ' + type(model).__name__ + ' that qswap did not quantize'}; "
            "to keep only the calibration of a prepared model use qswap.save_calibration"
        )
    calibration = calibration_payload(model)
    tensors = dict(calibration["tensors"])
    state_tensors: dict[str, torch.Tensor] = {}
    state_dict = model.state_dict()
    seen: dict[tuple[Any, ...], tuple[str, torch.Tensor]] = {}
    encoded = {key: _encode(value, key, state_tensors, seen) for key, value in state_dict.items()}
    # per-module state versions: torch.ao's quantized modules read their state by version
    versions = {
        prefix: {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}
        for prefix, info in getattr(state_dict, "_metadata", {}).items()
    }
    meta = _meta(calibration)
    meta["kind"] = _KIND
    meta["plan"] = str(state.plan)
    meta["decisions"] = _decisions(state.plan)
    meta["state"] = encoded
    meta["state_versions"] = versions
    for name, t in state_tensors.items():
        tensors[f"state.{name}"] = t
    return save_payload(path, make_payload(_KIND, meta, tensors))


def _untie_where_saved_apart(qmodel: nn.Module, state: Mapping[str, Any]) -> None:
    """Give a state entry its own tensor where the rebuilt model shares it but the file does not.

    A float model with tied weights (a language model's ``lm_head`` and embedding) rebuilds
    with the tie, and a backend that keeps ties (``packed``) shares the packed bytes; but a
    weight method that fitted one of them untied it when it was saved. Loading both into
    one tensor would leave whichever came last in both modules.
    """
    groups: dict[int, list[str]] = {}
    for key, tensor in qmodel.state_dict(keep_vars=True).items():
        if isinstance(tensor, torch.Tensor) and key in state:
            groups.setdefault(id(tensor), []).append(key)
    for keys in groups.values():
        first = state[keys[0]]
        for key in keys[1:]:
            saved = state[key]
            if saved is first or (
                isinstance(saved, torch.Tensor)
                and isinstance(first, torch.Tensor)
                and saved.shape == first.shape
                and torch.equal(saved, first)
            ):
                continue
            path, _, name = key.rpartition(".")
            owner = qmodel.get_submodule(path)
            if name in owner._parameters:
                old = owner._parameters[name]
                assert old is not None
                owner._parameters[name] = nn.Parameter(old.detach().clone(), old.requires_grad)
            elif name in owner._buffers:
                buffer = owner._buffers[name]
                assert buffer is not None
                owner._buffers[name] = buffer.clone()


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    registry: Registry | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Rebuild the quantized model saved at ``path`` on ``model``, a float model of the same class.

    ``model``'s weights do not matter (the saved state replaces them) and ``model`` itself
    is left untouched. ``registry`` must hold any custom entries the config used.
    ``example_inputs`` replaces the zero tensors built from the saved input shapes for
    tracing. Raises ``PlanError`` when ``model`` does not match the saved one.

    >>> qmodel = qswap.load("vgg_int8.qswap", vgg(width=0.25))  # doctest: +SKIP
    """
    from qswap.config import load_config
    from qswap.convert import convert
    from qswap.plan import plan
    from qswap.prepare import prepare

    source = str(path)
    payload = read_payload(path, _KIND, MODEL_FILE)
    calibration = _decode(payload, source, MODEL_FILE)  # every field checked
    meta = calibration.meta
    f = _Fields(source, MODEL_FILE)
    for key in ("config", "model_type"):
        if not isinstance(meta.get(key), str):
            raise f.fail(f"field {key!r}", "is missing")
    saved_decisions = meta.get("decisions", [])
    if not isinstance(saved_decisions, list) or not all(
        isinstance(d, list) and len(d) == 4 and all(isinstance(x, str) for x in d)
        for d in saved_decisions
    ):
        raise f.fail("its plan decisions ('decisions')", "are not rows of four names")
    state = _saved_state(meta, payload["tensors"], f)  # before any work: a bad file fails fast
    for entry in calibration.layers_meta.values():
        entry["weight_digests"] = {}  # the saved state replaces the weights after convert
    if not isinstance(model, nn.Module):
        raise PlanError(
            f"qswap.load() rebuilds the saved model on a float model of the same class; pass an "
            f"instance (e.g. {meta['model_type'].rpartition('.')[2]}()), got "
            f"{type(model).__name__}"
        )
    saved_type = meta["model_type"]
    if saved_type != qualified_name(type(model)):
        raise PlanError(
            f"{MODEL_FILE} {source!r} is a {saved_type}, not a {qualified_name(type(model))}; "
            f"pass a freshly built {saved_type.rpartition('.')[2]}"
        )
    try:
        # a stored config is complete: its extends may not reach the file system
        cfg = load_config(meta["config"], registry=registry, files=False)
    except ConfigError as exc:
        raise PlanError(
            f"{MODEL_FILE} {source!r}: its config does not load here ({exc}). If it names "
            "components of your own, pass the registry that holds them (registry=...); "
            "otherwise the file is corrupt: save it again"
        ) from exc
    if example_inputs is None:
        found = example_inputs_from(meta.get("example_inputs"))
        example_inputs = None if found is None else (found[1] if not found[0] else found[0])
    flags = [(m, m.training) for m in model.modules()]
    model.train(False)  # trace as the quantized model runs: in eval mode
    try:
        the_plan = plan(model, cfg, example_inputs=example_inputs, registry=registry)
    finally:
        for m, flag in flags:
            m.training = flag
    now = _decisions(the_plan)
    if saved_decisions and saved_decisions != now and len(saved_decisions) == len(now):
        for before, after in zip(saved_decisions, now, strict=False):
            if list(before) != after:
                raise PlanError(
                    f"{MODEL_FILE} {source!r}: module {after[0] or '(root)'!r} was "
                    f"planned as {before[1]} ({before[3] or before[2] or 'float'}) when saved but "
                    f"as {after[1]} ({after[3] or after[2] or 'float'}) now; load it with the "
                    "registry it was saved with (registry=...)"
                )
    prepared = prepare(model, the_plan, example_inputs=example_inputs, registry=registry)
    prepared.train(False)
    qmodel = convert(prepared, inplace=True, calibration=calibration)
    _check_quantization_buffers(qmodel, state, f)
    _untie_where_saved_apart(qmodel, state)
    try:
        result = qmodel.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a saved tensor whose shape does not fit this model
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0] if first else ""
        raise PlanError(
            f"{MODEL_FILE} {source!r} does not fit this {type(model).__name__}: {detail[:300]}. "
            "Build the model with the same arguments as the saved one"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        what = []
        if result.missing_keys:
            what.append(f"missing {', '.join(result.missing_keys[:3])}")
        if result.unexpected_keys:
            what.append(f"unexpected {', '.join(result.unexpected_keys[:3])}")
        raise PlanError(
            f"{MODEL_FILE} {source!r} does not fit this {type(model).__name__}: "
            f"{'; '.join(what)}. Build the model with the same arguments as the saved one"
        )
    return qmodel
