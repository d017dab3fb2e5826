"""QParams, qparams_from_range, the affine fake-quantizer and component options."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qswap.config import QuantSpec
from qswap.exceptions import ConfigError, PlanError
from qswap.observers import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, Observer
from qswap.quantizers import AffineQuantizer, QParams, fake_quantize, qparams_from_range
from qswap.registry import Registry

EPS = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test draws the same random tensors."""
    torch.manual_seed(0)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


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


def test_observers_moved_to_their_module_still_load_from_the_old_one() -> None:
    """Files that pickled qswap.quantizers.<Observer> still load: the old names are the new classes."""
    import pickle

    import qswap.observers
    import qswap.quantizers

    assert qswap.quantizers.MinMaxObserver is qswap.observers.MinMaxObserver
    for name in qswap.observers.__all__:
        assert getattr(qswap.quantizers, name) is getattr(qswap.observers, name)
    # a pickle written when the class lived in qswap.quantizers names it there
    observer = MinMaxObserver(QuantSpec())
    observer(torch.tensor([-1.0, 2.0]))
    text = pickle.dumps(observer, protocol=0)  # protocol 0 names classes as plain text lines
    old = text.replace(b"qswap.observers\nMinMaxObserver", b"qswap.quantizers\nMinMaxObserver")
    assert old != text
    loaded = pickle.loads(old)
    assert type(loaded) is MinMaxObserver and float(loaded.max_val) == 2.0
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchObserver'"):
        _ = qswap.quantizers.NoSuchObserver
