"""Built-in quantization methods: pow2, log2, binary, ternary and LSQ put values on their grids."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qswap
from qswap.config import QuantSpec, load_config
from qswap.exceptions import ConfigError
from qswap.methods import (
    BinaryQuantizer,
    Log2Quantizer,
    LSQQuantizer,
    Pow2Quantizer,
    TernaryQuantizer,
    learns_qparams,
    runs_on_integer_grid,
)
from qswap.quantizers import AffineQuantizer, qparams_from_range
from qswap.registry import Registry

PER_CHANNEL = QuantSpec(granularity="per_channel", axis=0)


def _ready(cls: type, spec: QuantSpec, x: torch.Tensor, **options: object) -> torch.nn.Module:
    """A quantizer of ``cls`` with qparams from the min/max of ``x`` under ``spec``."""
    q = cls(spec, options)
    if spec.granularity == "per_channel":
        flat = x.movedim(spec.axis or 0, 0).reshape(x.shape[spec.axis or 0], -1)
        lo, hi = flat.amin(1), flat.amax(1)
    else:
        lo, hi = x.min(), x.max()
    q.set_qparams(qparams_from_range(lo, hi, spec))
    return q


def _is_power_of_two(t: torch.Tensor) -> bool:
    e = torch.log2(t.abs().double())
    return bool(torch.equal(e, e.round()))


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(0)) * torch.linspace(
        0.1, 3.0, 6
    ).reshape(6, 1, 1)


# --------------------------------------------------------------------------- pow2


def test_pow2_scales_are_powers_of_two_and_outputs_on_their_grid(weight: torch.Tensor) -> None:
    """pow2 per-channel scales are exact powers of two and every output is an integer multiple."""
    q = _ready(Pow2Quantizer, PER_CHANNEL, weight)
    qp = q.qparams
    assert qp is not None and qp.scale.shape == (6,)
    assert _is_power_of_two(qp.scale)
    steps = q(weight) / qp.scale.reshape(6, 1, 1)
    assert torch.equal(steps, steps.round())
    assert int(steps.abs().max()) <= 128


def test_pow2_ceil_keeps_the_whole_range_and_floor_clips(weight: torch.Tensor) -> None:
    """With rounding ceil nothing clips beyond half a step; floor's finer steps clip the extremes."""
    top = weight.abs().max()
    ceil = _ready(Pow2Quantizer, QuantSpec(bits=4), weight)
    floor = _ready(Pow2Quantizer, QuantSpec(bits=4), weight, rounding="floor")
    assert ceil.qparams is not None and floor.qparams is not None
    assert float(floor.qparams.scale) * 2 == float(ceil.qparams.scale)
    assert float((ceil(weight) - weight).abs().max()) <= float(ceil.qparams.scale) / 2 + 1e-6
    assert float(floor(weight).abs().max()) < float(top)


def test_pow2_affine_zero_point_keeps_the_range_low_end() -> None:
    """An affine pow2 spec recomputes the zero point so the range still covers the observed minimum."""
    spec = QuantSpec(signed=False, scheme="affine")
    x = torch.linspace(-1.3, 5.0, 101)
    q = _ready(Pow2Quantizer, spec, x)
    qp = q.qparams
    assert qp is not None and _is_power_of_two(qp.scale)
    low = (qp.quant_min - qp.zero_point.float()) * qp.scale
    assert float(low) <= -1.3 + float(qp.scale) / 2
    assert float((q(x) - x).abs().max()) <= float(qp.scale) / 2 + 1e-6


# --------------------------------------------------------------------------- log2


def test_log2_outputs_are_signed_powers_of_two_within_the_exponent_window(
    weight: torch.Tensor,
) -> None:
    """Every nonzero log2 output is ±2**e with e among the 7 exponents below each channel's top."""
    q = _ready(Log2Quantizer, QuantSpec(bits=4, granularity="per_channel", axis=0), weight)
    out = q(weight)
    nonzero = out[out != 0]
    assert nonzero.numel() > weight.numel() // 2
    assert _is_power_of_two(nonzero)
    assert torch.equal(torch.sign(out[out != 0]), torch.sign(weight[out != 0]))
    for row, w_row in zip(out, weight, strict=False):
        exponents = torch.log2(row[row != 0].abs()).unique()
        assert len(exponents) <= 7
        top = torch.round(torch.log2(w_row.abs().max()))
        assert float(exponents.max()) <= float(top)
        assert float(exponents.min()) >= float(top) - 6


def test_log2_small_values_become_zero_and_large_ones_clip() -> None:
    """Magnitudes below the window map to 0 and above the top exponent clip to it."""
    q = Log2Quantizer(QuantSpec(bits=3), {"max_exponent": 0})
    q.set_qparams(qparams_from_range(-1.0, 1.0, QuantSpec(bits=3)))
    out = q(torch.tensor([5.0, -0.6, 0.26, 0.1, 0.0]))
    assert out.tolist() == [1.0, -0.5, 0.25, 0.0, 0.0]


def test_log2_linear_rounding_picks_the_nearest_power() -> None:
    """rounding: linear sends 0.74 to 0.5 and 0.76 to 1, where log rounding splits at 0.707."""
    spec = QuantSpec(bits=4)
    x = torch.tensor([0.70, 0.72, 0.74, 0.76])
    log = _ready(Log2Quantizer, spec, torch.tensor([-1.0, 1.0]))
    linear = _ready(Log2Quantizer, spec, torch.tensor([-1.0, 1.0]), rounding="linear")
    assert log(x).tolist() == [0.5, 1.0, 1.0, 1.0]
    assert linear(x).tolist() == [0.5, 0.5, 0.5, 1.0]


def test_log2_unsigned_keeps_only_non_negative_values() -> None:
    """An unsigned log2 spec (activations after ReLU) sends negatives to 0 and uses 15 levels."""
    spec = QuantSpec(bits=4, signed=False, scheme="affine")
    q = _ready(Log2Quantizer, spec, torch.tensor([0.0, 8.0]))
    out = q(torch.tensor([-3.0, 8.0, 2.0**-11, 2.0**-12]))
    assert out.tolist() == [0.0, 8.0, 2.0**-11, 0.0]


def test_log2_too_many_levels_for_the_bits_is_a_config_error() -> None:
    """Asking for more powers of two than the bits can encode names the limit."""
    with pytest.raises(
        ConfigError, match=r"levels=8 needs 17 codes .* bits=4 gives 16; use levels <= 7"
    ):
        Log2Quantizer(QuantSpec(bits=4), {"levels": 8})


# --------------------------------------------------------------------------- binary / ternary


def test_binary_weights_take_two_values_per_channel(weight: torch.Tensor) -> None:
    """Each output channel of a binary weight is ±mean|w| of that channel: exactly two values."""
    q = _ready(BinaryQuantizer, PER_CHANNEL, weight)
    out = q(weight)
    for row, w_row in zip(out, weight, strict=False):
        values = row.unique()
        a = w_row.abs().mean()
        assert len(values) == 2
        assert torch.allclose(values, torch.stack([-a, a]))
    assert torch.equal(out > 0, weight >= 0)


def test_binary_max_abs_per_tensor_uses_the_largest_magnitude(weight: torch.Tensor) -> None:
    """scale: max_abs per tensor gives the two values ±max|w| for the whole tensor."""
    q = _ready(BinaryQuantizer, QuantSpec(), weight, scale="max_abs")
    top = weight.abs().max()
    assert torch.allclose(q(weight).unique(), torch.stack([-top, top]))


def test_ternary_weights_take_three_values_per_channel(weight: torch.Tensor) -> None:
    """Each channel of a ternary weight is {-a, 0, a}, zero exactly where |w| <= 0.7 mean|w|."""
    q = _ready(TernaryQuantizer, PER_CHANNEL, weight)
    out = q(weight)
    for row, w_row in zip(out, weight, strict=False):
        values = row.unique()
        assert len(values) == 3
        kept = w_row.abs() > 0.7 * w_row.abs().mean()
        a = w_row.abs()[kept].mean()
        assert torch.allclose(values, torch.stack([-a, torch.zeros(()), a]))
        assert torch.equal(row != 0, kept)


def test_ternary_per_group_has_its_own_magnitude_per_group() -> None:
    """Per group (size 4), each group of a ternary weight has its own ±a."""
    w = torch.cat([torch.full((1, 4), 0.1), torch.full((1, 4), 2.0)], dim=1)
    w = w * torch.tensor([1.0, -1.0, 1.0, -1.0] * 2)
    spec = QuantSpec(granularity="per_group", group_size=4)
    q = TernaryQuantizer(spec)
    q.set_qparams(qparams_from_range(torch.full((1, 2), -2.0), torch.full((1, 2), 2.0), spec))
    assert torch.allclose(q(w), w)
    assert torch.allclose(q(w * 1.2), w * 1.2)


def test_binary_and_ternary_refuse_unsigned_specs() -> None:
    """Binary and ternary values have both signs, so an unsigned spec is refused with the fix."""
    for cls, name in ((BinaryQuantizer, "binary"), (TernaryQuantizer, "ternary")):
        with pytest.raises(ConfigError, match=f"quantizer '{name}' .* needs signed: true"):
            cls(QuantSpec(signed=False))


def test_methods_pass_straight_through_gradients_to_the_float_tensor(weight: torch.Tensor) -> None:
    """Binary, ternary, log2 and pow2 all give the float tensor a gradient of ones inside the range."""
    for cls in (BinaryQuantizer, TernaryQuantizer, Log2Quantizer, Pow2Quantizer):
        q = _ready(cls, PER_CHANNEL, weight)
        w = (weight * 0.5).requires_grad_()
        q(w).sum().backward()
        assert w.grad is not None
        assert torch.equal(w.grad, torch.ones_like(w)), cls.__name__


def test_methods_are_the_identity_until_qparams_are_set(weight: torch.Tensor) -> None:
    """Like every quantizer, a method without qparams returns its input unchanged."""
    for cls in (BinaryQuantizer, TernaryQuantizer, Log2Quantizer, Pow2Quantizer, LSQQuantizer):
        assert cls(PER_CHANNEL)(weight) is weight


def test_methods_keep_the_input_dtype(weight: torch.Tensor) -> None:
    """A bfloat16 tensor comes back bfloat16 from every method."""
    x = weight.to(torch.bfloat16)
    for cls in (BinaryQuantizer, TernaryQuantizer, Log2Quantizer, Pow2Quantizer, LSQQuantizer):
        assert _ready(cls, PER_CHANNEL, weight)(x).dtype == torch.bfloat16


# --------------------------------------------------------------------------- LSQ


def test_lsq_gradients_reach_the_step_and_the_weights(weight: torch.Tensor) -> None:
    """LSQ gives the per-channel step and the float weight gradients, and the step is a parameter."""
    q = _ready(LSQQuantizer, QuantSpec(bits=4, granularity="per_channel", axis=0), weight)
    assert [n for n, _ in q.named_parameters()] == ["step"]
    w = weight.clone().requires_grad_()
    (q(w) - weight * 1.1).pow(2).sum().backward()
    assert q.step is not None and q.step.grad is not None
    assert q.step.grad.shape == (6,) and bool((q.step.grad != 0).all())
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_lsq_training_moves_the_step_and_qparams_follow() -> None:
    """A few SGD steps towards a target change the learned step, and qparams report it."""
    torch.manual_seed(0)
    x = torch.randn(256) * 0.5
    q = _ready(LSQQuantizer, QuantSpec(bits=3), torch.tensor([-4.0, 4.0]))
    start = q.qparams
    assert start is not None
    before = float((q(x) - x).pow(2).mean().detach())
    opt = torch.optim.SGD(q.parameters(), lr=5.0)  # the LSQ gradient scale makes steps small
    for _ in range(50):
        opt.zero_grad()
        (q(x) - x).pow(2).mean().backward()
        opt.step()
    learned = q.qparams
    assert learned is not None
    assert float(learned.scale) < 0.5 * float(start.scale)
    assert float((q(x) - x).pow(2).mean().detach()) < 0.5 * before
    steps = q(x) / learned.scale
    assert torch.allclose(steps, steps.round(), atol=1e-4)


def test_lsq_paper_init_starts_from_the_first_tensor() -> None:
    """init: lsq sets the step to 2 mean|x| / sqrt(quant_max) on the first tensor quantized."""
    x = torch.tensor([1.0, -3.0, 2.0, 0.0])
    q = _ready(LSQQuantizer, QuantSpec(bits=3), torch.tensor([-8.0, 8.0]), init="lsq")
    q(x)
    assert q.qparams is not None
    assert float(q.qparams.scale) == pytest.approx(2 * 1.5 / 3**0.5)


def test_lsq_state_dict_round_trips_into_a_fresh_quantizer(weight: torch.Tensor) -> None:
    """A fresh LSQ quantizer loaded from a trained one's state_dict quantizes identically."""
    spec = QuantSpec(bits=4, granularity="per_channel", axis=0)
    q = _ready(LSQQuantizer, spec, weight)
    assert q.step is not None
    with torch.no_grad():
        q.step.mul_(0.7)
    fresh = LSQQuantizer(spec)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(weight), q(weight))
    assert learns_qparams(fresh)


# --------------------------------------------------------------------------- registration and config


def test_register_methods_and_integer_grid_flags() -> None:
    """The five methods register by name; only affine, pow2 and lsq run on integer grids."""
    from qswap.registry import registry_data_dir

    reg = Registry("methods")
    reg.load_pack(registry_data_dir() / "quantization.yaml")
    assert reg.names("quantizer") == ["affine", "binary", "log2", "lsq", "pow2", "ternary"]
    flags = {name: runs_on_integer_grid(reg.quantizer(name).cls) for name in reg.names("quantizer")}
    assert flags == {
        "affine": True,
        "binary": False,
        "log2": False,
        "lsq": True,
        "pow2": True,
        "ternary": False,
    }
    assert runs_on_integer_grid(AffineQuantizer)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x

    reg.register_quantizer("mine", fn)
    assert not runs_on_integer_grid(reg.quantizer("mine").cls)


def _method_registry() -> Registry:
    return Registry("methods", parent=qswap.default_registry())  # the default names them all


def test_bad_method_options_fail_with_the_option_models_message_and_yaml_line() -> None:
    """An out-of-range ternary threshold in YAML reports the model's bound at its line."""
    text = (
        "version: 1\n"
        "backend: fake\n"
        "rules:\n"
        "  - match: {type: Linear}\n"
        "    weight:\n"
        "      quantizer: {name: ternary, threshold: 3.0}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(text, registry=_method_registry())
    assert str(info.value) == (
        "<string>:6:45: rules[0].weight.quantizer.threshold: quantizer 'ternary' option "
        "'threshold': must be at most 1.5, got the number 3.0. Use a value at most 1.5"
    )


def test_unknown_method_option_suggests_the_right_name() -> None:
    """A misspelt log2 option is refused with the option it most likely meant."""
    text = "version: 1\nweight: {quantizer: {name: log2, level: 4}}\n"
    with pytest.raises(ConfigError, match=r"has no option 'level'.*did you mean 'levels'"):
        load_config(text, registry=_method_registry())


def test_a_plain_function_registers_in_one_line_and_quantizes_the_chosen_layer() -> None:
    """reg.register_quantizer('mine', fn) applies fn to the weights of the layers a rule picks, only."""
    reg = Registry("decorated", parent=qswap.default_registry())

    def quantization_decorator(x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4

    reg.register_quantizer("quarter", quantization_decorator)
    cfg = {
        "backend": "fake",
        "mode": "weight_only",
        "rules": [{"match": {"name": "0"}, "weight": {"quantizer": "quarter"}}],
    }
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    qmodel = qswap.quantize(
        model, cfg, calib_data=[torch.randn(4, 8)], registry=reg, progress=False
    )
    assert torch.equal(qmodel[0].weight, quantization_decorator(model[0].weight))
    steps = qmodel[1].weight * 4
    assert not torch.equal(steps, steps.round())


def test_integer_backend_lowers_pow2_and_falls_back_to_fake_for_log2() -> None:
    """On x86 a pow2 layer becomes int8 with power-of-two weight scales; a log2 layer falls back
    to fake-quant and the plan says why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    cfg = {
        "extends": ["x86_int8"],
        "rules": [
            {"match": {"name": "0"}, "weight": {"quantizer": "pow2"}},
            {"match": {"name": "2"}, "weight": {"quantizer": "log2"}},
        ],
    }
    x = torch.randn(16, 8)
    plan = qswap.plan(model, cfg, example_inputs=(x,))
    assert plan["0"].backend == "x86"
    assert plan["2"].backend == "fake" and plan["2"].fallback
    assert "weight asks quantizer 'log2', which is not one" in plan["2"].reason
    with pytest.warns(qswap.FallbackWarning, match="fall back to fake"):
        q = qswap.quantize(model, cfg, calib_data=[x], example_inputs=(x,), progress=False)
    scales = q[0].weight().q_per_channel_scales()
    assert _is_power_of_two(scales)
    w = q[2].weight.detach()
    assert _is_power_of_two(w[w != 0])
