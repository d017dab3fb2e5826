"""Quantization components: parameters, the affine fake-quantizer and the observers.

An *observer* watches tensors during calibration and turns what it saw into
``QParams`` (scale, zero point, integer range, layout); a *quantizer* applies
``QParams`` to a float tensor (fake-quantization: quantize then dequantize, in
float, with a straight-through gradient). Both are ``nn.Module`` subclasses
whose state lives in buffers, so ``.to()`` moves it and ``state_dict`` keeps
it. Observers keep *mergeable* state so that calibrations run in several
processes combine into one (``merge``).

The built-ins are declared by name in the pack ``registry/quantization.yaml``, as a third
party declares its own: quantizer ``affine``; observers ``minmax``,
``moving_average_minmax``, ``per_channel_minmax`` and ``histogram``.

Conventions follow ``torch.ao.quantization`` observers so that numbers agree
with PyTorch's own flow: the range always includes 0; symmetric signed ranges
have zero point 0; affine zero points are ``quant_min - round(min / scale)``
clamped to the range; scales are floored at float32 epsilon. A symmetric
*unsigned* range uses the midpoint ``(quant_min + quant_max + 1) // 2`` as zero
point: 128 for uint8 as in torch, and 64 with ``reduce_range`` (a combination
torch's observers refuse).
"""

from __future__ import annotations

import inspect
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from qswap.exceptions import CalibrationError, ConfigError, PlanError, RegistrationError
from qswap.registry import accepts_positional, qualified_name

if TYPE_CHECKING:
    from qswap.config import QuantSpec

__all__ = [
    "AffineQuantizer",
    "EmptyOptions",
    "HistogramObserver",
    "HistogramOptions",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAverageOptions",
    "Observer",
    "PerChannelMinMaxObserver",
    "QParams",
    "Quantizer",
    "add_buffer",
    "fake_quantize",
    "group_view_shape",
    "normalize_axis",
    "qparams_from_range",
    "rebin",
    "set_attrs",
    "set_buffer",
]

_FP32_EPS = float(torch.finfo(torch.float32).eps)
_NO_AXIS = -(2**62)  # stands for ``axis=None`` inside an int64 buffer
_EXACT_CELLS = 1024  # above this many grid steps the MSE search uses the s**2/12 rounding model
_GRID1 = (512, 33, 3)  # coarse points, fine points, fine rounds of the 1-D MSE search
_GRID2 = (12, 7, 4)
_ZP_WINDOW = 4  # zero points either side of the grid search's that the affine refinement tries
_CHUNK = 16384  # grid boundaries evaluated per tensor op in the MSE search
_TINY_RANGE = 2.0**-100  # width given to a histogram that has only seen zeros
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


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float (``inf`` beyond float32's range)."""
    try:
        return float(_F32.unpack(_F32.pack(x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


def _scalar_scale_zero_point(
    lo: float, hi: float, quant_min: int, quant_max: int, symmetric: bool
) -> tuple[float, int]:
    """``_scale_zero_point`` for one finite float32 range, in Python floats, bit for bit.

    Each float32 operation is done in float64 and rounded to float32 once; for ``+ - * /``
    of float32 operands that double rounding is exact, so the result equals torch's float32
    kernel (``round`` is half-to-even in both). A dozen tiny tensor ops cost ~50 us on CPU.
    """
    min_neg, max_pos = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        max_pos = max(-min_neg, max_pos)
        scale = max(_f32(max_pos / _f32(float(quant_max - quant_min) / 2)), _FP32_EPS)
        return scale, 0 if quant_min < 0 else (quant_min + quant_max + 1) // 2
    span = _f32(max_pos - min_neg)
    scale = max(_f32(span / _f32(float(quant_max - quant_min))), _FP32_EPS)
    zero_point = quant_min - round(_f32(min_neg / scale))
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


def _scale_zero_point(
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
    """``_scale_zero_point`` for float32 CPU ranges: the same kernels, Python numbers pre-wrapped.

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


def _layout(spec: QuantSpec) -> tuple[int | None, int | None]:
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
    axis, group_size = _layout(spec)
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
            s, z = _scalar_scale_zero_point(low, high, quant_min, quant_max, symmetric)
            scale = torch.scalar_tensor(s, dtype=torch.float32)  # s is a float32 value: exact
            zero_point = torch.scalar_tensor(z, dtype=torch.int32)
            return QParams(scale, zero_point, *spec.storage_range())
    scale, zero_point = _scale_zero_point(lo, hi, quant_min, quant_max, symmetric)
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


def _validated_options(
    cls: type[nn.Module], options: BaseModel | Mapping[str, Any] | None
) -> BaseModel:
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


class _StateModule(nn.Module):
    """A module whose buffers may change shape (resized on load) and keep their float dtype.

    Scales and statistics are buffers so ``.to(device)`` moves them and ``state_dict``
    saves them; ``model.half()`` still leaves them in float32/float64.
    """

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> _StateModule:
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


def _describe(spec: QuantSpec) -> str:
    qmin, qmax = spec.quant_range()
    where = ""
    if spec.granularity == "per_channel":
        where = f", axis={spec.axis}"
    elif spec.granularity == "per_group":
        where = f", axis={0 if spec.axis is None else spec.axis}, group_size={spec.group_size}"
    return f"{spec.bits}-bit [{qmin}, {qmax}], {spec.scheme}, {spec.granularity}{where}"


class Quantizer(_StateModule):
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
        set_attrs(self, spec=spec, options=_validated_options(type(self), options))
        qmin, qmax = spec.storage_range()
        axis, group_size = _layout(spec)
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
        return _describe(self.spec) + state


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


class Observer(_StateModule):
    """Base class and protocol of observers: ``forward`` records, ``calculate_qparams`` answers.

    Subclasses implement ``observe(x)`` (record one detached batch), ``calculate_qparams``
    and ``_merge_state(other)``; the base counts batches (``num_batches``, a buffer), checks
    that merged observers are compatible and handles empty sides.
    """

    options_model: ClassVar[type[BaseModel]] = EmptyOptions
    spec: QuantSpec
    options: BaseModel
    num_batches: Tensor

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        set_attrs(self, spec=spec, options=_validated_options(type(self), options))
        _layout(spec)  # fail early on a spec without its axis / group size
        add_buffer(self, "num_batches", torch.zeros((), dtype=torch.int64))

    @property
    def seen(self) -> bool:
        """Whether at least one non-empty batch was observed."""
        return bool(self.num_batches.item() > 0)

    def forward(self, x: Tensor) -> Tensor:
        """Record statistics of ``x`` (detached) and return ``x`` unchanged."""
        if x.numel():
            if not x.is_floating_point():
                raise PlanError(f"{type(self).__name__} observes float tensors, got {x.dtype}")
            self.observe(x.detach())
            self.num_batches.add_(1)
        return x

    def observe(self, x: Tensor) -> None:
        """Record one non-empty batch; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement observe(x)")

    def calculate_qparams(self) -> QParams:
        """QParams from what was observed; ``CalibrationError`` if nothing was."""
        raise NotImplementedError(f"{type(self).__name__} must implement calculate_qparams()")

    def merge(self, other: Observer) -> None:
        """Make this observer the union of itself and ``other`` (``other`` is unchanged)."""
        if type(other) is not type(self):
            raise CalibrationError(
                f"cannot merge a {type(other).__name__} into a {type(self).__name__}; "
                "merge observers of the same kind"
            )
        mine, theirs = _layout(self.spec), _layout(other.spec)
        if (self.spec.granularity, mine) != (other.spec.granularity, theirs):
            raise CalibrationError(
                f"cannot merge {type(self).__name__}s with different layouts: "
                f"{_describe(self.spec)} vs {_describe(other.spec)}"
            )
        if not other.seen:
            return
        if not self.seen:
            self.load_state_dict(other.state_dict())
            return
        self._merge_state(other)
        self.num_batches += other.num_batches.to(self.num_batches.device)

    def _merge_state(self, other: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _merge_state(other)")

    def _require_seen(self) -> None:
        if not self.seen:
            raise CalibrationError(
                f"{type(self).__name__} has observed no data, so it has no quantization "
                "parameters; run calibration batches through the prepared model first "
                "(qswap.calibrate(prepared, batches))"
            )

    def extra_repr(self) -> str:
        return f"{_describe(self.spec)}, batches={int(self.num_batches)}"


# --------------------------------------------------------------------------- min/max observers


def _reduce_minmax(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Min and max of ``x`` (float32) per tensor, per channel or per group."""
    x = x.to(torch.float32)
    if spec.granularity == "per_tensor":
        lo, hi = torch.aminmax(x)
        return lo, hi
    channel_axis, group_size = _layout(spec)  # an int here: only per_tensor has no axis
    if x.dim() == 0:
        raise PlanError(
            f"{spec.granularity} observation needs a tensor with a channel axis, got a scalar"
        )
    axis = normalize_axis(cast(int, channel_axis), x.dim())
    moved = x.movedim(axis, 0)
    # amin + amax, not aminmax(dim=...): on CPU the latter hands even a 16x16 reduction to
    # the thread pool, which costs milliseconds on a busy machine; the values are the same.
    if group_size is None:
        rows = moved.reshape(moved.shape[0], -1)
        return torch.amin(rows, dim=1), torch.amax(rows, dim=1)
    groups = moved.reshape(group_view_shape(x.shape, axis, group_size))
    return torch.amin(groups, dim=2), torch.amax(groups, dim=2)


def _all_finite(lo: Tensor, hi: Tensor) -> bool:
    """Whether every element of ``lo`` and ``hi`` is finite (one host sync)."""
    if lo.dim() == 0 and hi.dim() == 0:
        return math.isfinite(float(lo)) and math.isfinite(float(hi))
    # x - x is 0 for finite x and nan for inf or nan; a sum of zeros never overflows.
    # (torch.isfinite is a composite of several kernels: two of them cost ~25 us.)
    return math.isfinite(float((lo - lo).sum() + (hi - hi).sum()))


def _check_finite(lo: Tensor, hi: Tensor, who: str) -> None:
    if not _all_finite(lo, hi):
        raise CalibrationError(
            f"{who} saw non-finite values (inf or nan), so no finite scale exists; "
            "check the calibration data and the float model for overflow"
        )


class MinMaxObserver(Observer):
    """Running min and max per tensor, channel or group (``spec.granularity``).

    Merging takes the elementwise min of mins and max of maxes: exactly the result of
    observing both streams.

    >>> from qswap.config import QuantSpec
    >>> obs = MinMaxObserver(QuantSpec(signed=False, scheme="affine"))
    >>> _ = obs(torch.tensor([-1.0, 3.0]))
    >>> obs.calculate_qparams().zero_point.item()
    64
    """

    min_val: Tensor
    max_val: Tensor

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(spec, options)
        add_buffer(self, "min_val", torch.empty(0, dtype=torch.float32))
        add_buffer(self, "max_val", torch.empty(0, dtype=torch.float32))

    def _incoming(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """This batch's (min, max) on the state's device, or None for the first batch."""
        lo, hi = _reduce_minmax(x, self.spec)
        if self.min_val.numel() == 0 and lo.numel() != 0:
            set_buffer(self, "min_val", lo)
            set_buffer(self, "max_val", hi)
            return None
        if lo.shape != self.min_val.shape:
            raise PlanError(
                f"{type(self).__name__} saw a tensor of shape {tuple(x.shape)} whose "
                f"{self.spec.granularity} statistics have shape {tuple(lo.shape)}, but earlier "
                f"batches gave {tuple(self.min_val.shape)}; the channel count must stay the same"
            )
        return lo.to(self.min_val.device), hi.to(self.max_val.device)

    def observe(self, x: Tensor) -> None:
        """Fold this batch's min and max into the running ones."""
        incoming = self._incoming(x)
        if incoming is not None:
            set_buffer(self, "min_val", torch.min(self.min_val, incoming[0]))
            set_buffer(self, "max_val", torch.max(self.max_val, incoming[1]))

    def calculate_qparams(self) -> QParams:
        """QParams for the observed range (see ``qparams_from_range``)."""
        self._require_seen()
        _check_finite(self.min_val, self.max_val, type(self).__name__)
        return qparams_from_range(self.min_val, self.max_val, self.spec)

    def _merge_state(self, other: MinMaxObserver) -> None:
        self._check_merge_shape(other)
        self.min_val = torch.min(self.min_val, other.min_val.to(self.min_val.device))
        self.max_val = torch.max(self.max_val, other.max_val.to(self.max_val.device))

    def _check_merge_shape(self, other: MinMaxObserver) -> None:
        if other.min_val.shape != self.min_val.shape:
            raise CalibrationError(
                f"cannot merge {type(self).__name__}s that saw different channel counts: "
                f"{tuple(self.min_val.shape)} vs {tuple(other.min_val.shape)}"
            )


class PerChannelMinMaxObserver(MinMaxObserver):
    """``minmax`` that insists on ``granularity: per_channel`` (like torch's observer)."""

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        if spec.granularity != "per_channel":
            raise PlanError(
                f"observer 'per_channel_minmax' needs granularity: per_channel with an axis, "
                f"got {spec.granularity}; set granularity: per_channel and axis: 0, or use "
                "observer: minmax, which follows any granularity"
            )
        super().__init__(spec, options)


class MovingAverageOptions(BaseModel):
    """Options of ``moving_average_minmax``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    averaging_constant: float = Field(0.01, gt=0.0, le=1.0)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min and max (torch's ``MovingAverage*`` rule).

    ``min <- min + c * (batch_min - min)`` with ``c = averaging_constant``; the first batch
    sets the value. A moving average depends on batch order, so ``merge`` cannot reproduce
    one long stream: it takes the mean of both sides weighted by their batch counts,
    which is symmetric and associative (merging in any order gives the same result).
    """

    options_model: ClassVar[type[BaseModel]] = MovingAverageOptions

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(spec, options)
        self.averaging_constant = cast(MovingAverageOptions, self.options).averaging_constant

    def observe(self, x: Tensor) -> None:
        """Move the running min and max towards this batch's."""
        incoming = self._incoming(x)
        if incoming is not None:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (incoming[0] - self.min_val)
            self.max_val = self.max_val + c * (incoming[1] - self.max_val)

    def _merge_state(self, other: MinMaxObserver) -> None:
        self._check_merge_shape(other)
        device = self.min_val.device
        n_self = self.num_batches.to(torch.float64)
        n_other = other.num_batches.to(device=device, dtype=torch.float64)
        total = n_self + n_other
        for name in ("min_val", "max_val"):
            mine: Tensor = getattr(self, name)
            theirs: Tensor = getattr(other, name).to(device)
            mixed = (mine.double() * n_self + theirs.double() * n_other) / total
            setattr(self, name, mixed.to(torch.float32))


# --------------------------------------------------------------------------- histogram observer


class HistogramOptions(BaseModel):
    """Options of ``histogram``: bin count and how the clipping range is chosen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # each observer holds its bins in float64: 65536 is 0.5 MB, and far finer than needed
    bins: int = Field(2048, ge=16, le=65536)
    method: Literal["mse", "percentile"] = "mse"
    percentile: float = Field(99.99, gt=50.0, le=100.0)


def rebin(hist: Tensor, lo: float, hi: float, new_lo: float, new_hi: float, bins: int) -> Tensor:
    """Histogram ``hist`` over ``[lo, hi]`` re-binned to ``bins`` bins over ``[new_lo, new_hi]``.

    Mass is spread uniformly inside each source bin, so every unit of mass moves by less
    than one bin and the total is kept.
    """
    n = hist.numel()
    edges = torch.linspace(new_lo, new_hi, bins + 1, dtype=torch.float64, device=hist.device)
    pos = ((edges - lo) * (n / (hi - lo))).clamp(0, n)
    index = _floor_index(pos, n - 1)
    frac = pos - index.to(torch.float64)
    cumulative = torch.cat([hist.new_zeros(1), hist.cumsum(0)])
    cdf = cumulative.index_select(0, index) + frac * hist.index_select(0, index)
    return cdf.diff().clamp_min(0)


def _floor_index(x: Tensor, top: int) -> Tensor:
    """``floor(x)`` clamped to ``[0, top]`` as int64, for ``x >= 0`` (any shape).

    Truncation instead of ``floor`` and ``index_select`` instead of fancy indexing: torch
    sends floor/round/gather on a few thousand elements to its thread pool, and on a busy
    machine every such hand-off can wait a scheduler tick (~16 ms) for the second thread.
    """
    return x.clamp(0, top).to(torch.int64)


class _Density:
    """The piecewise-uniform density a histogram describes, with exact moment integrals."""

    def __init__(self, hist: Tensor, lo: float, hi: float) -> None:
        self.bins = n = hist.numel()
        self.lo, self.hi = lo, hi
        self.width = w = (hi - lo) / n
        edges = lo + w * torch.arange(n + 1, dtype=torch.float64, device=hist.device)
        edges[-1] = hi
        a, b = edges[:-1], edges[1:]
        self.edges = edges
        self.density = density = hist / w
        zero = hist.new_zeros(1)
        self.c0 = torch.cat([zero, hist.cumsum(0)])
        self.c1 = torch.cat([zero, (hist * (a + b) / 2).cumsum(0)])
        self.c2 = torch.cat([zero, (hist * (a * a + a * b + b * b) / 3).cumsum(0)])
        total0, total1 = self.c0[-1], self.c1[-1]
        self.mass = total0
        self.mean = total1 / total0.clamp_min(1e-300)
        centers = (a + b) / 2
        # sum over the mass of (x - mean)^2, each bin spread uniformly over its width
        self.spread = (hist * (centers - self.mean) ** 2).sum() + total0 * w * w / 12
        # F(x) = e - u*(c0 + density*u/2) with u = x - (left edge) on each piece, where the
        # pieces are "left of the data", the bins, and "right of the data" (index 0..n+1)
        self.piece_left = torch.cat([torch.full_like(zero, lo), a, torch.full_like(zero, hi)])
        self.piece_c0 = torch.cat([zero, self.c0[:-1], total0.reshape(1)])
        self.piece_e = (
            torch.cat([zero, self.c1[:-1], total1.reshape(1)]) - self.piece_left * self.piece_c0
        )
        self.piece_half_density = torch.cat([zero, density / 2, zero])

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``integral of t**k * density(t) dt`` from -inf to ``x``, for k = 0, 1, 2."""
        index = _floor_index((x - self.lo) / self.width, self.bins - 1)
        xc = x.clamp(self.lo, self.hi)
        a = self.edges[index]
        part = self.density[index] * (xc - a)
        m0 = self.c0[index] + part
        m1 = self.c1[index] + part * (xc + a) / 2
        m2 = self.c2[index] + part * (xc * xc + xc * a + a * a) / 3
        return m0, m1, m2

    def below_gap(self, x: Tensor) -> Tensor:
        """``F(x) = -integral of (x - t) * density(t) dt`` over ``t < x`` (0 left of the data)."""
        flat = _floor_index((x.reshape(-1) - self.lo) * (1.0 / self.width) + 1, self.bins + 1)

        def piece(table: Tensor) -> Tensor:
            return table.index_select(0, flat).reshape(x.shape)

        u = x - piece(self.piece_left)
        return piece(self.piece_e) - u * (piece(self.piece_c0) + piece(self.piece_half_density) * u)

    def expected_error(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
        """Expected squared fake-quantization error (summed over the mass) for each candidate."""
        s = scale.to(torch.float64)
        zp = zero_point.to(torch.float64)
        steps = qmax - qmin
        if steps <= _EXACT_CELLS:
            # Cells (beta_{j-1}, beta_j] around grid points g_j, beta_j = g_j + s/2, outer cells
            # unbounded (so clipping counts exactly). Summing E[(x - g_j)^2] over the cells by
            # parts leaves sum((x - g_top)^2) + 2 s sum_j F(beta_j).
            top = (qmax - zp) * s
            offsets = torch.arange(steps, dtype=torch.float64, device=s.device) + (qmin + 0.5)
            # chunks small enough to stay on one thread: at this size waking torch's thread
            # pool costs more than it saves (and stalls on a busy machine)
            rows = max(1, _CHUNK // steps)
            gaps = torch.cat(
                [
                    self.below_gap((offsets - zp_part.unsqueeze(1)) * s_part.unsqueeze(1)).sum(1)
                    for zp_part, s_part in zip(
                        torch.split(zp, rows), torch.split(s, rows), strict=False
                    )
                ]
            )
            error = self.spread + self.mass * (self.mean - top) ** 2
            return (error + 2 * s * gaps).clamp_min(0)
        # many narrow steps: clipping exactly, rounding as s^2/12 per unit of mass inside
        low, high = (qmin - zp) * s, (qmax - zp) * s
        l0, l1, l2 = self.moments(low)
        h0, h1, h2 = self.moments(high)
        t0, t1, t2 = self.c0[-1], self.c1[-1], self.c2[-1]
        below = l2 - 2 * low * l1 + low * low * l0
        above = (t2 - h2) - 2 * high * (t1 - h1) + high * high * (t0 - h0)
        inside = (h0 - l0) * s**2 / 12
        return (below + above + inside).clamp_min(0)

    def quantile(self, q: Tensor) -> Tensor:
        """Values below which a fraction ``q`` of the mass lies (linear inside bins)."""
        target = q.to(torch.float64) * self.c0[-1]
        k = torch.searchsorted(self.c0, target).clamp(1, self.bins)
        b = k - 1
        mass = self.c0[k] - self.c0[b]
        frac = ((target - self.c0[b]) / mass.clamp_min(1e-300)).clamp(0, 1)
        return self.edges[b] + frac * self.width


def _grid_search(cost: Callable[[Tensor], Tensor], dims: int, device: torch.device) -> Tensor:
    """Minimize ``cost`` over ``[0, 1]**dims`` (batched points ``[K, dims]``), coarse to fine."""
    coarse, fine, rounds = _GRID1 if dims == 1 else _GRID2

    def grid(axis: Tensor) -> Tensor:
        mesh = torch.meshgrid(*([axis] * dims), indexing="ij")
        return torch.stack([m.reshape(-1) for m in mesh], dim=1)

    points = grid(torch.arange(1, coarse + 1, dtype=torch.float64, device=device) / coarse)
    best = points[int(torch.argmin(cost(points)))]
    step = 1.0 / coarse
    for _ in range(rounds):
        offsets = torch.linspace(-step, step, fine, dtype=torch.float64, device=device)
        points = (best + grid(offsets)).clamp(0, 1)
        best = points[int(torch.argmin(cost(points)))]
        step = 2 * step / (fine - 1)
    return best


def _refine_affine(
    density: _Density, low: float, high: float, x_min: float, x_max: float, qmin: int, qmax: int
) -> tuple[float, float]:
    """The affine clip range ``(low, high)`` improved over nearby zero points and scales.

    Candidates are the zero points within ``_ZP_WINDOW`` of the one ``(low, high)`` gives and,
    for each, scales within 4 % of its scale: 0.1 % apart, then 0.005 % and 0.00025 % apart
    around that zero point's best. A pair counts only if its grid reaches at most one step
    past ``[x_min, x_max]`` at either end. Returns the input unless a pair has a lower
    expected error.
    """
    scale, zero_point = _scalar_scale_zero_point(low, high, qmin, qmax, False)
    zs = torch.arange(
        max(qmin, zero_point - _ZP_WINDOW),
        min(qmax, zero_point + _ZP_WINDOW) + 1,
        dtype=torch.float64,
        device=density.edges.device,
    ).unsqueeze(1)

    def cost(scales: Tensor) -> Tensor:  # scales: [Z, K] -> expected error, inf where outside
        zp = zs.expand_as(scales)
        error = density.expected_error(scales.reshape(-1), zp.reshape(-1), qmin, qmax)
        error = error.reshape(scales.shape)
        # a grid may reach up to one step past the data, as rounding the zero point can
        inside = ((qmin - zp + 1) * scales >= x_min) & ((qmax - zp - 1) * scales <= x_max)
        return torch.where(inside, error, torch.full_like(error, math.inf))

    base = density.expected_error(
        torch.tensor([scale], dtype=torch.float64, device=zs.device),
        torch.tensor([zero_point], dtype=torch.float64, device=zs.device),
        qmin,
        qmax,
    )
    step = 0.04 / 40
    scales = scale * (1 + torch.linspace(-0.04, 0.04, 81, dtype=torch.float64, device=zs.device))
    scales = scales.expand(zs.shape[0], -1)
    for _ in range(2):
        errors = cost(scales)
        best_k = errors.argmin(1, keepdim=True)
        centre = scales.gather(1, best_k)
        offsets = torch.linspace(-step, step, 41, dtype=torch.float64, device=zs.device)
        scales = centre * (1 + offsets)
        step = 2 * step / 40
    errors = cost(scales)
    flat = int(errors.argmin())
    if not float(errors.reshape(-1)[flat]) < float(base[0]):
        return low, high
    row, col = divmod(flat, errors.shape[1])
    s, z = float(scales[row, col]), float(zs[row, 0])
    # the clip range whose float32 qparams are (s, z), as qparams_from_range recomputes them
    return _f32((qmin - z) * s), _f32((qmax - z) * s)


class HistogramObserver(Observer):
    """Histogram of a tensor's values with a clipping-range search (per tensor only).

    ``method: mse`` picks the range whose quantization grid minimizes the expected squared
    error under the histogram's density (clipping and rounding, computed exactly from bin
    moments, vectorised over candidate ranges, coarse to fine; an affine range that clips at
    both ends is then refined over nearby zero points); ``method: percentile``
    clips at the ``percentile`` (and ``100 - percentile``) point. The histogram always
    covers 0 and every observed value; ``forward`` costs one ``aminmax`` and one
    ``torch.histc``. When the range grows, or when merging, histograms are re-binned to the
    union of the ranges (mass spread uniformly inside a bin, so nothing moves by more than a
    bin) and summed.

    >>> from qswap.config import QuantSpec
    >>> obs = HistogramObserver(QuantSpec(), {"bins": 256, "method": "percentile", "percentile": 100})
    >>> _ = obs(torch.tensor([-2.0, 0.5, 1.0]))
    >>> round(obs.calculate_qparams().scale.item() * 127.5, 4)
    2.0
    """

    options_model: ClassVar[type[BaseModel]] = HistogramOptions
    histogram: Tensor
    hist_range: Tensor
    min_val: Tensor
    max_val: Tensor

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        if spec.granularity != "per_tensor":
            raise PlanError(
                f"observer 'histogram' works per tensor, got granularity {spec.granularity}; "
                "use observer: minmax (or per_channel_minmax) for per-channel or per-group "
                "specs, or set granularity: per_tensor"
            )
        super().__init__(spec, options)
        options = cast(HistogramOptions, self.options)
        self.bins = options.bins
        self.method = options.method
        self.percentile = options.percentile
        self.register_buffer("histogram", torch.empty(0, dtype=torch.float64))
        self.register_buffer("hist_range", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("min_val", torch.empty(0, dtype=torch.float32))
        self.register_buffer("max_val", torch.empty(0, dtype=torch.float32))

    def observe(self, x: Tensor) -> None:
        """Add this batch to the histogram, re-binning first if the range grows."""
        x = x.to(torch.float32)
        lo_x, hi_x = torch.aminmax(x)
        x_min, x_max = torch.stack([lo_x, hi_x]).tolist()
        if not (math.isfinite(x_min) and math.isfinite(x_max)):
            raise CalibrationError(
                "HistogramObserver saw non-finite values (inf or nan); check the calibration "
                "data and the float model for overflow"
            )
        if self.histogram.numel() == 0:
            lo, hi = min(x_min, 0.0), max(x_max, 0.0)
            if hi == lo:
                hi = lo + _TINY_RANGE
            self.min_val, self.max_val = lo_x, hi_x
            self.histogram = torch.zeros(self.bins, dtype=torch.float64, device=x.device)
        else:
            old_lo, old_hi = self.hist_range.tolist()
            lo, hi = min(old_lo, x_min), max(old_hi, x_max)
            if (lo, hi) != (old_lo, old_hi):
                self.histogram = rebin(self.histogram, old_lo, old_hi, lo, hi, self.bins)
            self.min_val = torch.min(self.min_val, lo_x.to(self.min_val.device))
            self.max_val = torch.max(self.max_val, hi_x.to(self.max_val.device))
        counts = torch.histc(x, self.bins, min=lo, max=hi)
        self.histogram += counts.to(device=self.histogram.device, dtype=torch.float64)
        self.hist_range = torch.tensor([lo, hi], dtype=torch.float64, device=self.hist_range.device)

    def _after_load(self) -> None:
        # a state saved with another bin count (or copied by merge) is re-binned to ours
        n = self.histogram.numel()
        if n and n != self.bins:
            lo, hi = self.hist_range.tolist()
            self.histogram = rebin(self.histogram, lo, hi, lo, hi, self.bins)

    def _merge_state(self, other: HistogramObserver) -> None:
        lo1, hi1 = self.hist_range.tolist()
        lo2, hi2 = other.hist_range.tolist()
        lo, hi = min(lo1, lo2), max(hi1, hi2)
        device = self.histogram.device
        mine = rebin(self.histogram, lo1, hi1, lo, hi, self.bins)
        theirs = rebin(other.histogram.to(device), lo2, hi2, lo, hi, self.bins)
        self.histogram = mine + theirs
        self.hist_range = torch.tensor([lo, hi], dtype=torch.float64, device=device)
        self.min_val = torch.min(self.min_val, other.min_val.to(self.min_val.device))
        self.max_val = torch.max(self.max_val, other.max_val.to(self.max_val.device))

    def clip_range(self) -> tuple[float, float]:
        """The ``(low, high)`` clipping range the search chose.

        It lies within the observed range, except that an affine ``mse`` range may reach up
        to one grid step past it where a shifted grid (another zero point) fits better.
        """
        self._require_seen()
        x_min, x_max = float(self.min_val), float(self.max_val)
        lo, hi = self.hist_range.tolist()
        density = _Density(self.histogram, lo, hi)
        if self.method == "percentile":
            p = self.percentile / 100.0
            q = density.quantile(torch.tensor([1.0 - p, p], device=self.histogram.device))
            low, high = q.tolist()
            return min(max(low, x_min), x_max), min(max(high, x_min), x_max)
        return self._mse_range(density, x_min, x_max)

    def _mse_range(self, density: _Density, x_min: float, x_max: float) -> tuple[float, float]:
        qmin, qmax = self.spec.quant_range()
        symmetric = self.spec.scheme == "symmetric"
        neg, pos = max(-x_min, 0.0), max(x_max, 0.0)
        if symmetric:
            neg = pos = max(neg, pos)
        spans = [span for span in ((neg, pos) if not symmetric else (pos,)) if span > 0]
        if not spans:
            return 0.0, 0.0
        device = density.edges.device

        def bounds(points: Tensor) -> tuple[Tensor, Tensor]:
            if symmetric:
                hi = pos * points[:, 0]
                return -hi, hi
            columns = iter(points.unbind(1))
            lo = -neg * next(columns) if neg > 0 else points.new_zeros(points.shape[0])
            hi = pos * next(columns) if pos > 0 else points.new_zeros(points.shape[0])
            return lo, hi

        def cost(points: Tensor) -> Tensor:
            lo, hi = bounds(points)
            scale, zero_point = _scale_zero_point(
                lo.to(torch.float32), hi.to(torch.float32), qmin, qmax, symmetric
            )
            return density.expected_error(scale, zero_point, qmin, qmax)

        best = _grid_search(cost, len(spans), device).unsqueeze(0)
        lo, hi = bounds(best)
        low, high = float(lo.to(torch.float32)), float(hi.to(torch.float32))
        if len(spans) == 2:
            # Both ends clip: the error jumps wherever the zero point changes, which a grid
            # over (low, high) can step over. Search (scale, zero point) pairs near the winner.
            low, high = _refine_affine(density, low, high, x_min, x_max, qmin, qmax)
        return low, high

    def calculate_qparams(self) -> QParams:
        """QParams for the clipping range chosen by ``method``."""
        low, high = self.clip_range()
        return qparams_from_range(low, high, self.spec)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, method={self.method}"


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
