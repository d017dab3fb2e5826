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
import ctypes
import dataclasses
import errno
import hashlib
import json
import math
import os
import secrets
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeGuard

import torch
from torch import nn

from qswap.exceptions import CalibrationError, FileError, PlanError, QSwapError
from qswap.quantizers import QParams

if TYPE_CHECKING:
    from qswap.config import QuantSpec
    from qswap.plan import LayerSpec, Plan
    from qswap.state import QSwapState

__all__ = [
    "FORMAT_VERSION",
    "Calibration",
    "calibrated_layers",
    "check_writable",
    "load_calibration",
    "save_calibration",
    "structure_hash",
    "sync_folder",
    "temp_path",
    "write_atomic",
]

FORMAT_VERSION = 1
_KIND = "qswap-calibration"
ARTIFACT = "calibration artifact"
MODEL_FILE = "model file"
_WRITERS = {ARTIFACT: "qswap.save_calibration", MODEL_FILE: "qswap.save"}


# --------------------------------------------------------------------------- files


def temp_path(target: Path, tag: str = "tmp") -> Path:
    """A fresh name beside ``target`` that says whose it is: ``.<name>.qswap-<tag>-<8 hex>``.

    A process killed outright (``kill -9``, power loss) cannot remove its temporary file or
    folder; the name makes it recognisable as qswap's, and it is safe to delete.

    >>> temp_path(Path("out/model.pt")).name.startswith(".model.pt.qswap-tmp-")
    True
    """
    stem = target.name[:200] or "out"  # room for the suffix within the 255-byte name limit
    return target.parent / f".{stem}.qswap-{tag}-{secrets.token_hex(4)}"


def write_atomic(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path``, all or nothing.

    qswap writes every file through this one function: the bytes go to a temporary file
    beside ``path`` (``.<name>.qswap-tmp-XXXXXXXX``) created with mode ``0o666`` less the
    umask (what ``open()`` gives), are flushed to the disk (``fsync``), and the file is
    renamed over ``path``; the folder is then synced where the OS allows, so the rename
    survives a crash too. A reader never sees a half-written file, an existing ``path``
    stays intact when writing fails, and the temporary file is removed on any error. Only
    a process killed outright leaves it behind, under that recognisable name.

    Raises ``FileError`` naming ``path`` (never the temporary name) and what to do when
    ``path`` is a folder, its folder cannot be made, or the disk refuses the write.

    >>> import tempfile
    >>> write_atomic(os.path.join(tempfile.mkdtemp(), "a", "b.txt"), b"hi").read_bytes()
    b'hi'
    """
    target = Path(path)
    check_writable(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(target, exc) from exc
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = temp_path(target)
        try:
            fd = os.open(tmp, flags, 0o666)  # the OS applies the umask, as for open()
        except FileExistsError:
            continue  # another writer drew the same name: draw again
        except OSError as exc:
            raise _write_error(target, exc) from exc
        break
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, (bytes, bytearray, memoryview)):
                fh.write(data)
            else:
                data(fh)
            fh.flush()
            _fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, QSwapError):
            raise _write_error(target, exc) from exc
        raise
    sync_folder(target.parent)
    return target


def _fsync(fd: int) -> None:
    """``os.fsync``, except where the file system has no such thing (it then has nothing to lose)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk, where the OS allows it (POSIX)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            _fsync(fd)
        finally:
            os.close(fd)


def check_writable(target: Path) -> None:
    """Refuse (``FileError``), before any work, a file path that is a folder or lies under a file."""
    if target.is_dir():
        raise FileError(
            f"cannot write {str(target)!r}: it is a folder; pass a file path, e.g. "
            f"{str(target / 'name.ext')!r}, or remove the folder"
        )
    for parent in target.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise FileError(
                    f"cannot write {str(target)!r}: {str(parent)!r} is a file, not a folder; "
                    "choose a path in a folder"
                )
            return


def _write_error(target: Path, exc: OSError) -> FileError:
    """A ``FileError`` naming the user's path (never a temporary name) and what to do."""
    if isinstance(exc, IsADirectoryError) or target.is_dir():
        return FileError(
            f"cannot write {str(target)!r}: it is a folder; pass a file path, e.g. "
            f"{str(target / 'name.ext')!r}, or remove the folder"
        )
    if isinstance(exc, PermissionError):
        how = "choose a folder you can write to, or change its permissions"
    elif exc.errno == errno.ENOSPC:
        how = "the disk is full; free some space or write elsewhere"
    elif exc.errno == errno.EROFS:
        how = "the file system is read-only; write elsewhere"
    elif isinstance(exc, (NotADirectoryError, FileExistsError)):
        how = "a part of the path is a file, not a folder; choose another path"
    else:
        how = "check the path and that its folder is writable"
    return FileError(f"cannot write {str(target)!r}: {exc.strerror or exc}; {how}")


def save_payload(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """``torch.save`` a qswap payload to ``path`` through :func:`write_atomic`."""
    return write_atomic(path, lambda fh: torch.save(dict(payload), fh))


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
    stored = payload.get("checksum")  # absent from files written before qswap stored one
    if stored is not None:
        writer = "qswap.save_calibration" if kind == _KIND else "qswap.save"
        meta, tensors = payload.get("meta"), payload.get("tensors")
        if (
            not isinstance(stored, str)
            or not isinstance(meta, str)
            or not isinstance(tensors, dict)
            or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
            )
            or stored != _checksum(kind, version, meta, tensors)
        ):
            raise CalibrationError(
                f"{what} {str(p)!r} was changed after qswap wrote it: its contents do not "
                "match the checksum stored in it (a damaged copy, or an edit). Copy it again "
                f"from where it came, or write it again with {writer}"
            )
    return payload


def _checksum(kind: str, version: int, meta: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over everything a qswap file holds: kind, version, meta text, every tensor."""
    h = hashlib.sha256(f"{kind}\n{version}\n{meta}".encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"\n{key}:{t.dtype}:{list(t.shape)}\n".encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def make_payload(
    kind: str, meta: Mapping[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """What ``torch.save`` writes for a qswap file: kind, version, meta JSON, tensors, checksum."""
    text = json.dumps(meta, sort_keys=True)
    return {
        "qswap": kind,
        "format_version": FORMAT_VERSION,
        "meta": text,
        "tensors": tensors,
        "checksum": _checksum(kind, FORMAT_VERSION, text, tensors),
    }


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
    for i, (a, b) in enumerate(zip(saved, now, strict=False)):
        if a != b:
            pa, _, ta = a.rpartition(":")
            pb, _, tb = b.rpartition(":")
            if pa == pb:
                return f"module {pa or '(root)'!r} is a {ta} in the file's model, a {tb} here"
            return (
                f"module #{i} is {pa or '(root)'!r} ({ta}) in the file's model but "
                f"{pb or '(root)'!r} ({tb}) here"
            )
    if len(saved) > len(now):
        path, _, kind = saved[len(now)].rpartition(":")
        return f"module {path!r} ({kind}) of the file's model is missing here"
    if len(now) > len(saved):
        path, _, kind = now[len(saved)].rpartition(":")
        return f"module {path!r} ({kind}) is not in the file's model"
    return "the module lists agree"


def _module_device(module: nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    for buf in module.buffers():
        return buf.device
    return torch.device("cpu")


def _slot_tensor(module: nn.Module, slot: str) -> torch.Tensor | None:
    """The float value of a parameter slot before quantization, where the model still has it."""
    from qswap.slots import original_of, param_location, parametrizations_of

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


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    """Feed the bytes of a tensor's elements (row-major) to the hash ``h``, through torch alone.

    The CPU wheel of torch comes without numpy, so ``.numpy().tobytes()`` is not an option;
    these are the same bytes, read in place from the contiguous CPU tensor while it is alive.
    """
    data = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    size = data.numel() * data.element_size()
    if size:
        h.update((ctypes.c_char * size).from_address(data.data_ptr()))


def _digest(t: torch.Tensor) -> str:
    """A short hash of a tensor's dtype and values (the weights an artifact was calibrated on)."""
    h = hashlib.sha256(str(t.dtype).encode())
    _hash_tensor(h, t)
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
    from qswap.slots import WeightObserver, activation_slot, param_location, parametrizations_of

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
    #: what the file is, for messages: ``"calibration artifact"`` or ``"model file"``
    kind: str = ARTIFACT

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
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _state(model: nn.Module, what: str) -> QSwapState:
    from qswap.state import state_of

    state = state_of(model)
    if state is None:
        raise CalibrationError(
            f"{what} needs a model that qswap.prepare() (and calibrate()) or qswap.convert() "
            f"returned, got a {type(model).__name__} that qswap did not prepare"
        )
    return state


def calibration_payload(model: nn.Module) -> dict[str, Any]:
    """The artifact of a calibrated (prepared) or converted model, as ``torch.save`` takes it."""
    from qswap.config import dump_config
    from qswap.registry import qualified_name
    from qswap.version import __version__

    state = _state(model, "save_calibration()")
    if state.stage == "prepared" and state.failed is not None:
        raise CalibrationError(
            f"save_calibration(): the last calibrate() on this model stopped early "
            f"({state.failed}), so its observers hold statistics of part of the data; nothing "
            "was written. Fix the data and calibrate again, then save"
        )
    the_plan = state.plan
    observers: dict[str, dict[str, dict[str, Any]]] = {}
    if state.stage == "prepared":
        from qswap.qparams import chain_inputs, collect_qparams

        for name, layer in state.layers.items():
            observers[name] = _observers(model, layer)
        # the qparams convert will use: fake layers fed by a quantized layer take its output's
        layers = chain_inputs(model, state, collect_qparams(model, the_plan, state.layers))
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
                # a counterpart that stores its weight in another layout says the float one
                float_shape = getattr(module, "float_shape", None)
                shape = float_shape(slot) if callable(float_shape) else None
                shapes[slot] = list(value.shape if shape is None else shape)
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
    return make_payload(_KIND, meta, tensors)


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
        shape = [int(s) for s in entry["shape"]]
        if math.prod(shape) > _MAX_EXAMPLE_ELEMENTS:
            raise CalibrationError(
                f"the recorded example input of shape {shape} has {math.prod(shape)} elements, "
                "too many to build zeros for a trace; pass example_inputs=... yourself"
            )
        return torch.zeros(shape, dtype=dtype)

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
    return save_payload(path, calibration_payload(model))


class _Fields:
    """Checks the fields of a loaded qswap file; each refusal names the file, the field, the fix."""

    def __init__(self, source: str, what: str) -> None:
        self.source = source
        self.what = what

    def fail(self, where: str, problem: str) -> CalibrationError:
        return CalibrationError(
            f"{self.what} {self.source!r}: {where} {problem}; the file is corrupt or was "
            f"edited. Write it again with {_WRITERS.get(self.what, 'qswap')}"
        )

    def table(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise self.fail(where, f"is a {type(value).__name__}, not a table")
        return value

    def text(self, value: Any, where: str, *, optional: bool = False) -> None:
        if not isinstance(value, str) and not (optional and value is None):
            raise self.fail(where, f"is {_shown(value)}, not text")

    def ints(self, value: Any, where: str) -> list[int]:
        if not isinstance(value, list) or not all(_is_int(v) and v >= 0 for v in value):
            raise self.fail(where, f"is {_shown(value)}, not a shape (a list of sizes)")
        return value


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}..." if len(text) > 60 else text


def _first_where(mask: torch.Tensor, values: torch.Tensor) -> str:
    """How many elements ``mask`` marks, and the first of them with its index."""
    count = int(mask.sum())
    if values.dim() == 0:
        return f"{values.item()}"
    index = [int(i) for i in mask.nonzero()[0]]
    return f"{count} such value(s), e.g. {values[tuple(index)].item()} at index {index}"


_INT32 = (-(2**31), 2**31 - 1)
_MAX_EXAMPLE_ELEMENTS = 1 << 28  # zeros for a trace: 1 GiB of float32 at most
_META_TEXT = ("model_type", "backend", "mode", "config", "qswap_version", "torch_version")
_DROPPABLE = ("input", "output")


def _check_meta(f: _Fields, meta: dict[str, Any]) -> list[Any]:
    """Check the file-level fields; return the layer table."""
    layers = meta.get("layers")
    if not isinstance(layers, list):
        raise f.fail("its layer table ('layers')", "is missing")
    digest = meta.get("structure_hash")
    if not isinstance(digest, str) or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
        raise f.fail("its structure hash", f"is {_shown(digest)}, not a SHA-256 hex digest")
    for key in _META_TEXT:
        if key in meta:
            f.text(meta[key], f"field {key!r}")
    structure = meta.get("structure", [])
    if not isinstance(structure, list) or not all(isinstance(s, str) for s in structure):
        raise f.fail("its module list ('structure')", "is not a list of module paths")
    groups = meta.get("fusion_groups", [])
    if not isinstance(groups, list) or not all(
        isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups
    ):
        raise f.fail("its fusion groups", "are not lists of module paths")
    example = meta.get("example_inputs")
    if example is not None:
        example = f.table(example, "its example inputs")
        args = example.get("args", [])
        if not isinstance(args, list):
            raise f.fail("its example inputs", "have no list of positional arguments")
        specs = [(f"example input #{i}", e) for i, e in enumerate(args)]
        specs += [
            (f"example input {k!r}", e)
            for k, e in f.table(example.get("kwargs", {}), "its example keyword inputs").items()
        ]
        for where, entry in specs:
            entry = f.table(entry, where)
            f.ints(entry.get("shape"), f"the shape of {where}")
            dtype = getattr(torch, str(entry.get("dtype")), None)
            if not isinstance(dtype, torch.dtype):
                raise f.fail(where, f"has dtype {_shown(entry.get('dtype'))}, not a torch dtype")
    return layers


def _slot_qparams(
    f: _Fields, where: str, info: Any, tensors: Mapping[str, torch.Tensor]
) -> QParams:
    """The QParams of one slot, after checking every field and both tensors."""
    info = f.table(info, where)
    key = info.get("tensor")
    if not isinstance(key, str):
        raise f.fail(where, "names no tensors (field 'tensor')")
    scale, zero_point = tensors.get(f"{key}.scale"), tensors.get(f"{key}.zero_point")
    if scale is None or zero_point is None:
        missing = f"{key}.scale" if scale is None else f"{key}.zero_point"
        raise f.fail(where, f"has no {missing.rpartition('.')[2]} tensor ({missing!r} is missing)")
    qmin, qmax = info.get("quant_min"), info.get("quant_max")
    if not (_is_int(qmin) and _is_int(qmax)) or not _INT32[0] <= qmin < qmax <= _INT32[1]:
        raise f.fail(
            where,
            f"has the integer range [{_shown(qmin)}, {_shown(qmax)}], not two 32-bit "
            "integers quant_min < quant_max",
        )
    axis, group = info.get("axis"), info.get("group_size")
    if axis is not None and not _is_int(axis):
        raise f.fail(where, f"has axis {_shown(axis)}, not an integer or null")
    if group is not None and not (_is_int(group) and group > 0):
        raise f.fail(where, f"has group_size {_shown(group)}, not a positive integer or null")
    if not scale.is_floating_point():
        raise f.fail(where, f"has a scale of dtype {scale.dtype}, not floating point")
    if zero_point.is_floating_point() or zero_point.is_complex() or zero_point.dtype == torch.bool:
        raise f.fail(where, f"has a zero point of dtype {zero_point.dtype}, not integer")
    if scale.numel() == 0:
        raise f.fail(where, f"has an empty scale (shape {list(scale.shape)})")
    if scale.shape != zero_point.shape:
        raise f.fail(
            where,
            f"has a scale of shape {list(scale.shape)} but a zero point of shape "
            f"{list(zero_point.shape)}; they must match",
        )
    recorded = info.get("shape")
    if recorded is not None and recorded != list(scale.shape):
        raise f.fail(
            where,
            f"has a scale of shape {list(scale.shape)} but the layer table records "
            f"{_shown(recorded)}",
        )
    finite = torch.isfinite(scale)
    if not bool(finite.all()):
        raise f.fail(where, f"has a non-finite scale ({_first_where(~finite, scale)})")
    if not bool((scale > 0).all()):
        raise f.fail(where, f"has a zero or negative scale ({_first_where(scale <= 0, scale)})")
    outside = (zero_point < qmin) | (zero_point > qmax)
    if bool(outside.any()):
        raise f.fail(
            where,
            f"has a zero point outside its integer range [{qmin}, {qmax}] "
            f"({_first_where(outside, zero_point)})",
        )
    for field_name, value in (
        ("scale_min", float(scale.min())),
        ("scale_max", float(scale.max())),
        ("zero_point_min", int(zero_point.min())),
        ("zero_point_max", int(zero_point.max())),
    ):
        if field_name in info and info[field_name] != value:
            raise f.fail(
                where,
                f"has {field_name.replace('_', ' ')} {value} but the layer table "
                f"records {_shown(info[field_name])}",
            )
    try:
        qp = QParams(scale, zero_point, qmin, qmax, axis, group)
    except PlanError as exc:
        raise f.fail(where, f"is inconsistent ({exc})") from exc
    if "granularity" in info and info["granularity"] != qp.granularity:
        raise f.fail(
            where,
            f"holds {qp.granularity} parameters but the layer table says "
            f"{_shown(info['granularity'])}",
        )
    return qp


def _check_layer(
    f: _Fields, index: int, entry: Any, tensors: Mapping[str, torch.Tensor]
) -> tuple[str, dict[str, QParams], torch.Tensor | None]:
    """Check one entry of the layer table; return its name, QParams by slot and bias shift."""
    entry = f.table(entry, f"layer #{index}")
    name = entry.get("name")
    if not isinstance(name, str):
        raise f.fail(f"layer #{index}", f"has the name {_shown(name)}, not a module path")
    where = f"layer {name or '(root)'!r}"
    for key in ("module_type", "backend"):
        if key in entry:
            f.text(entry[key], f"{where} field {key!r}", optional=True)
    slots = {
        slot: _slot_qparams(f, f"{where} slot {slot!r}", info, tensors)
        for slot, info in f.table(entry.get("slots"), f"{where} slots").items()
    }
    for slot, spec in f.table(entry.get("specs", {}), f"{where} specs").items():
        if spec is not None:
            f.table(spec, f"{where} spec of slot {slot!r}")
    for slot, shape in f.table(entry.get("param_shapes", {}), f"{where} shapes").items():
        f.ints(shape, f"{where} shape of {slot!r}")
    for slot, digest in f.table(entry.get("weight_digests", {}), f"{where} digests").items():
        f.text(digest, f"{where} digest of {slot!r}")
    for slot, summary in f.table(entry.get("observers", {}), f"{where} observers").items():
        f.table(summary, f"{where} observer of {slot!r}")
    dropped = entry.get("dropped", [])
    if not isinstance(dropped, list) or not set(dropped) <= set(_DROPPABLE):
        raise f.fail(
            where, f"lists {_shown(dropped)} as dropped slots; only 'input' and 'output' can be"
        )
    shift = None
    key = entry.get("bias_shift")
    if key is not None:
        shift = tensors.get(key) if isinstance(key, str) else None
        if shift is None:
            raise f.fail(where, f"names the bias shift {_shown(key)}, which is not in the file")
        if not shift.is_floating_point() or not bool(torch.isfinite(shift).all()):
            raise f.fail(where, "has a bias shift that is not finite floating-point numbers")
    return name, slots, shift


def _decode(payload: Mapping[str, Any], source: str, what: str = ARTIFACT) -> Calibration:
    """The ``Calibration`` in a payload, after checking every field it holds."""
    f = _Fields(source, what)
    text = payload.get("meta")
    try:
        meta = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError as exc:
        raise f.fail("its description ('meta')", f"is not JSON ({exc})") from exc
    meta = f.table(meta, "its description ('meta')")
    tensors = payload.get("tensors")
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise f.fail("its tensors", "are missing or not a table of tensors")
    qparams: dict[str, dict[str, QParams]] = {}
    shifts: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(_check_meta(f, meta)):
        name, slots, shift = _check_layer(f, index, entry, tensors)
        if name in qparams:
            raise f.fail(f"layer {name or '(root)'!r}", "appears twice in the layer table")
        qparams[name] = slots
        if shift is not None:
            shifts[name] = shift
        layers_meta[name] = entry
    return Calibration(
        qparams=qparams,
        meta=meta,
        source=source,
        layers_meta=layers_meta,
        bias_shifts=shifts,
        kind=what,
    )


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    """Read an artifact written by :func:`save_calibration` (weights-only: never runs code).

    Every field is checked: a scale that is not a positive finite number, a zero point
    outside its range, a tensor of the wrong shape or a missing entry is refused with a
    ``CalibrationError`` naming the file, the layer, the slot and what is wrong.

    >>> cal = load_calibration("vgg.qcal")  # doctest: +SKIP
    >>> print(cal)  # doctest: +SKIP
    """
    return _decode(read_payload(path, _KIND, ARTIFACT), str(path))


# --------------------------------------------------------------------------- reuse


def _fixes(kind: str) -> dict[str, str]:
    """How to fix each mismatch, for an artifact or for a saved model (``qswap.load``)."""
    if kind == MODEL_FILE:
        rebuild = "Pass a freshly built model of the class and with the arguments of the saved one"
        return {
            "model": rebuild,
            "config": "Load it with the registry it was saved with (registry=...)",
            "fusion": "Pass the example_inputs it was saved with (example_inputs=...)",
            "shape": rebuild,
            "verb": "saved from",
        }
    return {
        "model": "Calibrate this model and save a new artifact",
        "config": (
            "Use the artifact's config (qswap.load_calibration(path).config_text) or "
            "calibrate again"
        ),
        "fusion": (
            "Prepare with the same config and example_inputs as when calibrating (fusion "
            "follows a trace of the example inputs)"
        ),
        "shape": "Calibrate this model and save a new artifact",
        "verb": "made for",
    }


def _layout_problem(qp: QParams, slot: str, value: torch.Tensor) -> str | None:
    """Why the per-channel or per-group ``qp`` cannot apply to the parameter ``value``, if so."""
    if qp.axis is None:
        return None
    ndim = value.dim()
    if not -ndim <= qp.axis < ndim:
        return f"its scales run along axis {qp.axis}, but the {slot} has {ndim} dimension(s)"
    channels = value.shape[qp.axis]
    if qp.scale.shape[0] != channels:
        return (
            f"it has {qp.scale.shape[0]} scale(s) along axis {qp.axis}, but the {slot} of "
            f"shape {list(value.shape)} has {channels} channel(s) there"
        )
    if qp.group_size is not None and channels:
        per_channel = value.numel() // channels
        if qp.scale.shape[1] * qp.group_size != per_channel:
            return (
                f"its {qp.scale.shape[1]} group(s) of {qp.group_size} do not cover the "
                f"{per_channel} values per channel of the {slot} of shape {list(value.shape)}"
            )
    return None


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
    (naming the layer and slot), for other parameter shapes or scales that do not fit them,
    or -- with ``check_weights`` -- for other weights. When ``prepared`` has no example
    inputs yet, the recorded shapes give zero tensors for tracing.
    """
    from qswap.bias_correction import correctable
    from qswap.registry import qualified_name

    cal = calibration if isinstance(calibration, Calibration) else load_calibration(calibration)
    src = f"{cal.kind} {cal.source!r}"
    fix = _fixes(cal.kind)
    meta = cal.meta
    here = _structure(the_plan)
    if meta.get("structure_hash") != structure_hash(the_plan):
        saved = [str(s) for s in meta.get("structure", [])]
        model_type = str(meta.get("model_type", "?"))
        if saved == here and model_type == qualified_name(the_plan.model_type):
            raise PlanError(
                f"{src}: its structure hash does not match the module list recorded beside "
                f"it, so the file was edited or is corrupt. Write it again with "
                f"{_WRITERS.get(cal.kind, 'qswap')}"
            )
        difference = (
            f"the modules agree but the model is a {model_type} there, a "
            f"{qualified_name(the_plan.model_type)} here"
            if saved == here
            else _first_difference(saved, here)
        )
        raise PlanError(
            f"{src} was {fix['verb']} another model ({model_type}, "
            f"{len(saved)} modules; this {the_plan.model_type.__name__} has {len(here)}): "
            f"{difference}. {fix['model']}"
        )
    saved_groups = [list(g) for g in meta.get("fusion_groups", [])]
    groups = [list(g) for g in the_plan.groups]
    if "fusion_groups" in meta and saved_groups != groups:
        only_saved = [g for g in saved_groups if g not in groups]
        only_here = [g for g in groups if g not in saved_groups]
        what = (
            f"the file's model fused {' + '.join(only_saved[0])}"
            if only_saved
            else f"this plan fuses {' + '.join(only_here[0])}"
        )
        raise PlanError(
            f"{src} was calibrated with other fusion groups: {what}, this plan does not "
            f"({len(saved_groups)} groups there, {len(groups)} here). {fix['fusion']}"
        )
    out: dict[str, LayerSpec] = {}
    missing = [name for name in the_plan.layers if name not in cal.qparams]
    if missing:
        raise PlanError(
            f"{src} has no parameters for layer {missing[0]!r}, which this config quantizes: "
            f"it was calibrated with another config. {fix['config']}"
        )
    extra = [name for name in cal.qparams if name not in the_plan.layers]
    if extra:
        raise PlanError(
            f"{src} has parameters for layer {extra[0]!r}, which this config does not "
            f"quantize: it was calibrated with another config. {fix['config']}"
        )
    for name, layer in the_plan.layers.items():
        entry = cal.layers_meta.get(name, {})
        where = f"{src}: layer {name or '(root)'!r}"
        saved_specs = entry.get("specs", {})
        for slot, spec in _layer_specs(layer).items():
            before = saved_specs.get(slot)
            if before != spec:
                raise PlanError(
                    f"{where} slot {slot!r} was calibrated as {_describe(before)}, but this "
                    f"config says {_describe(spec)}. {fix['config']}"
                )
        module = prepared.get_submodule(name)
        for slot, shape in dict(entry.get("param_shapes", {})).items():
            value = _slot_tensor(module, slot)
            if value is not None and list(value.shape) != list(shape):
                raise PlanError(
                    f"{where} has a {slot} of shape {list(value.shape)} here but {list(shape)} "
                    f"in the file's model. {fix['shape']}"
                )
        params = layer.param_specs()
        for slot, qp in cal.qparams[name].items():
            value = _slot_tensor(module, slot) if slot in params else None
            problem = None if value is None else _layout_problem(qp, slot, value)
            if problem is not None:
                raise PlanError(
                    f"{where} slot {slot!r}: {problem}. The file is corrupt or was edited; "
                    f"write it again with {_WRITERS.get(cal.kind, 'qswap')}"
                )
        if check_weights:
            for slot, digest in dict(entry.get("weight_digests", {})).items():
                value = _slot_tensor(module, slot)
                if value is not None and _digest(value) != digest:
                    raise PlanError(
                        f"{src}: the {slot} of layer {name or '(root)'!r} differs from the one "
                        "it was calibrated with (the model was trained or loaded since); its "
                        "ranges would not fit. Calibrate again and save a new artifact"
                    )
        device = _module_device(module)
        qparams = {
            slot: qp if qp.scale.device == device else qp.to(device)
            for slot, qp in cal.qparams[name].items()
        }
        changes: dict[str, Any] = {"qparams": qparams}
        shift = cal.bias_shifts.get(name)
        if shift is not None:
            core = correctable(module)
            bias = None if core is None else core._parameters.get("bias")
            if bias is not None and shift.shape != bias.shape:
                raise PlanError(
                    f"{where}: its bias shift has shape {list(shift.shape)} but the bias has "
                    f"shape {list(bias.shape)}. The file is corrupt or was edited; write it "
                    f"again with {_WRITERS.get(cal.kind, 'qswap')}"
                )
            changes["bias_shift"] = shift.to(device)
        changes.update(
            (str(which), None) for which in entry.get("dropped", []) if which in _DROPPABLE
        )
        out[name] = dataclasses.replace(layer, **changes)
    from qswap.state import state_of

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
