"""Observers: what calibration records of a tensor, and the ``QParams`` it turns that into.

An *observer* watches tensors during calibration and turns what it saw into ``QParams``
(scale, zero point, integer range, layout). Observers are ``nn.Module`` subclasses whose
state lives in buffers, so ``.to()`` moves it and ``state_dict`` keeps it, and that state is
*mergeable*: calibrations run in several processes combine into one (``merge``).

The built-ins are declared by name in the pack ``registry/quantization.yaml``, as a third
party declares its own: ``minmax``, ``moving_average_minmax``, ``per_channel_minmax`` and
``histogram``. Their numbers follow ``torch.ao.quantization``'s observers (see
:mod:`qswap.quantizers` for the conventions of ``qparams_from_range``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from qswap.exceptions import CalibrationError, PlanError
from qswap.quantizers import (
    EmptyOptions,
    QParams,
    StateModule,
    add_buffer,
    describe_spec,
    group_view_shape,
    normalize_axis,
    qparams_from_range,
    scalar_scale_zero_point,
    scale_zero_point,
    set_attrs,
    set_buffer,
    spec_layout,
    to_float32,
    validated_options,
)

if TYPE_CHECKING:
    from qswap.config import QuantSpec

__all__ = [
    "HistogramObserver",
    "HistogramOptions",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAverageOptions",
    "Observer",
    "PerChannelMinMaxObserver",
    "rebin",
]

_EXACT_CELLS = 1024  # above this many grid steps the MSE search uses the s**2/12 rounding model
_GRID1 = (512, 33, 3)  # coarse points, fine points, fine rounds of the 1-D MSE search
_GRID2 = (12, 7, 4)
_ZP_WINDOW = 4  # zero points either side of the grid search's that the affine refinement tries
_CHUNK = 16384  # grid boundaries evaluated per tensor op in the MSE search
_TINY_RANGE = 2.0**-100  # width given to a histogram that has only seen zeros


# --------------------------------------------------------------------------- base class


class Observer(StateModule):
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
        set_attrs(self, spec=spec, options=validated_options(type(self), options))
        spec_layout(spec)  # fail early on a spec without its axis / group size
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
        mine, theirs = spec_layout(self.spec), spec_layout(other.spec)
        if (self.spec.granularity, mine) != (other.spec.granularity, theirs):
            raise CalibrationError(
                f"cannot merge {type(self).__name__}s with different layouts: "
                f"{describe_spec(self.spec)} vs {describe_spec(other.spec)}"
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
        return f"{describe_spec(self.spec)}, batches={int(self.num_batches)}"


# --------------------------------------------------------------------------- min/max observers


def _reduce_minmax(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Min and max of ``x`` (float32) per tensor, per channel or per group."""
    x = x.to(torch.float32)
    if spec.granularity == "per_tensor":
        lo, hi = torch.aminmax(x)
        return lo, hi
    channel_axis, group_size = spec_layout(spec)  # an int here: only per_tensor has no axis
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
    scale, zero_point = scalar_scale_zero_point(low, high, qmin, qmax, False)
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
    return to_float32((qmin - z) * s), to_float32((qmax - z) * s)


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
            scale, zero_point = scale_zero_point(
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
