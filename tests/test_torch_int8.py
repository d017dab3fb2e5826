"""Real int8 on CPU: torch.ao.nn.quantized counterparts, boundaries from the trace, end to end."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import INT8_MINMAX
from torch import nn

import qswap
import qswap.backends.fake
from qswap.backends import torch_int8 as ti
from qswap.config import QuantSpec
from qswap.cpu import pair_saturates
from qswap.exceptions import UnsupportedModuleError
from qswap.plan import LayerSpec
from qswap.quantizers import QParams, fake_quantize, qparams_from_range

with ti.torch_ao_quiet():
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.quantized as nnq

ACT = QuantSpec(signed=False, scheme="affine")
ACT_RR = QuantSpec(signed=False, scheme="affine", reduce_range=True)
W_PC = QuantSpec(signed=True, scheme="symmetric", granularity="per_channel", axis=0)
W_PT = QuantSpec(signed=True, scheme="symmetric")


def _range_qparams(t: torch.Tensor, spec: QuantSpec) -> QParams:
    if spec.granularity == "per_channel":
        dims = tuple(range(1, t.dim()))
        return qparams_from_range(t.amin(dims), t.amax(dims), spec)
    return qparams_from_range(t.min(), t.max(), spec)


def _weight_of(module: nn.Module) -> torch.Tensor | None:
    inner = module[0] if isinstance(module, nn.Sequential) else module
    w = getattr(inner, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


#: CPU-dependent: without VNNI, fbgemm adds pairs of u8 x s8 products in 16 bits (qswap.cpu)
SATURATES = ti.fbgemm_saturates()


def as_planned(act: QuantSpec, weight: QuantSpec | None) -> QuantSpec | None:
    """The weight spec the plan gives on this CPU: 7 bits where 8-bit pairs would saturate."""
    if weight is None or not SATURATES:
        return weight
    lo, hi = act.quant_range()
    codes = hi + (128 if lo < 0 else 0)
    if not pair_saturates(act_codes=codes, weight_range=weight.quant_range()):
        return weight
    return weight.model_copy(update={"reduce_range": True})


def make_spec(
    module: nn.Module,
    counterpart: type,
    x: torch.Tensor,
    *,
    act: QuantSpec = ACT,
    weight: QuantSpec | None = W_PC,
    name: str = "layer",
) -> LayerSpec:
    """A LayerSpec with qparams calibrated by min/max on ``x``, as plan and convert fill it."""
    weight = as_planned(act, weight)
    with torch.no_grad():
        y = module(x.clone())
    qparams = {"input": _range_qparams(x, act), "output": _range_qparams(y, act)}
    w = _weight_of(module)
    if weight is not None and w is not None:
        qparams["weight"] = _range_qparams(w.detach(), weight)
    return LayerSpec(
        name=name,
        module_type=type(module),
        counterpart=counterpart,
        weight=weight,
        input=act,
        output=act,
        qparams=qparams,
        backend="x86",
    )


def quantized_steps(y: torch.Tensor, qp: QParams) -> torch.Tensor:
    """uint8 codes of a float tensor under per-tensor ``qp``, as torch's kernels saturate them."""
    scale, zero_point = ti._activation_qparams(qp, "test")
    return torch.clamp(torch.round(y / scale) + zero_point, 0, 255)


def reference(module: nn.Module, spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """torch's reference arithmetic: fake-quantized input and weight, float op, output codes."""
    m = copy.deepcopy(module)
    inner = m[0] if isinstance(m, nn.Sequential) else m
    with torch.no_grad():
        if "weight" in spec.qparams:
            inner.weight.copy_(fake_quantize(inner.weight, spec.qparams["weight"]))
        y = m(fake_quantize(x, spec.qparams["input"]))
    return quantized_steps(y, spec.qparams["output"])


CASES: list[tuple[str, Callable[[], nn.Module], type, tuple[int, ...]]] = [
    ("Linear", lambda: nn.Linear(16, 8), ti.QuantizedLinear, (4, 16)),
    (
        "LinearReLU",
        lambda: nni.LinearReLU(nn.Linear(16, 8), nn.ReLU()),
        ti.QuantizedLinearReLU,
        (4, 16),
    ),
    ("Conv1d", lambda: nn.Conv1d(4, 6, 3, padding=1), ti.QuantizedConv1d, (2, 4, 10)),
    ("Conv2d", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), ti.QuantizedConv2d, (2, 4, 9, 9)),
    (
        "Conv2d-groups",
        lambda: nn.Conv2d(4, 8, 3, groups=2, bias=False),
        ti.QuantizedConv2d,
        (2, 4, 7, 7),
    ),
    ("Conv3d", lambda: nn.Conv3d(3, 4, 3, padding=1), ti.QuantizedConv3d, (1, 3, 5, 5, 5)),
    (
        "ConvReLU1d",
        lambda: nni.ConvReLU1d(nn.Conv1d(4, 6, 3), nn.ReLU()),
        ti.QuantizedConvReLU1d,
        (2, 4, 10),
    ),
    (
        "ConvReLU2d",
        lambda: nni.ConvReLU2d(nn.Conv2d(4, 6, 3), nn.ReLU()),
        ti.QuantizedConvReLU2d,
        (2, 4, 8, 8),
    ),
    (
        "ConvReLU3d",
        lambda: nni.ConvReLU3d(nn.Conv3d(3, 4, 3), nn.ReLU()),
        ti.QuantizedConvReLU3d,
        (1, 3, 5, 5, 5),
    ),
]


@pytest.mark.parametrize("weight_spec", [W_PC, W_PT], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("act", [ACT, ACT_RR], ids=["full_range", "reduce_range"])
@pytest.mark.parametrize(
    ("label", "build", "counterpart", "shape"), CASES, ids=[c[0] for c in CASES]
)
def test_weighted_counterpart_matches_reference_arithmetic(
    label: str,
    build: Callable[[], nn.Module],
    counterpart: type,
    shape: tuple[int, ...],
    act: QuantSpec,
    weight_spec: QuantSpec,
) -> None:
    """Each int8 module's output codes equal torch's quantize-dequantize reference within one step.

    With full-range activations on a CPU without VNNI the weights keep to 7 bits, as the
    plan gives them there (``as_planned``): exact on every CPU.
    """
    torch.manual_seed(0)
    module = build().eval()
    x = torch.randn(shape)
    spec = make_spec(module, counterpart, x, act=act, weight=weight_spec)
    q = counterpart.from_float(module, spec)
    assert isinstance(q, counterpart)
    out = q(x)
    assert out.is_quantized and out.dtype == torch.quint8
    diff = (out.int_repr().float() - reference(module, spec, x)).abs()
    assert diff.max().item() <= 1.0
    assert diff.mean().item() < 0.1  # almost every code is exact


@pytest.mark.parametrize(
    ("build", "counterpart"),
    [
        (lambda: nn.BatchNorm2d(6), ti.QuantizedBatchNorm2d),
        (lambda: nni.BNReLU2d(nn.BatchNorm2d(6), nn.ReLU()), ti.QuantizedBNReLU2d),
        (lambda: nn.BatchNorm3d(6), ti.QuantizedBatchNorm3d),
    ],
    ids=["BatchNorm2d", "BNReLU2d", "BatchNorm3d"],
)
def test_batchnorm_counterpart_matches_reference(
    build: Callable[[], nn.Module], counterpart: type
) -> None:
    """An unfused BatchNorm becomes a quantized BatchNorm whose codes match the float BN within a step."""
    torch.manual_seed(0)
    bn = build()
    inner = bn[0] if isinstance(bn, nn.Sequential) else bn
    with torch.no_grad():
        inner.running_mean.uniform_(-1, 1)
        inner.running_var.uniform_(0.5, 2)
        inner.weight.uniform_(0.5, 1.5)
        inner.bias.uniform_(-0.5, 0.5)
    bn.eval()
    x = (
        torch.randn(2, 6, 4, 4)
        if counterpart is not ti.QuantizedBatchNorm3d
        else torch.randn(2, 6, 3, 3, 3)
    )
    spec = make_spec(bn, counterpart, x, weight=None)
    q = counterpart.from_float(bn, spec)
    out = q(x)
    assert isinstance(q, nnq.BatchNorm2d | nnq.BatchNorm3d)
    diff = (out.int_repr().float() - reference(bn, spec, x)).abs()
    assert diff.max().item() <= 1.0


def test_integer_input_runs_without_requantizing() -> None:
    """A quantized input goes straight to the kernel; a float one is quantized with the input qparams."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 6, 6)
    spec = make_spec(conv, ti.QuantizedConv2d, x)
    q = ti.QuantizedConv2d.from_float(conv, spec)
    scale, zero_point = ti._activation_qparams(spec.qparams["input"], "x")
    with ti.torch_ao_quiet():
        qx = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    assert torch.equal(q(qx).int_repr(), q(x).int_repr())
    assert torch.equal(q(x.double()).int_repr(), q(x).int_repr())


def test_signed_activation_qparams_map_exactly_onto_uint8() -> None:
    """Signed 8-bit activation qparams run on torch's quint8 kernels with the same real values."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 4).eval()
    x = torch.randn(5, 8)
    signed = QuantSpec(signed=True, scheme="affine")
    spec_s = make_spec(lin, ti.QuantizedLinear, x, act=signed)
    spec_u = make_spec(lin, ti.QuantizedLinear, x, act=ACT)
    assert spec_s.qparams["input"].quant_min == -128
    out_s = ti.QuantizedLinear.from_float(lin, spec_s)(x).dequantize()
    ref = reference(lin, spec_s, x)
    scale, zero_point = ti._activation_qparams(spec_s.qparams["output"], "x")
    assert zero_point == int(spec_s.qparams["output"].zero_point) + 128
    assert torch.allclose(out_s, (ref - zero_point) * scale, atol=scale * 1.01)
    out_u = ti.QuantizedLinear.from_float(lin, spec_u)(x).dequantize()
    assert torch.allclose(out_s, out_u, atol=0.05)


def _saturating_linear() -> tuple[nn.Module, torch.Tensor, QuantSpec]:
    """A Linear whose pairs of full-range u8 x s8 products need 17 bits (255 x 127 x 2)."""
    lin = nn.Linear(64, 4).eval()
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.zero_()
    x = torch.cat([torch.zeros(1, 64), torch.ones(3, 64)])  # input codes 0 and 255
    return lin, x, QuantSpec(signed=True, scheme="symmetric")


def test_probe_predicts_the_kernel_on_this_cpu() -> None:
    """CPU-dependent: 8-bit weights on full-range input are exact iff the probe says no saturation.

    On a CPU with VNNI every code matches torch's reference; without it the 16-bit pair sums
    clip (the probe says so) and the codes are far off, which is why the plan narrows them.
    """
    lin, x, w8 = _saturating_linear()
    spec = make_spec(lin, ti.QuantizedLinear, x, act=ACT, weight=None)
    spec.weight = w8
    spec.qparams["weight"] = _range_qparams(lin.weight.detach(), w8)
    with torch.no_grad():
        y = lin(x)
    spec.qparams["output"] = _range_qparams(y, ACT)
    diff = ti.QuantizedLinear.from_float(lin, spec)(x).int_repr().float() - reference(lin, spec, x)
    if SATURATES:
        assert diff.abs().max().item() > 50
    else:
        assert diff.abs().max().item() <= 1.0


def test_plan_keeps_weights_to_7_bits_where_pairs_saturate() -> None:
    """With vnni: false the plan narrows 8-bit weights that meet 8-bit activations, and says why."""
    lin, x, _ = _saturating_linear()
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(4, 2))
    full = {"extends": ["x86_int8"], "activation": {"reduce_range": False, "observer": "minmax"}}
    p = qswap.plan(model, {**full, "vnni": False}, example_inputs=(x,))
    assert p.narrowed == ("0", "2")
    assert p["0"].layer is not None and p["0"].layer.weight is not None
    assert p["0"].layer.weight.quant_range() == (-64, 63)
    assert "weights kept to 7 bits (no VNNI)" in p["0"].reason
    assert "vnni: false (the CPU that runs it has no VNNI)" in p.explain("0")
    assert "2 layer(s) have weights kept to 7 bits" in str(p)
    assert p.config.vnni is False
    # 7-bit activations (the preset) leave 8-bit weights alone
    assert qswap.plan(model, {"extends": ["x86_int8"], "vnni": False}).narrowed == ()
    # auto measures this CPU, and the plan's config records what it found
    auto = qswap.plan(model, full, example_inputs=(x,))
    assert auto.narrowed == (("0", "2") if SATURATES else ())
    assert auto.config.vnni is (not SATURATES)
    qmodel = qswap.quantize(model, full, calib_data=[x], example_inputs=(x,), progress=False)
    ref = model(x)
    assert (qmodel(x) - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_vnni_true_on_a_saturating_cpu_warns() -> None:
    """CPU-dependent: vnni: true keeps 8 bits, and warns where this CPU would saturate them."""
    lin, _, _ = _saturating_linear()
    cfg = {
        "extends": ["x86_int8"],
        "activation": {"reduce_range": False, "observer": "minmax"},
        "vnni": True,
    }
    if SATURATES:
        with pytest.warns(UserWarning, match=r"the config says vnni: true, but on this CPU"):
            p = qswap.plan(nn.Sequential(lin), cfg)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p = qswap.plan(nn.Sequential(lin), cfg)
    assert p.narrowed == ()


def test_weight_codes_are_exactly_the_calibrated_ones() -> None:
    """The packed int8 weight holds exactly clamp(round(w / s) + z) with the given scales."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 3).eval()
    spec = make_spec(lin, ti.QuantizedLinear, torch.randn(2, 6))
    q = ti.QuantizedLinear.from_float(lin, spec)
    w_q = q.weight()
    assert w_q.qscheme() == torch.per_channel_affine
    assert torch.equal(w_q.q_per_channel_scales().float(), spec.qparams["weight"].scale)
    assert torch.allclose(
        w_q.dequantize(), fake_quantize(lin.weight.detach(), spec.qparams["weight"])
    )


def test_unsigned_weights_are_shifted_to_int8() -> None:
    """uint8 affine weight qparams become int8 codes with zero point - 128, same real values."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 3).eval()
    wspec = QuantSpec(signed=False, scheme="affine")
    spec = make_spec(lin, ti.QuantizedLinear, torch.randn(2, 6), weight=wspec)
    q = ti.QuantizedLinear.from_float(lin, spec)
    assert torch.allclose(
        q.weight().dequantize(), fake_quantize(lin.weight.detach(), spec.qparams["weight"])
    )


def test_unsupported_qparams_raise_with_fix() -> None:
    """Per-group weights, 16-bit activations, unsupported padding and missing qparams say what to do."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    spec = make_spec(lin, ti.QuantizedLinear, x)
    spec.qparams["weight"] = QParams(
        torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int32), -128, 127, 0, 4
    )
    with pytest.raises(UnsupportedModuleError, match=r"per-tensor or per-channel \(axis 0\)"):
        ti.QuantizedLinear.from_float(lin, spec)
    spec = make_spec(
        lin, ti.QuantizedLinear, x, act=QuantSpec(bits=16, signed=False, scheme="affine")
    )
    with pytest.raises(
        UnsupportedModuleError, match="layer output: activation range \\[0, 65535\\]"
    ):
        ti.QuantizedLinear.from_float(lin, spec)
    spec = make_spec(lin, ti.QuantizedLinear, x)
    del spec.qparams["output"]
    with pytest.raises(
        UnsupportedModuleError, match="layer: int8 lowering needs calibrated 'output'"
    ):
        ti.QuantizedLinear.from_float(lin, spec)
    conv = nn.Conv2d(2, 2, 3, padding="same").eval()
    spec = make_spec(conv, ti.QuantizedConv2d, torch.randn(1, 2, 5, 5))
    with pytest.raises(UnsupportedModuleError, match="numeric padding, not padding='same'"):
        ti.QuantizedConv2d.from_float(conv, spec)
    conv3 = nn.Conv3d(2, 2, 3, padding=1, padding_mode="reflect").eval()
    spec = make_spec(conv3, ti.QuantizedConv3d, torch.randn(1, 2, 4, 4, 4))
    with pytest.raises(
        UnsupportedModuleError,
        match=r"layer: torch's int8 kernels cannot run this layer \(Conv3d does not support "
        r"reflection padding\); skip it with a rule or use backend 'fake'",
    ):
        ti.QuantizedConv3d.from_float(conv3, spec)


def test_state_dict_round_trip_keeps_input_qparams() -> None:
    """A lowered layer's state_dict carries input qparams and loads into a fresh one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 6, 6)
    q = ti.QuantizedConv2d.from_float(conv, make_spec(conv, ti.QuantizedConv2d, x))
    state = q.state_dict()
    assert {"input_scale", "input_zero_point", "scale", "zero_point", "weight"} <= set(state)
    fresh = ti.QuantizedConv2d.from_float(
        nn.Conv2d(3, 4, 3).eval(), make_spec(nn.Conv2d(3, 4, 3).eval(), ti.QuantizedConv2d, x * 3)
    )
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x).int_repr(), q(x).int_repr())


def _warn_inside_silenced_block(*warnings_to_raise: tuple[str, type[Warning]]) -> None:
    with ti.torch_ao_quiet():
        for message, category in warnings_to_raise:
            warnings.warn(message, category, stacklevel=2)


def test_silencing_is_limited_to_torch_ao_deprecations() -> None:
    """Inside the silenced block torch.ao's deprecation is dropped but any other warning still fires."""
    message = (
        "torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor "
        "creation functions that produce tensors ... are deprecated"
    )
    torch_ao = (message, UserWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_inside_silenced_block(torch_ao, ("something else", UserWarning))
        _warn_inside_silenced_block(("my_api is deprecated", DeprecationWarning))
    assert [str(w.message) for w in caught] == ["something else", "my_api is deprecated"]


# --------------------------------------------------------------------------- lowering


class Block(nn.Module):
    """A residual block with a plain ``+=`` and one ReLU used twice (the forum's pattern)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += identity
        return self.relu(out)


class Sigmoidish(nn.Module):
    """A float-only custom layer that fails loudly if it ever sees a quantized tensor."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_quantized:
            raise AssertionError("a float module received a quantized tensor")
        return torch.sigmoid(x) * self.scale


class Net(nn.Module):
    """Stem, residual block, cat of two branches, a float layer, a functional op, dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_relu = nn.ReLU()
        self.block = Block(8)
        self.left = nn.Conv2d(8, 4, 1)
        self.right = nn.Conv2d(8, 4, 1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.custom = Sigmoidish(8)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
        x = self.block(self.stem_relu(self.stem(x)))
        y = torch.cat([F.relu(self.left(x)), self.right(x)], 1)
        y = self.mix(y)
        z = self.custom(y) * scale
        feats = self.pool(y).view(y.size(0), -1)
        return {"logits": self.fc(feats), "gate": z, "feats": feats}


INT8_MAPPING: dict[type, type] = {
    nn.Conv2d: ti.QuantizedConv2d,
    nn.Linear: ti.QuantizedLinear,
    nn.ReLU: ti.IntegerPassthrough,
    nn.AdaptiveAvgPool2d: ti.IntegerPassthrough,
    nn.MaxPool2d: ti.IntegerPassthrough,
    nn.Flatten: ti.IntegerPassthrough,
    nn.Identity: ti.IntegerPassthrough,
}


def calibrated_layers(
    model: nn.Module, batches: list[tuple[Any, ...]], mapping: dict[type, type] = INT8_MAPPING
) -> dict[str, LayerSpec]:
    """Min/max-calibrated LayerSpecs for every mapped module, the way convert hands them over."""
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def seen(key: str, t: torch.Tensor) -> None:
        lo[key] = torch.minimum(lo.get(key, t.min()), t.min())
        hi[key] = torch.maximum(hi.get(key, t.max()), t.max())

    handles = []
    for name, m in model.named_modules():
        if type(m) in mapping:
            handles.append(
                m.register_forward_pre_hook(lambda mod, a, n=name: seen(n + ".input", a[0]))
            )
            handles.append(
                m.register_forward_hook(lambda mod, a, o, n=name: seen(n + ".output", o))
            )
    with torch.no_grad():
        for batch in batches:
            model(*batch)
    for h in handles:
        h.remove()
    layers: dict[str, LayerSpec] = {}
    for name, m in model.named_modules():
        if type(m) not in mapping or name + ".input" not in lo:
            continue
        qparams = {
            k: qparams_from_range(lo[f"{name}.{k}"], hi[f"{name}.{k}"], ACT_RR)
            for k in ("input", "output")
        }
        w = _weight_of(m)
        if w is not None and mapping[type(m)] is not ti.IntegerPassthrough:
            qparams["weight"] = _range_qparams(w.detach(), W_PC)
        layers[name] = LayerSpec(
            name, type(m), mapping[type(m)], W_PC, ACT_RR, ACT_RR, qparams=qparams, backend="x86"
        )
    return layers


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach(), out.detach()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


@pytest.fixture(scope="module")
def lowered_net() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Net().eval()
    batches = [(torch.rand(4, 3, 8, 8),) for _ in range(4)]
    layers = calibrated_layers(model, batches)
    qmodel = ti.lower_x86(copy.deepcopy(model), layers, batches[0], None)
    return model, qmodel, torch.rand(4, 3, 8, 8)


def test_lowered_model_returns_float_and_matches_float_model(lowered_net: Any) -> None:
    """Every output leaves as float (dict values included) and stays close to the float model."""
    model, qmodel, x = lowered_net
    with torch.no_grad():
        ref = model(x, scale=2.0)
    out = qmodel(x, scale=2.0)
    assert set(out) == {"logits", "gate", "feats"}
    for key in out:
        assert not out[key].is_quantized and out[key].dtype == torch.float32
        assert sqnr(ref[key], out[key]) > 25, key


def test_modules_become_int8_and_ops_between_them_stay_integer(lowered_net: Any) -> None:
    """Convs/linears are int8 modules, ReLUs fold into them, += runs as add_relu and cat as quantized cat."""
    _, qmodel, _ = lowered_net
    counts = sum(isinstance(m, nnq.Conv2d | nnq.Linear) for m in qmodel.modules())
    assert counts == 7
    assert isinstance(qmodel.block.conv1, ti.QuantizedConvReLU2d)  # the ReLU after it is folded
    assert isinstance(qmodel.stem, ti.QuantizedConvReLU2d)
    assert isinstance(qmodel.left, ti.QuantizedConvReLU2d)  # F.relu after it too
    assert type(qmodel.custom) is Sigmoidish
    text = ti.describe_lowering(qmodel)
    assert "torch.Tensor.add_: quantized.add_relu" in text
    assert "torch.cat: quantized.cat" in text


def test_float_consumers_never_see_integer_tensors(lowered_net: Any) -> None:
    """A custom float layer and a float functional op get dequantized tensors, never QuantizedCPU ones."""
    _, qmodel, x = lowered_net
    seen: list[bool] = []
    handle = qmodel.custom.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_quantized))
    try:
        qmodel(x)
    finally:
        handle.remove()
    assert seen == [False]


def test_integer_ops_are_dispatched_only_during_forward(lowered_net: Any) -> None:
    """Outside forward a quantized tensor behaves as torch's own (the dispatch mode is not left active)."""
    _, qmodel, x = lowered_net
    qmodel(x)
    with ti.torch_ao_quiet():
        q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
    with pytest.raises(NotImplementedError, match="QuantizedCPU"):
        q + q


def test_exception_in_forward_leaves_no_mode_behind(lowered_net: Any) -> None:
    """A forward that raises still pops the dispatch mode, and the next call works."""
    _, qmodel, x = lowered_net
    with pytest.raises(RuntimeError):
        qmodel(torch.rand(4, 5, 8, 8))
    assert not torch._C._is_torch_function_mode_enabled()
    assert not qmodel(x)["logits"].is_quantized


def test_lowered_model_copies_and_pickles(lowered_net: Any) -> None:
    """deepcopy and pickle keep a working int8 model with the same outputs."""
    _, qmodel, x = lowered_net
    out = qmodel(x)["logits"]
    clone = copy.deepcopy(qmodel)
    assert torch.equal(clone(x)["logits"], out)
    buffer = io.BytesIO()
    torch.save(qmodel, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():  # torch's own loader of quantized tensors warns about this
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x)["logits"], out)
    assert pickle.loads(pickle.dumps(qmodel._qswap_int8)).ops == qmodel._qswap_int8.ops


def test_shared_module_and_repeated_calls_are_lowered_once() -> None:
    """A module reachable at two paths and called twice is swapped at both paths and runs int8."""
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = shared
            self.b = shared
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.act(self.a(x)))

    model = Twice().eval()
    batches = [(torch.randn(3, 6),) for _ in range(3)]
    layers = calibrated_layers(model, batches)
    qmodel = ti.lower_x86(copy.deepcopy(model), layers, batches[0], None)
    assert qmodel.a is qmodel.b and isinstance(qmodel.a, ti.QuantizedLinear)
    x = torch.randn(3, 6)
    assert sqnr(model(x).detach(), qmodel(x)) > 25


def test_view_on_channels_last_integer_tensor_falls_back_to_float() -> None:
    """``.view`` of a channels-last int8 conv output (no kernel) runs in float instead of failing."""
    torch.manual_seed(0)

    class ViewNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.fc(y.view(y.size(0), -1))

    model = ViewNet().eval()
    batches = [(torch.randn(2, 3, 6, 6),) for _ in range(3)]
    qmodel = ti.lower_x86(copy.deepcopy(model), calibrated_layers(model, batches), batches[0], None)
    x = torch.randn(2, 3, 6, 6)
    assert sqnr(model(x).detach(), qmodel(x)) > 25


def test_layer_fed_by_float_code_without_input_qparams_stays_float() -> None:
    """A layer that would need to quantize a float input but has no input qparams is left float."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    batches = [(torch.randn(3, 4),)]
    layers = calibrated_layers(model, batches)
    del layers["0"].qparams["input"]
    qmodel = ti.lower_x86(copy.deepcopy(model), layers, batches[0], None)
    assert type(qmodel[0]) is nn.Linear and isinstance(qmodel[1], ti.QuantizedLinear)
    assert "0 stays float: its input comes from float code" in ti.describe_lowering(qmodel)
    assert not qmodel(torch.randn(3, 4)).is_quantized


def test_skipped_layer_between_int8_layers_gets_float_and_keeps_hooks() -> None:
    """A layer left out of the plan receives a float tensor; a swapped layer keeps the user's hooks."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)
    ).eval()
    seen: list[tuple[str, bool]] = []
    model[0].register_forward_hook(lambda m, a, o: seen.append(("hook", o.is_quantized)))
    batches = [(torch.rand(2, 3, 6, 6),) for _ in range(3)]
    layers = calibrated_layers(model, batches)
    del layers["2"]  # as if a rule skipped it
    qmodel = ti.lower_x86(copy.deepcopy(model), layers, batches[0], None)
    qmodel[2].register_forward_pre_hook(lambda m, a: seen.append(("skipped", a[0].is_quantized)))
    seen.clear()
    out = qmodel(torch.rand(2, 3, 6, 6))
    assert isinstance(qmodel[0], ti.QuantizedConvReLU2d) and type(qmodel[2]) is nn.Conv2d
    assert isinstance(qmodel[3], ti.QuantizedConv2d)
    assert seen == [("hook", True), ("skipped", False)]
    assert not out.is_quantized


def test_relu_kept_for_a_second_call_runs_on_integers() -> None:
    """A ReLU used twice (after a fused conv and after +=) stays an nn.ReLU and runs on int8 tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Block(4)).eval()
    batches = [(torch.rand(4, 3, 6, 6),) for _ in range(3)]
    qmodel = ti.lower_x86(copy.deepcopy(model), calibrated_layers(model, batches), batches[0], None)
    relu = qmodel[2].relu
    assert isinstance(relu, nn.ReLU) and repr(relu) == "ReLU(inplace=True)"
    seen: list[bool] = []
    relu.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_quantized))
    x = torch.rand(4, 3, 6, 6)
    assert sqnr(model(x), qmodel(x)) > 25
    assert seen == [True, True]


def test_non_cpu_model_is_refused_with_fix() -> None:
    """Lowering a model on another device says to move it to the CPU or use the fake backend."""
    model = nn.Sequential(nn.Linear(2, 2)).to("meta")
    with pytest.raises(UnsupportedModuleError, match=r"model\.cpu\(\)\), or use backend 'fake'"):
        ti.lower_x86(model, {}, (torch.randn(1, 2),), None)


@pytest.mark.skipif(
    "qnnpack" not in torch.backends.quantized.supported_engines,
    reason="torch built without qnnpack",
)
def test_qnnpack_lowering_runs_and_restores_the_engine() -> None:
    """qnnpack lowering packs weights for qnnpack and leaves torch's global engine as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).eval()
    batches = [(torch.rand(8, 3, 6, 6),) for _ in range(4)]
    before = torch.backends.quantized.engine
    qmodel = ti.lower_qnnpack(
        copy.deepcopy(model), calibrated_layers(model, batches), batches[0], None
    )
    assert torch.backends.quantized.engine == before
    x = torch.rand(2, 3, 6, 6)
    assert sqnr(model(x).detach(), qmodel(x)) > 25


def test_packs_declare_integer_backends_and_map_layers_for_them() -> None:
    """x86 and qnnpack are integer 8-bit backends; the pack maps layers for both (no 3-d conv on qnnpack)."""
    from qswap.registry import Registry, registry_data_dir

    reg = Registry("int8-test")
    reg.load_pack(registry_data_dir() / "backends.yaml")
    reg.load_pack(registry_data_dir() / "torch_int8.yaml")
    for name, lower in (("x86", ti.lower_x86), ("qnnpack", ti.lower_qnnpack)):
        backend = reg.backend(name)
        assert (
            backend.integer and backend.weight_bits == (8, 8) and backend.activation_bits == (8, 8)
        )
        assert backend.lower is lower
        assert reg.find_mapping(nn.Conv2d, name).counterpart is ti.QuantizedConv2d  # type: ignore[union-attr]
        assert reg.find_mapping(nn.MaxPool2d, name).counterpart is ti.IntegerPassthrough  # type: ignore[union-attr]
    assert reg.find_mapping(nn.Conv3d, "x86").counterpart is ti.QuantizedConv3d  # type: ignore[union-attr]
    assert reg.find_mapping(nn.Conv3d, "qnnpack") is None


def test_fresh_process_lowering_and_forward_emit_no_warning() -> None:
    """In a new process with warnings as errors, lowering and running an int8 model warns nothing."""
    code = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("error")
        import torch
        from torch import nn
        from qswap.convert import quantize
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)).eval()
        batches = [torch.rand(2, 3, 6, 6)]
        q = quantize(model, "x86_int8", calib_data=batches, example_inputs=(batches[0],), progress=False)
        print(type(q[0]).__name__, q(torch.rand(2, 3, 6, 6)).dtype)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "QuantizedConvReLU2d torch.float32"
    assert result.stderr == ""


# --------------------------------------------------------------------------- end to end

forum_models = pytest.importorskip("forum_models")


def _fingerprint(model: nn.Module) -> tuple[Any, ...]:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    types = tuple(type(m).__name__ for m in model.modules())
    return types, hooks, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=["vgg", "resnet18"])
def forum_int8(request: pytest.FixtureRequest) -> tuple[str, nn.Module, nn.Module]:
    from qswap.convert import quantize

    torch.manual_seed(0)
    model = getattr(forum_models, request.param)(width=0.25).eval()
    before = _fingerprint(model)
    batches = [torch.rand(8, 3, 32, 32) for _ in range(3)]
    qmodel = quantize(
        model, "x86_int8", calib_data=batches, example_inputs=(batches[0][:1],), progress=False
    )
    after = _fingerprint(model)
    assert before[:2] == after[:2]
    assert all(torch.equal(before[2][k], after[2][k]) for k in before[2])
    return request.param, model, qmodel


def test_forum_models_run_in_int8_with_float_output(
    forum_int8: tuple[str, nn.Module, nn.Module],
) -> None:
    """The unedited forum models quantize in one call; int8 logits are float and close to float (> 25 dB)."""
    _, model, qmodel = forum_int8
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = qmodel(x)
    assert isinstance(out, torch.Tensor) and not out.is_quantized and out.dtype == torch.float32
    assert out.shape == ref.shape == (16, 10)
    assert sqnr(ref, out) > 25


def test_forum_models_are_made_of_int8_kernels(
    forum_int8: tuple[str, nn.Module, nn.Module],
) -> None:
    """Every conv and linear runs as a torch.ao quantized module; ResNet's 8 skips run as add_relu."""
    name, model, qmodel = forum_int8
    quantized = [m for m in qmodel.modules() if isinstance(m, nnq.Conv2d | nnq.Linear)]
    float_weighted = [
        m for m in qmodel.modules() if type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    ]
    assert float_weighted == []
    assert len(quantized) == {"vgg": 10, "resnet18": 21}[name]
    adds = ti.describe_lowering(qmodel).count("quantized.add_relu")
    assert adds == {"vgg": 0, "resnet18": 8}[name]
    assert type(model).__name__ == type(qmodel).__name__


def test_forum_model_int8_forward_is_quiet_and_batch_independent(
    forum_int8: tuple[str, nn.Module, nn.Module],
) -> None:
    """Batch 1 and batch 4 give the same per-image logits, and the forward emits no warning."""
    _, _, qmodel = forum_int8
    x = torch.rand(4, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = qmodel(x)
        single = torch.cat([qmodel(x[i : i + 1]) for i in range(4)])
    assert torch.allclose(full, single, atol=1e-6)


def test_in_place_add_as_a_statement_updates_the_tensor() -> None:
    """``out.add_(x)`` used as a statement (its result ignored) still changes ``out``, in int8 and float."""
    torch.manual_seed(0)

    class Statement(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.c = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.a(x)
            out.add_(self.b(x))  # planned as quantized add
            out = self.relu(out)
            out.mul_(2.0)  # no int8 kernel: runs in float, still in place
            return self.c(out)

    model = Statement().eval()
    batches = [(torch.rand(4, 3, 6, 6),) for _ in range(3)]
    qmodel = ti.lower_x86(copy.deepcopy(model), calibrated_layers(model, batches), batches[0], None)
    assert "quantized.add" in ti.describe_lowering(qmodel)
    x = torch.rand(4, 3, 6, 6)
    assert sqnr(model(x), qmodel(x)) > 25


@pytest.mark.parametrize(
    ("counterpart", "float_module", "x"),
    [
        (ti.QuantizedLinear, nn.Linear(12, 5), torch.randn(4, 12)),
        (ti.QuantizedLinearReLU, nn.Linear(12, 5, bias=False), torch.randn(4, 12)),
        (ti.QuantizedConv2d, nn.Conv2d(6, 8, 3, padding=1, groups=2), torch.randn(2, 6, 5, 5)),
        (ti.QuantizedConvReLU1d, nn.Conv1d(3, 4, 3, stride=2), torch.randn(2, 3, 9)),
        (
            ti.QuantizedConv3d,
            nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1), dilation=(1, 2, 1)),
            torch.randn(1, 2, 3, 6, 6),
        ),
        (
            ti.QuantizedConvReLU2d,
            nn.Conv2d(2, 4, 3, padding=2, padding_mode="reflect", bias=False),
            torch.randn(1, 2, 6, 6),
        ),
    ],
    ids=["linear", "linear-relu-nobias", "conv2d-groups", "conv-relu1d", "conv3d", "reflect"],
)
def test_counterparts_match_torch_ao_constructors(
    counterpart: type, float_module: nn.Module, x: torch.Tensor
) -> None:
    """Built with the weight packed once, a counterpart equals torch.ao's own construction.

    Same attributes, same state_dict, same integer outputs as ``cls(sizes...)`` followed by
    ``set_weight_bias``: the path torch.ao documents.
    """
    torch.manual_seed(0)
    spec = make_spec(float_module, counterpart, x)
    fast = counterpart.from_float(float_module, spec)
    ref_args: tuple[Any, ...]
    inner: Any = float_module
    if isinstance(inner, nn.Linear):
        ref_args = (inner.in_features, inner.out_features, inner.bias is not None, torch.qint8)
    else:
        ref_args = (
            inner.in_channels, inner.out_channels, inner.kernel_size, inner.stride,
            inner.padding, inner.dilation, inner.groups, inner.bias is not None,
            inner.padding_mode,
        )  # fmt: skip
    with ti.torch_ao_quiet():
        ref: Any = counterpart(*ref_args)
        ref.set_weight_bias(*fast._weight_bias())
    ref.scale, ref.zero_point = fast.scale, fast.zero_point
    ref.input_scale, ref.input_zero_point = fast.input_scale, fast.input_zero_point
    assert sorted(vars(fast)) == sorted(vars(ref))
    assert {k: v for k, v in vars(fast).items() if not k.startswith("_")} == {
        k: v for k, v in vars(ref).items() if not k.startswith("_")
    }
    got, want = fast.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert _same(got[key], want[key]), key
    with torch.no_grad():
        assert torch.equal(fast(x).int_repr(), ref(x).int_repr())
    assert repr(fast) == repr(ref)


def _same(a: Any, b: Any) -> bool:
    """Equal values, tensors (quantized ones by integer values and qparams) inside tuples."""
    if isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(b, torch.Tensor):
        if not isinstance(a, torch.Tensor) or a.is_quantized != b.is_quantized:
            return False
        if b.is_quantized:
            return torch.equal(a.int_repr(), b.int_repr()) and torch.equal(
                a.dequantize(), b.dequantize()
            )
        return torch.equal(a, b)
    return bool(a == b)


def test_pooling_and_flatten_on_int8_skip_the_dispatch_mode_and_keep_their_results() -> None:
    """Pools/flatten that only see int8 run as int8-only variants; same name, same outputs.

    A pool that sees the float input stays the plain torch module.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.MaxPool2d(2),  # float input: stays as it is
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    batches = [(torch.rand(4, 3, 8, 8),) for _ in range(2)]
    qmodel = ti.lower_x86(copy.deepcopy(model), calibrated_layers(model, batches), batches[0], None)
    assert type(qmodel[0]) is nn.MaxPool2d
    for i, base in ((3, nn.MaxPool2d), (4, nn.AdaptiveAvgPool2d), (5, nn.Flatten)):
        assert isinstance(qmodel[i], ti.IntegerNative) and isinstance(qmodel[i], base)
        assert repr(qmodel[i]) == repr(model[i])
    plain = copy.deepcopy(qmodel)
    for i in (3, 4, 5):
        plain[i] = ti.float_native(plain[i])
        assert type(plain[i]) is type(model[i])
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(qmodel(x), plain(x))


class _AttentionLike(nn.Module):
    """Model code that reads its projections' dtype and keeps them, as a KV cache does."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)
        self.cache: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.q(x), self.k(x).transpose(-1, -2)
        assert q.dtype == torch.float32, q.dtype  # the model's own code sees float tensors
        self.cache.append(torch.cat([torch.tensor([], dtype=k.dtype), k.flatten()]))
        return self.out(torch.softmax(q @ k, dim=-1) @ x)


def test_int8_outputs_that_only_model_code_reads_are_float() -> None:
    """A layer whose output only functional model code consumes hands on a float tensor."""
    torch.manual_seed(0)
    model = _AttentionLike().eval()
    x = torch.randn(2, 4, 8)
    q = qswap.quantize(model, "x86_int8", calib_data=[x], example_inputs=(x,), progress=False)
    assert isinstance(q.q, ti.QuantizedLinear) and isinstance(q.k, ti.QuantizedLinear)
    q.cache.clear()
    with torch.no_grad():
        out = q(x)
    assert q.cache and all(t.dtype == torch.float32 for t in q.cache)
    ref = model(x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


class _EncoderDecoder(nn.Module):
    """An encoder with an int8 skip add, called on its own as generate() calls encoders."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Block(4))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def test_a_container_called_on_its_own_runs_int8_and_returns_float() -> None:
    """Calling the int8 model's encoder directly runs its integer add and returns a float tensor."""
    torch.manual_seed(0)
    model = _EncoderDecoder().eval()
    x = torch.rand(2, 3, 8, 8)
    q = qswap.quantize(model, INT8_MINMAX, calib_data=[x], example_inputs=(x,), progress=False)
    with torch.no_grad():
        enc = q.encoder(x)
        full = q(x)
    assert not enc.is_quantized and enc.dtype == torch.float32
    assert (enc - model.encoder(x)).abs().max() < 0.1 * model.encoder(x).abs().max()
    assert not full.is_quantized
    assert "quantized.add" in ti.describe_lowering(q)


def test_int8_layers_read_weight_and_bias_as_the_float_layer() -> None:
    """.weight/.bias read float values (dtype, shape) for model code; .weight() is torch.ao's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Flatten(), nn.Linear(64, 2)).eval()
    x = torch.rand(2, 3, 6, 6)
    q = qswap.quantize(model, INT8_MINMAX, calib_data=[x], example_inputs=(x,), progress=False)
    conv, fc = q[0], q[2]
    assert conv.weight.dtype == torch.float32 and conv.weight.shape == model[0].weight.shape
    assert conv.weight().dtype == torch.qint8 and conv.bias is None
    assert (conv.weight - model[0].weight).abs().max() < 0.02
    assert fc.bias is not None and fc.bias.shape == (2,)  # bias-corrected float values
    assert (fc.bias - model[2].bias).abs().max() < 0.01
    assert type(conv.weight * 2) is torch.Tensor  # arithmetic gives plain tensors
    assert (fc.in_features, fc.out_features) == (64, 2)


class TransposedWeight(nn.Module):
    """x @ weight + bias with weight stored (in, out), as transformers' Conv1D."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], -1
        )


@pytest.mark.parametrize("preset", ["x86_int8", "x86_dynamic_int8"])
def test_in_out_weights_run_int8_per_output_channel(preset: str) -> None:
    """An (in, out) weight runs as int8 Linear with one scale per output feature, as fake does."""
    reg = qswap.Registry("t", parent=qswap.default_registry())
    reg.register_mapping(
        TransposedWeight, ti.QuantizedTransposedLinear, backend="x86", slots={"weight": 1}
    )
    reg.register_mapping(TransposedWeight, qswap.backends.fake.FakeQuantized, slots={"weight": 1})
    torch.manual_seed(0)
    model = nn.Sequential(TransposedWeight(16, 12), nn.GELU(), TransposedWeight(12, 4)).eval()
    x = torch.randn(3, 5, 16)
    q = qswap.quantize(
        model, preset, calib_data=[x], example_inputs=(x,), registry=reg, progress=False
    )
    scales = q[0].weight().q_per_channel_scales()
    assert scales.numel() == 12
    ref = model(x)
    with torch.no_grad():
        assert (q(x) - ref).abs().max() < 0.05 * ref.abs().max()


def test_what_int8_kernels_cannot_run_is_a_fallback_in_the_plan() -> None:
    """Per-group or axis-1 weights on x86 fall back to fake in the plan, with the reason."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    grouped = qswap.plan(
        model, {"extends": ["x86_int8"], "weight": {"granularity": "per_group", "group_size": 4}}
    )
    assert grouped["0"].backend == "fake" and grouped["0"].fallback
    assert "per-group weights (groups of 4): torch's int8 kernels take" in grouped["0"].reason
    axis1 = qswap.plan(
        model,
        {"extends": ["x86_int8"], "rules": [{"match": {"name": "2"}, "weight": {"axis": 1}}]},
    )
    assert axis1["0"].backend == "x86" and axis1["2"].backend == "fake"
    assert "per-channel weights on axis 1" in axis1["2"].reason
    weight_only = qswap.plan(model, {"extends": ["x86_int8"], "mode": "weight_only"})
    assert "they have no weight-only form" in weight_only["2"].reason


def test_layernorm_runs_int8_between_int8_layers() -> None:
    """nn.LayerNorm lowers to quantized::layer_norm on x86, within a step of its reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    x = torch.randn(8, 5, 16)
    q = qswap.quantize(model, INT8_MINMAX, calib_data=[x], example_inputs=(x,), progress=False)
    assert isinstance(q[1], ti.QuantizedLayerNorm)
    ref = model(x)
    with torch.no_grad():
        assert (q(x) - ref).abs().max() < 0.05 * ref.abs().max()
