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
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qswap.artifact import (
    FORMAT_VERSION,
    _decode,
    _meta,
    _torch_bytes,
    calibration_payload,
    example_inputs_from,
    read_payload,
    write_atomic,
)
from qswap.exceptions import PlanError
from qswap.registry import Registry, qualified_name

__all__ = ["load", "save"]

_KIND = "qswap-model"


# --------------------------------------------------------------------------- state encoding


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON description of one ``state_dict`` value; its tensors go into ``tensors``."""

    def put(t: torch.Tensor) -> str:
        name = f"s{len(tensors)}"
        tensors[name] = t.detach().to("cpu").clone()
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
            "seq": [_encode(v, f"{key}[{i}]", tensors) for i, v in enumerate(value)],
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
    from qswap.backends.torch_int8 import _torch_ao_deprecations_silenced

    with _torch_ao_deprecations_silenced():
        yield


def _decode_value(entry: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if not isinstance(entry, dict):
        raise PlanError(f"unexpected state entry {entry!r}")
    if "t" in entry:
        return tensors[entry["t"]]
    if "q" in entry:
        ints = tensors[entry["q"]]
        with _quantized_quiet():
            if "scale" in entry:
                return torch._make_per_tensor_quantized_tensor(
                    ints, float(entry["scale"]), int(entry["zero_point"])
                )
            return torch._make_per_channel_quantized_tensor(
                ints,
                tensors[entry["scales"]].to(torch.float64),
                tensors[entry["zero_points"]].to(torch.int64),
                int(entry["axis"]),
            )
    if "seq" in entry:
        items = [_decode_value(e, tensors) for e in entry["seq"]]
        return tuple(items) if entry.get("tuple") else items
    if "dtype" in entry:
        dtype = getattr(torch, str(entry["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise PlanError(f"unknown dtype {entry['dtype']!r}")
        return dtype
    if "v" in entry:
        return entry["v"]
    raise PlanError(f"unexpected state entry {entry!r}")


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
    from qswap.observe import state_of

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
    encoded = {key: _encode(value, key, state_tensors) for key, value in state_dict.items()}
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
    payload = {
        "qswap": _KIND,
        "format_version": FORMAT_VERSION,
        "meta": json.dumps(meta, sort_keys=True),
        "tensors": tensors,
    }
    return write_atomic(path, _torch_bytes(payload))


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
    from qswap.observe import prepare
    from qswap.walker import plan

    payload = read_payload(path, _KIND, "saved qswap model")
    meta = _meta(payload)
    calibration = _decode(payload, str(path))
    for entry in calibration.layers_meta.values():
        entry["weight_digests"] = {}  # the saved state replaces the weights after convert
    if not isinstance(model, nn.Module):
        raise PlanError(
            f"qswap.load() rebuilds the saved model on a float model of the same class; pass an "
            f"instance (e.g. {meta.get('model_type', 'MyModel').rpartition('.')[2]}()), got "
            f"{type(model).__name__}"
        )
    saved_type = str(meta.get("model_type", "?"))
    if saved_type != qualified_name(type(model)):
        raise PlanError(
            f"saved qswap model {str(path)!r} is a {saved_type}, not a "
            f"{qualified_name(type(model))}; pass a freshly built {saved_type.rpartition('.')[2]}"
        )
    cfg = load_config(str(meta.get("config", "")), registry=registry)
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
    saved_decisions = meta.get("decisions", [])
    now = _decisions(the_plan)
    if saved_decisions and saved_decisions != now and len(saved_decisions) == len(now):
        for before, after in zip(saved_decisions, now):
            if list(before) != after:
                raise PlanError(
                    f"saved qswap model {str(path)!r}: module {after[0] or '(root)'!r} was "
                    f"planned as {before[1]} ({before[3] or before[2] or 'float'}) when saved but "
                    f"as {after[1]} ({after[3] or after[2] or 'float'}) now; load it with the "
                    "registry it was saved with (registry=...)"
                )
    prepared = prepare(model, the_plan, example_inputs=example_inputs, registry=registry)
    prepared.train(False)
    qmodel = convert(prepared, inplace=True, calibration=calibration)
    tensors = payload["tensors"]
    state_tensors = {
        k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")
    }
    try:
        state: Any = OrderedDict(
            (k, _decode_value(e, state_tensors)) for k, e in dict(meta["state"]).items()
        )
        state._metadata = OrderedDict(
            (str(k), dict(v)) for k, v in dict(meta.get("state_versions", {})).items()
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(
            f"saved qswap model {str(path)!r} has a corrupt state ({type(exc).__name__}: {exc}); "
            "save it again"
        ) from exc
    result = qmodel.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        what = []
        if result.missing_keys:
            what.append(f"missing {', '.join(result.missing_keys[:3])}")
        if result.unexpected_keys:
            what.append(f"unexpected {', '.join(result.unexpected_keys[:3])}")
        raise PlanError(
            f"saved qswap model {str(path)!r} does not fit this {type(model).__name__}: "
            f"{'; '.join(what)}. Build the model with the same arguments as the saved one"
        )
    return qmodel
