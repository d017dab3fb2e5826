"""Observers: min/max, moving average, per channel and histogram, against torch.ao's, and merging."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.ao.quantization as tq
from pydantic import ValidationError

from qswap.config import QuantSpec
from qswap.exceptions import CalibrationError, PlanError
from qswap.observers import (
    HistogramObserver,
    HistogramOptions,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAverageOptions,
    PerChannelMinMaxObserver,
)
from qswap.quantizers import QParams, fake_quantize, qparams_from_range

EPS = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test draws the same random tensors."""
    torch.manual_seed(0)


@contextmanager
def torch_ao_quiet() -> Iterator[None]:
    """Silence only the deprecation notices torch.ao.quantization emits about itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        yield


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


def laplace(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).to(torch.float32)


# --------------------------------------------------------------------------- against torch.ao observers


TORCH_VARIANTS = [
    # (our spec, torch observer kwargs)
    (
        QuantSpec(signed=False, scheme="affine"),
        {"dtype": torch.quint8, "qscheme": torch.per_tensor_affine},
    ),
    (
        QuantSpec(signed=False, scheme="affine", reduce_range=True),
        {"dtype": torch.quint8, "qscheme": torch.per_tensor_affine, "reduce_range": True},
    ),
    (
        QuantSpec(signed=True, scheme="symmetric"),
        {"dtype": torch.qint8, "qscheme": torch.per_tensor_symmetric},
    ),
    (
        QuantSpec(signed=True, scheme="symmetric", reduce_range=True),
        {"dtype": torch.qint8, "qscheme": torch.per_tensor_symmetric, "reduce_range": True},
    ),
    (
        QuantSpec(signed=True, scheme="affine"),
        {"dtype": torch.qint8, "qscheme": torch.per_tensor_affine},
    ),
    (
        QuantSpec(signed=False, scheme="symmetric"),
        {"dtype": torch.quint8, "qscheme": torch.per_tensor_symmetric},
    ),
    (
        QuantSpec(bits=4, signed=True, scheme="symmetric"),
        {
            "dtype": torch.qint8,
            "qscheme": torch.per_tensor_symmetric,
            "quant_min": -8,
            "quant_max": 7,
        },
    ),
    (
        QuantSpec(bits=5, signed=False, scheme="affine"),
        {
            "dtype": torch.quint8,
            "qscheme": torch.per_tensor_affine,
            "quant_min": 0,
            "quant_max": 31,
        },
    ),
]


def batches(seed: int, shape: tuple[int, ...] = (4, 3, 5, 5), n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) + 0.3 * i for i in range(n)]


@pytest.mark.parametrize(("spec", "torch_kwargs"), TORCH_VARIANTS)
def test_minmax_qparams_identical_to_torch(spec: QuantSpec, torch_kwargs: dict[str, Any]) -> None:
    """minmax gives bit-identical scale and zero point to torch's MinMaxObserver."""
    ours = MinMaxObserver(spec)
    with torch_ao_quiet():
        theirs = tq.MinMaxObserver(**torch_kwargs)
        for x in batches(0):
            ours(x)
            theirs(x)
        scale, zero_point = theirs.calculate_qparams()
    qp = ours.calculate_qparams()
    assert torch.equal(qp.scale, scale.reshape(()))
    assert torch.equal(qp.zero_point, zero_point.reshape(()).to(torch.int32))


@pytest.mark.parametrize(("spec", "torch_kwargs"), TORCH_VARIANTS)
def test_moving_average_qparams_identical_to_torch(
    spec: QuantSpec, torch_kwargs: dict[str, Any]
) -> None:
    """moving_average_minmax reproduces torch's MovingAverageMinMaxObserver exactly."""
    ours = MovingAverageMinMaxObserver(spec, {"averaging_constant": 0.1})
    with torch_ao_quiet():
        theirs = tq.MovingAverageMinMaxObserver(averaging_constant=0.1, **torch_kwargs)
        for x in batches(1, n=6):
            ours(x)
            theirs(x)
        scale, zero_point = theirs.calculate_qparams()
    qp = ours.calculate_qparams()
    assert torch.equal(qp.scale, scale.reshape(()))
    assert torch.equal(qp.zero_point, zero_point.reshape(()).to(torch.int32))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(
    ("signed", "scheme", "qscheme", "reduce_range"),
    [
        (True, "symmetric", torch.per_channel_symmetric, False),
        (False, "affine", torch.per_channel_affine, False),
        (False, "affine", torch.per_channel_affine, True),
        (True, "affine", torch.per_channel_affine, False),
    ],
)
@pytest.mark.parametrize("moving", [False, True])
def test_per_channel_qparams_identical_to_torch(
    axis: int, signed: bool, scheme: str, qscheme: torch.qscheme, reduce_range: bool, moving: bool
) -> None:
    """Per-channel (moving-average) min-max matches torch's per-channel observers exactly."""
    spec = QuantSpec(
        signed=signed,
        scheme=scheme,
        granularity="per_channel",
        axis=axis,
        reduce_range=reduce_range,
    )
    dtype = torch.qint8 if signed else torch.quint8
    kwargs = {"ch_axis": axis, "dtype": dtype, "qscheme": qscheme, "reduce_range": reduce_range}
    with torch_ao_quiet():
        if moving:
            ours: MinMaxObserver = MovingAverageMinMaxObserver(spec, {"averaging_constant": 0.25})
            theirs = tq.MovingAveragePerChannelMinMaxObserver(averaging_constant=0.25, **kwargs)
        else:
            ours = PerChannelMinMaxObserver(spec)
            theirs = tq.PerChannelMinMaxObserver(**kwargs)
        for x in batches(2):
            ours(x)
            theirs(x)
        scale, zero_point = theirs.calculate_qparams()
    qp = ours.calculate_qparams()
    assert qp.axis == axis
    assert torch.equal(qp.scale, scale)
    assert torch.equal(qp.zero_point, zero_point.to(torch.int32))


def test_unsigned_symmetric_reduce_range_uses_midpoint_zero_point() -> None:
    """uint8 symmetric with reduce_range (torch's observers refuse it) centres on 64 of 0..127."""
    spec = QuantSpec(signed=False, scheme="symmetric", reduce_range=True)
    with torch_ao_quiet(), pytest.raises(NotImplementedError):
        tq.MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_symmetric, reduce_range=True)
    ours = MinMaxObserver(spec)
    ours(torch.tensor([-1.0, 1.0]))
    qp = ours.calculate_qparams()
    assert qp.zero_point.item() == 64 and (qp.quant_min, qp.quant_max) == (0, 255)
    assert qp.scale.item() == pytest.approx(1 / 63.5)
    # 1.0 is 63.5 steps: it rounds to 64, which the uint8 tensor holds (the 7-bit grid would
    # clamp it to 63); beyond the calibrated range values fit up to 191 steps above zero
    out = fake_quantize(torch.tensor([-1.0, 1.0, 2.0, 5.0]), qp)
    assert out.tolist() == pytest.approx([-64 / 63.5, 64 / 63.5, 127 / 63.5, 191 / 63.5])


# --------------------------------------------------------------------------- merge & state


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"granularity": "per_channel", "axis": 1},
        {"granularity": "per_group", "axis": 0, "group_size": 5},
    ],
)
def test_minmax_merge_equals_observing_everything_bit_for_bit(kwargs: dict[str, Any]) -> None:
    """minmax(a) merged with minmax(b) gives exactly the qparams of minmax over a and b."""
    spec = QuantSpec(scheme="affine", **kwargs)
    a, b = batches(3, shape=(4, 6, 10), n=3), batches(4, shape=(4, 6, 10), n=2)
    left, right, both = MinMaxObserver(spec), MinMaxObserver(spec), MinMaxObserver(spec)
    for x in a:
        left(x)
        both(x)
    for x in b:
        right(x)
        both(x)
    left.merge(right)
    merged, direct = left.calculate_qparams(), both.calculate_qparams()
    assert torch.equal(merged.scale, direct.scale)
    assert torch.equal(merged.zero_point, direct.zero_point)
    assert int(left.num_batches) == 5


def test_merge_handles_empty_sides_and_refuses_other_kinds() -> None:
    """Merging into an empty observer copies the other; merging an empty one changes nothing."""
    spec = QuantSpec()
    empty, full = MinMaxObserver(spec), MinMaxObserver(spec)
    full(torch.tensor([-1.0, 2.0]))
    full.merge(MinMaxObserver(spec))
    empty.merge(full)
    assert torch.equal(empty.calculate_qparams().scale, full.calculate_qparams().scale)
    with pytest.raises(
        CalibrationError, match="cannot merge a HistogramObserver into a MinMaxObserver"
    ):
        full.merge(HistogramObserver(spec))
    with pytest.raises(CalibrationError, match="different layouts"):
        full.merge(MinMaxObserver(QuantSpec(granularity="per_channel", axis=0)))


def test_moving_average_merge_is_batch_weighted_mean() -> None:
    """Merging moving averages weights each side's min and max by its number of batches."""
    spec = QuantSpec(scheme="affine")
    a, b = MovingAverageMinMaxObserver(spec), MovingAverageMinMaxObserver(spec)
    for _ in range(3):
        a(torch.tensor([-1.0, 1.0]))
    b(torch.tensor([-4.0, 5.0]))
    a.merge(b)
    assert float(a.min_val) == pytest.approx((3 * -1.0 + 1 * -4.0) / 4)
    assert float(a.max_val) == pytest.approx((3 * 1.0 + 1 * 5.0) / 4)
    assert int(a.num_batches) == 4


def test_observer_without_data_raises_calibration_error() -> None:
    """Asking an observer that saw nothing for qparams says to run calibration first."""
    for obs in (MinMaxObserver(QuantSpec()), HistogramObserver(QuantSpec())):
        assert not obs.seen
        with pytest.raises(CalibrationError, match=r"observed no data.*qswap\.calibrate"):
            obs.calculate_qparams()


def test_observer_returns_input_and_ignores_empty_batches() -> None:
    """forward returns the very same tensor, without tracking grad, and skips empty tensors."""
    obs = MinMaxObserver(QuantSpec())
    x = torch.randn(3, requires_grad=True)
    assert obs(x) is x
    obs(torch.empty(0))
    assert int(obs.num_batches) == 1 and not obs.min_val.requires_grad


def test_observer_state_dict_round_trips_into_fresh_observer() -> None:
    """A per-channel observer's state loads into a fresh observer and gives the same qparams."""
    spec = QuantSpec(granularity="per_channel", axis=0)
    obs = MinMaxObserver(spec)
    obs(torch.randn(5, 7))
    fresh = MinMaxObserver(spec)
    fresh.load_state_dict(obs.state_dict())
    assert fresh.seen
    assert torch.equal(fresh.calculate_qparams().scale, obs.calculate_qparams().scale)


def test_non_finite_values_raise_calibration_error() -> None:
    """An inf in calibration data is reported instead of producing an infinite scale."""
    obs = MinMaxObserver(QuantSpec())
    obs(torch.tensor([1.0, float("inf")]))
    with pytest.raises(CalibrationError, match="non-finite"):
        obs.calculate_qparams()
    with pytest.raises(CalibrationError, match="non-finite"):
        HistogramObserver(QuantSpec())(torch.tensor([1.0, float("nan")]))


def test_non_finite_per_channel_values_raise_calibration_error() -> None:
    """An inf or nan in any channel (min or max side) is reported; finite extremes are not."""
    spec = QuantSpec(granularity="per_channel", axis=0)
    for bad in (float("inf"), float("-inf"), float("nan")):
        w = torch.randn(4, 5)
        w[2, 3] = bad
        obs = MinMaxObserver(spec)
        obs(w)
        with pytest.raises(CalibrationError, match="MinMaxObserver saw non-finite values"):
            obs.calculate_qparams()
    obs = MinMaxObserver(spec)
    obs(torch.tensor([[3.4e38, -3.4e38], [1.0, 2.0]]))
    assert bool(torch.isfinite(obs.calculate_qparams().scale).all())


def test_observers_refuse_specs_they_cannot_serve() -> None:
    """per_channel_minmax needs per_channel; histogram needs per_tensor; both say what to use."""
    with pytest.raises(PlanError, match="needs granularity: per_channel.*observer: minmax"):
        PerChannelMinMaxObserver(QuantSpec())
    with pytest.raises(PlanError, match="works per tensor.*use observer: minmax"):
        HistogramObserver(QuantSpec(granularity="per_channel", axis=0))


def test_channel_count_change_between_batches_is_an_error() -> None:
    """A per-channel observer fed 4 then 5 channels names both shapes."""
    obs = MinMaxObserver(QuantSpec(granularity="per_channel", axis=0))
    obs(torch.randn(4, 3))
    with pytest.raises(PlanError, match=r"shape \(5,\).*gave \(4,\)"):
        obs(torch.randn(5, 3))


def test_options_models_are_frozen_with_documented_defaults() -> None:
    """Options default to bins=2048, mse, 99.99 and averaging_constant=0.01, and are immutable."""
    opts = HistogramOptions()
    assert (opts.bins, opts.method, opts.percentile) == (2048, "mse", 99.99)
    assert MovingAverageOptions().averaging_constant == 0.01
    with pytest.raises(ValidationError):
        opts.bins = 16  # type: ignore[misc]


# --------------------------------------------------------------------------- histogram observer

HISTOGRAM_VS_TORCH = [
    (
        QuantSpec(signed=False, scheme="affine"),
        {"dtype": torch.quint8, "qscheme": torch.per_tensor_affine},
    ),
    (
        QuantSpec(signed=True, scheme="symmetric"),
        {"dtype": torch.qint8, "qscheme": torch.per_tensor_symmetric},
    ),
    (
        QuantSpec(signed=False, scheme="affine", reduce_range=True),
        {"dtype": torch.quint8, "qscheme": torch.per_tensor_affine, "reduce_range": True},
    ),
]


def _sqnr_vs_torch(
    x: torch.Tensor, spec: QuantSpec, torch_kwargs: dict[str, Any]
) -> tuple[float, float, float]:
    """SQNR (dB) of ``x`` fake-quantized by qswap's histogram, torch's HistogramObserver and minmax.

    Each observer sees ``x`` in the same four chunks.
    """
    ours, minmax = HistogramObserver(spec), MinMaxObserver(spec)
    with torch_ao_quiet():
        theirs = tq.HistogramObserver(**torch_kwargs)
        for chunk in x.chunk(4):
            ours(chunk)
            theirs(chunk)
            minmax(chunk)
        scale, zero_point = theirs.calculate_qparams()
    qmin, qmax = spec.quant_range()
    return (
        sqnr_db(x, fake_quantize(x, ours.calculate_qparams())),
        sqnr_db(x, fake_quantize(x, QParams(scale, zero_point, qmin, qmax))),
        sqnr_db(x, fake_quantize(x, minmax.calculate_qparams())),
    )


@pytest.mark.parametrize(("spec", "torch_kwargs"), HISTOGRAM_VS_TORCH)
def test_histogram_mse_beats_torch_histogram_observer_on_laplace(
    spec: QuantSpec, torch_kwargs: dict[str, Any]
) -> None:
    """On heavy-tailed data the MSE range gives SQNR at least that of torch's HistogramObserver."""
    our_sqnr, torch_sqnr, minmax_sqnr = _sqnr_vs_torch(laplace(100_000), spec, torch_kwargs)
    assert our_sqnr >= torch_sqnr
    assert our_sqnr > minmax_sqnr + 0.3


@pytest.mark.parametrize("scheme", ["symmetric", "affine"])
@pytest.mark.parametrize("bits", [4, 8])
def test_histogram_mse_range_is_a_local_optimum_of_measured_error(scheme: str, bits: int) -> None:
    """Shrinking or widening the chosen clip range by 5 % raises the measured MSE."""
    x = laplace(200_000, seed=1) * 0.7 + 0.4
    spec = QuantSpec(bits=bits, signed=False, scheme=scheme)
    obs = HistogramObserver(spec)
    obs(x)
    lo, hi = obs.clip_range()

    def mse(factor: float) -> float:
        qp = qparams_from_range(lo * factor, hi * factor, spec)
        return float((fake_quantize(x, qp) - x).pow(2).mean())

    best = mse(1.0)
    assert best < mse(0.95) and best < mse(1.05)
    assert lo > float(x.min()) or hi < float(x.max())  # it did clip something


def standard_sample(name: str, n: int = 50_000, seed: int = 3) -> torch.Tensor:
    """Gaussian, Laplace, half-normal (a ReLU's output: half the values exactly 0) or uniform."""
    g = torch.Generator().manual_seed(seed)
    if name == "gaussian":
        return torch.randn(n, generator=g)
    if name == "laplace":
        return laplace(n, seed)
    if name == "half_normal":
        return torch.randn(n, generator=g).clamp_min(0)
    return torch.rand(n, generator=g) * 3 - 1  # uniform on [-1, 2]


STANDARD = ["gaussian", "laplace", "half_normal", "uniform"]


@pytest.mark.parametrize("name", STANDARD)
@pytest.mark.parametrize(("spec", "torch_kwargs"), HISTOGRAM_VS_TORCH)
def test_histogram_mse_at_least_as_good_as_torch_on_standard_distributions(
    name: str, spec: QuantSpec, torch_kwargs: dict[str, Any]
) -> None:
    """The MSE range's SQNR is at least torch's HistogramObserver's (within 0.005 dB) and minmax's."""
    our_sqnr, torch_sqnr, minmax_sqnr = _sqnr_vs_torch(standard_sample(name), spec, torch_kwargs)
    # uniform data has nothing worth clipping: all three land within 0.003 dB of each other
    assert our_sqnr >= torch_sqnr - 0.005
    assert our_sqnr >= minmax_sqnr - 0.005
    if name != "uniform":
        assert our_sqnr > max(torch_sqnr, minmax_sqnr) + 0.01


@pytest.mark.parametrize("name", STANDARD)
@pytest.mark.parametrize(("spec", "torch_kwargs"), HISTOGRAM_VS_TORCH)
def test_histogram_mse_is_within_0_005_db_of_exhaustive_search_on_the_data(
    name: str, spec: QuantSpec, torch_kwargs: dict[str, Any]
) -> None:
    """No zero point within 5 of the chosen one and no scale within 5 % quantizes the data better.

    Measured on the grid the observer chooses for (``quant_range``: with ``reduce_range`` the
    data should fit 7 bits, although the tensor could hold 8).
    """
    x = standard_sample(name)
    obs = HistogramObserver(spec)
    obs(x)
    qp = obs.calculate_qparams()
    qmin, qmax = spec.quant_range()
    scale, zero_point = float(qp.scale), int(qp.zero_point)
    ours = sqnr_db(x, torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax))
    zero_points = [zero_point]
    if spec.scheme == "affine":
        zero_points = list(range(max(qmin, zero_point - 5), min(qmax, zero_point + 5) + 1))
    best = max(
        sqnr_db(x, torch.fake_quantize_per_tensor_affine(x, scale * f, z, qmin, qmax))
        for z in zero_points
        for f in torch.linspace(0.95, 1.05, 201).tolist()
    )
    assert ours >= best - 0.005


def test_histogram_affine_range_may_shift_past_the_data_to_fit_the_grid() -> None:
    """Where no zero point fits the data's ends, the MSE grid reaches past one and beats minmax."""
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    spec = QuantSpec(signed=False, scheme="affine", reduce_range=True)
    obs, minmax = HistogramObserver(spec), MinMaxObserver(spec)
    obs(x)
    minmax(x)
    low, high = obs.clip_range()
    qp = obs.calculate_qparams()
    step = float(qp.scale)
    assert low < float(x.min()) or high > float(x.max())
    assert float(x.min()) - step <= low and high <= float(x.max()) + step
    ours = sqnr_db(x, fake_quantize(x, qp))
    assert ours > sqnr_db(x, fake_quantize(x, minmax.calculate_qparams())) + 0.1


def test_histogram_percentile_picks_the_quantiles() -> None:
    """percentile=99 on uniform [-1, 3] data clips at about -0.96 and 2.96."""
    x = torch.linspace(-1, 3, 400_001)
    obs = HistogramObserver(QuantSpec(scheme="affine"), {"method": "percentile", "percentile": 99})
    obs(x)
    lo, hi = obs.clip_range()
    bin_width = 4 / 2048
    assert lo == pytest.approx(-0.96, abs=bin_width)
    assert hi == pytest.approx(2.96, abs=bin_width)


def test_histogram_percentile_100_equals_minmax() -> None:
    """percentile=100 reproduces minmax's qparams exactly."""
    x = laplace(10_000, seed=2) + 0.5
    spec = QuantSpec(signed=False, scheme="affine")
    hist = HistogramObserver(spec, {"method": "percentile", "percentile": 100})
    minmax = MinMaxObserver(spec)
    for chunk in x.chunk(3):
        hist(chunk)
        minmax(chunk)
    a, b = hist.calculate_qparams(), minmax.calculate_qparams()
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


def test_histogram_keeps_every_value_when_range_grows() -> None:
    """Batches with growing ranges are re-binned: total count equals the number of values seen."""
    obs = HistogramObserver(QuantSpec(), {"bins": 64})
    sizes = 0
    for i, scale in enumerate([0.1, 1.0, 10.0, 3.0]):
        x = torch.randn(1000 + i) * scale
        sizes += x.numel()
        obs(x)
    assert float(obs.histogram.sum()) == pytest.approx(sizes, rel=1e-12)
    assert float(obs.hist_range[0]) <= float(obs.min_val) and float(obs.hist_range[1]) >= float(
        obs.max_val
    )


def cdf_at_edges(obs: HistogramObserver) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.float64), obs.histogram.cumsum(0)])


def test_histogram_merge_is_within_one_bin_of_observing_everything() -> None:
    """Merged histograms' cumulative counts stay within one bin of a histogram of all the data."""
    a = laplace(20_000, seed=3) * 0.5 - 1.0
    b = laplace(20_000, seed=4) * 2.0 + 0.5
    spec = QuantSpec(signed=False, scheme="affine")
    left, right, both = HistogramObserver(spec), HistogramObserver(spec), HistogramObserver(spec)
    left(a)
    right(b)
    both(torch.cat([a, b]))
    left.merge(right)
    assert torch.equal(left.hist_range, both.hist_range)
    merged, direct = cdf_at_edges(left), cdf_at_edges(both)
    # the merged CDF at each edge lies between the direct CDF one bin earlier and one bin later
    assert bool(
        (merged[1:] >= direct[:-1] - 1e-6).all() and (merged[:-1] <= direct[1:] + 1e-6).all()
    )
    # so the MSE range quantizes the data as well as the direct one (its optimum is flat, so
    # compare quality, not the exact clip)
    x = torch.cat([a, b])
    merged_sqnr = sqnr_db(x, fake_quantize(x, left.calculate_qparams()))
    direct_sqnr = sqnr_db(x, fake_quantize(x, both.calculate_qparams()))
    assert merged_sqnr == pytest.approx(direct_sqnr, abs=0.05)


def test_histogram_merge_moves_percentile_clips_by_at_most_one_bin() -> None:
    """After a merge, percentile clip points are within one bin of those from all the data."""
    a, b = laplace(30_000, seed=5) - 0.5, laplace(30_000, seed=6) * 3
    options = {"method": "percentile", "percentile": 99.9}
    spec = QuantSpec(scheme="affine")
    left, right, both = (HistogramObserver(spec, options) for _ in range(3))
    left(a)
    right(b)
    both(torch.cat([a, b]))
    left.merge(right)
    bin_width = float(both.hist_range[1] - both.hist_range[0]) / both.bins
    for merged, direct in zip(left.clip_range(), both.clip_range(), strict=False):
        assert abs(merged - direct) <= bin_width * 1.001


def test_histogram_state_dict_loads_into_observer_with_other_bin_count() -> None:
    """A histogram saved with 2048 bins loads into a 512-bin observer, re-binned, mass kept."""
    src = HistogramObserver(QuantSpec())
    src(laplace(5000))
    dst = HistogramObserver(QuantSpec(), {"bins": 512})
    dst.load_state_dict(src.state_dict())
    assert dst.histogram.numel() == 512
    assert float(dst.histogram.sum()) == pytest.approx(5000)
    assert dst.clip_range()[1] == pytest.approx(src.clip_range()[1], rel=0.02)


def test_histogram_of_zeros_gives_the_smallest_scale() -> None:
    """A tensor of zeros yields the float32-epsilon scale rather than a division by zero."""
    obs = HistogramObserver(QuantSpec(signed=False, scheme="affine"))
    obs(torch.zeros(100))
    qp = obs.calculate_qparams()
    assert qp.scale.item() == EPS and qp.zero_point.item() == 0


# --------------------------------------------------------------------------- copies


def test_deepcopy_keeps_observer_state() -> None:
    """A deep copy of a calibrated observer (what prepare(inplace=False) does) is independent."""
    obs = MinMaxObserver(QuantSpec())
    obs(torch.tensor([-1.0, 1.0]))
    twin = copy.deepcopy(obs)
    twin(torch.tensor([5.0]))
    assert float(obs.max_val) == 1.0 and float(twin.max_val) == 5.0
