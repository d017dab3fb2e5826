"""Quantization methods beyond uniform affine: power-of-two scales, log2, binary, ternary, LSQ.

Each method is a :class:`qswap.quantizers.Quantizer` (the protocol every quantizer follows:
``__init__(spec, options)``, ``set_qparams(qparams)``, ``forward(x)``; the identity until
``set_qparams``) with its own pydantic options model, so a config validates
``quantizer: {name: ternary, threshold: 0.5}`` with that model and nothing central changes
when a method is added. The pack ``registry/quantization.yaml`` names them:

============  ===============================================================================
``pow2``      uniform grid whose scale is rounded to a power of two (shift-only rescaling)
``log2``      signed powers of two: ``sign(x) * 2**e``, ``2**(bits-1) - 1`` exponents and zero
``binary``    ``{-a, +a}`` per tensor/channel/group, ``a`` = mean (or max) of ``|x|``
``ternary``   ``{-a, 0, +a}`` per tensor/channel/group (TWN: threshold ``0.7 * mean|x|``)
``lsq``       uniform grid with a *learned* step size (LSQ, Esser et al. 2020), for QAT
============  ===============================================================================

``pow2`` and ``lsq`` stay on the uniform grid of their ``qparams``, so integer backends
run them (:func:`runs_on_integer_grid`); the others are simulated (``fake`` backend).

    >>> from qswap.config import QuantSpec
    >>> from qswap.quantizers import qparams_from_range
    >>> q = Log2Quantizer(QuantSpec(bits=3))
    >>> q.set_qparams(qparams_from_range(-1.0, 1.0, QuantSpec(bits=3)))
    >>> q(torch.tensor([0.9, -0.3, 0.01, 0.2]))
    tensor([ 1.0000, -0.2500,  0.0000,  0.2500])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from qswap.exceptions import ConfigError
from qswap.quantizers import (
    AffineQuantizer,
    QParams,
    Quantizer,
    group_view_shape,
    normalize_axis,
)

if TYPE_CHECKING:
    from qswap.config import QuantSpec

__all__ = [
    "BinaryOptions",
    "BinaryQuantizer",
    "LSQOptions",
    "LSQQuantizer",
    "Log2Options",
    "Log2Quantizer",
    "Pow2Options",
    "Pow2Quantizer",
    "TernaryOptions",
    "TernaryQuantizer",
    "learns_qparams",
    "runs_on_integer_grid",
]

_FP32_EPS = float(torch.finfo(torch.float32).eps)
_OPTIONS = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- shared pieces


def _rows(
    x: Tensor, axis: int | None, group_size: int | None
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``x`` as rows that share one scale, and the function that puts rows back in ``x``'s shape.

    Per tensor one row ``[1, N]``; per channel ``[C, N]``; per group ``[C * G, group_size]``
    (the same row order as a ``[C, G]`` scale flattened).
    """
    if axis is None:
        return x.reshape(1, -1), lambda rows: rows.reshape(x.shape)
    axis = normalize_axis(axis, x.dim())
    moved = x.movedim(axis, 0)
    if group_size is None:
        rows = moved.reshape(moved.shape[0], -1)
    else:
        channels, groups, size = group_view_shape(x.shape, axis, group_size)
        rows = moved.reshape(channels * groups, size)
    shape = moved.shape
    return rows, lambda out: out.reshape(shape).movedim(0, axis)


def _straight_through(x: Tensor, quantized: Tensor, inside: Tensor | None = None) -> Tensor:
    """``quantized`` in the forward pass; gradient 1 w.r.t. ``x`` (only where ``inside``)."""
    if not x.requires_grad:
        return quantized
    if inside is None:
        return x + (quantized - x).detach()
    return quantized.detach() + torch.where(inside, x - x.detach(), torch.zeros_like(x))


def _require_signed(spec: QuantSpec, name: str) -> None:
    if not spec.signed:
        raise ConfigError(
            f"quantizer {name!r} produces values of both signs and needs signed: true, but this "
            "slot's spec has signed: false (the default for activations). Use it for weights "
            "(weight: {quantizer: " + name + "}) or set signed: true for this slot"
        )


def runs_on_integer_grid(cls: type) -> bool:
    """Whether quantizers of class ``cls`` output values on the uniform grid of their ``qparams``.

    Integer backends run only such quantizers; a class says so with a class attribute
    ``integer_grid = True``. ``AffineQuantizer`` (and subclasses that keep its ``forward``)
    count as uniform; anything else does not, plain-function quantizers included.

    >>> runs_on_integer_grid(Pow2Quantizer), runs_on_integer_grid(Log2Quantizer)
    (True, False)
    """
    flag = getattr(cls, "integer_grid", None)
    if flag is not None:
        return bool(flag)
    return (
        isinstance(cls, type)
        and issubclass(cls, AffineQuantizer)
        and cls.forward is AffineQuantizer.forward
    )


def learns_qparams(quantizer: nn.Module) -> bool:
    """Whether ``quantizer`` holds trainable parameters and already has qparams (QAT keeps them).

    Such a quantizer (LSQ) is initialised once from its observer; afterwards its own
    parameters, trained by the optimizer, are its qparams.

    >>> from qswap.config import QuantSpec
    >>> from qswap.quantizers import qparams_from_range
    >>> q = LSQQuantizer(QuantSpec())
    >>> before = learns_qparams(q)
    >>> q.set_qparams(qparams_from_range(-1.0, 1.0, QuantSpec()))
    >>> before, learns_qparams(q)
    (False, True)
    """
    if getattr(quantizer, "qparams", None) is None:
        return False
    return any(p.requires_grad for p in quantizer.parameters())


# --------------------------------------------------------------------------- pow2


class Pow2Options(BaseModel):
    """Options of ``pow2``: how a calibrated scale is rounded to a power of two."""

    model_config = _OPTIONS
    rounding: Literal["ceil", "nearest", "floor"] = Field(
        "ceil",
        description=(
            "ceil keeps the whole calibrated range (never clips more); nearest is the closest "
            "power of two in log scale; floor gives finer steps and clips more."
        ),
    )


class Pow2Quantizer(AffineQuantizer):
    """Uniform fake-quantizer whose scales are powers of two (rescaling becomes a bit shift).

    ``set_qparams`` rounds each calibrated scale to ``2**k`` (``rounding``) and, for an
    affine scheme, recomputes the zero point so the range's lower end stays put; symmetric
    zero points are kept. ``qparams`` returns the rounded parameters, so integer backends
    use them as they are.

    >>> from qswap.config import QuantSpec
    >>> from qswap.quantizers import qparams_from_range
    >>> q = Pow2Quantizer(QuantSpec())
    >>> q.set_qparams(qparams_from_range(-1.0, 1.0, QuantSpec()))
    >>> q.qparams.scale.item() == 2.0 ** -6
    True
    """

    options_model: ClassVar[type[BaseModel]] = Pow2Options
    integer_grid: ClassVar[bool] = True

    def set_qparams(self, qparams: QParams) -> None:
        """Use ``qparams`` with each scale rounded to a power of two."""
        rounding = cast(Pow2Options, self.options).rounding
        exponent = torch.log2(qparams.scale.to(torch.float64))
        rounded = {"ceil": torch.ceil, "nearest": torch.round, "floor": torch.floor}[rounding]
        scale = torch.exp2(rounded(exponent)).clamp_min(_FP32_EPS).to(torch.float32)
        zero_point = qparams.zero_point
        if self.spec.scheme == "affine":
            low = (qparams.quant_min - zero_point.to(torch.float64)) * qparams.scale.double()
            zero_point = qparams.quant_min - torch.round(low / scale.double())
            zero_point = zero_point.clamp(qparams.quant_min, qparams.quant_max).to(torch.int32)
        super().set_qparams(
            QParams(
                scale,
                zero_point,
                qparams.quant_min,
                qparams.quant_max,
                qparams.axis,
                qparams.group_size,
            )
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rounding={cast(Pow2Options, self.options).rounding}"


# --------------------------------------------------------------------------- log2


class Log2Options(BaseModel):
    """Options of ``log2``: how many powers of two, the top one, and how values round to them."""

    model_config = _OPTIONS
    levels: int | None = Field(
        None,
        ge=1,
        le=64,
        description=(
            "Nonzero magnitudes 2**e (consecutive exponents); default 2**(bits-1) - 1 for a "
            "signed spec, 2**bits - 1 for an unsigned one."
        ),
    )
    max_exponent: int | None = Field(
        None,
        ge=-126,
        le=127,
        description="Largest exponent; default: the calibrated range's maximum, rounded in log2.",
    )
    rounding: Literal["log", "linear"] = Field(
        "log",
        description=(
            "log rounds log2|x| to the nearest integer; linear picks the nearest power of two."
        ),
    )


class Log2Quantizer(Quantizer):
    """Logarithmic fake-quantizer: outputs are ``0`` or ``±2**e`` with ``e`` in a window of exponents.

    The top exponent comes from the calibrated range (per tensor, channel or group, like the
    qparams) unless ``max_exponent`` fixes it; magnitudes below the window become 0 and
    above it clip to the top. Unsigned specs keep only non-negative values. Gradients pass
    straight through inside the representable range.
    """

    options_model: ClassVar[type[BaseModel]] = Log2Options
    integer_grid: ClassVar[bool] = False
    exponent: Tensor

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(spec, options)
        opts = cast(Log2Options, self.options)
        default = (1 << (spec.bits - 1)) - 1 if spec.signed else (1 << spec.bits) - 1
        self.levels = opts.levels if opts.levels is not None else default
        codes = 1 << spec.bits
        needed = 2 * self.levels + 1 if spec.signed else self.levels + 1
        if needed > codes:
            raise ConfigError(
                f"quantizer 'log2' with levels={self.levels} needs {needed} codes "
                f"({'sign, ' if spec.signed else ''}{self.levels} magnitudes and zero), but "
                f"bits={spec.bits} gives {codes}; use levels <= {default} or more bits"
            )
        self.max_exponent = opts.max_exponent
        self.rounding = opts.rounding
        self.register_buffer("exponent", torch.empty(0, dtype=torch.float32))

    def set_qparams(self, qparams: QParams) -> None:
        """Take the top exponent of each tensor/channel/group from the range ``qparams`` cover."""
        super().set_qparams(qparams)
        if self.max_exponent is not None:
            top = torch.full_like(qparams.scale, float(self.max_exponent))
        else:
            zp = qparams.zero_point.to(torch.float32)
            reach = torch.maximum((qparams.quant_max - zp).abs(), (qparams.quant_min - zp).abs())
            biggest = (reach * qparams.scale).clamp_min(2.0**-126)
            top = torch.round(torch.log2(biggest))
        self.exponent = top.to(device=self.scale.device, dtype=torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        """Round ``x`` to signed powers of two (same dtype and device); straight-through gradient."""
        if self.scale.numel() == 0 or x.numel() == 0:
            return x
        xf = x.to(torch.float32)
        rows, back = _rows(xf, self._axis, self._group_size)
        top = self.exponent.to(x.device).reshape(-1, 1)
        bottom = top - (self.levels - 1)
        with torch.no_grad():
            magnitude = rows.abs()
            safe = magnitude.clamp_min(2.0**-149)
            if self.rounding == "log":
                e = torch.round(torch.log2(safe))
                keep = e >= bottom
            else:
                k = torch.floor(torch.log2(safe))
                e = k + (safe >= 1.5 * torch.exp2(k)).to(k.dtype)
                keep = magnitude >= torch.exp2(bottom - 1)
            keep = keep & (magnitude > 0)
            e = torch.minimum(torch.maximum(e, bottom), top)
            sign = torch.sign(rows) if self.spec.signed else (rows > 0).to(rows.dtype)
            out = sign * torch.exp2(e) * keep.to(rows.dtype)
            limit = torch.exp2(top)
            inside = (rows <= limit) & (rows >= (-limit if self.spec.signed else 0.0))
        result = _straight_through(rows, out, inside)
        return back(result).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.levels}, rounding={self.rounding}"


# --------------------------------------------------------------------------- binary / ternary


class _MagnitudeQuantizer(Quantizer):
    """What ``binary`` and ``ternary`` share: signed specs only, levels computed per row from the
    tensor being quantized (``bits`` unused), straight-through gradient.

    A subclass names itself in ``method`` and computes the output rows in ``_quantize_rows``.
    """

    integer_grid: ClassVar[bool] = False
    method: ClassVar[str]

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        _require_signed(spec, self.method)
        super().__init__(spec, options)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` quantized per row (same dtype and device); straight-through gradient."""
        if self.scale.numel() == 0 or x.numel() == 0:
            return x
        xf = x.to(torch.float32)
        rows, back = _rows(xf, self._axis, self._group_size)
        with torch.no_grad():
            out = self._quantize_rows(rows)
        return back(_straight_through(rows, out)).to(x.dtype)

    def _quantize_rows(self, rows: Tensor) -> Tensor:
        """The quantized values of ``rows`` (float32, one row per tensor/channel/group)."""
        raise NotImplementedError


class BinaryOptions(BaseModel):
    """Options of ``binary``: which statistic of ``|x|`` sets the magnitude ``a``."""

    model_config = _OPTIONS
    scale: Literal["mean_abs", "max_abs"] = Field(
        "mean_abs",
        description="mean_abs (XNOR-Net: least-squares optimal a) or max_abs.",
    )


class BinaryQuantizer(_MagnitudeQuantizer):
    """Binary fake-quantizer: ``a * sign(x)`` (``+a`` at 0), one ``a`` per tensor, channel or group.

    ``a`` is computed from the tensor being quantized (meant for weights), so ``bits`` is
    not used; the granularity comes from the spec. Straight-through gradient.

    >>> from qswap.config import QuantSpec
    >>> from qswap.quantizers import qparams_from_range
    >>> q = BinaryQuantizer(QuantSpec())
    >>> q.set_qparams(qparams_from_range(-1.0, 1.0, QuantSpec()))
    >>> q(torch.tensor([0.5, -1.0, 0.0, 2.5]))
    tensor([ 1., -1.,  1.,  1.])
    """

    options_model: ClassVar[type[BaseModel]] = BinaryOptions
    method: ClassVar[str] = "binary"

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(spec, options)
        self.statistic = cast(BinaryOptions, self.options).scale

    def _quantize_rows(self, rows: Tensor) -> Tensor:
        """``±a`` per row."""
        magnitude = rows.abs()
        if self.statistic == "mean_abs":
            a = magnitude.mean(dim=1, keepdim=True)
        else:
            a = magnitude.amax(dim=1, keepdim=True)
        return torch.where(rows >= 0, a, -a)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.statistic}"


class TernaryOptions(BaseModel):
    """Options of ``ternary``: the zero threshold as a multiple of ``mean|x|``."""

    model_config = _OPTIONS
    threshold: float = Field(
        0.7,
        gt=0.0,
        le=1.5,
        description="Values with |x| <= threshold * mean|x| become 0 (TWN uses 0.7).",
    )


class TernaryQuantizer(_MagnitudeQuantizer):
    """Ternary fake-quantizer (TWN): ``{-a, 0, +a}`` per tensor, channel or group.

    Values with ``|x| <= threshold * mean|x|`` become 0; ``a`` is the mean of the others'
    magnitudes (the least-squares choice). Computed from the tensor being quantized (meant
    for weights); straight-through gradient.

    >>> from qswap.config import QuantSpec
    >>> from qswap.quantizers import qparams_from_range
    >>> q = TernaryQuantizer(QuantSpec())
    >>> q.set_qparams(qparams_from_range(-1.0, 1.0, QuantSpec()))
    >>> q(torch.tensor([0.9, -1.1, 0.1, 0.0]))
    tensor([ 1., -1.,  0.,  0.])
    """

    options_model: ClassVar[type[BaseModel]] = TernaryOptions
    method: ClassVar[str] = "ternary"

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(spec, options)
        self.threshold = cast(TernaryOptions, self.options).threshold

    def _quantize_rows(self, rows: Tensor) -> Tensor:
        """``{-a, 0, +a}`` per row."""
        magnitude = rows.abs()
        delta = self.threshold * magnitude.mean(dim=1, keepdim=True)
        keep = (magnitude > delta).to(rows.dtype)
        kept = keep.sum(dim=1, keepdim=True).clamp_min(1)
        a = (magnitude * keep).sum(dim=1, keepdim=True) / kept
        return torch.sign(rows) * a * keep

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


# --------------------------------------------------------------------------- LSQ


class LSQOptions(BaseModel):
    """Options of ``lsq``: where the step starts and whether its gradient is scaled."""

    model_config = _OPTIONS
    init: Literal["observer", "lsq"] = Field(
        "observer",
        description=(
            "observer starts from the calibrated scale; lsq from 2 * mean|x| / sqrt(quant_max) "
            "of the first tensor quantized (the paper's rule)."
        ),
    )
    grad_scale: bool = Field(
        True,
        description="Scale the step's gradient by 1 / sqrt(N * quant_max), as in the LSQ paper.",
    )


class LSQQuantizer(Quantizer):
    """Learned Step Size Quantization: a uniform grid whose step is an ``nn.Parameter``.

    ``set_qparams`` initialises the step (per tensor, channel or group, like the qparams)
    and the zero point; from then on ``step`` appears in ``model.parameters()`` and
    training moves it with the LSQ gradient (rounding straight-through, clipping exact).
    ``qparams`` returns the current step as the scale, so ``convert`` freezes what was
    learned and integer backends run it.

    >>> from qswap.config import QuantSpec
    >>> from qswap.quantizers import qparams_from_range
    >>> q = LSQQuantizer(QuantSpec(bits=4))
    >>> q.set_qparams(qparams_from_range(-1.0, 1.0, QuantSpec(bits=4)))
    >>> loss = q(torch.tensor([0.3, -0.8, 2.0])).sum()
    >>> loss.backward()
    >>> q.step.grad is not None
    True
    """

    options_model: ClassVar[type[BaseModel]] = LSQOptions
    integer_grid: ClassVar[bool] = True
    step: nn.Parameter | None
    pending: Tensor

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(spec, options)
        opts = cast(LSQOptions, self.options)
        self.init = opts.init
        self.grad_scale = opts.grad_scale
        self.register_parameter("step", None)
        # 1 while an init: lsq step still waits for its first tensor (a buffer: saved with it)
        self.register_buffer("pending", torch.zeros((), dtype=torch.int64))

    def set_qparams(self, qparams: QParams) -> None:
        """Set the step and zero point from ``qparams`` (in place when the shape is unchanged)."""
        super().set_qparams(qparams)
        value = self.scale.detach().clone()
        if self.step is not None and self.step.shape == value.shape:
            with torch.no_grad():
                self.step.copy_(value.to(self.step.device, self.step.dtype))
        else:
            self.step = nn.Parameter(value)
        self.pending.fill_(1 if self.init == "lsq" else 0)

    @property
    def qparams(self) -> QParams | None:
        """The current (learned) step as the scale, with the zero point and range."""
        if self.step is None or self.scale.numel() == 0:
            return None
        return QParams(
            self.step.detach().abs().clamp_min(_FP32_EPS).to(torch.float32).clone(),
            self.zero_point.clone(),
            self._qmin,
            self._qmax,
            self._axis,
            self._group_size,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` with the learned step; LSQ gradients to ``x`` and ``step``."""
        step = self.step
        if step is None or self.scale.numel() == 0 or x.numel() == 0:
            return x
        xf = x.to(torch.float32)
        rows, back = _rows(xf, self._axis, self._group_size)
        positive = max(self._qmax, 1)
        if int(self.pending):
            with torch.no_grad():
                start = 2 * rows.abs().mean(dim=1) / math.sqrt(positive)
                step.copy_(start.reshape(step.shape).clamp_min(_FP32_EPS).to(step.dtype))
                self.pending.fill_(0)
        s = step.to(torch.float32).reshape(-1, 1)
        if self.grad_scale:
            g = 1.0 / math.sqrt(rows.shape[1] * positive)
            s = (s - s * g).detach() + s * g
        s = s.abs().clamp_min(_FP32_EPS)
        zp = self.zero_point.to(device=x.device, dtype=torch.float32).reshape(-1, 1)
        v = (rows / s + zp).clamp(self._qmin, self._qmax)
        v = v + (torch.round(v) - v).detach()
        return back((v - zp) * s).to(x.dtype)

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
        incoming = state_dict.get(prefix + "step")
        if isinstance(incoming, Tensor) and (
            self.step is None or self.step.shape != incoming.shape
        ):
            device = self.scale.device
            self.step = nn.Parameter(
                torch.empty(incoming.shape, dtype=torch.float32, device=device)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init}, grad_scale={self.grad_scale}"


# --------------------------------------------------------------------------- registration
