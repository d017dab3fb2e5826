"""The plan: one pure walk deciding fuse / quantize / wrap / passthrough / skip per module, with reasons."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qswap
from qswap.config import QConfig
from qswap.plan import LayerSpec, Plan, plan

FAKE = "w8a8_minmax"


# --------------------------------------------------------------------------- models


class Mixer(nn.Module):
    """A custom layer no registry entry covers: its own parameter names, functional ops."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n, n))
        self.gain = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.kernel) * self.gain


class MyLinear(nn.Linear):
    """A Linear subclass that overrides forward: must never be treated as a Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Nested(nn.Module):
    """Nested containers, a ModuleList, a ModuleDict and a module shared at two paths."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2)])
        self.heads = nn.ModuleDict({"a": shared, "b": nn.Linear(4, 2)})
        self.again = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        x = self.heads["a"](x)
        x = self.again(x)
        return self.heads["b"](x)


def state(model: nn.Module) -> dict[str, Any]:
    """Everything a user would notice changing on a model."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "types": [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "training": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), dict(m._parameters).keys())
            for m in model.modules()
        ],
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["types"] == after["types"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), k


# --------------------------------------------------------------------------- decisions


def test_sequential_decisions_and_reasons() -> None:
    """Linear+ReLU in a Sequential fuse without example inputs; each decision says why."""
    p = plan(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), FAKE)
    assert {d.name: d.kind for d in p} == {
        "": "passthrough",
        "0": "quantize",
        "1": "fuse",
        "2": "quantize",
    }
    assert p["0"].reason == (
        "fused Linear + ReLU -> LinearReLU; counterpart FakeQuantized on backend 'fake'"
    )
    assert p["1"].reason == "fused into '0' (group 0: Linear + ReLU -> LinearReLU)"
    assert p.groups == [("0", "1")]
    layer = p.layers["0"]
    assert layer.module_type.__name__ == "LinearReLU"
    assert (layer.weight.bits, layer.weight.granularity, layer.weight.axis) == (8, "per_channel", 0)
    assert (layer.input.signed, layer.output.scheme) == (False, "affine")


def test_plan_is_pure() -> None:
    """plan (with a trace) leaves parameters, buffers, hooks, flags and types as they were."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    model[0].register_forward_hook(lambda m, a, o: None)
    before = state(model)
    plan(model, FAKE, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert_same(before, state(model))
    assert model.training


def test_table_is_aligned() -> None:
    """print(plan) is a table with one aligned row per module path."""
    text = str(plan(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), FAKE))
    lines = text.splitlines()
    assert lines[0].startswith("qswap plan for Sequential: backend 'fake', mode 'static'")
    header, _, *rows = lines[1:]
    assert header.split() == ["path", "type", "decision", "detail"]
    col = header.index("decision")
    assert [r[col:].split()[0] for r in rows] == ["passthrough", "quantize", "fuse", "quantize"]
    assert rows[0].startswith("(root)")


def test_rule_cascade_and_explain() -> None:
    """Later rules override earlier ones field by field; explain lists rules, registry, specs."""
    cfg = {
        "extends": [FAKE],
        "rules": [
            {"match": {"type": "Linear"}, "weight": {"bits": 4, "granularity": "per_tensor"}},
            {
                "match": {"name": "2"},
                "weight": {"bits": 6},
                "activation": {"observer": "histogram"},
            },
        ],
    }
    p = plan(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), cfg)
    first, last = p.layers["0"], p.layers["2"]
    assert (first.weight.bits, first.weight.granularity) == (4, "per_tensor")
    assert (last.weight.bits, last.weight.granularity) == (6, "per_tensor")
    assert last.input.observer.name == last.output.observer.name == "histogram"
    assert first.input.observer.name == "minmax"
    text = p.explain("2")
    assert text.splitlines()[0] == "2 (torch.nn.Linear): quantize"
    assert "    rules[0] {type='Linear'}: weight.{" in text
    assert "    rules[1] {name='2'}: weight.{bits=6}; activation.{observer=histogram}" in text
    assert "backend 'fake': matched exactly -> qswap.backends.fake.FakeQuantized" in text
    assert "    weight: int6 symmetric per_tensor observer=minmax quantizer=affine" in text
    assert "    input: uint8 affine per_tensor observer=histogram quantizer=affine" in text
    assert text.index("rules[0]") < text.index("rules[1]")


def test_default_axis_comes_from_the_mapping() -> None:
    """Per-channel weights use the mapping's channel axis (ConvTranspose: 1) unless a rule sets it."""
    model = nn.Sequential(nn.ConvTranspose2d(3, 5, 2), nn.Conv2d(5, 4, 1))
    assert plan(model, FAKE).layers["0"].weight.axis == 1
    assert plan(model, FAKE).layers["1"].weight.axis == 0
    cfg = {"extends": [FAKE], "rules": [{"match": {"name": "0"}, "weight": {"axis": 0}}]}
    assert plan(model, cfg).layers["0"].weight.axis == 0


def test_strict_rule_mismatch_is_an_error() -> None:
    """A rule that matches nothing raises ConfigError naming it and the nearest module names."""
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    model.add_module("classifier", nn.Linear(4, 2))
    cfg = {"rules": [{"match": {"name": "feature.*"}, "skip": True}]}
    with pytest.raises(qswap.ConfigError) as info:
        plan(model, cfg)
    assert str(info.value) == (
        "rules[0].match: no module of Sequential matches {name='feature.*'}; nearest module "
        "names: features, features.0, features.1. Fix the match, delete the rule, or set "
        "strict: false to only warn"
    )
    assert info.value.path == "rules[0].match"


def test_lenient_rule_mismatch_warns() -> None:
    """With strict: false the same mismatch is a UserWarning and the plan is made."""
    cfg = {"strict": False, "rules": [{"match": {"type": "Conv3d"}, "skip": True}]}
    with pytest.warns(
        UserWarning,
        match=r"rules\[0\]\.match: no module of Sequential matches "
        r"\{type='Conv3d'\}; nearest module types: Conv2d",
    ):
        p = plan(nn.Sequential(nn.Conv2d(3, 4, 3)), cfg)
    assert p["0"].kind == "quantize"


def test_skip_first_and_last_layers() -> None:
    """A rule can keep the first and last layers float; the plan names the rule."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    cfg = {"extends": [FAKE], "rules": [{"match": {"regex": "0|4"}, "skip": True}]}
    p = plan(model, cfg)
    assert [p[n].kind for n in ("0", "2", "4")] == ["skip", "quantize", "skip"]
    assert p["0"].reason == "rules[0] skips it (match {regex='0|4'}); stays float"
    assert set(p.layers) == {"2"}


def test_skip_covers_a_subtree() -> None:
    """Skipping a container keeps everything inside it float."""
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2))
    p = plan(model, {"rules": [{"match": {"name": "0"}, "skip": True}]})
    assert [p[n].kind for n in ("0", "0.0", "0.1", "1")] == ["skip", "skip", "skip", "quantize"]
    assert p["0.1"].reason == "inside '0', which rules[0] skips; stays float"


def test_nested_containers_and_shared_module() -> None:
    """ModuleList/ModuleDict children are planned; a shared module is decided once, at its first path."""
    p = plan(Nested(), {"fusion": "off"})
    kinds = {d.name: d.kind for d in p}
    assert kinds["blocks.0.0"] == kinds["blocks.1.0"] == kinds["heads.b"] == "quantize"
    assert kinds["blocks"] == kinds["heads"] == "passthrough"
    assert p["again"].shared_with == "heads.a"
    assert p["again"].reason == "same module object as 'heads.a' (decided once, there)"
    assert "again" not in p.layers and p.layers["heads.a"].aliases == ("again",)


def test_custom_layer_is_wrapped_and_reported() -> None:
    """A layer with its own float parameters and no mapping is wrapped; uncovered lists it with snippets."""
    model = nn.Sequential(Mixer(), nn.Linear(4, 2))
    p = plan(model, FAKE)
    assert p["0"].kind == "wrap"
    layer = p.layers["0"]
    assert layer.counterpart is None and layer.weight is None
    assert sorted(layer.slots) == ["kernel"]  # the 1-d gain stays float unless a rule names it
    assert "gain stay float (1-d; a rule's slots: can name them)" in p["0"].reason
    rule = {"match": {"type": "Mixer"}, "slots": {"gain": {"bits": 8}}}
    named = plan(model, {"extends": [FAKE], "rules": [rule]})
    assert sorted(named.layers["0"].slots) == ["gain", "kernel"]
    assert p.uncovered == ["0"]
    report = p.uncovered_report()
    assert (
        "1 module(s) of 1 type(s) hold float parameters but have no mapping for backend 'fake'"
        in report
    )
    assert '@reg.register_mapping(Mixer, backend="fake")' in report
    assert "def from_float(cls, module, spec)" in report
    assert (
        f"- {{module: {Mixer.__module__}.Mixer, counterpart: my_pkg.QuantizedMixer, backend: fake, "
        "slots: {kernel: 0, gain: 0}}"
    ) in report


def test_slot_rules_set_axis_and_refuse_unknown_slots() -> None:
    """slots: sets a named parameter's spec (axis 1 here); an unknown slot name lists the real ones."""
    cfg = {"extends": [FAKE], "rules": [{"match": {"name": "0"}, "slots": {"kernel": {"axis": 1}}}]}
    p = plan(nn.Sequential(Mixer()), cfg)
    assert p.layers["0"].slots["kernel"].axis == 1
    assert "gain" not in p.layers["0"].slots  # 1-d: float unless a rule names it
    bad = {"rules": [{"match": {"name": "0"}, "slots": {"kernal": {"bits": 4}}}]}
    with pytest.raises(
        qswap.PlanError,
        match=r"rules\[0\]\.slots names 'kernal', but the module\(s\) "
        r"it matches \(0\) have no such slot; their slots are: gain, input, kernel, output",
    ):
        plan(nn.Sequential(Mixer()), bad)


def test_subclass_overriding_forward_is_not_its_parent() -> None:
    """An unregistered Linear subclass that overrides forward is wrapped generically and reported."""
    p = plan(nn.Sequential(MyLinear(4, 4)), FAKE)
    assert p["0"].kind == "wrap"
    assert p.uncovered == ["0"]
    assert (
        "subclass of torch.nn.Linear that overrides forward: not treated as Linear" in p["0"].reason
    )


def test_backend_bit_limits_fall_back_to_fake() -> None:
    """4-bit weights on x86 fall back to fake-quant for that layer, and the plan says so."""
    cfg = {"extends": ["x86_int8"], "rules": [{"match": {"name": "2"}, "weight": {"bits": 4}}]}
    p = plan(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), cfg)
    assert p["0"].backend == "x86" and not p["0"].fallback
    assert p["2"].backend == "fake" and p["2"].fallback
    assert p["2"].reason == (
        "backend 'x86' runs 8..8-bit weights, weight asks bits=4; falls back to fake (FakeQuantized)"
    )


def test_integer_backend_plans_parameter_free_layers() -> None:
    """On x86 a ReLU gets input/output specs (no weight); on fake it is passthrough, not uncovered."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.ReLU())
    x86 = plan(model, "x86_int8")
    assert x86["2"].kind == "quantize"
    assert x86.layers["2"].weight is None and x86.layers["2"].input is not None
    fake = plan(model, FAKE)
    assert fake["2"].kind == "passthrough" and fake.uncovered == []


def test_fusion_off_and_explicit_groups() -> None:
    """fusion: off plans no group; an explicit group is checked and used."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert plan(model, {"fusion": "off"}).groups == []
    assert plan(model, {"fusion": [["0", "1"]]}).groups == [("0", "1")]
    with pytest.raises(qswap.PlanError, match=r"fusion\[0\] = \['0', '2'\]: "):
        plan(model, {"fusion": [["0", "2"]]})


def test_modes_shape_the_specs() -> None:
    """weight_only quantizes no activation; dynamic only inputs; x86 runs dynamic Linear only."""
    model = nn.Sequential(nn.Linear(4, 2))
    weight_only = plan(model, {"mode": "weight_only"}).layers["0"]
    assert (
        weight_only.input is None and weight_only.output is None and weight_only.weight is not None
    )
    dynamic = plan(model, {"mode": "dynamic"}).layers["0"]
    assert dynamic.input is not None and dynamic.output is None
    conv = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 1))
    on_x86 = plan(conv, {"extends": ["x86_int8"], "mode": "dynamic"})
    assert on_x86["0"].backend == "x86" and on_x86["0"].counterpart is not None
    assert on_x86["2"].backend == "fake" and on_x86["2"].fallback
    assert "torch's dynamic int8 kernels run Linear layers only" in on_x86["2"].reason
    float_fallback = plan(conv, "x86_dynamic_int8")["2"]
    assert float_fallback.kind == "skip" and float_fallback.reason.endswith(
        "stays float (fallback: float)"
    )


def test_unknown_module_name() -> None:
    """Looking up a path the model does not have suggests the nearest ones."""
    p = plan(nn.Sequential(nn.Linear(4, 2)), FAKE)
    with pytest.raises(qswap.PlanError, match=r"no module named '1' in the plan of Sequential"):
        p["1"]
    with pytest.raises(qswap.PlanError, match=r"did you mean '0'"):
        p.explain("0 ")


def test_plan_accepts_every_config_form(tmp_path: Any) -> None:
    """A QConfig, a dict, a preset name and a YAML path all give the same decisions."""
    path = tmp_path / "q.yaml"
    path.write_text("backend: fake\nrules:\n  - {match: {name: '1'}, skip: true}\n")
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    forms = [
        QConfig.model_validate({"rules": [{"match": {"name": "1"}, "skip": True}]}),
        {"rules": [{"match": {"name": "1"}, "skip": True}]},
        str(path),
        path,
    ]
    for form in forms:
        p = plan(model, form)
        assert isinstance(p, Plan) and [d.kind for d in p] == ["passthrough", "quantize", "skip"]


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.sampled_from(["linear", "relu", "tanh", "seq", "mixer"]), min_size=1, max_size=8)
)
def test_every_path_gets_exactly_one_decision(kinds: list[str]) -> None:
    """For any stack of layers, every module path has one decision and every Linear is quantized."""

    def make(kind: str) -> nn.Module:
        return {
            "linear": lambda: nn.Linear(4, 4),
            "relu": nn.ReLU,
            "tanh": nn.Tanh,
            "seq": lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh()),
            "mixer": Mixer,
        }[kind]()

    model = nn.Sequential(*(make(k) for k in kinds))
    p = plan(model, FAKE)
    paths = [n for n, _ in model.named_modules(remove_duplicate=False)]
    assert list(p.decisions) == paths
    for name, module in model.named_modules():
        d = p[name]
        if isinstance(module, nn.Linear):
            assert d.kind == "quantize" and isinstance(d.layer, LayerSpec)
        if isinstance(module, Mixer):
            assert d.kind == "wrap"
        if isinstance(module, nn.Tanh):
            assert d.kind == "passthrough"
    assert sum(p.counts().values()) == len(paths)
    assert repr(p).startswith("<Plan Sequential backend='fake' mode='static': ")


def test_norms_and_biases_keep_float_under_a_weight_spec() -> None:
    """w4_per_group reaches weights only: a LayerNorm's scale and shift stay float, with the reason."""
    model = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.Linear(256, 8))
    p = plan(model, "w4_per_group")
    assert p["1"].kind == "passthrough"
    assert "its parameters are 1-d (biases, norm scales), which stay float" in p["1"].reason
    assert p.layers["0"].weight is not None and p.layers["0"].weight.group_size == 128
    assert "bias" not in p.layers["0"].slots


def test_groups_that_cannot_split_a_tensor_fall_back_to_per_channel_in_the_plan() -> None:
    """A tensor per_group(128) cannot split is per-channel in the plan, which says so."""
    model = nn.Sequential(nn.Conv1d(80, 16, 3), nn.Flatten(), nn.Linear(16 * 6, 4))
    p = plan(model, "w4_per_group")
    conv = p.layers["0"].weight
    assert conv is not None and conv.granularity == "per_channel" and conv.group_size is None
    assert "weight: per_group(128) cannot split 240 element(s) per channel of 16" in p["0"].reason
    q = qswap.quantize(model, "w4_per_group", calib_data=None, progress=False)
    assert q._qswap.layers["0"].qparams["weight"].scale.shape == (16,)  # type: ignore[union-attr]


def test_an_axis_the_tensor_does_not_have_is_an_error_naming_the_layer() -> None:
    """weight.axis out of range fails in the plan, naming the layer, slot and shape."""
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(
        qswap.PlanError,
        match=r"layer '0': its weight of shape \[4, 4\] has no axis -100 for per_channel "
        r"\(a 2-d tensor takes -2 <= axis < 2\)",
    ):
        plan(model, {"extends": [FAKE], "weight": {"axis": -100}})
    rule = {"match": {"type": "Mixer"}, "slots": {"gain": {"axis": 1}}}
    with pytest.raises(qswap.PlanError, match=r"layer '0': its gain of shape \[4\] has no axis 1"):
        plan(nn.Sequential(Mixer()), {"extends": [FAKE], "rules": [rule]})
