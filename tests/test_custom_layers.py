"""Custom layers three ways: generic slots, a registered counterpart, a custom fusion pattern."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from custom_layer import Int8TransposedLinear, TransposedLinear
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations as cls_of

import qswap
from qswap.exceptions import PlanError, RegistrationError
from qswap.registry import Registry

STATIC = {"version": 1, "backend": "fake", "mode": "static", "fusion": "off"}
WEIGHT_ONLY = {"version": 1, "backend": "fake", "mode": "weight_only", "fusion": "off"}


class TwoKernels(nn.Module):
    """A layer with several float tensors under its own names, one int buffer, functional ops."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kernel = nn.Parameter(torch.randn(6, 4) * torch.linspace(0.1, 2.0, 4))
        self.mix = nn.Parameter(torch.randn(4, 4))
        self.offset = nn.Parameter(torch.randn(4))
        self.register_buffer("steps", torch.tensor(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.kernel) @ self.mix + self.offset


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(TwoKernels(), nn.ReLU(), TransposedLinear(4, 3))


def _data() -> list[torch.Tensor]:
    return [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _cfg(base: dict[str, Any], *rules: dict[str, Any]) -> dict[str, Any]:
    return {**base, "rules": list(rules)}


def _on_grid(values: torch.Tensor, scale: torch.Tensor, axis: int) -> bool:
    shape = [1] * values.dim()
    shape[axis] = -1
    steps = values / scale.reshape(shape)
    return bool(torch.allclose(steps, steps.round(), atol=1e-3))


# --------------------------------------------------------------------------- 1. zero registration


def test_unregistered_layer_gets_every_float_parameter_as_a_named_slot() -> None:
    """A layer nobody registered is wrapped: each float matrix is a slot; the 1-d offset (a bias)
    and the int buffer are not, unless a rule names the offset."""
    plan = qswap.plan(_net(), STATIC)
    decision = plan["0"]
    assert decision.kind == "wrap"
    assert decision.layer is not None
    assert sorted(decision.layer.param_specs()) == ["kernel", "mix"]
    assert "offset stay float" in decision.reason
    named = qswap.plan(
        _net(), _cfg(STATIC, {"match": {"type": "TwoKernels"}, "slots": {"offset": {}}})
    )
    assert named["0"].layer is not None
    assert sorted(named["0"].layer.param_specs()) == ["kernel", "mix", "offset"]
    assert plan.uncovered == ["0", "2"]
    assert "class QuantizedTwoKernels" in plan.uncovered_report()


def test_generic_wrap_fake_quantizes_each_slot_on_its_own_grid() -> None:
    """After quantize, reading each custom parameter gives values on its calibrated grid."""
    model = _net()
    q = qswap.quantize(model, _cfg(STATIC), calib_data=_data(), progress=False)
    layer = q._qswap.layers["0"]
    for slot in ("kernel", "mix"):
        qp = layer.qparams[slot]
        assert qp.scale.shape == (getattr(model[0], slot).shape[0],)
        assert _on_grid(getattr(q[0], slot), qp.scale, 0)
        assert not torch.equal(getattr(q[0], slot), getattr(model[0], slot))
    with torch.no_grad():
        out, ref = q(_data()[0]), model(_data()[0])
    assert 0 < float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())


@pytest.mark.parametrize(("axis", "channels"), [(1, 4), (0, 6)])
def test_a_rule_sets_the_channel_axis_of_one_slot(axis: int, channels: int) -> None:
    """slots: {kernel: {axis: N}} gives the kernel one scale per index of axis N, and only the kernel."""
    cfg = _cfg(
        STATIC,
        {
            "match": {"type": "TwoKernels"},
            "slots": {"kernel": {"granularity": "per_channel", "axis": axis, "bits": 4}},
        },
    )
    q = qswap.quantize(_net(), cfg, calib_data=_data(), progress=False)
    layer = q._qswap.layers["0"]
    qp = layer.qparams["kernel"]
    assert (qp.axis, qp.scale.shape, qp.quant_max) == (axis, (channels,), 7)
    assert _on_grid(q[0].kernel, qp.scale, axis)
    assert layer.qparams["mix"].axis == 0 and layer.qparams["mix"].quant_max == 127


def test_transposed_weight_per_column_axis_beats_per_row() -> None:
    """For a kernel stored (in, out), 4-bit scales per output column (axis 1) keep columns apart."""
    model = nn.Sequential(TransposedLinear(8, 4))
    with torch.no_grad():
        model[0].kernel.mul_(torch.tensor([0.01, 0.1, 1.0, 10.0]))
    errors = {}
    for axis in (0, 1):
        slots = {"kernel": {"granularity": "per_channel", "axis": axis, "bits": 4}}
        cfg = _cfg(WEIGHT_ONLY, {"match": {"type": "TransposedLinear"}, "slots": slots})
        q = qswap.quantize(model, cfg, calib_data=[torch.randn(4, 8)], progress=False)
        with torch.no_grad():
            relative = (q[0].kernel - model[0].kernel).abs() / model[0].kernel.abs().amax(0)
        errors[axis] = float(relative[:, 0].max())
    assert errors[1] < 0.1 < errors[0]


def test_slot_the_module_does_not_have_lists_the_slots_it_has() -> None:
    """A rule naming a missing slot fails with the slots the matched module does have."""
    cfg = _cfg(STATIC, {"match": {"type": "TwoKernels"}, "slots": {"kernal": {"bits": 4}}})
    with pytest.raises(PlanError) as info:
        qswap.plan(_net(), cfg)
    assert str(info.value) == (
        "rules[0].slots names 'kernal', but the module(s) it matches (0) have no such slot; "
        "their slots are: input, kernel, mix, offset, output"
    )


# --------------------------------------------------------------------------- 2. a mapping


def _mapped_registry() -> Registry:
    reg = Registry("mapped", parent=qswap.default_registry())
    reg.register_mapping(TransposedLinear, Int8TransposedLinear, slots={"kernel": 1})
    return reg


def test_registered_counterpart_replaces_the_layer_with_its_from_float_result() -> None:
    """A mapping swaps in the counterpart, whose from_float got per-column qparams from the slot axis."""
    model = _net()
    q = qswap.quantize(
        model, WEIGHT_ONLY, calib_data=_data(), registry=_mapped_registry(), progress=False
    )
    assert type(q[2]) is Int8TransposedLinear
    assert q[2].q_kernel.dtype == torch.int8
    assert q[2].kernel_scale.shape == (3,)
    expected = (model[2].kernel.abs().amax(0) / 127.5).float()
    assert torch.allclose(q[2].kernel_scale, expected)
    assert cls_of(q[0]) is TwoKernels  # still wrapped generically


def test_mapping_from_a_yaml_pack_works_like_a_python_registration(tmp_path: Path) -> None:
    """One line in a registry pack maps the layer to its counterpart, slots included."""
    pack = tmp_path / "pack.yaml"
    pack.write_text(
        "version: 1\nname: mine\nbackend: fake\nmappings:\n"
        "  - {module: custom_layer.TransposedLinear, "
        "counterpart: custom_layer.Int8TransposedLinear, slots: {kernel: 1}}\n"
    )
    reg = Registry("pack", parent=qswap.default_registry())
    reg.load_pack(pack)
    q = qswap.quantize(_net(), WEIGHT_ONLY, calib_data=_data(), registry=reg, progress=False)
    assert type(q[2]) is Int8TransposedLinear and q[2].kernel_scale.shape == (3,)


def test_counterpart_without_from_float_is_refused_at_registration() -> None:
    """Registering a counterpart that lacks from_float says what to add."""

    class NoFromFloat(nn.Module):
        pass

    reg = Registry("bad")
    with pytest.raises(RegistrationError) as info:
        reg.register_mapping(TransposedLinear, NoFromFloat)
    message = str(info.value)
    assert re.match(
        r"test_custom_layers\.test_counterpart_without_from_float_is_refused_at_registration"
        r"\.<locals>\.NoFromFloat cannot be registered as the counterpart of "
        r"custom_layer\.TransposedLinear \(at .*test_custom_layers\.py:\d+\): it has no "
        r"from_float\(module, spec\); add\n    @classmethod\n    def from_float\(cls, module, "
        r"spec\) -> torch\.nn\.Module: \.\.\.\nto NoFromFloat$",
        message,
    ), message


class Base(nn.Module):
    """A registered custom layer."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class KeepsForward(Base):
    """A subclass that only changes construction."""


class Doubles(Base):
    """A subclass that computes something else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class QBase(nn.Module):
    """Counterpart of Base: records that it was used."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    @classmethod
    def from_float(cls, module: nn.Module, spec: Any) -> QBase:
        return cls(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_subclass_overriding_forward_is_reported_not_treated_as_its_parent() -> None:
    """With subclasses=True, a subclass keeping forward gets the parent's counterpart; one
    overriding forward is wrapped generically, listed as uncovered, and keeps computing its own."""
    reg = Registry("sub", parent=qswap.default_registry())
    reg.register_mapping(Base, QBase, subclasses=True)
    torch.manual_seed(0)
    model = nn.Sequential(KeepsForward(), Doubles())
    plan = qswap.plan(model, WEIGHT_ONLY, registry=reg)
    assert plan["0"].kind == "quantize" and plan["0"].counterpart is QBase
    assert plan["1"].kind == "wrap"
    assert "overrides forward: not treated as Base" in plan["1"].reason
    assert plan.uncovered == ["1"]
    assert "refused: base" in reg.explain(Doubles, "fake")
    q = qswap.quantize(model, WEIGHT_ONLY, calib_data=[torch.randn(2, 4)], registry=reg)
    assert type(q[0]) is QBase and cls_of(q[1]) is Doubles
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = 2 * (q[0](x) @ model[1].weight)
        got = q(x)
    assert torch.allclose(got, expected, atol=0.05 * float(expected.abs().max()))


# --------------------------------------------------------------------------- 3. fusion patterns


class MyConv(nn.Module):
    """A convolution with its own parameter names."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.3)
        self.shift = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.kernel, self.shift, padding=1)


class MyAct(nn.Module):
    """A custom activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.leaky_relu(x, 0.1)


class MyConvBnAct(MyConv):
    """What the custom fuser makes: BN folded into the kernel, then the activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.leaky_relu(super().forward(x), 0.1)


def fuse_my_conv_bn_act(conv: MyConv, bn: nn.BatchNorm2d, act: MyAct) -> nn.Module:
    """Fold ``bn`` (eval statistics) into a copy of ``conv`` and add the activation."""
    fused = MyConvBnAct(conv.kernel.shape[1], conv.kernel.shape[0])
    with torch.no_grad():
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused.kernel.copy_(conv.kernel * s.reshape(-1, 1, 1, 1))
        fused.shift.copy_((conv.shift - bn.running_mean) * s + bn.bias)
    return fused


class ConvNet(nn.Module):
    """MyConv -> BN -> MyAct twice, written as attributes (no nn.Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1, self.a1 = MyConv(3, 4), nn.BatchNorm2d(4), MyAct()
        self.c2, self.b2, self.a2 = MyConv(4, 4), nn.BatchNorm2d(4), MyAct()
        for bn in (self.b1, self.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a2(self.b2(self.c2(self.a1(self.b1(self.c1(x))))))


def test_custom_fusion_pattern_is_found_by_the_trace_and_quantized_as_one() -> None:
    """(MyConv, BatchNorm2d, MyAct) fuse by dataflow, no names given, and the result stays close."""
    reg = Registry("fusion", parent=qswap.default_registry())
    reg.register_fusion((MyConv, nn.BatchNorm2d, MyAct), fuse_my_conv_bn_act)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    plan = qswap.plan(model, {**STATIC, "fusion": "auto"}, example_inputs=(x,), registry=reg)
    assert plan.groups == [("c1", "b1", "a1"), ("c2", "b2", "a2")]
    assert plan["c1"].kind == "wrap" and plan["b1"].kind == "fuse"
    q = qswap.quantize(
        model, {**STATIC, "fusion": "auto"}, calib_data=[x], example_inputs=(x,), registry=reg
    )
    assert cls_of(q.c1) is MyConvBnAct and type(q.b1) is nn.Identity
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert torch.allclose(got, ref, atol=0.05 * float(ref.abs().max()))


def test_fuser_returning_a_non_module_names_the_pattern_and_the_fuser() -> None:
    """A fuser that returns something other than an nn.Module is reported with where it was registered."""
    reg = Registry("badfuser", parent=qswap.default_registry())

    def broken(conv: nn.Module, bn: nn.Module, act: nn.Module) -> Any:
        return "fused"

    reg.register_fusion((MyConv, nn.BatchNorm2d, MyAct), broken)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RegistrationError) as info:
        qswap.plan(
            ConvNet().eval(), {**STATIC, "fusion": "auto"}, example_inputs=(x,), registry=reg
        )
    assert re.fullmatch(
        r"fusion pattern \(MyConv, BatchNorm2d, MyAct\) registered at .*test_custom_layers\.py:\d+: "
        r"its fuser .*broken returned str, not a torch\.nn\.Module; make the fuser return the "
        r"fused module",
        str(info.value),
    ), str(info.value)
