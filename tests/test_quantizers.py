"""Quantization components: QParams, the affine fake-quantizer and the observers."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.ao.quantization as tq
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from qswap.config import QuantSpec
from qswap.exceptions import CalibrationError, ConfigError, PlanError
from qswap.quantizers import (
    AffineQuantizer,
    HistogramObserver,
    HistogramOptions,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAverageOptions,
    Observer,
    PerChannelMinMaxObserver,
    QParams,
    fake_quantize,
    qparams_from_range,
)
from qswap.registry import Registry

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


def on_grid(xq: torch.Tensor, qp: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer levels of fake-quantized per-tensor values and how far they are from integers."""
    levels = xq.double() / qp.scale.double() + qp.zero_point.double()
    return levels, (levels - levels.round()).abs()


# --------------------------------------------------------------------------- QParams


def test_qparams_reads_torch_shaped_pairs_as_per_tensor() -> None:
    """A [1]-shaped scale/zero point (torch observers' shape) becomes a 0-d float32/int32 pair."""
    qp = QParams(torch.tensor([0.5], dtype=torch.float64), torch.tensor([3]), 0, 255)
    assert qp.granularity == "per_tensor"
    assert qp.scale.shape == () and qp.scale.dtype == torch.float32
    assert qp.zero_point.dtype == torch.int32 and int(qp.zero_point) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": torch.ones(3), "zero_point": torch.zeros(2, dtype=torch.int32)}, "must match"),
        (
            {"scale": torch.ones(3), "zero_point": torch.zeros(3, dtype=torch.int32)},
            "needs the channel axis",
        ),
        (
            {
                "scale": torch.ones(2, 2),
                "zero_point": torch.zeros(2, 2, dtype=torch.int32),
                "axis": 0,
            },
            "needs group_size > 0",
        ),
        ({"scale": torch.ones(()), "zero_point": torch.zeros(())}, "must be an integer tensor"),
        (
            {
                "scale": torch.ones(()),
                "zero_point": torch.zeros((), dtype=torch.int32),
                "quant_min": 5,
            },
            r"range \[5, 5\] is empty",
        ),
    ],
)
def test_qparams_rejects_inconsistent_fields(kwargs: dict[str, Any], message: str) -> None:
    """Inconsistent QParams fail at construction with a message saying which field is wrong."""
    fields: dict[str, Any] = {"quant_min": -128, "quant_max": 127, **kwargs}
    if fields["quant_min"] == 5:
        fields["quant_max"] = 5
    with pytest.raises(PlanError, match=message):
        QParams(**fields)


# --------------------------------------------------------------------------- qparams_from_range


@pytest.mark.parametrize(
    ("spec", "lo", "hi", "scale", "zero_point"),
    [
        (QuantSpec(), -1.0, 2.0, 2.0 / 127.5, 0),
        (QuantSpec(signed=False, scheme="affine"), -1.0, 3.0, 4.0 / 255, 64),
        (QuantSpec(signed=False, scheme="symmetric"), -1.0, 3.0, 3.0 / 127.5, 128),
        (QuantSpec(signed=False, scheme="symmetric", reduce_range=True), -1.0, 3.0, 3.0 / 63.5, 64),
        (QuantSpec(signed=False, scheme="affine", reduce_range=True), -1.0, 3.0, 4.0 / 127, 32),
        (QuantSpec(signed=True, scheme="affine"), 2.0, 4.0, 4.0 / 255, -128),
        (QuantSpec(bits=4), -3.0, 1.5, 3.0 / 7.5, 0),
        (QuantSpec(bits=2, signed=False, scheme="affine"), -1.0, 2.0, 1.0, 1),
        (QuantSpec(bits=16), -1.0, 1.0, 1.0 / 32767.5, 0),
        (QuantSpec(signed=False, scheme="affine"), 0.0, 0.0, EPS, 0),
    ],
)
def test_qparams_from_range_matches_hand_computation(
    spec: QuantSpec, lo: float, hi: float, scale: float, zero_point: int
) -> None:
    """Scale and zero point follow the documented formulas, the range always covering 0.

    They map the range onto ``quant_range`` (reduced by ``reduce_range``); the clamp is the
    ``storage_range`` a quantized tensor holds (torch's int8 tensors: all 8 bits).
    """
    qp = qparams_from_range(lo, hi, spec)
    assert qp.scale.item() == pytest.approx(scale, rel=1e-6)
    assert qp.zero_point.item() == zero_point
    assert (qp.quant_min, qp.quant_max) == spec.storage_range()
    assert spec.storage_range() == (spec.quant_range() if not spec.reduce_range else (0, 255))


def test_qparams_from_range_checks_shapes_against_granularity() -> None:
    """Per-channel ranges must be 1-D; a scalar range for a per-channel spec is refused."""
    spec = QuantSpec(granularity="per_channel", axis=1)
    qp = qparams_from_range(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 4.0]), spec)
    assert qp.axis == 1 and qp.scale.shape == (2,)
    with pytest.raises(PlanError, match="per_channel ranges need 1-dimensional"):
        qparams_from_range(-1.0, 1.0, spec)


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


# --------------------------------------------------------------------------- fake-quantization


def test_affine_quantizer_per_tensor_equals_torch_kernel() -> None:
    """Per-tensor fake-quant output is identical to torch.fake_quantize_per_tensor_affine."""
    x = torch.randn(8, 16) * 3
    spec = QuantSpec(signed=False, scheme="affine")
    fq = AffineQuantizer(spec)
    fq.set_qparams(qparams_from_range(-2.0, 5.0, spec))
    qp = fq.qparams
    assert qp is not None
    expected = torch.fake_quantize_per_tensor_affine(x, float(qp.scale), int(qp.zero_point), 0, 255)
    assert torch.equal(fq(x), expected)


def test_affine_quantizer_per_channel_equals_torch_kernel() -> None:
    """Per-channel fake-quant output is identical to torch.fake_quantize_per_channel_affine."""
    w = torch.randn(6, 4, 3, 3)
    spec = QuantSpec(granularity="per_channel", axis=0)
    obs = MinMaxObserver(spec)
    obs(w)
    qp = obs.calculate_qparams()
    fq = AffineQuantizer(spec)
    fq.set_qparams(qp)
    expected = torch.fake_quantize_per_channel_affine(w, qp.scale, qp.zero_point, 0, -128, 127)
    assert torch.equal(fq(w), expected)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_group_with_whole_rows_equals_per_channel(axis: int) -> None:
    """The hand-written per-group path with one group per channel matches torch's per-channel kernel."""
    w = torch.randn(5, 12, 8) * torch.linspace(0.1, 4, 8)
    moved = w.movedim(axis, 0)
    row = moved[0].numel()
    pg = QuantSpec(bits=4, scheme="affine", granularity="per_group", axis=axis, group_size=row)
    pc = QuantSpec(bits=4, scheme="affine", granularity="per_channel", axis=axis)
    obs_g, obs_c = MinMaxObserver(pg), MinMaxObserver(pc)
    obs_g(w)
    obs_c(w)
    qg, qc = obs_g.calculate_qparams(), obs_c.calculate_qparams()
    assert qg.scale.shape == (moved.shape[0], 1)
    assert torch.equal(qg.scale[:, 0], qc.scale)
    assert torch.equal(fake_quantize(w, qg), fake_quantize(w, qc))


def test_per_group_values_lie_on_each_groups_grid() -> None:
    """4-bit per-group fake-quant yields at most 16 values per group, all on that group's grid."""
    w = torch.randn(8, 64) * torch.logspace(-2, 1, 64)
    spec = QuantSpec(bits=4, granularity="per_group", axis=0, group_size=16)
    obs = MinMaxObserver(spec)
    obs(w)
    qp = obs.calculate_qparams()
    assert qp.scale.shape == (8, 4) and qp.group_size == 16
    out = fake_quantize(w, qp).reshape(8, 4, 16)
    levels = out.double() / qp.scale.double().unsqueeze(-1)
    assert (levels - levels.round()).abs().max() < 1e-4
    assert levels.round().min() >= -8 and levels.round().max() <= 7
    for c in range(8):
        for g in range(4):
            assert out[c, g].unique().numel() <= 16
    # a group of small weights keeps its resolution: error well below the largest group's step
    small = (w.reshape(8, 4, 16)[:, 0] - out[:, 0]).abs().max()
    assert small < qp.scale.max() / 10


def test_per_group_on_conv_weight_groups_flattened_channel_rows() -> None:
    """A 4-D conv weight is grouped along its flattened per-channel rows (in*kh*kw)."""
    w = torch.randn(4, 8, 3, 3)  # 72 elements per output channel
    spec = QuantSpec(bits=3, granularity="per_group", axis=0, group_size=24)
    obs = MinMaxObserver(spec)
    obs(w)
    qp = obs.calculate_qparams()
    assert qp.scale.shape == (4, 3)
    out = fake_quantize(w, qp)
    assert out.shape == w.shape
    assert all(
        out.reshape(4, 3, 24)[c, g].unique().numel() <= 8 for c in range(4) for g in range(3)
    )


def test_per_group_without_axis_groups_rows_of_axis_zero() -> None:
    """per_group with no axis uses axis 0 (output channels), like a weight's default slot."""
    spec = QuantSpec(bits=4, granularity="per_group", group_size=4)
    obs = MinMaxObserver(spec)
    obs(torch.randn(3, 8))
    qp = obs.calculate_qparams()
    assert (qp.axis, qp.group_size, tuple(qp.scale.shape)) == (0, 4, (3, 2))


def test_per_group_rejects_group_size_that_does_not_divide_rows() -> None:
    """A row length that is not a multiple of group_size is refused with divisors to pick from."""
    spec = QuantSpec(bits=4, granularity="per_group", axis=0, group_size=128)
    obs = MinMaxObserver(spec)
    with pytest.raises(PlanError, match=r"each channel holds 100 elements.*e\.g\. 100, 50, 25"):
        obs(torch.randn(4, 100))


def test_per_channel_qparams_refuse_a_tensor_with_other_channel_count() -> None:
    """Applying 6-channel QParams to a 5-channel tensor is an error naming both counts."""
    qp = QParams(torch.ones(6), torch.zeros(6, dtype=torch.int32), -128, 127, axis=0)
    with pytest.raises(PlanError, match="6 channels do not fit .* with 5 channels"):
        fake_quantize(torch.randn(5, 3), qp)


def test_quantizer_is_identity_until_qparams_are_set() -> None:
    """Before set_qparams the quantizer returns its input unchanged and passes gradients."""
    fq = AffineQuantizer(QuantSpec())
    x = torch.randn(10, requires_grad=True)
    out = fq(x)
    assert fq.qparams is None and torch.equal(out, x)
    out.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones(10))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_straight_through_gradient_is_one_inside_range_zero_outside(granularity: str) -> None:
    """The STE gradient is 1 where round(x/s)+zp is inside [qmin, qmax] and 0 where clamped."""
    kwargs: dict[str, Any] = {"granularity": granularity}
    if granularity != "per_tensor":
        kwargs["axis"] = 0
    if granularity == "per_group":
        kwargs["group_size"] = 4
    spec = QuantSpec(bits=4, signed=False, scheme="affine", **kwargs)
    x = torch.linspace(-3, 3, 32).reshape(4, 8)
    obs = MinMaxObserver(spec)
    obs(x * 0.5)  # calibrated on half the range: the outer values get clipped
    qp = obs.calculate_qparams()
    fq = AffineQuantizer(spec)
    fq.set_qparams(qp)
    xg = x.clone().requires_grad_(True)
    fq(xg).sum().backward()
    assert xg.grad is not None
    if granularity == "per_tensor":
        ref = x.clone().requires_grad_(True)
        torch.fake_quantize_per_tensor_affine(
            ref, float(qp.scale), int(qp.zero_point), 0, 15
        ).sum().backward()
        assert ref.grad is not None
        assert torch.equal(xg.grad, ref.grad)
    # by hand: the level before clamping, per element with its own scale and zero point
    if granularity == "per_tensor":
        s, zp = qp.scale, qp.zero_point
    elif granularity == "per_channel":
        s, zp = qp.scale.reshape(4, 1), qp.zero_point.reshape(4, 1)
    else:
        s = qp.scale.repeat_interleave(4, dim=1)
        zp = qp.zero_point.repeat_interleave(4, dim=1)
    level = torch.round(x * (1.0 / s)) + zp
    inside = (level >= 0) & (level <= 15)
    assert 0 < int(inside.sum()) < x.numel()
    assert torch.equal(xg.grad, inside.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_any_float_dtype_is_fake_quantized_like_float32(
    dtype: torch.dtype, granularity: str
) -> None:
    """fp16/bf16/fp64 inputs come back in their dtype with the float32 result's values."""
    kwargs: dict[str, Any] = {"granularity": granularity}
    if granularity != "per_tensor":
        kwargs["axis"] = 0
    if granularity == "per_group":
        kwargs["group_size"] = 8
    spec = QuantSpec(**kwargs)
    x = torch.randn(4, 16).to(dtype)
    obs = MinMaxObserver(spec)
    obs(x)
    fq = AffineQuantizer(spec)
    fq.set_qparams(obs.calculate_qparams())
    out = fq(x)
    assert out.dtype == dtype
    assert torch.equal(out, fq(x.float()).to(dtype))


def test_sixteen_bit_quantization_runs_on_torch_kernels() -> None:
    """16-bit signed per-tensor and per-channel fake-quant reach SQNR above 80 dB."""
    x = torch.randn(8, 256)
    for spec in (QuantSpec(bits=16), QuantSpec(bits=16, granularity="per_channel", axis=0)):
        obs = MinMaxObserver(spec)
        obs(x)
        assert sqnr_db(x, fake_quantize(x, obs.calculate_qparams())) > 80


def test_quantizer_state_dict_round_trips_and_half_keeps_float32_scale() -> None:
    """QParams survive state_dict into a fresh quantizer; model.half() does not round the scale."""
    spec = QuantSpec(bits=4, scheme="affine", granularity="per_group", axis=1, group_size=4)
    fq = AffineQuantizer(spec)
    x = torch.randn(8, 3)
    obs = MinMaxObserver(spec)
    obs(x)
    fq.set_qparams(obs.calculate_qparams())
    fresh = AffineQuantizer(spec)
    fresh.load_state_dict(fq.state_dict())
    assert fresh.qparams is not None and fresh.qparams.group_size == 4 and fresh.qparams.axis == 1
    assert torch.equal(fresh(x), fq(x))
    scale = fq.scale.clone()
    fq.half()
    assert fq.scale.dtype == torch.float32 and torch.equal(fq.scale, scale)
    assert fq(x.half()).dtype == torch.float16


def test_set_qparams_refuses_other_granularity() -> None:
    """A per-channel quantizer refuses per-tensor QParams with a message naming both."""
    fq = AffineQuantizer(QuantSpec(granularity="per_channel", axis=0))
    with pytest.raises(PlanError, match="configured per_channel but got per_tensor"):
        fq.set_qparams(qparams_from_range(-1.0, 1.0, QuantSpec()))


@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(2, 16),
    signed=st.booleans(),
    scheme=st.sampled_from(["symmetric", "affine"]),
    per_channel=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
)
def test_fake_quantized_values_lie_on_grid_inside_range(
    bits: int, signed: bool, scheme: str, per_channel: bool, scale: float, shift: float, seed: int
) -> None:
    """For any spec, fake-quantized values are integer levels of the grid within [qmin, qmax]."""
    kwargs: dict[str, Any] = {"granularity": "per_channel", "axis": 1} if per_channel else {}
    spec = QuantSpec(bits=bits, signed=signed, scheme=scheme, **kwargs)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 4, 10, generator=g) + shift) * scale
    obs = MinMaxObserver(spec)
    obs(x[:2])  # the last slice may fall outside the observed range and be clamped
    qp = obs.calculate_qparams()
    out = fake_quantize(x, qp)
    s = qp.scale.double().reshape(1, -1, 1) if per_channel else qp.scale.double()
    zp = qp.zero_point.double().reshape(1, -1, 1) if per_channel else qp.zero_point.double()
    levels = out.double() / s + zp
    # float32 output carries ~2**-24 relative error, i.e. up to 2e-3 of a level at 16 bits
    assert bool(((levels - levels.round()).abs() <= 1e-4 + (levels - zp).abs() * 2**-21).all())
    qmin, qmax = spec.quant_range()
    assert levels.round().min() >= qmin and levels.round().max() <= qmax
    # inside the observed range the error is at most half a step (plus float rounding)
    err = (out[:2] - x[:2]).abs().double()
    assert bool((err <= s * 0.5 * (1 + 1e-4) + 1e-6 * x.abs().max()).all())


# --------------------------------------------------------------------------- observers: merge & state


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


_F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(
    low=_F32,
    high=_F32,
    bits=st.integers(2, 16),
    signed=st.booleans(),
    scheme=st.sampled_from(["symmetric", "affine"]),
    reduce_range=st.booleans(),
)
def test_per_tensor_qparams_equal_one_channel_qparams_bit_for_bit(
    low: float, high: float, bits: int, signed: bool, scheme: str, reduce_range: bool
) -> None:
    """A range per tensor gets exactly the scale and zero point of the same range as one channel."""
    kwargs: dict[str, Any] = {"bits": bits, "signed": signed, "scheme": scheme}
    kwargs["reduce_range"] = reduce_range and bits > 2
    one = qparams_from_range(low, high, QuantSpec(**kwargs))
    channel = QuantSpec(granularity="per_channel", axis=0, **kwargs)
    many = qparams_from_range(torch.tensor([low]), torch.tensor([high]), channel)
    assert one.scale.shape == () and one.zero_point.dtype == torch.int32
    assert one.scale.view(torch.int32).item() == many.scale.view(torch.int32).item()
    assert one.zero_point.item() == many.zero_point.item()


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


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (HistogramObserver, {"bins": 8}, "bins: Input should be greater than or equal to 16"),
        (HistogramObserver, {"percentile": 50}, "percentile: Input should be greater than 50"),
        (
            HistogramObserver,
            {"percentile": 100.5},
            "percentile: Input should be less than or equal to 100",
        ),
        (HistogramObserver, {"method": "kl"}, "method: Input should be 'mse' or 'percentile'"),
        (
            MovingAverageMinMaxObserver,
            {"averaging_constant": 0},
            "averaging_constant: Input should be greater than 0",
        ),
        (MovingAverageMinMaxObserver, {"averaging_constant": 1.5}, "less than or equal to 1"),
        (
            MinMaxObserver,
            {"bins": 10},
            r"bins: Extra inputs are not permitted \(allowed options: none\)",
        ),
        (AffineQuantizer, {"x": 1}, "x: Extra inputs are not permitted"),
    ],
)
def test_options_are_validated_by_each_components_model(
    cls: type[torch.nn.Module], options: dict[str, Any], message: str
) -> None:
    """Bad options raise ConfigError with the field, the bound and the allowed options."""
    with pytest.raises(ConfigError, match=message):
        cls(QuantSpec(), options)


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


# --------------------------------------------------------------------------- registration


def test_the_quantization_pack_makes_components_creatable_by_name() -> None:
    """registry/quantization.yaml adds the quantizers and the four observers; create() validates options."""
    from qswap.registry import registry_data_dir

    reg = Registry("test-components")
    reg.load_pack(registry_data_dir() / "quantization.yaml")
    assert reg.names("quantizer") == ["affine", "binary", "log2", "lsq", "pow2", "ternary"]
    assert reg.names("observer") == [
        "histogram",
        "minmax",
        "moving_average_minmax",
        "per_channel_minmax",
    ]
    obs = reg.observer("histogram").create(QuantSpec(), {"bins": 256, "method": "percentile"})
    assert isinstance(obs, HistogramObserver) and obs.bins == 256 and obs.method == "percentile"
    assert isinstance(reg.quantizer("affine").create(QuantSpec()), AffineQuantizer)
    assert isinstance(obs, Observer)


def test_deepcopy_keeps_observer_state() -> None:
    """A deep copy of a calibrated observer (what prepare(inplace=False) does) is independent."""
    obs = MinMaxObserver(QuantSpec())
    obs(torch.tensor([-1.0, 1.0]))
    twin = copy.deepcopy(obs)
    twin(torch.tensor([5.0]))
    assert float(obs.max_val) == 1.0 and float(twin.max_val) == 5.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_components_follow_module_to_cuda() -> None:
    """Observers and quantizers moved with .to('cuda') calibrate and fake-quantize on the GPU."""
    spec = QuantSpec(bits=4, granularity="per_group", axis=0, group_size=8)
    obs = MinMaxObserver(spec).to("cuda")
    w = torch.randn(4, 16, device="cuda")
    obs(w)
    fq = AffineQuantizer(spec).to("cuda")
    fq.set_qparams(obs.calculate_qparams())
    assert fq.scale.device.type == "cuda"
    out = fq(w.half())
    assert out.device.type == "cuda" and out.dtype == torch.float16
    cpu = AffineQuantizer(spec)
    cpu.set_qparams(obs.calculate_qparams().to("cpu"))
    assert torch.allclose(out.float().cpu(), cpu(w.cpu()).half().float())
    hist = HistogramObserver(QuantSpec()).to("cuda")
    hist(torch.randn(10_000, device="cuda"))
    assert hist.calculate_qparams().scale.device.type == "cuda"
