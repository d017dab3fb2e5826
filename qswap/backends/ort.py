"""ONNX Runtime as a backend: qswap calibrates, ONNX Runtime runs the integer kernels.

A config with ``backend: onnxruntime`` (the ``ort_int8`` preset) is planned, prepared and
calibrated like any other. ``convert`` then builds the fake-quantized model (every layer
simulated in float with the calibrated grids), exports it as QDQ ONNX
(:func:`qswap.export_onnx`) and returns an :class:`OrtModel`: an ``nn.Module`` whose
``forward`` runs an ONNX Runtime session, where the QDQ pairs fuse into ``QLinearConv``,
``QGemm``... at ``extended`` optimization.

What ONNX Runtime's kernels compute decides the plan: activations use the full 8 bits, and
on a CPU without VNNI (where ONNX Runtime adds pairs of u8 x s8 products in 16 bits) the
weights of those layers keep to 7 bits -- measured once per process, shown in the plan,
overridable with ``vnni:`` (:mod:`qswap.cpu`). Layers ONNX Runtime has no integer kernel
for stay float in the graph (the preset's ``fallback: float``), so no Q/DQ pair is spent
on them.

The :class:`OrtModel` keeps its torch twin (``torch_twin``, the fake-quantized model it
was exported from): ``qswap.report`` measures layers on it, ``qswap.compare_layers`` checks
the ONNX file against it, ``qswap.save``/``qswap.load`` store and rebuild it (the ONNX
model is exported again from the loaded state). ``save_onnx(path)`` writes the ``.onnx``
file a deployment loads with ``onnxruntime.InferenceSession`` alone.

    >>> import torch, qswap  # doctest: +SKIP
    >>> qmodel = qswap.quantize(model, "ort_int8", calib_data=batches)  # doctest: +SKIP
    >>> qmodel(x)  # ONNX Runtime computes this  # doctest: +SKIP
    >>> qmodel.save_onnx("model.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from qswap.backends import fake
from qswap.exceptions import PlanError, UnsupportedModuleError
from qswap.export.onnx import Optimization, export_onnx, onnx_session
from qswap.persist.artifact import write_atomic
from qswap.state import STATE_ATTR, state_of

__all__ = ["OrtModel", "check_layer", "lower"]


def check_layer(layer: Any) -> str | None:
    """What ONNX Runtime's integer kernels cannot run of ``layer`` (None: they can).

    Its QDQ kernels take uint8 or int8 activations quantized per tensor and int8 weights
    quantized per tensor or per output channel, with static activation ranges.
    """
    if layer.mode != "static":
        return f"backend 'onnxruntime' runs static int8 (calibrated activations), not mode {layer.mode!r}"
    for slot, spec in layer.param_specs().items():
        if spec.granularity == "per_group":
            return f"ONNX Runtime's QLinear kernels take no per-group {slot} (per_channel or per_tensor)"
        if spec.bits != 8:
            return f"ONNX Runtime's integer kernels take 8-bit {slot}s, not {spec.bits}-bit"
    for which, spec in layer.activation_specs().items():
        if spec.granularity != "per_tensor":
            return f"ONNX Runtime's integer kernels take per-tensor {which} activations"
        if spec.bits != 8:
            return f"ONNX Runtime's integer kernels take 8-bit activations, not {spec.bits}-bit {which}"
    return None


def lower(
    model: nn.Module,
    layers: Mapping[str, Any],
    example_args: tuple[Any, ...],
    example_kwargs: Mapping[str, Any],
) -> nn.Module:
    """The ONNX Runtime backend's lowering (``qswap.registry.Lowering``).

    Its layers become fake-quantized (as on the fake backend), the whole model is exported
    as QDQ ONNX on the calibration example, and an :class:`OrtModel` running it is returned.
    """
    twin = fake.lower(model, layers, example_args, example_kwargs)
    state = state_of(twin)
    if state is not None:  # the twin is a converted fake model now; convert says so for all
        twin.__dict__[STATE_ATTR] = dataclasses.replace(
            state, stage="converted", layers=dict(layers)
        )
    return OrtModel(twin, example_args, example_kwargs)


def _flat(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
    """The inputs in export order: positions first, then keywords."""
    return [*args, *kwargs.values()]


class OrtModel(nn.Module):
    """A quantized model run by ONNX Runtime, with the torch model it was exported from.

    Its modules, parameters and buffers are its twin's (same names, same tensors), so
    ``state_dict``, ``named_modules`` and qswap's tools see the quantized model; ``forward``
    feeds the inputs to an ONNX Runtime session and returns its outputs as torch tensors in
    the structure the twin returns. After changing weights in place (or
    ``load_state_dict``), the next call exports again.
    """

    def __init__(
        self,
        twin: nn.Module,
        example_args: tuple[Any, ...],
        example_kwargs: Mapping[str, Any],
        *,
        threads: int | None = None,
        optimization: Optimization = "extended",
        opset: int = 17,
    ) -> None:
        super().__init__()
        # the twin's own dicts: one set of modules and tensors, seen from both
        self._modules = twin._modules
        self._parameters = twin._parameters
        self._buffers = twin._buffers
        object.__setattr__(self, "_twin", twin)
        self.training = False
        self._example = (tuple(example_args), dict(example_kwargs))
        self.threads = threads
        self.optimization: Optimization = optimization
        self.opset = opset
        self._onnx: bytes | None = None
        self._session: Any = None
        self._lock = threading.Lock()
        self._export()  # here, so a model ONNX cannot take fails in quantize, not later

    @property
    def torch_twin(self) -> nn.Module:
        """The fake-quantized torch model this ONNX model was exported from (same tensors)."""
        twin: nn.Module = self.__dict__["_twin"]
        mine = state_of(self)
        if mine is not None:  # what convert recorded for the whole model holds for the twin
            twin.__dict__[STATE_ATTR] = mine
        return twin

    # ------------------------------------------------------------------ export and session

    def _export(self) -> bytes:
        args, kwargs = self._example
        example: Any = dict(kwargs) if kwargs and not args else args if not kwargs else None
        if example is None:
            raise UnsupportedModuleError(
                "the ONNX Runtime backend exports models called with positional or with "
                "keyword arguments, not both; calibrate with one kind"
            )
        twin: nn.Module = self.torch_twin
        with torch.no_grad():
            out = twin(*args, **kwargs)
        leaves, spec = pytree.tree_flatten(out)
        try:  # a string copies and pickles quietly; a class pytree cannot name stays a spec
            self._out_spec: Any = pytree.treespec_dumps(spec)
        except (NotImplementedError, TypeError, ValueError):
            self._out_spec = spec
        self._out_tensor = [isinstance(leaf, torch.Tensor) for leaf in leaves]
        self._out_rest = [
            None if t else leaf for leaf, t in zip(leaves, self._out_tensor, strict=True)
        ]
        with tempfile.TemporaryDirectory(prefix="qswap-ort-") as tmp:
            # int32 biases (as ORT's own quantizer stores them): a layer whose output stays
            # float fuses into QGemm / QLinearConv only with one
            path = export_onnx(
                twin, example, Path(tmp) / "model.onnx", opset=self.opset, quantize_bias=True
            )
            data = path.read_bytes()
        self._onnx = data
        self._session = None
        return data

    @property
    def onnx_model(self) -> bytes:
        """The serialized ONNX model this module runs (exported again after weight changes)."""
        with self._lock:
            return self._onnx if self._onnx is not None else self._export()

    @property
    def session(self) -> Any:
        """The ``onnxruntime.InferenceSession`` (CPU) that runs this model."""
        with self._lock:
            data = self._onnx if self._onnx is not None else self._export()
            if self._session is None:
                self._session = onnx_session(
                    data, threads=self.threads, optimization=self.optimization
                )
                self._inputs = {i.name for i in self._session.get_inputs()}
            return self._session

    def set_threads(self, threads: int | None) -> OrtModel:
        """Run with ``threads`` intra-op threads (None: ONNX Runtime's choice); returns self."""
        with self._lock:
            self.threads = threads
            self._session = None
        return self

    def refresh(self) -> OrtModel:
        """Export again from the twin's current weights (done by ``load_state_dict`` too)."""
        with self._lock:
            self._onnx = None
            self._session = None
        return self

    def save_onnx(self, path: str | os.PathLike[str]) -> Path:
        """Write the ONNX model to ``path`` atomically; ``onnxruntime.InferenceSession`` loads it."""
        return write_atomic(path, self.onnx_model)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.refresh()
        return result

    # ------------------------------------------------------------------ running

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        session = self.session
        values = _flat(args, kwargs)
        # export_onnx's names: "input" alone, else input_<i> for positions and the keywords
        names = (
            ["input"]
            if len(values) == 1
            else [f"input_{i}" for i in range(len(args))] + list(kwargs)
        )
        feed = {}
        for name, value in zip(names, values, strict=False):
            if name not in self._inputs:
                continue  # an input the graph does not read (the exporter drops those)
            if not isinstance(value, torch.Tensor):
                raise UnsupportedModuleError(
                    f"the ONNX Runtime model takes tensors; input {name!r} is a {type(value).__name__}"
                )
            feed[name] = value.detach().cpu().numpy()
        missing = self._inputs - set(feed)
        if missing:
            raise PlanError(
                f"the ONNX model needs inputs {sorted(missing)}, as it was calibrated; got "
                f"{len(args)} positional and {sorted(kwargs)} keyword argument(s)"
            )
        outs = iter(torch.from_numpy(o) for o in session.run(None, feed))
        leaves = [
            next(outs) if t else rest
            for t, rest in zip(self._out_tensor, self._out_rest, strict=True)
        ]
        spec = self._out_spec
        return pytree.tree_unflatten(
            leaves, pytree.treespec_loads(spec) if isinstance(spec, str) else spec
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None  # an ONNX Runtime session does not pickle; made again
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()

    def extra_repr(self) -> str:
        size = len(self._onnx) if self._onnx is not None else 0
        return f"ONNX Runtime, opset {self.opset}, {size / 1024:.0f} KiB, optimization {self.optimization!r}"
