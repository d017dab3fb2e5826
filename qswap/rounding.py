"""Weight methods: how a layer's weights are rounded onto their grid, from its calibration inputs.

Round-to-nearest (RTN) rounds each weight on its own. A *weight method* looks at what the
layer computes on real inputs and rounds to make the layer's output, not each weight, come
out right: GPTQ spreads each rounding error over the weights not yet rounded (through the
inputs' second moments), AWQ scales the input channels that carry large activations before
rounding. SmoothQuant, for layers whose inputs are quantized too (``mode: dynamic``), moves
the range of outlier input channels from the activations into the weights. A method is a registered component, like an observer, chosen in a config::

    weight: {bits: 4, granularity: per_group, group_size: 128, method: gptq}
    weight: {method: {name: gptq, act_order: true, damp: 0.01}}

``prepare`` hangs one instance on each such layer's input (beside its observers);
calibration feeds it the layer's inputs (:meth:`WeightMethod.observe`, statistics that add
up across batches and across processes: ``reduction = "merge"``); ``convert`` calls
:meth:`WeightMethod.solve` once with the float weight and the qparams the weight observer
computed, and quantizes what it returns. A method of your own subclasses
:class:`WeightMethod` and is registered with ``Registry.register_method`` or a pack's
``methods:`` table, as the built-in ``gptq`` and ``awq`` are.

Methods work on 2-D weights read as ``(output features, input features)``: ``nn.Linear``
and layers mapped with the output axis elsewhere (transformers' ``Conv1D``, axis 1).

    >>> import torch
    >>> from qswap.config import QuantSpec
    >>> g = GPTQ(QuantSpec(bits=4))
    >>> _ = g(torch.randn(32, 8))
    >>> tuple(g.hessian.shape), int(g.rows)
    ((8, 8), 32)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from qswap.exceptions import CalibrationError
from qswap.observers import Observer
from qswap.quantizers import QParams, add_buffer, set_buffer
from qswap.weight_methods import awq_clip, awq_scales, gptq, moment_root

if TYPE_CHECKING:
    from qswap.config import QuantSpec

__all__ = [
    "AWQ",
    "GPTQ",
    "RTN",
    "AWQOptions",
    "GPTQOptions",
    "Rounded",
    "SmoothQuant",
    "SmoothQuantOptions",
    "Solved",
    "WeightMethod",
    "expand_qparams",
]


@dataclass(frozen=True)
class Rounded:
    """What a method returns: the weight to quantize, its qparams, and an input scale.

    ``weight`` has the float weight's shape (``(out, in)``); ``qparams`` are the ones it is
    quantized with (the observer's, or new ones for a rescaled weight); ``input_scale``
    (``(in,)``), when set, multiplies the layer's input before the weight is applied (AWQ),
    so the layer computes ``weight @ (input_scale * x)``.
    """

    weight: Tensor
    qparams: QParams
    input_scale: Tensor | None = None


#: ``rtn(weight) -> (fake-quantized weight, its qparams)``: round to nearest with the spec's
#: own observer and quantizer, for a method that tries weights of its own (AWQ)
RoundToNearest = Callable[[Tensor], tuple[Tensor, QParams]]


class WeightMethod(Observer):
    """Base class and protocol of weight methods: record inputs, then round one weight.

    Subclasses implement ``observe(x)`` (one batch of the layer's inputs, detached; the
    last axis is the input features), ``_merge_state(other)`` (add another instance's
    statistics) and ``solve(weight, qparams, rtn)``. ``spec`` is the layer's weight spec.
    Being an :class:`qswap.observers.Observer`, a method counts its batches, merges and is
    reduced across processes like one (``reduction = "merge"``).
    """

    reduction: ClassVar[str] = "merge"
    #: whether ``prepare`` hangs the method on the layer's input to record calibration data
    records_inputs: ClassVar[bool] = True
    #: whether ``solve`` may return an ``input_scale`` (the backend must then apply it)
    scales_inputs: ClassVar[bool] = False

    def calculate_qparams(self) -> QParams:
        raise CalibrationError(
            f"{type(self).__name__} is a weight method: it rounds a weight in solve(), it has "
            "no quantization parameters of its own"
        )

    def solve(self, weight: Tensor, qparams: QParams, rtn: RoundToNearest) -> Rounded:
        """Round ``weight`` (``(out, in)``, float) given the observer's ``qparams``."""
        raise NotImplementedError(f"{type(self).__name__} must implement solve(weight, ...)")

    @staticmethod
    def _features(x: Tensor) -> Tensor:
        """``x`` as rows of input features, float32."""
        return x.reshape(-1, x.shape[-1]).to(torch.float32)

    def _add_sums(self, sums: Mapping[str, Tensor]) -> None:
        """Add each of ``sums`` (buffer name -> a batch's or another instance's sum) into the
        buffer of that name, taken as is the first time. The first sum's leading size is the
        layer's input feature count: it must match what came before."""
        name, value = next(iter(sums.items()))
        held = getattr(self, name)
        if held.numel() and held.shape != value.shape:
            raise CalibrationError(
                f"{type(self).__name__.lower()} saw inputs with {value.shape[0]} features after "
                f"{held.shape[0]}; a layer's input size must stay the same"
            )
        for key, total in sums.items():
            current = getattr(self, key)
            if current.numel() == 0:
                set_buffer(self, key, total.clone())
            else:
                current.add_(total.to(current.device))


class Solved(WeightMethod):
    """A method that has rounded its layer already (sequential calibration); statistics freed.

    ``qswap.calibrate(..., sequential=True)`` solves each block's methods as soon as the block
    has seen every batch, writes the rounded weight into the prepared model and leaves this
    in the method's place: what ``solve`` returned (``qparams``, ``input_scale``), the
    method's name and its plan notes, without the statistics (a GPTQ Hessian is ``in x in`` floats per layer).
    """

    records_inputs: ClassVar[bool] = False
    input_scale: Tensor

    def __init__(self, method: WeightMethod, rounded: Rounded, notes: tuple[str, ...] = ()) -> None:
        super().__init__(method.spec, None)
        self.method = type(method).__name__
        #: what solving it noted for the plan (an untied weight), shown again by convert
        self.notes = tuple(notes)
        self.qparams = rounded.qparams
        scale = rounded.input_scale
        add_buffer(self, "input_scale", torch.zeros(0) if scale is None else scale.clone())
        self.num_batches.copy_(method.num_batches)

    def observe(self, x: Tensor) -> None:
        raise CalibrationError(
            f"this layer's {self.method} has rounded its weight already (sequential "
            "calibration); calibrate a freshly prepared model to see more data"
        )

    def _merge_state(self, other: Any) -> None:
        self.observe(torch.zeros(0))

    def solve(self, weight: Tensor, qparams: QParams, rtn: RoundToNearest) -> Rounded:
        scale = self.input_scale if self.input_scale.numel() else None
        return Rounded(weight, self.qparams, scale)

    def extra_repr(self) -> str:
        return f"{self.method}, solved"


def expand_qparams(qparams: QParams, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` of a 2-D ``(out, in)`` weight's qparams, broadcast to ``shape``.

    >>> qp = QParams(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2, dtype=torch.int32),
    ...              -8, 7, axis=0, group_size=2)
    >>> expand_qparams(qp, (1, 4))[0].tolist()
    [[1.0, 1.0, 2.0, 2.0]]
    """
    scale, zero = qparams.scale.to(torch.float32), qparams.zero_point.to(torch.float32)
    if qparams.group_size is not None and scale.dim() == 2:
        scale = scale.repeat_interleave(qparams.group_size, dim=1)
        zero = zero.repeat_interleave(qparams.group_size, dim=1)
    elif scale.dim() == 1 and scale.numel() > 1:
        scale, zero = scale[:, None], zero[:, None]
    return scale.expand(shape).contiguous(), zero.expand(shape).contiguous()


class RTN(WeightMethod):
    """Round to nearest: what a weight spec without ``method`` does (for rules to restore it)."""

    records_inputs: ClassVar[bool] = False

    def observe(self, x: Tensor) -> None:
        pass

    def _merge_state(self, other: Any) -> None:
        pass

    def solve(self, weight: Tensor, qparams: QParams, rtn: RoundToNearest) -> Rounded:
        return Rounded(weight, qparams)


class GPTQOptions(BaseModel):
    """Options of ``gptq``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    damp: float = Field(
        default=0.01,
        gt=0,
        le=1,
        description="Fraction of the mean input power added to the diagonal (stability).",
    )
    act_order: bool = Field(
        default=False,
        description="Round the input features with the most power first (better at 3-4 bits).",
    )
    block_size: int = Field(default=128, ge=1, description="Columns updated together (speed only).")


class GPTQ(WeightMethod):
    """GPTQ (Frantar et al., 2022): round column by column, compensating on the rest.

    Records ``H = sum x x^T`` over the calibration inputs and minimizes the layer-output
    error ``tr((W - Q) H (W - Q)^T)`` greedily, with the qparams the weight observer chose
    (static groups: each group's scale is the one RTN would use, so ``act_order`` and
    groups combine freely and the result is exactly on the observer's grid).
    """

    options_model: ClassVar[type[BaseModel]] = GPTQOptions
    options: GPTQOptions
    hessian: Tensor
    rows: Tensor

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(spec, options)
        add_buffer(self, "hessian", torch.zeros(0, 0, dtype=torch.float32))
        add_buffer(self, "rows", torch.zeros((), dtype=torch.int64))

    def observe(self, x: Tensor) -> None:
        rows = self._features(x)
        self._add_sums({"hessian": rows.T @ rows})
        self.rows.add_(rows.shape[0])

    def _merge_state(self, other: GPTQ) -> None:
        self._add_sums({"hessian": other.hessian})
        self.rows.add_(int(other.rows))

    def solve(self, weight: Tensor, qparams: QParams, rtn: RoundToNearest) -> Rounded:
        self._require_seen()
        if self.hessian.shape[0] != weight.shape[1]:
            raise CalibrationError(
                f"gptq recorded inputs with {self.hessian.shape[0]} features for a weight with "
                f"{weight.shape[1]} input features"
            )
        scale, zero = expand_qparams(qparams, (weight.shape[0], weight.shape[1]))
        opts = self.options
        new = gptq(
            weight,
            self.hessian / max(int(self.rows), 1),
            scale,
            zero,
            qparams.quant_min,
            qparams.quant_max,
            damp=opts.damp,
            act_order=opts.act_order,
            block_size=opts.block_size,
        )
        return Rounded(new, qparams)


class AWQOptions(BaseModel):
    """Options of ``awq``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    grid: int = Field(default=20, ge=1, le=200, description="Exponents tried in [0, 1).")
    clip: bool = Field(
        default=True,
        description=(
            "After scaling, shrink each group's (or row's) range where that lowers the output "
            "error on the calibration inputs, as AWQ's clipping search does. Per-tensor "
            "weights: ignored."
        ),
    )
    max_shrink: float = Field(
        default=0.5, ge=0, lt=1, description="Largest share of a range clipping may cut."
    )


class AWQ(WeightMethod):
    """AWQ (Lin et al., 2023): scale up the input channels that carry large activations.

    Records the inputs' second moments ``sum x x^T`` (``in x in``, as GPTQ's Hessian) and
    each input channel's summed magnitude, both sums (reduced across batches and processes,
    exactly); ``solve`` tries ``s = mean|x| ** alpha`` for ``alpha`` on a grid, rounds
    ``W * s`` to nearest and keeps the ``alpha`` whose output error over all calibration
    inputs, ``tr(D H D^T)``, is least; with ``clip`` it then shrinks each group's range where
    that brings the output closer (``awq_clip``). The layer computes
    ``round(W * s) @ (x / s)``: the backend applies ``input_scale``. ``alpha = 0`` is plain
    RTN and clipping keeps a row's range where cutting it does not help, so the result is
    never worse than RTN on the calibration inputs.
    """

    options_model: ClassVar[type[BaseModel]] = AWQOptions
    options: AWQOptions
    scales_inputs: ClassVar[bool] = True
    rows: Tensor
    moments: Tensor
    magnitude: Tensor

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(spec, options)
        add_buffer(self, "rows", torch.zeros((), dtype=torch.int64))
        add_buffer(self, "moments", torch.zeros(0, 0, dtype=torch.float32))
        add_buffer(self, "magnitude", torch.zeros(0, dtype=torch.float32))

    def observe(self, x: Tensor) -> None:
        rows = self._features(x)
        self._add_sums({"moments": rows.T @ rows, "magnitude": rows.abs().sum(dim=0)})
        self.rows.add_(rows.shape[0])

    def _merge_state(self, other: AWQ) -> None:
        self._add_sums({"moments": other.moments, "magnitude": other.magnitude})
        self.rows.add_(int(other.rows))

    def solve(self, weight: Tensor, qparams: QParams, rtn: RoundToNearest) -> Rounded:
        self._require_seen()
        if self.moments.shape[0] != weight.shape[1]:
            raise CalibrationError(
                f"awq recorded inputs with {self.moments.shape[0]} features for a weight with "
                f"{weight.shape[1]} input features"
            )
        count = max(int(self.rows), 1)
        root = moment_root(self.moments / count).to(weight)  # stands in for every input row
        scales, _alpha = awq_scales(
            weight,
            root,
            lambda w: rtn(w)[0],
            grid=self.options.grid,
            activation=self.magnitude / count,
        )
        scaled = weight * scales
        rows = self.spec.granularity == "per_channel" and self.spec.axis == 0
        if self.options.clip and (rows or self.spec.granularity == "per_group"):
            group = None if rows else self.spec.group_size
            scaled = awq_clip(
                scaled,
                root / scales,
                lambda w: rtn(w)[0],
                group,
                grid=self.options.grid,
                max_shrink=self.options.max_shrink,
            )
        _, qp = rtn(scaled)
        return Rounded(scaled, qp, input_scale=(1.0 / scales).to(torch.float32))


class SmoothQuantOptions(BaseModel):
    """Options of ``smoothquant``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alpha: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description=(
            "Migration strength: how much of each input channel's range moves into the weight "
            "(0: none, 1: all). 0.5 suits most transformers; raise it for larger outliers."
        ),
    )


class SmoothQuant(WeightMethod):
    """SmoothQuant (Xiao et al., 2022): migrate activation outliers into the weights (w8a8).

    Records each input channel's largest magnitude ``max|x_j|`` over the calibration inputs
    (a maximum: reduced across batches and processes). ``solve`` sets
    ``s_j = max|x_j| ** alpha / max|W_:,j| ** (1 - alpha)`` and rounds ``W * s`` to nearest;
    the layer computes ``round(W * s) @ (x / s)``, so the input it quantizes at run time has
    its outlier channels divided down (the backend applies ``input_scale``: on ``x86`` in
    ``mode: dynamic``, on ``packed``). The float layer's output is unchanged before rounding.

        >>> import torch
        >>> from qswap.config import QuantSpec
        >>> m = SmoothQuant(QuantSpec(bits=8))
        >>> _ = m(torch.tensor([[1.0, -16.0], [2.0, 4.0]]))
        >>> m.absmax.tolist()
        [2.0, 16.0]
    """

    options_model: ClassVar[type[BaseModel]] = SmoothQuantOptions
    options: SmoothQuantOptions
    scales_inputs: ClassVar[bool] = True
    absmax: Tensor

    def __init__(
        self, spec: QuantSpec, options: BaseModel | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(spec, options)
        add_buffer(self, "absmax", torch.zeros(0, dtype=torch.float32))

    def observe(self, x: Tensor) -> None:
        self._add(self._features(x).abs().amax(dim=0))

    def _add(self, absmax: Tensor) -> None:
        if self.absmax.numel() == 0:
            set_buffer(self, "absmax", absmax.clone())
        elif self.absmax.shape != absmax.shape:
            raise CalibrationError(
                f"smoothquant saw inputs with {absmax.numel()} features after "
                f"{self.absmax.numel()}; a layer's input size must stay the same"
            )
        else:
            torch.maximum(self.absmax, absmax.to(self.absmax), out=self.absmax)

    def _merge_state(self, other: SmoothQuant) -> None:
        self._add(other.absmax)

    def solve(self, weight: Tensor, qparams: QParams, rtn: RoundToNearest) -> Rounded:
        self._require_seen()
        if self.absmax.numel() != weight.shape[1]:
            raise CalibrationError(
                f"smoothquant recorded inputs with {self.absmax.numel()} features for a weight "
                f"with {weight.shape[1]} input features"
            )
        alpha = self.options.alpha
        x_max = self.absmax.to(weight).clamp(min=1e-5)
        w_max = weight.abs().amax(dim=0).clamp(min=1e-5)
        scales = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
        scaled = weight * scales
        _, qp = rtn(scaled)
        return Rounded(scaled, qp, input_scale=(1.0 / scales).to(torch.float32))
