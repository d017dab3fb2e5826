"""Real int8 on CPU: lower a calibrated model to PyTorch's quantized kernels (x86, qnnpack).

This is the only qswap module that touches ``torch.ao.nn.quantized`` and
``torch.ao.nn.intrinsic.quantized``, which torch 2.13 marks deprecated; their deprecation
warnings are silenced here, by category and message, where that API is imported and used.

Lowering swaps every layer whose counterpart is one of the classes below for a
``torch.ao.nn.quantized`` module built from the calibrated ``QParams``, and places
quant/dequant boundaries from a dataflow trace of the fused model: integer modules hand
integer tensors to integer consumers, ``+``/``cat`` between them run as quantized ops, and
every other consumer (a float module, a functional op without a kernel, the caller) gets a
float tensor. Nothing in the user's model code is edited: no QuantStub, no FloatFunctional.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, resolve_name

from qswap.dataflow import (
    ADD_FUNCTIONS,
    CAT_FUNCTIONS,
    GRID_FUNCTIONS,
    GRID_MODULES,
    RELU_FUNCTIONS,
)
from qswap.exceptions import UnsupportedModuleError
from qswap.trace import Call, Trace, trace
from qswap.tree import replace_module

if TYPE_CHECKING:
    from qswap.plan import LayerSpec
    from qswap.quantizers import QParams

__all__ = [
    "HOOK_DICTS",
    "IntegerModule",
    "IntegerNative",
    "IntegerPassthrough",
    "IntegerReLU",
    "QuantizedBNReLU2d",
    "QuantizedBNReLU3d",
    "QuantizedBatchNorm2d",
    "QuantizedBatchNorm3d",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedConv3d",
    "QuantizedConvReLU1d",
    "QuantizedConvReLU2d",
    "QuantizedConvReLU3d",
    "QuantizedDynamicLinear",
    "QuantizedDynamicLinearReLU",
    "QuantizedLayerNorm",
    "QuantizedLayerNorm2d",
    "QuantizedLinear",
    "QuantizedLinearReLU",
    "QuantizedTransposedLinear",
    "WeightView",
    "check_layer",
    "describe_lowering",
    "fbgemm_saturates",
    "lower_qnnpack",
    "lower_x86",
    "recorded_op",
    "torch_ao_quiet",
]

# torch 2.13 warns (once per process, from C++) when a quantized tensor is first created, and
# torch.ao's Python modules may warn on import. Only these two messages are silenced, and only
# around qswap's own use of that API; every other warning still reaches the user.
_QTENSOR_DEPRECATION = (
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor "
    r"creation functions"
)
_AO_DEPRECATION = r"(?s).*torch\.ao\.(nn\.)?(quantized|intrinsic|quantization)\b.*deprecated"


_SILENCED: contextvars.ContextVar[bool] = contextvars.ContextVar("qswap_ao_silenced", default=False)


@contextlib.contextmanager
def torch_ao_quiet() -> Iterator[None]:
    """Ignore torch.ao's deprecation warnings (only those) inside the block; cheap when nested."""
    if _SILENCED.get():
        yield  # an enclosing block already filters them (per-layer builders inside _lower)
        return
    token = _SILENCED.set(True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_QTENSOR_DEPRECATION, category=UserWarning)
            warnings.filterwarnings("ignore", message=_AO_DEPRECATION, category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=_AO_DEPRECATION, category=FutureWarning)
            yield
    finally:
        _SILENCED.reset(token)


with torch_ao_quiet():
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.nn.quantized.modules.linear import LinearPackedParams as _PackedParams

_QTENSOR_WARNING_SEEN = False


def _consume_qtensor_warning() -> None:
    """Trigger torch's once-per-process quantized-tensor warning where it is silenced."""
    global _QTENSOR_WARNING_SEEN
    if not _QTENSOR_WARNING_SEEN:
        with torch_ao_quiet():
            torch._empty_affine_quantized([1], scale=1.0, zero_point=0, dtype=torch.quint8)
        _QTENSOR_WARNING_SEEN = True


# --------------------------------------------------------------------------- specs


def _qparams(spec: LayerSpec, key: str, module: nn.Module) -> QParams:
    qp = spec.qparams.get(key)
    if qp is None:
        raise UnsupportedModuleError(
            f"{spec.name or type(module).__name__}: int8 lowering needs calibrated {key!r} "
            f"qparams, but the layer has only {sorted(spec.qparams) or 'none'}; quantize its "
            f"{key} (config `{'weight' if key == 'weight' else 'activation'}`) or skip the layer"
        )
    return qp


def _activation_qparams(qp: QParams, where: str) -> tuple[float, int]:
    """Per-tensor ``(scale, zero_point)`` of a ``quint8`` tensor equivalent to ``qp``.

    A signed 8-bit range is the unsigned one shifted by 128, so signed activation qparams
    map exactly onto torch's ``quint8`` kernels.
    """
    if qp.scale.numel() != 1:
        raise UnsupportedModuleError(
            f"{where}: torch's int8 kernels need per-tensor activation qparams, got "
            f"{tuple(qp.scale.shape)} scales; set `granularity: per_tensor` for activations"
        )
    zero_point = int(qp.zero_point.item())
    shift = 128 if qp.quant_min < 0 else 0
    if qp.quant_min + shift < 0 or qp.quant_max + shift > 255:
        raise UnsupportedModuleError(
            f"{where}: activation range [{qp.quant_min}, {qp.quant_max}] does not fit 8 bits; "
            "torch's int8 kernels need bits <= 8"
        )
    return float(qp.scale.item()), zero_point + shift


def _quantize_weight(weight: Tensor, qp: QParams, where: str) -> Tensor:
    """A ``qint8`` tensor holding exactly ``clamp(round(w / s) + z, qmin, qmax)``."""
    _consume_qtensor_warning()
    w = weight.detach().to(torch.float32)
    shift = -128 if qp.quant_min >= 0 and qp.quant_max > 127 else 0
    qmin, qmax = qp.quant_min + shift, qp.quant_max + shift
    if qmin < -128 or qmax > 127:
        raise UnsupportedModuleError(
            f"{where}: weight range [{qp.quant_min}, {qp.quant_max}] does not fit 8 bits; "
            "torch's int8 kernels need weight bits <= 8"
        )
    scale = qp.scale.detach().to(torch.float32)
    zero_point = qp.zero_point.detach().to(torch.int32) + shift
    if (scale.numel() == 1 and qp.axis is None) or scale.dim() == 0:
        s, z = float(scale.item()), int(zero_point.item())
        on_grid = torch.fake_quantize_per_tensor_affine(w, s, z, qmin, qmax)
        return torch.quantize_per_tensor(on_grid, s, z, torch.qint8)
    if qp.axis != 0 or scale.dim() != 1 or scale.numel() != w.shape[0]:
        raise UnsupportedModuleError(
            f"{where}: torch's int8 kernels take per-tensor or per-channel (axis 0) weights, got "
            f"scales of shape {tuple(scale.shape)} on axis {qp.axis}; use `granularity: "
            "per_channel, axis: 0` or per_tensor for weights"
        )
    on_grid = torch.fake_quantize_per_channel_affine(w, scale, zero_point, 0, qmin, qmax)
    return torch.quantize_per_channel(
        on_grid, scale.to(torch.float64), zero_point.to(torch.int64), 0, torch.qint8
    )


# --------------------------------------------------------------------------- counterparts


class _IntegerModuleState(dict[str, Any]):
    """Marks the extra state that ``IntegerModule.__getstate__`` adds."""


class IntegerModule(nn.Module):
    """Mixin: quantize a float input with the calibrated input qparams, then run the kernel."""

    input_scale: float = 1.0
    input_zero_point: int = 0
    scale: Any  # output qparams, as the torch.ao.nn.quantized class keeps them
    zero_point: Any

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:
        """Build the int8 module from a float one and its calibrated qparams."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        with torch._C.DisableTorchFunction():
            if not x.is_quantized:
                if x.dtype is not torch.float32:
                    x = x.to(torch.float32)
                x = torch.quantize_per_tensor(
                    x, self.input_scale, self.input_zero_point, torch.quint8
                )
            out: Tensor = super().forward(x)
            return out

    # torch.ao's quantized convolutions copy and pickle through a fixed tuple of fields;
    # keep the input qparams and hooks along with it.
    _EXTRA_STATE = (
        "input_scale",
        "input_zero_point",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
    )

    def __getstate__(self) -> Any:
        extra = {k: self.__dict__[k] for k in self._EXTRA_STATE if k in self.__dict__}
        return (_IntegerModuleState(extra), cast(Any, super()).__getstate__())

    def __setstate__(self, state: Any) -> None:
        if "_parameters" not in self.__dict__:  # unpickling: torch.ao's tuple state needs this
            nn.Module.__init__(self)
        if (
            isinstance(state, tuple)
            and len(state) == 2
            and isinstance(state[0], _IntegerModuleState)
        ):
            cast(Any, super()).__setstate__(state[1])
            self.__dict__.update(state[0])
        else:
            cast(Any, super()).__setstate__(state)

    def _set_input(self, spec: LayerSpec, module: nn.Module) -> None:
        qp = spec.qparams.get("input")
        if qp is not None:
            self.input_scale, self.input_zero_point = _activation_qparams(qp, f"{spec.name} input")

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, input_scale={self.input_scale:.6g}, "
            f"input_zero_point={self.input_zero_point}"
        )

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "input_scale"] = torch.tensor(self.input_scale, dtype=torch.float64)
        destination[prefix + "input_zero_point"] = torch.tensor(self.input_zero_point)

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for key, convert_to in (("input_scale", float), ("input_zero_point", int)):
            value = state_dict.pop(prefix + key, None)
            if value is not None:
                setattr(self, key, convert_to(value))
            elif strict:
                missing_keys.append(prefix + key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


@contextlib.contextmanager
def _refusal_explained(spec: LayerSpec) -> Iterator[None]:
    """torch.ao refuses some layers with bare asserts/ValueErrors: say which layer, and why."""
    try:
        yield
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise UnsupportedModuleError(
            f"{spec.name}: torch's int8 kernels cannot run this layer ({exc}); skip it with a "
            "rule or use backend 'fake'"
        ) from exc


def _out(spec: LayerSpec, module: nn.Module) -> tuple[float, int]:
    return _activation_qparams(_qparams(spec, "output", module), f"{spec.name} output")


def _bias(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().to(torch.float32)


def _inner(module: nn.Module, fused: type[nn.Module]) -> nn.Module:
    """The conv/linear/bn inside a torch.ao.nn.intrinsic fused container, else the module."""
    if isinstance(module, fused):
        first: nn.Module = module[0]  # type: ignore[index]
        return first
    return module


def _new_linear(cls: type[IntegerModule], linear: nn.Linear, qweight: Tensor) -> IntegerModule:
    """``cls(in, out, bias, qint8)`` with ``qweight`` set, packing the weight once.

    torch.ao's constructors pack a placeholder weight twice before ``set_weight_bias``
    packs the real one; this sets the same attributes directly (tests compare the two).
    """
    packed: Any = _PackedParams.__new__(_PackedParams)
    nn.Module.__init__(packed)
    packed.dtype = torch.qint8
    packed._packed_params = torch.ops.quantized.linear_prepack(qweight, _bias(linear))
    q: Any = cls.__new__(cls)
    nn.Module.__init__(q)
    q.in_features = linear.in_features
    q.out_features = linear.out_features
    q._packed_params = packed
    q.scale = 1.0
    q.zero_point = 0
    return cast(IntegerModule, q)


def _new_conv(
    cls: type[IntegerModule], conv: nn.modules.conv._ConvNd, qweight: Tensor
) -> IntegerModule:
    """``cls(in, out, kernel, stride, ...)`` with ``qweight`` set, packing the weight once.

    torch.ao's ``_ConvNd._init`` packs a placeholder weight (as costly as the real one on
    small convolutions) before ``set_weight_bias``; this sets the attributes it sets, with
    the float convolution's sizes (tuples already), and packs the real weight only. The
    checks of those constructors are ``_build_conv``'s (tests compare the two).
    """
    q: Any = cls.__new__(cls)
    nn.Module.__init__(q)
    q.in_channels = conv.in_channels
    q.out_channels = conv.out_channels
    q.kernel_size = conv.kernel_size
    q.stride = conv.stride
    q.padding = conv.padding
    q.dilation = conv.dilation
    q.transposed = False
    q.output_padding = (0,) * len(conv.kernel_size)
    q.groups = conv.groups
    q.padding_mode = conv.padding_mode
    q.set_weight_bias(qweight, _bias(conv))
    q.scale = 1.0
    q.zero_point = 0
    return cast(IntegerModule, q)


def _build_linear(
    cls: type[IntegerModule], module: nn.Module, spec: LayerSpec, fused: type[nn.Module]
) -> nn.Module:
    linear = _inner(module, fused)
    if not isinstance(linear, nn.Linear):
        raise UnsupportedModuleError(
            f"{spec.name}: expected nn.Linear (or {fused.__name__}), got {type(module).__name__}"
        )
    qweight = _quantize_weight(
        linear.weight, _qparams(spec, "weight", module), f"{spec.name} weight"
    )
    scale, zero_point = _out(spec, module)
    with torch_ao_quiet(), _refusal_explained(spec):
        q = _new_linear(cls, linear, qweight)
    q.scale = scale
    q.zero_point = zero_point
    q._set_input(spec, module)
    return q


def _build_conv(
    cls: type[IntegerModule],
    module: nn.Module,
    spec: LayerSpec,
    float_cls: type[nn.Module],
    fused: type[nn.Module],
) -> nn.Module:
    conv = _inner(module, fused)
    if not isinstance(conv, float_cls) or not isinstance(conv, nn.modules.conv._ConvNd):
        raise UnsupportedModuleError(
            f"{spec.name}: expected {float_cls.__name__} (or {fused.__name__}), got "
            f"{type(module).__name__}"
        )
    if isinstance(conv.padding, str):
        raise UnsupportedModuleError(
            f"{spec.name}: torch's quantized convolutions take numeric padding, not "
            f"padding={conv.padding!r}; write the padding as numbers or skip the layer"
        )
    if conv.padding_mode not in ("zeros", "reflect"):
        raise UnsupportedModuleError(
            f"{spec.name}: torch's quantized convolutions support padding_mode 'zeros' and "
            f"'reflect', not {conv.padding_mode!r}; skip the layer with a rule"
        )
    if conv.padding_mode == "reflect" and len(conv.kernel_size) == 3:  # torch.ao's Conv3d refuses
        raise UnsupportedModuleError(
            f"{spec.name}: torch's int8 kernels cannot run this layer (Conv3d does not support "
            "reflection padding); skip it with a rule or use backend 'fake'"
        )
    qweight = _quantize_weight(conv.weight, _qparams(spec, "weight", module), f"{spec.name} weight")
    scale, zero_point = _out(spec, module)
    with torch_ao_quiet(), _refusal_explained(spec):
        q = _new_conv(cls, conv, qweight)
    q.scale = scale
    q.zero_point = zero_point
    q._set_input(spec, module)
    return q


def _build_batchnorm(
    cls: type[IntegerModule], module: nn.Module, spec: LayerSpec, fused: type[nn.Module]
) -> nn.Module:
    bn = _inner(module, fused)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedModuleError(
            f"{spec.name}: expected a BatchNorm, got {type(module).__name__}"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModuleError(
            f"{spec.name}: a quantized BatchNorm needs running statistics, but this one has "
            "track_running_stats=False; skip the layer with a rule"
        )
    scale, zero_point = _out(spec, module)
    with torch_ao_quiet(), _refusal_explained(spec):
        q = cls(bn.num_features, bn.eps, bn.momentum)
    n = bn.num_features
    with torch.no_grad():
        q.weight.copy_(bn.weight.detach() if bn.weight is not None else torch.ones(n))  # type: ignore[operator]
        q.bias.copy_(bn.bias.detach() if bn.bias is not None else torch.zeros(n))  # type: ignore[operator]
        q.running_mean.copy_(bn.running_mean)  # type: ignore[operator]
        q.running_var.copy_(bn.running_var)  # type: ignore[operator]
        q.scale = torch.tensor(scale)
        q.zero_point = torch.tensor(zero_point)
    q._set_input(spec, module)
    return q


class WeightView(Tensor):
    """A quantized layer's weight (or bias) as the float values it computes with.

    The model's own code reads ``module.weight`` as it would on ``nn.Linear`` or ``nn.Conv2d``:
    ``.dtype``, ``.shape`` and ``.device`` cost nothing (Hugging Face ViT casts its input to
    ``projection.weight.dtype`` and T5 checks ``wo.weight.dtype`` in every forward); the
    values are unpacked and dequantized only when an operation uses them, and the result is
    a plain tensor. Calling it, ``module.weight()``, returns torch.ao's tensor as before.
    """

    _load: Callable[[], Tensor]
    _call: Callable[[], Tensor]

    @staticmethod
    def __new__(
        cls, shape: Sequence[int], load: Callable[[], Tensor], call: Callable[[], Tensor]
    ) -> WeightView:
        view: WeightView = Tensor._make_wrapper_subclass(
            cls, tuple(shape), dtype=torch.float32, device=torch.device("cpu")
        )
        view._load = load
        view._call = call
        return view

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        def real(t: Any) -> Any:
            return t._load() if isinstance(t, WeightView) else t

        from torch.utils._pytree import tree_map

        return func(*tree_map(real, tuple(args)), **tree_map(real, dict(kwargs or {})))

    def __call__(self) -> Tensor:
        return self._call()

    def __repr__(self) -> str:  # type: ignore[override]
        return f"WeightView({self._load()!r})"


def _float_shape(module: Any) -> tuple[int, ...]:
    """The float weight's shape, from the layer's sizes (no unpacking)."""
    d = module.__dict__
    if "in_features" in d:
        return (d["out_features"], d["in_features"])
    return (d["out_channels"], d["in_channels"] // d["groups"], *d["kernel_size"])


class _FloatReads:
    """Mixin: ``weight``/``bias`` read as on the float layer (float tensors), callable as in torch.ao."""

    if TYPE_CHECKING:  # torch.ao's, on the classes below (defining it here would shadow theirs)

        def _weight_bias(self) -> tuple[Tensor, Tensor | None]: ...

    @property
    def weight(self) -> WeightView:
        """The weight as float values; ``module.weight()`` is torch.ao's quantized tensor."""
        return WeightView(
            _float_shape(self),
            lambda: self._weight_bias()[0].dequantize(),
            lambda: self._weight_bias()[0],
        )

    @property
    def bias(self) -> WeightView | None:
        """The float bias (``None`` without one), as on the float layer; callable as in torch.ao."""
        b = self._weight_bias()[1]
        if b is None:
            return None

        def bias() -> Tensor:
            found = self._weight_bias()[1]
            return found if found is not None else torch.zeros(0)

        return WeightView(tuple(b.shape), bias, bias)

    def extra_repr(self) -> str:
        # torch.ao's own extra_repr calls weight() and bias() as methods
        q, b = self._weight_bias()
        d = cast(Any, self).__dict__
        if "in_features" in d:
            head = f"in_features={d['in_features']}, out_features={d['out_features']}"
        else:
            head = (
                f"{d['in_channels']}, {d['out_channels']}, kernel_size={d['kernel_size']}, "
                f"stride={d['stride']}"
            )
            if any(d["padding"]):
                head += f", padding={d['padding']}"
            if d["groups"] != 1:
                head += f", groups={d['groups']}"
        bias = "" if b is not None else ", bias=False"
        return (
            f"{head}, scale={d.get('scale')}, zero_point={d.get('zero_point')}, "
            f"qscheme={q.qscheme()}{bias}"
        )


class QuantizedLinear(IntegerModule, _FloatReads, nnq.Linear):  # type: ignore[misc]
    """int8 ``nn.Linear`` (torch.ao.nn.quantized.Linear) that also accepts float input."""

    #: in ``mode: dynamic`` its dynamic form applies a weight method's input scale (SmoothQuant)
    input_scale_modes: ClassVar[frozenset[str]] = frozenset({"dynamic"})

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from a float ``nn.Linear`` and calibrated weight/input/output qparams."""
        return _build_linear(cls, module, spec, nni.LinearReLU)


class QuantizedLinearReLU(IntegerModule, _FloatReads, nniq.LinearReLU):  # type: ignore[misc]
    """int8 ``Linear`` + ``ReLU`` in one kernel (from ``torch.ao.nn.intrinsic.LinearReLU``)."""

    input_scale_modes: ClassVar[frozenset[str]] = frozenset({"dynamic"})

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from ``LinearReLU`` (or a Linear followed by ReLU); output qparams after ReLU."""
        return _build_linear(cls, module, spec, nni.LinearReLU)


class QuantizedConv1d(IntegerModule, _FloatReads, nnq.Conv1d):  # type: ignore[misc]
    """int8 ``nn.Conv1d`` that also accepts float input."""

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from a float ``nn.Conv1d`` and calibrated qparams."""
        return _build_conv(cls, module, spec, nn.Conv1d, nni.ConvReLU1d)


class QuantizedConv2d(IntegerModule, _FloatReads, nnq.Conv2d):  # type: ignore[misc]
    """int8 ``nn.Conv2d`` that also accepts float input."""

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from a float ``nn.Conv2d`` and calibrated qparams."""
        return _build_conv(cls, module, spec, nn.Conv2d, nni.ConvReLU2d)


class QuantizedConv3d(IntegerModule, _FloatReads, nnq.Conv3d):  # type: ignore[misc]
    """int8 ``nn.Conv3d`` that also accepts float input."""

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from a float ``nn.Conv3d`` and calibrated qparams."""
        return _build_conv(cls, module, spec, nn.Conv3d, nni.ConvReLU3d)


class QuantizedConvReLU1d(IntegerModule, _FloatReads, nniq.ConvReLU1d):  # type: ignore[misc]
    """int8 ``Conv1d`` + ``ReLU`` in one kernel."""

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from ``torch.ao.nn.intrinsic.ConvReLU1d``; output qparams after ReLU."""
        return _build_conv(cls, module, spec, nn.Conv1d, nni.ConvReLU1d)


class QuantizedConvReLU2d(IntegerModule, _FloatReads, nniq.ConvReLU2d):  # type: ignore[misc]
    """int8 ``Conv2d`` + ``ReLU`` in one kernel."""

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from ``torch.ao.nn.intrinsic.ConvReLU2d``; output qparams after ReLU."""
        return _build_conv(cls, module, spec, nn.Conv2d, nni.ConvReLU2d)


class QuantizedConvReLU3d(IntegerModule, _FloatReads, nniq.ConvReLU3d):  # type: ignore[misc]
    """int8 ``Conv3d`` + ``ReLU`` in one kernel."""

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from ``torch.ao.nn.intrinsic.ConvReLU3d``; output qparams after ReLU."""
        return _build_conv(cls, module, spec, nn.Conv3d, nni.ConvReLU3d)


class QuantizedBatchNorm2d(IntegerModule, nnq.BatchNorm2d):
    """int8 ``BatchNorm2d`` for a BatchNorm that could not be folded into a convolution."""

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from a float ``nn.BatchNorm2d`` (running statistics) and output qparams."""
        return _build_batchnorm(cls, module, spec, nni.BNReLU2d)


class QuantizedBatchNorm3d(IntegerModule, nnq.BatchNorm3d):
    """int8 ``BatchNorm3d`` for a BatchNorm that could not be folded into a convolution."""

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from a float ``nn.BatchNorm3d`` (running statistics) and output qparams."""
        return _build_batchnorm(cls, module, spec, nni.BNReLU3d)


class QuantizedBNReLU2d(IntegerModule, nniq.BNReLU2d):
    """int8 ``BatchNorm2d`` + ``ReLU`` (from ``torch.ao.nn.intrinsic.BNReLU2d``)."""

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from ``BNReLU2d``; output qparams after ReLU."""
        return _build_batchnorm(cls, module, spec, nni.BNReLU2d)


class QuantizedBNReLU3d(IntegerModule, nniq.BNReLU3d):
    """int8 ``BatchNorm3d`` + ``ReLU`` (from ``torch.ao.nn.intrinsic.BNReLU3d``)."""

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from ``BNReLU3d``; output qparams after ReLU."""
        return _build_batchnorm(cls, module, spec, nni.BNReLU3d)


def _transposed(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` view of a layer that stores its weight as ``(in, out)``."""
    inner = module[0] if isinstance(module, nn.Sequential) else module
    weight = getattr(inner, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise UnsupportedModuleError(
            f"expected a layer with a 2-d (in, out) weight, got {type(module).__name__}"
        )
    bias = getattr(inner, "bias", None)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=isinstance(bias, Tensor))
    with torch.no_grad():
        linear.weight = nn.Parameter(weight.detach().t(), requires_grad=False)
        if isinstance(bias, Tensor):
            linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def _transposed_spec(spec: LayerSpec) -> LayerSpec:
    """``spec`` for the ``(out, in)`` form of an ``(in, out)`` weight: channel axis 1 -> 0."""
    qp = spec.qparams.get("weight")
    if qp is None or qp.axis is None:
        return spec
    return dataclasses.replace(
        spec, qparams={**spec.qparams, "weight": dataclasses.replace(qp, axis=1 - qp.axis)}
    )


class QuantizedTransposedLinear(QuantizedLinear):
    """int8 Linear for layers that store the weight as ``(in, out)``: transformers' ``Conv1D``.

    Its mapping names axis 1 (the output features) as the weight's channel axis; the int8
    module holds the transposed ``(out, in)`` weight, per output channel, as ``nn.Linear``.
    """

    weight_axis = 1  # the output channels of an (in, out) weight

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from a layer computing ``x @ weight + bias`` with an ``(in, out)`` weight."""
        return _build_linear(cls, _transposed(module), _transposed_spec(spec), nni.LinearReLU)


class QuantizedDynamicLinear(_FloatReads, nnqd.Linear):  # type: ignore[misc]
    """Dynamic int8 ``nn.Linear``: int8 weights; each input quantized per batch by the kernel.

    Float in, float out (``torch.ops.quantized.linear_dynamic``), so it needs no calibration
    and no boundaries. The input uses the full 8 bits unless its spec says ``reduce_range``
    (the plan keeps weights to 7 bits where a CPU without VNNI would saturate them).
    ``input_scale`` (``(in,)``, or empty): what a weight method that moved range from the
    input into the weight (SmoothQuant) multiplies each input channel by before the input
    is quantized.
    """

    reduce_range: bool = False
    input_scale: Tensor

    def _scaled(self, x: Tensor) -> Tensor:
        x = x.to(torch.float32)
        return x * self.input_scale if self.input_scale.numel() else x

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        saved = state_dict.get(prefix + "input_scale")
        if isinstance(saved, Tensor) and saved.shape != self.input_scale.shape:
            # a layer rebuilt from its qparams has no input scale yet (SmoothQuant stored one)
            self.input_scale = torch.zeros_like(saved, dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[no-untyped-call]

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from ``nn.Linear``, ``LinearReLU`` or an ``(in, out)`` Conv1D, and weight qparams."""
        return _build_dynamic(cls, module, spec)

    def forward(self, x: Tensor) -> Tensor:
        with torch._C.DisableTorchFunction():
            y: Tensor = torch.ops.quantized.linear_dynamic(
                self._scaled(x), self._packed_params._packed_params, self.reduce_range
            )
            return y.to(x.dtype)

    def extra_repr(self) -> str:
        scaled = ", input_scale" if self.input_scale.numel() else ""
        return f"{super().extra_repr()}, reduce_range={self.reduce_range}{scaled}"


class QuantizedDynamicLinearReLU(QuantizedDynamicLinear):
    """Dynamic int8 ``Linear`` + ``ReLU`` in one kernel (``linear_relu_dynamic``)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch._C.DisableTorchFunction():
            y: Tensor = torch.ops.quantized.linear_relu_dynamic(
                self._scaled(x), self._packed_params._packed_params, self.reduce_range
            )
            return y.to(x.dtype)


def _build_dynamic(
    cls: type[QuantizedDynamicLinear], module: nn.Module, spec: LayerSpec
) -> nn.Module:
    linear = _inner(module, nni.LinearReLU)
    if spec.counterpart is QuantizedTransposedLinear:
        linear, spec = _transposed(module), _transposed_spec(spec)
    if not isinstance(linear, nn.Linear):
        raise UnsupportedModuleError(
            f"{spec.name}: expected nn.Linear (or LinearReLU), got {type(module).__name__}"
        )
    qweight = _quantize_weight(
        linear.weight, _qparams(spec, "weight", module), f"{spec.name} weight"
    )
    with torch_ao_quiet(), _refusal_explained(spec):
        packed: Any = _PackedParams.__new__(_PackedParams)
        nn.Module.__init__(packed)
        packed.dtype = torch.qint8
        packed._packed_params = torch.ops.quantized.linear_prepack(qweight, _bias(linear))
        q: Any = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features = linear.in_features
        q.out_features = linear.out_features
        q._packed_params = packed
        q.version = 4
        q.training = False
        q.scale, q.zero_point = 1.0, 0  # torch.ao's state_dict keeps them (unused: float out)
    q.reduce_range = bool(spec.input is not None and spec.input.reduce_range)
    scale = spec.input_scale
    q.register_buffer(
        "input_scale", torch.zeros(0) if scale is None else scale.detach().to(torch.float32)
    )
    return cast(nn.Module, q)


class QuantizedLayerNorm(IntegerModule, nnq.LayerNorm):
    """int8 ``nn.LayerNorm`` (``quantized::layer_norm``): float scale and shift, integer in and out.

    Between int8 layers (a transformer's norm before its projections) it keeps the tensor
    integer instead of dequantizing around a float norm.
    """

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:  # type: ignore[override]
        """Build from an ``nn.LayerNorm`` (timm's too) and calibrated input/output qparams."""
        if not isinstance(module, nn.LayerNorm):
            raise UnsupportedModuleError(
                f"{spec.name}: expected an nn.LayerNorm, got {type(module).__name__}"
            )
        scale, zero_point = _out(spec, module)
        with torch_ao_quiet(), _refusal_explained(spec):
            q = cls(
                module.normalized_shape,
                module.weight,
                module.bias,
                scale,
                zero_point,
                eps=module.eps,
                elementwise_affine=module.elementwise_affine,
            )
        q._set_input(spec, module)
        return q


class QuantizedLayerNorm2d(QuantizedLayerNorm):
    """int8 LayerNorm over the channels of an NCHW tensor (timm's ``LayerNorm2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch._C.DisableTorchFunction():
            if not x.is_quantized:
                x = torch.quantize_per_tensor(
                    x.to(torch.float32), self.input_scale, self.input_zero_point, torch.quint8
                )
            y: Tensor = torch.ops.quantized.layer_norm(
                x.permute(0, 2, 3, 1).contiguous(),
                self.normalized_shape,
                weight=self.weight,
                bias=self.bias,
                eps=self.eps,
                output_scale=float(self.scale),
                output_zero_point=int(self.zero_point),
            )
            return y.permute(0, 3, 1, 2)


class IntegerPassthrough:
    """Counterpart of parameter-free modules that run on quantized tensors as they are.

    ``ReLU``, ``MaxPool2d``, ``AdaptiveAvgPool2d``, ``Flatten``, ``Dropout`` … have kernels for
    quantized input that keep its scale and zero point, so lowering keeps the module itself:
    it returns an integer tensor for integer input and a float tensor for float input.
    """

    keeps_grid = True  # qswap.dataflow: its output is on its input's grid

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:
        """Return ``module`` unchanged (it already runs on quantized tensors)."""
        return module


class IntegerReLU(nn.ReLU):
    """``nn.ReLU`` on integer tensors without torch-function dispatch.

    A ``quint8`` tensor with zero point 0 holds no negative value (a ReLU fused into the
    kernel before it already clamped it), so this ReLU hands it back as it is.
    """

    def forward(self, input: Tensor) -> Tensor:
        with torch._C.DisableTorchFunction():
            if input.is_quantized and input.q_zero_point() == 0 and input.dtype == torch.quint8:
                return input
            return torch.relu_(input) if self.inplace else torch.relu(input)

    def _get_name(self) -> str:
        return "ReLU"


class IntegerNative:
    """Mixin: ``forward`` without torch-function dispatch, for a module that only sees int8.

    Pooling and flattening keep a quantized tensor's scale and zero point, so the lowered
    model's dispatch mode would only hand the call on; skipping it saves ~3-4 us a call.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch._C.DisableTorchFunction():
            return cast(Any, super()).forward(*args, **kwargs)

    def _get_name(self) -> str:
        return type(self).__mro__[2].__name__


class _IntegerMaxPool1d(IntegerNative, nn.MaxPool1d):
    pass


class _IntegerMaxPool2d(IntegerNative, nn.MaxPool2d):
    pass


class _IntegerMaxPool3d(IntegerNative, nn.MaxPool3d):
    pass


class _IntegerAvgPool1d(IntegerNative, nn.AvgPool1d):
    pass


class _IntegerAvgPool2d(IntegerNative, nn.AvgPool2d):
    pass


class _IntegerAvgPool3d(IntegerNative, nn.AvgPool3d):
    pass


class _IntegerAdaptiveAvgPool1d(IntegerNative, nn.AdaptiveAvgPool1d):
    pass


class _IntegerAdaptiveAvgPool2d(IntegerNative, nn.AdaptiveAvgPool2d):
    pass


class _IntegerAdaptiveAvgPool3d(IntegerNative, nn.AdaptiveAvgPool3d):
    pass


class _IntegerFlatten(IntegerNative, nn.Flatten):
    pass


# Exact module type -> its variant that skips the dispatch mode (see IntegerNative).
_NATIVE_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.MaxPool1d: _IntegerMaxPool1d,
    nn.MaxPool2d: _IntegerMaxPool2d,
    nn.MaxPool3d: _IntegerMaxPool3d,
    nn.AvgPool1d: _IntegerAvgPool1d,
    nn.AvgPool2d: _IntegerAvgPool2d,
    nn.AvgPool3d: _IntegerAvgPool3d,
    nn.AdaptiveAvgPool1d: _IntegerAdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d: _IntegerAdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d: _IntegerAdaptiveAvgPool3d,
    nn.Flatten: _IntegerFlatten,
}


def _retyped(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` with ``module``'s settings, buffers and hooks (the same objects)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def float_native(module: nn.Module) -> nn.Module:
    """The plain torch module behind one of the int8-only pooling/flatten variants.

    >>> float_native(_retyped(nn.MaxPool2d(2), _IntegerMaxPool2d))
    MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
    """
    for base, variant in _NATIVE_MODULES.items():
        if type(module) is variant:
            return _retyped(module, base)
    return module


# A conv/linear whose only consumer is a ReLU is lowered to the fused kernel (see _analyse).
_WITH_RELU: dict[type[IntegerModule], type[IntegerModule]] = {
    QuantizedLinear: QuantizedLinearReLU,
    QuantizedConv1d: QuantizedConvReLU1d,
    QuantizedConv2d: QuantizedConvReLU2d,
    QuantizedConv3d: QuantizedConvReLU3d,
}


# --------------------------------------------------------------------------- function names


def _resolve_name(func: Callable[..., Any]) -> str:
    """The same spelling ``qswap.trace`` records (``torch.Tensor.add_`` for ``+=``)."""
    name = resolve_name(func)
    if name is None:
        module = getattr(func, "__module__", None) or "torch"
        name = f"{module}.{getattr(func, '__qualname__', repr(func))}"
    return str(name)


_NAMES: dict[Any, str] = {}


def _name_of(func: Callable[..., Any]) -> str:
    try:
        return _NAMES[func]
    except KeyError:
        name = _NAMES[func] = _resolve_name(func)
        return name
    except TypeError:  # unhashable callable
        return _resolve_name(func)


# --------------------------------------------------------------------------- the plan


class _Act(NamedTuple):
    """Per-tensor quint8 qparams of an activation, with the calibrated integer range."""

    scale: float
    zero_point: int
    quant_min: int
    quant_max: int

    def clipped_to_relu(self) -> _Act:
        """Qparams covering ``[0, max]`` when a ReLU follows (the negative half is wasted)."""
        if self.zero_point <= self.quant_min:
            return self
        high = (self.quant_max - self.zero_point) * self.scale
        if high <= 0.0:
            return self
        return _Act(high / (self.quant_max - self.quant_min), self.quant_min, *self[2:])


def _act(qp: QParams, where: str) -> _Act:
    scale, zero_point = _activation_qparams(qp, where)
    shift = 128 if qp.quant_min < 0 else 0
    return _Act(scale, zero_point, qp.quant_min + shift, qp.quant_max + shift)


@dataclasses.dataclass(frozen=True)
class _IntegerOp:
    """A functional op between integer modules that runs as a quantized kernel."""

    index: int  # position of the call in the trace
    name: str
    kind: str  # "add", "add_relu", "cat"
    operands: tuple[tuple[float, int], ...]  # expected (scale, zero_point) of each operand
    scale: float
    zero_point: int

    def key(self) -> tuple[Any, ...]:
        return (self.name, self.operands)


@dataclasses.dataclass
class _Lowering:
    """What the analysis of one trace decided."""

    integer_ops: list[_IntegerOp]
    relu_folds: dict[str, _Act]  # layer path -> output qparams of the fused conv/linear + ReLU
    dequantize_inputs: set[str]  # float leaf modules that receive integer tensors
    float_fed: set[str]  # weighted layers that some call feeds a float tensor
    integer_relus: set[str]  # nn.ReLU modules that only ever see integer tensors
    integer_natives: set[str]  # pooling/flatten modules that only ever see integer tensors
    notes: list[str]
    dequantize_outputs: set[str] = dataclasses.field(default_factory=set)  # no integer consumer


def _analyse(
    t: Trace,
    kinds: Mapping[str, str],
    out_q: Mapping[str, _Act],
    in_q: Mapping[str, _Act],
    relu_out_q: Mapping[str, _Act],
    foldable: set[str],
) -> _Lowering:
    """Give every traced value a domain (integer or float) and plan the ops between modules.

    ``kinds`` maps module paths to "weighted" (an int8 counterpart) or "passthrough" (runs on
    quantized tensors as it is); other modules are float. ``out_q``/``in_q`` are the output
    qparams of weighted layers and the input qparams of integer layers; ``relu_out_q`` the
    output qparams of integer ReLU modules.

    A weighted layer whose output reaches neither an integer consumer nor a module (directly
    or through views, pooling...), only the model's own functional code, hands on a float
    tensor: its output is dequantized where it is made, so that no integer tensor reaches
    Python code that reads its dtype or keeps it (an attention's KV cache).
    """
    first = _analyse_pass(t, kinds, out_q, in_q, relu_out_q, foldable, set())
    if not first.float_out:
        return first.lowering
    second = _analyse_pass(t, kinds, out_q, in_q, relu_out_q, foldable, first.float_out)
    second.lowering.dequantize_outputs = set(first.float_out)
    return second.lowering


class _Pass(NamedTuple):
    lowering: _Lowering
    float_out: set[str]  # weighted layers no integer consumer takes the output of


def _analyse_pass(
    t: Trace,
    kinds: Mapping[str, str],
    out_q: Mapping[str, _Act],
    in_q: Mapping[str, _Act],
    relu_out_q: Mapping[str, _Act],
    foldable: set[str],
    float_out: set[str],
) -> _Pass:
    """One walk over the trace in call order: each value's domain, and the ops between modules."""
    walk = _Walk(t, kinds, out_q, in_q, relu_out_q, foldable, float_out)
    for call in t.calls:
        if call.kind == "module":
            walk.module_call(call)
        elif any(v in walk.qp for v in call.inputs):  # a function between modules, on integers
            walk.function_call(call)
    return walk.result()


class _Walk:
    """The state of :func:`_analyse_pass`: integer values with their qparams, and decisions."""

    def __init__(
        self,
        t: Trace,
        kinds: Mapping[str, str],
        out_q: Mapping[str, _Act],
        in_q: Mapping[str, _Act],
        relu_out_q: Mapping[str, _Act],
        foldable: set[str],
        float_out: set[str],
    ) -> None:
        self.t = t
        self.kinds = kinds
        self.out_q = out_q
        self.in_q = in_q
        self.relu_out_q = relu_out_q
        self.foldable = foldable
        self.float_out = float_out
        self.qp: dict[int, _Act] = {}  # value id -> qparams, for integer values only
        self.ops: list[_IntegerOp] = []
        self.folds: dict[str, _Act] = {}
        self.dequantize_inputs: set[str] = set()
        self.float_fed: set[str] = set()
        self.relus: dict[str, bool] = {}  # ReLU module -> whether every call gets an integer
        self.natives: dict[str, bool] = {}  # the same for pooling/flatten (_NATIVE_MODULES)
        self.notes: list[str] = []
        self.weighted_calls: list[Call] = []
        self.carriers: list[Call] = []  # calls that hand an integer value on (views, pooling)
        self.used: set[int] = set()  # integer values an integer consumer takes

    # -- looking downstream -----------------------------------------------------------------

    def path_of(self, call: Call) -> str | None:
        for p in call.paths or (call.target,):
            if p in self.kinds:
                return p
        return None

    def effective_consumers(self, vid: int) -> list[Call]:
        # Calls that hand the same value back (nn.Identity, Dropout in eval) are transparent.
        return [c for c in self.t.consumers(vid) if not (c.outputs and set(c.outputs) == {vid})]

    def single_consumer(self, vid: int) -> Call | None:
        consumers = self.effective_consumers(vid)
        if len(consumers) != 1 or self.t.is_output(vid):
            return None
        return consumers[0]

    def only_consumer_is_relu(self, vid: int) -> Call | None:
        c = self.single_consumer(vid)
        if c is None or len(c.outputs) != 1 or set(c.inputs) != {vid}:
            return None
        if c.module_type is nn.ReLU if c.kind == "module" else c.target in RELU_FUNCTIONS:
            return c
        return None

    def input_qparams_downstream(self, vid: int, depth: int = 0) -> _Act | None:
        """Input qparams that an integer module downstream observed on exactly this value."""
        for c in self.effective_consumers(vid):
            p = self.path_of(c)
            if c.kind == "module" and p is not None and p in self.in_q:
                return self.in_q[p]
        only = self.single_consumer(vid)
        if (
            depth < 8
            and only is not None
            and only.kind == "module"
            and only.module_type in GRID_MODULES
            and only.module_type is not nn.ReLU
            and len(only.outputs) == 1
        ):
            return self.input_qparams_downstream(only.outputs[0], depth + 1)
        return None

    def after_relu_qparams(self, relu: Call) -> _Act | None:
        """Qparams for the output of ``relu``: observed downstream, else by the ReLU itself."""
        found = self.input_qparams_downstream(relu.outputs[0])
        if found is not None:
            return found
        p = self.path_of(relu)
        if p is not None and p in self.relu_out_q:
            return self.relu_out_q[p]
        if p is not None and p in self.in_q:
            return self.in_q[p].clipped_to_relu()
        return None

    def consumer_qparams(self, vid: int) -> tuple[str, _Act] | None:
        relu = self.only_consumer_is_relu(vid)
        if relu is not None:
            act = self.after_relu_qparams(relu)
            if act is not None:
                return "relu", act
        act = self.input_qparams_downstream(vid)
        return None if act is None else ("plain", act)

    # -- the calls --------------------------------------------------------------------------

    def module_call(self, call: Call) -> None:
        ins = call.inputs
        p = self.path_of(call)
        kind = self.kinds.get(p) if p is not None else None
        if kind == "weighted" and p is not None:
            self.weighted(call, p)
        elif kind == "passthrough" or call.module_type in GRID_MODULES:
            self.carrier_module(call)
        elif any(v in self.qp for v in ins):
            # a float module: a pre-hook dequantizes its input, so the value can stay
            # integer up to it (a ReLU before it still runs fused)
            self.dequantize_inputs.add(call.paths[0] if call.paths else call.target)
            self.used.update(v for v in ins if v in self.qp)

    def weighted(self, call: Call, p: str) -> None:
        if any(v not in self.qp for v in call.inputs):
            self.float_fed.add(p)
        self.weighted_calls.append(call)
        if p in self.float_out:
            return  # dequantized where it is made
        out = self.out_q[p]
        relu = self.only_consumer_is_relu(call.outputs[0]) if len(call.outputs) == 1 else None
        if p in self.foldable and len(self.t.calls_of(p)) == 1 and relu is not None:
            out = self.folds[p] = self.after_relu_qparams(relu) or out.clipped_to_relu()
        for vid in call.outputs:
            self.qp[vid] = out

    def carrier_module(self, call: Call) -> None:
        ins = call.inputs
        integer_in = bool(ins) and all(v in self.qp for v in ins)
        if integer_in:
            for vid in call.outputs:
                self.qp[vid] = self.qp[ins[0]]
            self.carriers.append(call)
        target = call.paths[0] if call.paths else call.target
        if call.module_type is nn.ReLU:
            self.relus[target] = self.relus.get(target, True) and integer_in
        elif call.module_type in _NATIVE_MODULES:
            self.natives[target] = self.natives.get(target, True) and integer_in

    def function_call(self, call: Call) -> None:
        ins, name = call.inputs, call.target
        if name in GRID_FUNCTIONS or name.endswith(".__get__"):
            if all(v in self.qp for v in ins):
                self.carriers.append(call)
                for vid in call.outputs:
                    self.qp[vid] = self.qp[ins[0]]
            return
        combines = (name in ADD_FUNCTIONS and len(ins) == 2) or name in CAT_FUNCTIONS
        if not (combines and all(v in self.qp for v in ins)):
            self.notes.append(f"call #{call.index} {name}: no int8 kernel, so it runs in float")
            return
        found = self.consumer_qparams(call.outputs[0]) if len(call.outputs) == 1 else None
        if found is None:
            self.notes.append(
                f"call #{call.index} {name}: no integer consumer gives its output qparams, so "
                "it runs in float"
            )
            return
        how, act = found
        kind_name = "cat" if name in CAT_FUNCTIONS else ("add_relu" if how == "relu" else "add")
        operands = tuple((self.qp[v].scale, self.qp[v].zero_point) for v in ins)
        self.ops.append(
            _IntegerOp(call.index, name, kind_name, operands, act.scale, act.zero_point)
        )
        self.qp[call.outputs[0]] = act
        self.used.update(ins)

    # -- the result -------------------------------------------------------------------------

    def unused_outputs(self) -> set[str]:
        """Weighted layers whose integer output no integer consumer (nor a module) takes."""
        # weighted layers and integer ops take theirs; a view, pooling or ReLU passes the need
        # on to its input
        used, qp = self.used, self.qp
        for call in self.weighted_calls:
            used.update(v for v in call.inputs if v in qp)
        for call in reversed(self.carriers):
            if any(v in used for v in call.outputs):
                used.update(v for v in call.inputs if v in qp)
        unused: set[str] = set()
        for call in self.weighted_calls:
            p = self.path_of(call)
            outs = call.outputs
            if p is not None and outs and not any(v in used or self.t.is_output(v) for v in outs):
                unused.add(p)
        # a layer called several times keeps integer output if any call's output is used
        for call in self.weighted_calls:
            p = self.path_of(call)
            if p in unused and any(v in used for v in call.outputs):
                unused.discard(p)
        return unused

    def result(self) -> _Pass:
        lowering = _Lowering(
            self.ops,
            self.folds,
            self.dequantize_inputs,
            self.float_fed,
            {p for p, always in self.relus.items() if always},
            {p for p, always in self.natives.items() if always},
            self.notes,
        )
        return _Pass(lowering, self.unused_outputs() - self.float_out)


# --------------------------------------------------------------------------- run time


def _has_quantized(args: Sequence[Any]) -> bool:
    for a in args:
        if isinstance(a, Tensor):
            if a.is_quantized:
                return True
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, Tensor) and b.is_quantized:
                    return True
    return False


def _dequantize(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, Tensor):
        if obj.is_quantized:
            # contiguous like the float model's tensors (int8 convs return channels-last)
            out = obj.dequantize().contiguous()
            return out if dtype is torch.float32 else out.to(dtype)
        return obj
    if isinstance(obj, list):
        return [_dequantize(o, dtype) for o in obj]
    if isinstance(obj, tuple):
        items = [_dequantize(o, dtype) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, dict):
        return type(obj)((k, _dequantize(v, dtype)) for k, v in obj.items())
    return obj


def _operand_qparams(args: Sequence[Any]) -> tuple[tuple[float, int], ...] | None:
    out = []
    for a in args:
        if (
            not isinstance(a, Tensor)
            or not a.is_quantized
            or a.qscheme() != torch.per_tensor_affine
        ):
            return None
        out.append((a.q_scale(), a.q_zero_point()))
    return tuple(out)


def recorded_op(
    runtime: _Runtime,
    seen: dict[tuple[Any, ...], int],
    name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    qparams_of: Callable[[Sequence[Any]], tuple[tuple[float, int], ...] | None],
) -> tuple[_IntegerOp, list[Any], Any] | None:
    """The op recorded for this call of ``name``, with its tensor operands and ``cat``'s dim.

    ``qparams_of`` reads the operands' ``(scale, zero_point)``; calls with the same operands
    take the recorded ops in order (counted in ``seen``). ``None`` when the call's form or
    operands match no recorded op: it then runs as in float.
    """
    if name in CAT_FUNCTIONS:
        if not args or not isinstance(args[0], (list, tuple)) or set(kwargs) - {"dim"}:
            return None
        tensors = list(args[0])
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    else:
        if kwargs or len(args) != 2:
            return None
        tensors = list(args)
        dim = None
    operands = qparams_of(tensors)
    if operands is None:
        return None
    key = (name, operands)
    candidates = runtime.ops_by_key.get(key)
    if not candidates:
        return None
    n = seen.get(key, 0)
    seen[key] = n + 1
    return candidates[min(n, len(candidates) - 1)], tensors, dim


_swap_tensor_impl: Callable[[Tensor, Tensor], None] | None = getattr(
    torch._C, "_swap_tensor_impl", None
)


def _write_back(target: Tensor, result: Tensor) -> Tensor:
    """Make ``target`` (the caller's tensor object) hold ``result``; return it.

    Quantized tensors have no in-place kernels and cannot change dtype in place, so the
    contents of the two tensor objects are swapped instead (``torch.utils.swap_tensors``).
    """
    if (
        _swap_tensor_impl is not None
        and type(target) is Tensor
        and type(result) is Tensor
        and cast(Any, target)._use_count() == 1
        and cast(Any, result)._use_count() == 1
        and not weakref.getweakrefs(target)
        and not weakref.getweakrefs(result)
    ):
        _swap_tensor_impl(target, result)  # plain tensors: nothing else to swap
        return target
    try:
        cast(Any, torch.utils).swap_tensors(target, result)
    except (RuntimeError, TypeError):
        return result  # still right for ``out += x``, which rebinds ``out``
    return target


class _Dispatch(TorchFunctionMode):
    """Active during one forward of a lowered model: quantized ops between modules, else float."""

    def __init__(self, runtime: _Runtime) -> None:
        super().__init__()
        self.runtime = runtime
        self.seen: dict[tuple[Any, ...], int] = {}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        if not _has_quantized(args) and not (kwargs and _has_quantized(list(kwargs.values()))):
            return func(*args, **kwargs)
        name = _name_of(func)
        if name.endswith("_") and not name.endswith("__") and name not in GRID_FUNCTIONS:
            # In place on an integer tensor (``out += identity`` is ``add_``): compute the
            # result, then make the caller's tensor object hold it, so that code which keeps
            # using ``out`` (``out.add_(identity)`` as a statement) sees it as well.
            result = self._dispatch(name, func, args, kwargs)
            target = args[0] if args else None
            if isinstance(target, Tensor) and isinstance(result, Tensor) and result is not target:
                return _write_back(target, result)
            return result
        return self._dispatch(name, func, args, kwargs)

    def _dispatch(
        self, name: str, func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> Any:
        if name in GRID_FUNCTIONS or name.endswith(".__get__"):
            try:
                return func(*args, **kwargs)
            except (RuntimeError, NotImplementedError):
                # int8 convolutions return channels-last tensors, which .view() cannot
                # flatten; the float model's were contiguous, so make this one contiguous.
                if name != "torch.Tensor.view" or not isinstance(args[0], Tensor):
                    pass
                else:
                    try:
                        return func(args[0].contiguous(), *args[1:], **kwargs)
                    except (RuntimeError, NotImplementedError):
                        pass
        elif name in self.runtime.op_names:
            result = self._integer_op(name, args, kwargs)
            if result is not None:
                return result
        dtype = self.runtime.float_dtype
        return func(*_dequantize(tuple(args), dtype), **_dequantize(dict(kwargs), dtype))

    def _integer_op(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        found = recorded_op(self.runtime, self.seen, name, args, kwargs, _operand_qparams)
        if found is None:
            return None
        op, tensors, dim = found
        if op.kind == "cat":
            return torch.ops.quantized.cat.default(tensors, dim, op.scale, op.zero_point)
        if op.kind == "add_relu":
            return torch.ops.quantized.add_relu.default(
                tensors[0], tensors[1], op.scale, op.zero_point
            )
        return torch.ops.quantized.add.default(tensors[0], tensors[1], op.scale, op.zero_point)


class _Runtime:
    """Hooks on the lowered model's root: the dispatch mode during forward, float outputs."""

    def __init__(
        self,
        ops: list[_IntegerOp],
        float_dtype: torch.dtype,
        notes: list[str],
        backend: str,
        swapped: dict[str, str],
    ) -> None:
        self.ops = ops
        self.float_dtype = float_dtype
        self.notes = notes
        self.backend = backend
        self.swapped = swapped
        self._index()
        self._local = threading.local()

    def _index(self) -> None:
        self.ops_by_key: dict[tuple[Any, ...], list[_IntegerOp]] = {}
        for op in self.ops:
            self.ops_by_key.setdefault(op.key(), []).append(op)
        self.op_names = frozenset(op.name for op in self.ops)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Runtime:
        return self  # immutable after lowering; per-call state lives in the dispatch mode

    def enter(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """Before the root's forward, or a container's called on its own (``generate()`` calls
        a model's encoder directly): switch the dispatch mode on, once per outermost call."""
        local = self._local
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        if depth:
            return  # inside a call that has the mode on already
        _consume_qtensor_warning()
        mode = _Dispatch(self)
        cast(Any, mode).__enter__()
        local.mode = mode

    def exit(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        """After that call: the mode off again, and float outputs for the caller."""
        local = self._local
        local.depth = getattr(local, "depth", 1) - 1
        if local.depth:
            return None  # an inner container: its integer outputs go on to integer consumers
        mode = getattr(local, "mode", None)
        if mode is not None:
            local.mode = None
            cast(Any, mode).__exit__(None, None, None)
        return _dequantize(output, self.float_dtype)

    def dequantize_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        """A layer whose integer output no integer consumer takes hands on a float tensor."""
        return _dequantize(output, self.float_dtype)

    def dequantize_inputs(self, module: nn.Module, args: Any, kwargs: Any) -> Any:
        if _has_quantized(args) or (kwargs and _has_quantized(list(kwargs.values()))):
            return _dequantize(tuple(args), self.float_dtype), _dequantize(
                dict(kwargs), self.float_dtype
            )
        return None


def describe_lowering(model: nn.Module) -> str:
    """Say what int8 lowering did to ``model``: swapped layers, integer ops, notes.

    >>> describe_lowering(torch.nn.Linear(2, 2))
    'not lowered to int8'
    """
    runtime = getattr(model, "_qswap_int8", None)
    if not isinstance(runtime, _Runtime):
        return "not lowered to int8"
    lines = [f"int8 lowering for backend {runtime.backend!r}:"]
    for path, what in runtime.swapped.items():
        lines.append(f"  {path}: {what}")
    for op in runtime.ops:
        lines.append(f"  call #{op.index} {op.name}: quantized.{op.kind}")
    lines += [f"  note: {n}" for n in runtime.notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- what the kernels take

_LINEARS = (QuantizedLinear, QuantizedLinearReLU)


def check_layer(layer: LayerSpec) -> str | None:
    """What torch's int8 CPU kernels cannot run of a planned layer (the plan falls back), or None.

    >>> from qswap.config import QuantSpec
    >>> from qswap.plan import LayerSpec
    >>> w = QuantSpec(granularity="per_group", axis=0, group_size=4)
    >>> check_layer(LayerSpec("fc", torch.nn.Linear, QuantizedLinear, w, None, None))
    "per-group weights (groups of 4): torch's int8 kernels take per-tensor or per-channel (axis 0) weights"
    """
    cp = layer.counterpart
    if layer.mode == "weight_only":
        return (
            "torch's int8 CPU kernels quantize activations too: they have no weight-only form "
            "(use mode: dynamic for int8 weights with float activations)"
        )
    if layer.mode == "dynamic":
        if not (isinstance(cp, type) and issubclass(cp, _LINEARS)):
            return "torch's dynamic int8 kernels run Linear layers only"
        x = layer.input
        if x is not None and (x.signed or x.scheme != "affine" or x.granularity != "per_tensor"):
            return (
                "torch's dynamic int8 kernels quantize each input to uint8, affine, per tensor; "
                "the input spec asks otherwise"
            )
    w = layer.weight
    if w is not None:
        if w.granularity == "per_group":
            return (
                f"per-group weights (groups of {w.group_size}): torch's int8 kernels take "
                "per-tensor or per-channel (axis 0) weights"
            )
        out_axis = getattr(cp, "weight_axis", 0)
        if w.granularity == "per_channel" and (w.axis or 0) != out_axis:
            return (
                f"per-channel weights on axis {w.axis}: torch's int8 kernels take one scale per "
                f"output channel (axis {out_axis} of this layer's weight)"
            )
    for which, spec in layer.activation_specs().items():
        if layer.mode != "dynamic" and spec.granularity != "per_tensor":
            return f"{which} {spec.granularity}: torch's int8 kernels take per-tensor activations"
    return None


# --------------------------------------------------------------------------- lowering


# torch.backends.quantized.engine is one setting for the whole process, and weights are packed
# for the engine set at the time: lowering (switch, pack, restore) holds this lock, so two
# threads converting for x86 and qnnpack never pack for each other's engine, and the setting
# is restored to what it was before either began
_ENGINE_LOCK = threading.RLock()


@contextlib.contextmanager
def _engine(backend: str) -> Iterator[str]:
    with _ENGINE_LOCK, _engine_selected(backend) as engine:
        yield engine


@contextlib.contextmanager
def _engine_selected(backend: str) -> Iterator[str]:
    engines = torch.backends.quantized.supported_engines
    wanted = {"x86": ("x86", "fbgemm"), "qnnpack": ("qnnpack",)}[backend]
    for engine in wanted:
        if engine in engines:
            break
    else:
        raise UnsupportedModuleError(
            f"backend {backend!r} needs torch's quantized engine {wanted[0]!r}, but this build of "
            f"torch supports only {list(engines)}; use backend "
            f"{'qnnpack' if backend == 'x86' else 'x86'!r} or 'fake'"
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield engine
    finally:
        torch.backends.quantized.engine = previous


@functools.cache
def fbgemm_saturates() -> bool:
    """Whether torch's ``x86``/``fbgemm`` int8 kernels saturate u8 x s8 pairs on this machine.

    Measured once per process: rows of 255 times weights of 127 (pairs of 64770) through
    ``quantized::linear``. A CPU with VNNI returns the sum exactly; one without adds each pair
    in 16 bits and returns about half of it (``qswap.cpu`` explains). ``False`` when this
    build of torch has no fbgemm (nothing runs there).

    >>> isinstance(fbgemm_saturates(), bool)
    True
    """
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm")):
        return False
    k = 64  # several pairs, a full register row: the kernel's main loop
    exact = k * 255 * 127
    with _engine("x86"), torch_ao_quiet():
        x = torch.quantize_per_tensor(torch.full((4, k), 255.0), 1.0, 0, torch.quint8)
        w = torch.quantize_per_tensor(torch.full((8, k), 127.0), 1.0, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(w, None)
        y = torch.ops.quantized.linear(x, packed, exact / 200, 0)
        got = float(y.dequantize().min())
    return abs(got - exact) > exact / 100


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """The user's forward (pre-)hooks on a swapped module move to its replacement."""
    for name in HOOK_DICTS:
        source = getattr(old, name, None)
        target = getattr(new, name, None)
        if source and target is not None:
            target.update(source)


def _dataflow(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Trace:
    """The trace of the fused model: from its plan's trace where that tells it, else recorded."""
    state = model.__dict__.get("_qswap")
    the_plan = getattr(state, "plan", None)
    found = None if the_plan is None else the_plan.fused_trace(model, args, kwargs)
    return found if found is not None else trace(model, args, kwargs)


_DYNAMIC: dict[type, type[QuantizedDynamicLinear]] = {
    QuantizedLinear: QuantizedDynamicLinear,
    QuantizedLinearReLU: QuantizedDynamicLinearReLU,
    QuantizedTransposedLinear: QuantizedDynamicLinear,
}


def _lower_dynamic(backend: str, model: nn.Module, layers: Mapping[str, LayerSpec]) -> nn.Module:
    """Swap each planned Linear for its dynamic int8 form: float in, float out, no boundaries."""
    paths_of: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths_of.setdefault(id(module), []).append(path)
    with _engine(backend), torch_ao_quiet():
        for path, spec in layers.items():
            cls = _DYNAMIC.get(cast(type, spec.counterpart))
            if cls is None:
                continue  # the plan keeps only Linear layers on the backend in dynamic mode
            module = model.get_submodule(path)
            q = cls.from_float(module, spec)
            _carry_hooks(module, q)
            for alias_path in paths_of.get(id(module), [path]):
                if alias_path:
                    replace_module(model, (alias_path,), q)
                else:
                    model = q
    return model


def _lower(
    backend: str,
    model: nn.Module,
    layers: Mapping[str, LayerSpec],
    example_inputs: tuple[Any, ...] | Tensor,
    example_kwargs: Mapping[str, Any] | None,
) -> nn.Module:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "cpu":
            raise UnsupportedModuleError(
                f"backend {backend!r} runs torch's int8 CPU kernels, but {name} is on "
                f"{tensor.device}; move the model and its inputs to the CPU first "
                "(model.cpu()), or use backend 'fake' on this device"
            )
    if layers and all(spec.mode == "dynamic" for spec in layers.values()):
        return _lower_dynamic(backend, model, layers)
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    from qswap.plan import set_eval

    set_eval(model)
    lowering = _Lowerer(backend, model, layers)
    with _engine(backend), torch_ao_quiet():
        lowering.build()
        t = _dataflow(model, tuple(example_inputs), example_kwargs or {})
        plan = lowering.settle(t)
        lowering.swap(plan)
    return lowering.finish(plan)


class _Lowerer:
    """One int8 lowering: build the counterparts, place boundaries, swap, hook the runtime."""

    def __init__(self, backend: str, model: nn.Module, layers: Mapping[str, LayerSpec]) -> None:
        self.backend = backend
        self.model = model
        self.layers = layers
        self.float_dtype = next(
            (p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32
        )
        self.paths_of: dict[int, list[str]] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            self.paths_of.setdefault(id(module), []).append(path)
        self.modules: dict[str, nn.Module] = {}
        for path in layers:
            try:
                self.modules[path] = model.get_submodule(path)
            except AttributeError:
                continue
        self.notes: list[str] = []
        self.kinds: dict[str, str] = {}
        self.built: dict[str, IntegerModule] = {}
        self.out_q: dict[str, _Act] = {}
        # in_q: input qparams observed on the layer's own input (the analysis may requantize
        # the value feeding it with them); has_input: paths with input qparams of any origin,
        # those taken from their producer included (LayerSpec.input_from)
        self.in_q: dict[str, _Act] = {}
        self.has_input: set[str] = set()
        self.relu_out_q: dict[str, _Act] = {}
        self.swapped: dict[str, str] = {}

    def aliases(self, path: str) -> list[str]:
        return self.paths_of.get(id(self.modules[path]), [path])

    def build(self) -> None:
        """The int8 counterpart of every layer that can have one; the others keep float weights."""
        from qswap.bias_correction import apply_shift

        for path, spec in self.layers.items():
            module = self.modules.get(path)
            if module is None:
                continue
            cp = spec.counterpart
            if cp is IntegerPassthrough:
                self._passthrough(path, spec, module)
            elif not (isinstance(cp, type) and issubclass(cp, IntegerModule)):
                apply_shift(module, spec.bias_shift, undo=True)  # not lowered: float weights
            else:
                self._weighted(path, spec, module, cp)

    def _passthrough(self, path: str, spec: LayerSpec, module: nn.Module) -> None:
        try:
            acts = {
                k: _act(q, f"{path} {k}")
                for k, q in spec.qparams.items()
                if k in ("input", "output")
            }
        except UnsupportedModuleError as exc:
            self.notes.append(f"{exc} (the layer runs in float)")
            return
        for p in self.aliases(path):
            self.kinds[p] = "passthrough"
            if "input" in acts:
                self.has_input.add(p)
                if spec.input_from is None:  # observed on this very value
                    self.in_q[p] = acts["input"]
            if "output" in acts and type(module) is nn.ReLU:
                self.relu_out_q[p] = acts["output"]

    def _weighted(
        self, path: str, spec: LayerSpec, module: nn.Module, cp: type[IntegerModule]
    ) -> None:
        from qswap.bias_correction import apply_shift

        try:
            q = cp.from_float(module, spec)
            out = _act(_qparams(spec, "output", module), f"{path} output")
            qp_in = spec.qparams.get("input")
            inp = _act(qp_in, f"{path} input") if qp_in is not None else None
        except UnsupportedModuleError as exc:
            self.notes.append(f"{exc} (the layer stays float)")
            apply_shift(module, spec.bias_shift, undo=True)  # float weights: no correction
            return
        self.built[path] = cast(IntegerModule, q)
        for p in self.aliases(path):
            self.kinds[p] = "weighted"
            self.out_q[p] = out
            if inp is not None:
                self.has_input.add(p)
                if spec.input_from is None:  # observed on this very value
                    self.in_q[p] = inp

    def settle(self, t: Trace) -> _Lowering:
        """Place boundaries; a layer fed float with no input qparams to quantize it stays float."""
        from qswap.bias_correction import apply_shift

        foldable = {
            p for fp, q in self.built.items() if type(q) in _WITH_RELU for p in self.aliases(fp)
        }
        while True:
            lowering = _analyse(t, self.kinds, self.out_q, self.in_q, self.relu_out_q, foldable)
            stuck = sorted(p for p in lowering.float_fed if p not in self.has_input)
            if not stuck:
                return lowering
            for p in stuck:  # fed float by the caller or float code, with nothing to quantize it
                self.notes.append(
                    f"{p} stays float: its input comes from float code and it has no "
                    "calibrated input qparams"
                )
                owner = next(fp for fp in self.built if p in self.aliases(fp))
                self.built.pop(owner)
                apply_shift(self.modules[owner], self.layers[owner].bias_shift, undo=True)
                for alias_path in self.aliases(owner):
                    self.kinds.pop(alias_path, None)

    def _put(self, module: nn.Module, path: str, new: nn.Module) -> None:
        for alias_path in self.paths_of.get(id(module), [path]):
            if alias_path:
                replace_module(self.model, (alias_path,), new)
            else:  # the model itself is one layer
                self.model = new

    def swap(self, lowering: _Lowering) -> None:
        """Put the int8 modules in place (a ReLU after one fused in), and the fast int8 paths."""
        for path, q in self.built.items():
            fold = next(
                (lowering.relu_folds[p] for p in self.aliases(path) if p in lowering.relu_folds),
                None,
            )
            if fold is not None:
                fused_cls = _WITH_RELU[type(q)]
                q = cast(IntegerModule, fused_cls.from_float(self.modules[path], self.layers[path]))
                q.scale, q.zero_point = fold.scale, fold.zero_point
                self.notes.append(
                    f"{path}: the ReLU that follows runs fused ({fused_cls.__name__})"
                )
            _carry_hooks(self.modules[path], q)
            self._put(self.modules[path], path, q)
            self.swapped[path] = type(q).__name__
        for path in sorted(lowering.integer_relus):
            relu = self.model.get_submodule(path) if path else self.model
            if type(relu) is nn.ReLU and path:
                fast = IntegerReLU(inplace=relu.inplace)
                _carry_hooks(relu, fast)
                self._put(relu, path, fast)
        for path in sorted(lowering.integer_natives):
            native = self.model.get_submodule(path) if path else self.model
            fast_cls = _NATIVE_MODULES.get(type(native))
            if fast_cls is not None and path:
                self._put(native, path, _retyped(native, fast_cls))

    def finish(self, lowering: _Lowering) -> nn.Module:
        """The runtime: boundary hooks, the dispatch mode on the root and containers."""
        model = self.model
        self.notes += lowering.notes
        runtime = _Runtime(
            lowering.integer_ops, self.float_dtype, self.notes, self.backend, self.swapped
        )
        for path in sorted(lowering.dequantize_inputs):
            target = self._find(path)
            if target is not None:
                target.register_forward_pre_hook(
                    runtime.dequantize_inputs, with_kwargs=True, prepend=True
                )
        for path in sorted(lowering.dequantize_outputs):
            target = self._find(path)
            if target is not None:
                target.register_forward_hook(runtime.dequantize_output, prepend=True)
        # the root and every container of an int8 layer: a container called on its own gets
        # the dispatch mode and hands its caller float outputs, as the whole model does
        entries = {""} | {
            ".".join(parts[:i])
            for path in self.swapped
            for parts in [path.split(".")]
            for i in range(1, len(parts))
        }
        for path in sorted(entries):
            entry = self._find(path)
            if entry is not None:
                entry.register_forward_pre_hook(runtime.enter, with_kwargs=True)
                entry.register_forward_hook(
                    runtime.exit, with_kwargs=True, prepend=True, always_call=True
                )
        object.__setattr__(model, "_qswap_int8", runtime)
        _consume_qtensor_warning()
        return model

    def _find(self, path: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(path) if path else self.model
        except AttributeError:
            return None


def lower_x86(
    model: nn.Module,
    layers: Mapping[str, LayerSpec],
    example_inputs: tuple[Any, ...] | Tensor,
    example_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Lower a calibrated, fused float model to torch's x86 (fbgemm/onednn) int8 kernels.

    Called by ``qswap.convert`` for ``backend: x86``; ``layers`` maps module paths to
    ``LayerSpec`` with qparams. Returns ``model``, changed in place.

    >>> import torch, qswap
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    >>> qmodel = qswap.quantize(model, "x86_int8", calib_data=[torch.randn(8, 4)], progress=False)
    >>> type(qmodel[0]).__name__, qmodel(torch.randn(3, 4)).dtype
    ('QuantizedLinear', torch.float32)
    """
    return _lower("x86", model, layers, example_inputs, example_kwargs)


def lower_qnnpack(
    model: nn.Module,
    layers: Mapping[str, LayerSpec],
    example_inputs: tuple[Any, ...] | Tensor,
    example_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Lower a calibrated, fused float model to torch's qnnpack (ARM/mobile) int8 kernels.

    >>> import torch, qswap
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    >>> qmodel = qswap.quantize(model, "qnnpack_int8", calib_data=[torch.randn(8, 4)], progress=False)
    >>> type(qmodel[0]).__name__
    'QuantizedLinear'
    """
    return _lower("qnnpack", model, layers, example_inputs, example_kwargs)
