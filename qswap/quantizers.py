"""Quantization parameters and quantizers: ``QParams``, fake-quantization, the component bases.

A *quantizer* applies ``QParams`` (scale, zero point, integer range, layout) to a float
tensor: fake-quantization, quantize then dequantize in float, with a straight-through
gradient. Quantizers are ``nn.Module`` subclasses whose state lives in buffers, so ``.to()``
moves it and ``state_dict`` keeps it. The observers that produce ``QParams`` live in
:mod:`qswap.observers`, on the bases defined here (``StateModule``, ``validated_options``,
``EmptyOptions``).

The built-ins are declared by name in the pack ``registry/quantization.yaml``, as a third
party declares its own: quantizer ``affine`` (the other methods are in :mod:`qswap.methods`).

Conventions follow ``torch.ao.quantization`` observers so that numbers agree
with PyTorch's own flow: the range always includes 0; symmetric signed ranges
have zero point 0; affine zero points are ``quant_min - round(min / scale)``
clamped to the range; scales are floored at float32 epsilon. A symmetric
*unsigned* range uses the midpoint ``(quant_min + quant_max + 1) // 2`` as zero
point: 128 for uint8 as in torch, and 64 with ``reduce_range`` (a combination
torch's observers refuse).
"""

from __future__ import annotations

import importlib
import inspect
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from qswap.exceptions import ConfigError, PlanError, RegistrationError
from qswap.registry import accepts_positional, qualified_name

if TYPE_CHECKING:
    from qswap.config import QuantSpec

__all__ = [
    "AffineQuantizer",
    "EmptyOptions",
    "QParams",
    "Quantizer",
    "StateModule",
    "add_buffer",
    "describe_spec",
    "fake_quantize",
    "group_view_shape",
    "normalize_axis",
    "qparams_from_range",
    "scalar_scale_zero_point",
    "scale_zero_point",
    "set_attrs",
    "set_buffer",
    "spec_layout",
    "to_float32",
    "validated_options",
]

_FP32_EPS = float(torch.finfo(torch.float32).eps)
_NO_AXIS = -(2**62)  # stands for ``axis=None`` inside an int64 buffer
_F32 = struct.Struct("f")
_EXACT_INT = 1 << 24  # integer ranges within this bound never overflow int32 zero points

Granularity = Literal["per_tensor", "per_channel", "per_group"]


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class QParams:
    """Quantization parameters: ``q = clamp(round(x / scale) + zero_point, quant_min, quant_max)``.

    ``scale`` is float32 and ``zero_point`` int32 (other dtypes are converted), both of
    shape ``[]`` per tensor, ``[C]`` per channel (``axis`` set) or ``[C, G]`` per group
    (``axis`` and ``group_size`` set). Per group, the tensor with its channel axis moved
    to 0 is read as ``[C, N]`` (all other elements of a channel, row-major: for a Linear
    weight, its input features) and cut into ``G = N / group_size`` consecutive groups.
    A ``[1]``-shaped pair without an axis, as torch's observers return, is per tensor.

    >>> qp = QParams(torch.tensor(0.1), torch.tensor(0), -128, 127)
    >>> qp.granularity, qp.zero_point.dtype
    ('per_tensor', torch.int32)
    """

    scale: Tensor
    zero_point: Tensor
    quant_min: int
    quant_max: int
    axis: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        scale, zero_point = self.scale, self.zero_point
        if not isinstance(scale, Tensor) or not isinstance(zero_point, Tensor):
            raise PlanError("QParams.scale and QParams.zero_point must be tensors")
        if not scale.is_floating_point():
            raise PlanError(f"QParams.scale must be a floating-point tensor, got {scale.dtype}")
        if zero_point.is_floating_point() or zero_point.is_complex():
            raise PlanError(
                f"QParams.zero_point must be an integer tensor, got {zero_point.dtype}; "
                "round it and convert with .to(torch.int32)"
            )
        if scale.shape != zero_point.shape:
            raise PlanError(
                f"QParams.scale has shape {tuple(scale.shape)} but zero_point has shape "
                f"{tuple(zero_point.shape)}; they must match"
            )
        if self.quant_min >= self.quant_max:
            raise PlanError(
                f"QParams range [{self.quant_min}, {self.quant_max}] is empty; "
                "quant_min must be below quant_max"
            )
        if scale.dim() == 1 and scale.numel() == 1 and self.axis is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        if scale.dim() > 2:
            raise PlanError(
                f"QParams.scale must have 0 (per tensor), 1 (per channel) or 2 (per group) "
                f"dimensions, got shape {tuple(scale.shape)}"
            )
        if scale.dim() >= 1 and self.axis is None:
            raise PlanError(
                f"QParams with a scale of shape {tuple(scale.shape)} needs the channel axis "
                "(axis=...) it applies to"
            )
        if scale.dim() == 2 and (self.group_size is None or self.group_size <= 0):
            raise PlanError(
                f"QParams with a [C, G] scale (shape {tuple(scale.shape)}) is per group and "
                f"needs group_size > 0, got {self.group_size}"
            )
        if scale.dim() < 2 and self.group_size is not None:
            raise PlanError(
                f"QParams has group_size={self.group_size} but a scale of shape "
                f"{tuple(scale.shape)}; per-group scales have shape [C, G]"
            )
        scale, zero_point = scale.detach(), zero_point.detach()
        if scale.dtype != torch.float32:
            scale = scale.to(torch.float32)
        if zero_point.dtype != torch.int32:
            zero_point = zero_point.to(torch.int32)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)

    @property
    def granularity(self) -> Granularity:
        """``per_tensor``, ``per_channel`` or ``per_group``, read from the shape of ``scale``."""
        names: tuple[Granularity, ...] = ("per_tensor", "per_channel", "per_group")
        return names[self.scale.dim()]

    def to(self, device: torch.device | str) -> QParams:
        """A copy with ``scale`` and ``zero_point`` on ``device``."""
        return QParams(
            self.scale.to(device),
            self.zero_point.to(device),
            self.quant_min,
            self.quant_max,
            self.axis,
            self.group_size,
        )


def to_float32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float (``inf`` beyond float32's range)."""
    try:
        return float(_F32.unpack(_F32.pack(x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


def scalar_scale_zero_point(
    lo: float, hi: float, quant_min: int, quant_max: int, symmetric: bool
) -> tuple[float, int]:
    """``scale_zero_point`` for one finite float32 range, in Python floats, bit for bit.

    Each float32 operation is done in float64 and rounded to float32 once; for ``+ - * /``
    of float32 operands that double rounding is exact, so the result equals torch's float32
    kernel (``round`` is half-to-even in both). A dozen tiny tensor ops cost ~50 us on CPU.
    """
    min_neg, max_pos = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        max_pos = max(-min_neg, max_pos)
        scale = max(to_float32(max_pos / to_float32(float(quant_max - quant_min) / 2)), _FP32_EPS)
        return scale, 0 if quant_min < 0 else (quant_min + quant_max + 1) // 2
    span = to_float32(max_pos - min_neg)
    scale = max(to_float32(span / to_float32(float(quant_max - quant_min))), _FP32_EPS)
    zero_point = quant_min - round(to_float32(min_neg / scale))
    return scale, min(max(zero_point, quant_min), quant_max)


_CPU_SCALARS: dict[tuple[float, torch.dtype], Tensor] = {}


def _cpu_scalar(value: float, dtype: torch.dtype) -> Tensor:
    """A shared, never written, 0-dim CPU tensor: what a Python number becomes inside an op.

    ``x / 127.5`` wraps the number into a tensor on every call, which costs more than the
    division on a small ``x``; dividing by this tensor runs the same kernel on the same
    values (the number is cast to ``x``'s dtype either way).
    """
    key = (value, dtype)
    found = _CPU_SCALARS.get(key)
    if found is None:
        found = _CPU_SCALARS[key] = torch.tensor(value, dtype=dtype)
    return found


def scale_zero_point(
    min_val: Tensor, max_val: Tensor, quant_min: int, quant_max: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) for ranges, with torch's observer arithmetic."""
    if min_val.device.type == "cpu" and min_val.dtype == max_val.dtype == torch.float32:
        return _cpu_scale_zero_point(min_val, max_val, quant_min, quant_max, symmetric)
    min_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_pos = torch.max(max_val, torch.zeros_like(max_val))
    if symmetric:
        max_pos = torch.max(-min_neg, max_pos)
        scale = (max_pos / (float(quant_max - quant_min) / 2)).clamp_min(_FP32_EPS)
        zero = 0 if quant_min < 0 else (quant_min + quant_max + 1) // 2
        zero_point = torch.full(scale.shape, zero, dtype=torch.int32, device=scale.device)
    else:
        scale = ((max_pos - min_neg) / float(quant_max - quant_min)).clamp_min(_FP32_EPS)
        zero_point = quant_min - torch.round(min_neg / scale).to(torch.int32)
        zero_point = zero_point.clamp(quant_min, quant_max)
    return scale, zero_point


def _cpu_scale_zero_point(
    min_val: Tensor, max_val: Tensor, quant_min: int, quant_max: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """``scale_zero_point`` for float32 CPU ranges: the same kernels, Python numbers pre-wrapped.

    ``torch.minimum``/``maximum`` against a 0-dim zero are the kernels of ``torch.min/max``
    against ``zeros_like``; ``maximum`` with eps equals ``clamp_min(eps)`` (both keep nan).
    """
    zero = _cpu_scalar(0.0, torch.float32)
    eps = _cpu_scalar(_FP32_EPS, torch.float32)
    min_neg = torch.minimum(min_val, zero)
    max_pos = torch.maximum(max_val, zero)
    if symmetric:
        max_pos = torch.maximum(-min_neg, max_pos)
        half = _cpu_scalar(float(quant_max - quant_min) / 2, torch.float32)
        scale = torch.maximum(max_pos / half, eps)
        middle = 0 if quant_min < 0 else (quant_min + quant_max + 1) // 2
        zero_point = torch.full(scale.shape, middle, dtype=torch.int32)
        return scale, zero_point
    steps = _cpu_scalar(float(quant_max - quant_min), torch.float32)
    scale = torch.maximum((max_pos - min_neg) / steps, eps)
    shift = torch.round(min_neg / scale).to(torch.int32)
    zero_point = torch.sub(_cpu_scalar(quant_min, torch.int32), shift)
    return scale, zero_point.clamp(quant_min, quant_max)


def spec_layout(spec: QuantSpec) -> tuple[int | None, int | None]:
    """The (axis, group_size) that ``spec`` gives its QParams, with fix-it errors."""
    if spec.granularity == "per_tensor":
        return None, None
    if spec.granularity == "per_channel":
        if spec.axis is None:
            raise PlanError(
                "granularity per_channel needs the channel axis; set axis: 0 "
                "(the output channels of a Conv/Linear weight) or axis: 1 (NCHW activations)"
            )
        return spec.axis, None
    if spec.group_size is None or spec.group_size <= 0:
        raise PlanError(
            f"granularity per_group needs group_size > 0, got {spec.group_size}; "
            "set group_size: 128 (or another divisor of the input features)"
        )
    return (0 if spec.axis is None else spec.axis), spec.group_size


def qparams_from_range(
    min_val: Tensor | float, max_val: Tensor | float, spec: QuantSpec
) -> QParams:
    """QParams for observed ``[min_val, max_val]`` (widened to include 0) under ``spec``.

    Shapes follow ``spec.granularity``: scalars per tensor, ``[C]`` per channel, ``[C, G]``
    per group. Scale and zero point map the range onto ``spec.quant_range()`` (so
    ``reduce_range`` is honoured); the QParams clamp to ``spec.storage_range()``, what the
    quantized tensor holds.

    >>> from qswap.config import QuantSpec
    >>> qp = qparams_from_range(-1.0, 3.0, QuantSpec(signed=False, scheme="affine"))
    >>> round(qp.scale.item(), 6), qp.zero_point.item()
    (0.015686, 64)
    """
    lo = torch.as_tensor(min_val).detach()
    hi = torch.as_tensor(max_val).detach()
    if lo.dtype != torch.float32:
        lo = lo.to(torch.float32)
    if hi.dtype != torch.float32:
        hi = hi.to(torch.float32)
    axis, group_size = spec_layout(spec)
    want = {"per_tensor": 0, "per_channel": 1, "per_group": 2}[spec.granularity]
    if lo.shape != hi.shape or lo.dim() != want:
        raise PlanError(
            f"{spec.granularity} ranges need {want}-dimensional min and max of equal shape, "
            f"got {tuple(lo.shape)} and {tuple(hi.shape)}"
        )
    quant_min, quant_max = spec.quant_range()
    symmetric = spec.scheme == "symmetric"
    if want == 0 and lo.device.type == "cpu" and -_EXACT_INT <= quant_min < quant_max <= _EXACT_INT:
        low, high = float(lo), float(hi)
        if math.isfinite(low) and math.isfinite(high):
            s, z = scalar_scale_zero_point(low, high, quant_min, quant_max, symmetric)
            scale = torch.scalar_tensor(s, dtype=torch.float32)  # s is a float32 value: exact
            zero_point = torch.scalar_tensor(z, dtype=torch.int32)
            return QParams(scale, zero_point, *spec.storage_range())
    scale, zero_point = scale_zero_point(lo, hi, quant_min, quant_max, symmetric)
    return QParams(scale, zero_point, *spec.storage_range(), axis, group_size)


# --------------------------------------------------------------------------- fake-quantization


def normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise PlanError(f"channel axis {axis} is out of range for a {ndim}-dimensional tensor")
    return axis % ndim


def group_view_shape(shape: torch.Size, axis: int, group_size: int) -> tuple[int, int, int]:
    """``(C, G, group_size)`` for a tensor whose channel axis was moved to 0."""
    channels = shape[axis]
    per_channel = math.prod(shape) // channels if channels else 0
    if per_channel % group_size:
        divisors = [d for d in range(min(group_size, per_channel), 0, -1) if per_channel % d == 0]
        raise PlanError(
            f"per_group quantization with group_size={group_size} cannot split a tensor of "
            f"shape {tuple(shape)}: with channel axis {axis}, each channel holds {per_channel} "
            f"elements, which is not a multiple of {group_size}. Fix: use a group_size that "
            f"divides {per_channel} (e.g. {', '.join(map(str, divisors[:3]))}), or a rule that "
            "sets granularity: per_channel for this layer"
        )
    return channels, per_channel // group_size, group_size


def _fake_quantize_per_group(
    x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, group_size: int, qmin: int, qmax: int
) -> Tensor:
    moved = x.movedim(axis, 0)
    channels, groups, size = group_view_shape(x.shape, axis, group_size)
    if tuple(scale.shape) != (channels, groups):
        raise PlanError(
            f"per-group QParams of shape {tuple(scale.shape)} do not fit a tensor of shape "
            f"{tuple(x.shape)} (channel axis {axis}, group_size {group_size} -> "
            f"{(channels, groups)}); recalibrate for this tensor"
        )
    xg = moved.reshape(channels, groups, size)
    s = scale.unsqueeze(-1)
    zp = zero_point.unsqueeze(-1).to(torch.float32)
    with torch.no_grad():
        # the same arithmetic as torch's fused per-channel kernel, so a group that spans a
        # whole channel gives bit-identical results
        q = torch.round(xg * (1.0 / s)) + zp
        out = (q.clamp(qmin, qmax) - zp) * s
    if xg.requires_grad:
        inside = (q >= qmin) & (q <= qmax)
        out = out + torch.where(inside, xg - xg.detach(), torch.zeros_like(xg))
    return out.reshape(moved.shape).movedim(0, axis)


def fake_quantize(x: Tensor, qparams: QParams) -> Tensor:
    """Quantize-dequantize ``x`` with ``qparams``; the gradient passes where ``x`` is in range.

    Works on any float dtype and device (computes in float32, returns ``x.dtype``); uses
    torch's fused ``fake_quantize_per_tensor/per_channel_affine`` kernels.

    >>> qp = QParams(torch.tensor(0.5), torch.tensor(0), -128, 127)
    >>> fake_quantize(torch.tensor([0.26, 1.0, 100.0]), qp)
    tensor([ 0.5000,  1.0000, 63.5000])
    """
    return _fake_quantize(
        x,
        qparams.scale,
        qparams.zero_point,
        qparams.quant_min,
        qparams.quant_max,
        qparams.axis,
        qparams.group_size,
    )


def _fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None,
    group_size: int | None,
) -> Tensor:
    if not x.is_floating_point():
        raise PlanError(f"fake-quantization needs a floating-point tensor, got {x.dtype}")
    xf = x.to(torch.float32)
    scale = scale.to(device=x.device, dtype=torch.float32)
    zero_point = zero_point.to(device=x.device, dtype=torch.int32)
    if scale.dim() == 0:
        out = torch.fake_quantize_per_tensor_affine(xf, scale, zero_point, qmin, qmax)
    elif axis is None:
        raise PlanError("per-channel and per-group fake-quantization need a channel axis")
    elif scale.dim() == 1:
        axis = normalize_axis(axis, x.dim())
        if x.shape[axis] != scale.numel():
            raise PlanError(
                f"per-channel QParams for {scale.numel()} channels do not fit a tensor of "
                f"shape {tuple(x.shape)} with {x.shape[axis]} channels on axis {axis}"
            )
        out = torch.fake_quantize_per_channel_affine(xf, scale, zero_point, axis, qmin, qmax)
    elif group_size is None:
        raise PlanError("per-group fake-quantization needs a group_size")
    else:
        axis = normalize_axis(axis, x.dim())
        out = _fake_quantize_per_group(xf, scale, zero_point, axis, group_size, qmin, qmax)
    return out.to(x.dtype)


# --------------------------------------------------------------------------- base classes


class EmptyOptions(BaseModel):
    """Options of a component that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def validated_options(
    cls: type[nn.Module], options: BaseModel | Mapping[str, Any] | None
) -> BaseModel:
    """``options`` checked by ``cls.options_model`` (``EmptyOptions`` when it has none)."""
    model: type[BaseModel] = getattr(cls, "options_model", EmptyOptions)
    if options is None:
        options = {}
    if isinstance(options, model):
        return options
    if isinstance(options, BaseModel):
        options = options.model_dump()
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"options for {cls.__name__} must be a mapping or a {model.__name__}, "
            f"got {type(options).__name__}"
        )
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '<options>'}: {err['msg']}" for err in exc.errors()
        )
        allowed = ", ".join(model.model_fields) or "none"
        raise ConfigError(
            f"invalid options for {cls.__name__}: {problems} (allowed options: {allowed})"
        ) from None


def _plain_buffers(module: nn.Module) -> bool:
    """Whether ``module.<buffer> = tensor`` may write ``_buffers`` directly.

    ``nn.Module.__setattr__`` and ``register_buffer`` run ~20 checks and the global buffer
    registration hooks; with no such hook, a class that overrides neither, and a plain
    ``Tensor`` (not a ``Parameter``/``Buffer``), they end in the same dict assignment.
    """
    hooks = getattr(_torch_module, "_global_buffer_registration_hooks", None)
    cls = type(module)
    return (
        hooks is not None
        and not hooks
        and "_buffers" in module.__dict__
        and cls.__setattr__ is nn.Module.__setattr__
        and cls.register_buffer is nn.Module.register_buffer
    )


def add_buffer(module: nn.Module, name: str, tensor: Tensor) -> None:
    """``module.register_buffer(name, tensor)`` (persistent), for a name not used yet."""
    if type(tensor) is Tensor and _plain_buffers(module) and not hasattr(type(module), name):
        if name in module.__dict__ or name in module._parameters or name in module._modules:
            module.register_buffer(name, tensor)  # raises the usual error
            return
        module._buffers[name] = tensor
        module._non_persistent_buffers_set.discard(name)
    else:
        module.register_buffer(name, tensor)


def set_attrs(module: nn.Module, **values: Any) -> None:
    """``setattr`` for plain attributes (no tensors, modules or parameter/buffer/module names).

    ``nn.Module.__setattr__`` checks the value against parameters, buffers and submodules
    before it ends in ``object.__setattr__``; for these values all checks fail.
    """
    plain = type(module).__setattr__ is nn.Module.__setattr__
    for name, value in values.items():
        if (
            plain
            and not isinstance(value, (Tensor, nn.Module))
            and name not in module._parameters
            and name not in module._buffers
            and name not in module._modules
        ):
            object.__setattr__(module, name, value)
        else:
            setattr(module, name, value)


def set_buffer(module: nn.Module, name: str, tensor: Tensor) -> None:
    """``setattr(module, name, tensor)`` for a registered buffer."""
    if type(tensor) is Tensor and name in module._buffers and _plain_buffers(module):
        module._buffers[name] = tensor
    else:
        setattr(module, name, tensor)


class StateModule(nn.Module):
    """A module whose buffers may change shape (resized on load) and keep their float dtype.

    Scales and statistics are buffers so ``.to(device)`` moves them and ``state_dict``
    saves them; ``model.half()`` still leaves them in float32/float64.
    """

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> StateModule:
        # model.half() must not round scales or statistics: keep float buffers' dtype, follow
        # only the device.
        before = {
            name: buf
            for name, buf in self._buffers.items()
            if buf is not None and buf.is_floating_point()
        }
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name, buf in list(self._buffers.items()):
            incoming = state_dict.get(prefix + name)
            if buf is not None and isinstance(incoming, Tensor) and incoming.shape != buf.shape:
                self._buffers[name] = torch.empty(
                    incoming.shape, dtype=buf.dtype, device=buf.device
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._after_load()

    def _after_load(self) -> None:
        """Refresh Python-side caches after ``load_state_dict``."""


def _layout_tensor(
    qmin: int, qmax: int, axis: int | None, group_size: int | None, device: torch.device | None
) -> Tensor:
    """The ``layout`` buffer of a quantizer: ``[quant_min, quant_max, axis, group_size]``."""
    values = [qmin, qmax, _NO_AXIS if axis is None else axis, group_size or 0]
    return torch.tensor(values, dtype=torch.int64, device=device)


def describe_spec(spec: QuantSpec) -> str:
    """``spec`` in a few words for messages and reprs: bits, range, scheme, granularity."""
    qmin, qmax = spec.quant_range()
    where = ""
    if spec.granularity == "per_channel":
        where = f", axis={spec.axis}"
    elif spec.granularity == "per_group":
        where = f", axis={0 if spec.axis is None else spec.axis}, group_size={spec.group_size}"
    return f"{spec.bits}-bit [{qmin}, {qmax}], {spec.scheme}, {spec.granularity}{where}"


class Quantizer(StateModule):
    """Base class and protocol of quantizers: ``set_qparams`` then ``forward`` fake-quantizes.

    Subclasses implement ``forward`` (float in, float out, gradients for QAT) and may
    override ``set_qparams`` to derive their own parameters. The base stores the
    ``QParams`` in buffers (``scale``, ``zero_point``, ``layout``); ``forward`` must be
    the identity while ``qparams`` is ``None``.
    """

    options_model: ClassVar[type[BaseModel]] = EmptyOptions
    spec: QuantSpec
    options: BaseModel
    scale: Tensor
    zero_point: Tensor
    layout: Tensor
    _qmin: int
    _qmax: int
    _axis: int | None
    _group_size: int | None

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        set_attrs(self, spec=spec, options=validated_options(type(self), options))
        qmin, qmax = spec.storage_range()
        axis, group_size = spec_layout(spec)
        add_buffer(self, "scale", torch.empty(0, dtype=torch.float32))
        add_buffer(self, "zero_point", torch.empty(0, dtype=torch.int32))
        add_buffer(self, "layout", _layout_tensor(qmin, qmax, axis, group_size, None))
        set_attrs(self, _qmin=qmin, _qmax=qmax, _axis=axis, _group_size=group_size)

    def _store_layout(self, qmin: int, qmax: int, axis: int | None, group_size: int | None) -> None:
        if (qmin, qmax, axis, group_size) == (self._qmin, self._qmax, self._axis, self._group_size):
            return  # the buffer already holds these values (``_after_load`` keeps both in step)
        set_attrs(self, _qmin=qmin, _qmax=qmax, _axis=axis, _group_size=group_size)
        set_buffer(self, "layout", _layout_tensor(qmin, qmax, axis, group_size, self.layout.device))

    def _after_load(self) -> None:
        qmin, qmax, axis, group_size = (int(v) for v in self.layout.tolist())
        self._qmin, self._qmax = qmin, qmax
        self._axis = None if axis == _NO_AXIS else axis
        self._group_size = group_size or None

    def set_qparams(self, qparams: QParams) -> None:
        """Use ``qparams`` from now on (copied into this module's buffers, on its device)."""
        want = self.spec.granularity
        if qparams.granularity != want:
            raise PlanError(
                f"{type(self).__name__} is configured {want} but got {qparams.granularity} "
                f"QParams (scale shape {tuple(qparams.scale.shape)})"
            )
        device = self.scale.device
        scale = qparams.scale.detach().to(device=device, dtype=torch.float32).clone()
        zero_point = qparams.zero_point.detach().to(device=device, dtype=torch.int32).clone()
        set_buffer(self, "scale", scale)
        set_buffer(self, "zero_point", zero_point)
        self._store_layout(qparams.quant_min, qparams.quant_max, qparams.axis, qparams.group_size)

    @property
    def qparams(self) -> QParams | None:
        """A copy of the parameters in use, or ``None`` before ``set_qparams``."""
        if self.scale.numel() == 0:
            return None
        return QParams(
            self.scale.clone(),
            self.zero_point.clone(),
            self._qmin,
            self._qmax,
            self._axis,
            self._group_size,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x``; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x)")

    def extra_repr(self) -> str:
        state = "" if self.scale.numel() else ", no qparams yet (identity)"
        return describe_spec(self.spec) + state


class AffineQuantizer(Quantizer):
    """Uniform affine fake-quantizer with a straight-through gradient; identity until set.

    >>> from qswap.config import QuantSpec
    >>> fq = AffineQuantizer(QuantSpec(bits=4))
    >>> fq.set_qparams(qparams_from_range(-1.0, 1.0, QuantSpec(bits=4)))
    >>> fq(torch.tensor([0.1, 0.5, 2.0]))
    tensor([0.1333, 0.5333, 0.9333])
    """

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (same dtype and device); gradient 1 inside the range, 0 outside."""
        if self.scale.numel() == 0:
            return x
        return _fake_quantize(
            x, self.scale, self.zero_point, self._qmin, self._qmax, self._axis, self._group_size
        )


# --------------------------------------------------------------------------- registration


class FunctionQuantizer(Quantizer):
    """A plain function ``fn(x) -> x`` used as a quantizer (``register_quantizer(name, fn)``).

    The function does the quantization; uniform qparams are ignored. Like every
    quantizer it is the identity until ``set_qparams`` is called, and gradients pass
    straight through (STE) so QAT keeps training the float weights. Registration makes
    one subclass per function, so ``entry.cls(spec, options)`` works like any quantizer.
    """

    fn: ClassVar[Callable[[torch.Tensor], torch.Tensor]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``fn`` once qparams are set; straight-through gradient."""
        if self.qparams is None:
            return x
        fn = type(self).fn
        y = fn(x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise RegistrationError(
                f"quantizer function {qualified_name(fn)} must return a tensor shaped like its "
                f"input {tuple(x.shape)}, got {got}"
            )
        return x + (y - x).detach()


def function_quantizer(name: str, fn: Callable[..., Any], origin: str) -> type:
    """A :class:`FunctionQuantizer` subclass running ``fn`` (``register_quantizer(name, fn)``)."""
    if not accepts_positional(fn, 1):
        raise RegistrationError(
            f"{qualified_name(fn)} cannot be registered as quantizer {name!r} (at {origin}): a "
            f"quantizer function is called as fn(x) -> x, its signature is {inspect.signature(fn)}"
        )
    fname = getattr(fn, "__name__", "fn")
    return type(
        f"FunctionQuantizer[{fname}]",
        (FunctionQuantizer,),
        {"fn": staticmethod(fn), "__module__": __name__, "__doc__": f"Adapter for {fname}."},
    )


# Observers lived here before qswap.observers: files that pickled them under this module's
# name still load. Resolved by name on first use, as the registry resolves pack entries, so
# this lower module never imports the observers.
_MOVED_TO_OBSERVERS = frozenset(
    {
        "HistogramObserver",
        "HistogramOptions",
        "MinMaxObserver",
        "MovingAverageMinMaxObserver",
        "MovingAverageOptions",
        "Observer",
        "PerChannelMinMaxObserver",
        "rebin",
    }
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_OBSERVERS:
        return getattr(importlib.import_module("qswap.observers"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
