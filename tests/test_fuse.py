"""Tests for qswap.fuse: fusers, fusion without names (trace / nn.Sequential), explicit groups."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import yaml
from forum_models import resnet18, vgg
from torch import nn

import qswap.fuse as qfuse
from qswap.exceptions import PlanError, RegistrationError, UnsupportedModuleError
from qswap.fuse import (
    FusionGroup,
    check_explicit_groups,
    explain_unfused,
    find_fusion_groups,
    fuse_bn_relu,
    fuse_conv_bn,
    fuse_conv_bn_relu,
    fuse_conv_relu,
    fuse_group,
    fuse_linear_bn,
    fuse_linear_bn_relu,
    fuse_linear_relu,
    fuse_model,
)
from qswap.registry import FusionPattern
from qswap.trace import trace

REPO = Path(__file__).resolve().parent.parent

# The same patterns as registry/torch_nn.yaml, built here so these tests do not depend on the
# default registry (whose other packs are tested elsewhere).
_SPECS: list[tuple[tuple[type, ...], Callable[..., nn.Module]]] = [
    ((nn.Conv1d, nn.BatchNorm1d), fuse_conv_bn),
    ((nn.Conv2d, nn.BatchNorm2d), fuse_conv_bn),
    ((nn.Conv3d, nn.BatchNorm3d), fuse_conv_bn),
    ((nn.Conv1d, nn.BatchNorm1d, nn.ReLU), fuse_conv_bn_relu),
    ((nn.Conv2d, nn.BatchNorm2d, nn.ReLU), fuse_conv_bn_relu),
    ((nn.Conv3d, nn.BatchNorm3d, nn.ReLU), fuse_conv_bn_relu),
    ((nn.Conv1d, nn.ReLU), fuse_conv_relu),
    ((nn.Conv2d, nn.ReLU), fuse_conv_relu),
    ((nn.Conv3d, nn.ReLU), fuse_conv_relu),
    ((nn.Linear, nn.BatchNorm1d), fuse_linear_bn),
    ((nn.Linear, nn.BatchNorm1d, nn.ReLU), fuse_linear_bn_relu),
    ((nn.Linear, nn.ReLU), fuse_linear_relu),
    ((nn.BatchNorm2d, nn.ReLU), fuse_bn_relu),
]
PATTERNS = [FusionPattern(types, fuser, f"test:{i}") for i, (types, fuser) in enumerate(_SPECS)]


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so folding is actually tested."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def _paths(groups: list[FusionGroup]) -> list[tuple[str, ...]]:
    return [g.paths for g in groups]


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- fusers

FUSER_CASES: list[
    tuple[Callable[..., nn.Module], Callable[[], list[nn.Module]], tuple[int, ...], str]
] = [
    (fuse_conv_bn, lambda: [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)], (2, 3, 8, 8), "Conv2d"),
    (
        fuse_conv_bn,
        lambda: [nn.Conv1d(3, 4, 3, bias=False), nn.BatchNorm1d(4)],
        (2, 3, 8),
        "Conv1d",
    ),
    (
        fuse_conv_bn,
        lambda: [nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)],
        (2, 3, 5, 5),
        "ConvTranspose2d",
    ),
    (
        fuse_conv_bn_relu,
        lambda: [nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), nn.ReLU(inplace=True)],
        (2, 3, 5, 5, 5),
        "ConvReLU3d",
    ),
    (fuse_conv_relu, lambda: [nn.Conv1d(3, 4, 3), nn.ReLU()], (2, 3, 8), "ConvReLU1d"),
    (fuse_linear_bn, lambda: [nn.Linear(5, 4), nn.BatchNorm1d(4)], (3, 5), "Linear"),
    (
        fuse_linear_bn_relu,
        lambda: [nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU()],
        (3, 5),
        "LinearReLU",
    ),
    (fuse_linear_relu, lambda: [nn.Linear(5, 4), nn.ReLU()], (3, 5), "LinearReLU"),
    (fuse_bn_relu, lambda: [nn.BatchNorm2d(3), nn.ReLU()], (2, 3, 4, 4), "BNReLU2d"),
]


@pytest.mark.parametrize(
    ("fuser", "build", "shape", "result"), FUSER_CASES, ids=lambda v: getattr(v, "__name__", None)
)
def test_fuser_matches_float_and_leaves_inputs_alone(
    fuser: Callable[..., nn.Module],
    build: Callable[[], list[nn.Module]],
    shape: tuple[int, ...],
    result: str,
) -> None:
    """Each built-in fuser equals the float chain in eval mode within 1e-5 and copies its inputs."""
    torch.manual_seed(0)
    modules = [_randomize_bn(m) for m in build()]
    before = [copy.deepcopy(m.state_dict()) for m in modules]
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = x.clone()
        for m in modules:
            expected = m(expected)
        fused = fuser(*modules)
        got = fused(x)
    assert type(fused).__name__ == result
    assert not fused.training
    assert torch.allclose(got, expected, atol=1e-5)
    for m, state in zip(modules, before, strict=False):
        assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert all(p is not q for p in fused.parameters() for m in modules for q in m.parameters())


@pytest.mark.parametrize(
    ("fuser", "build", "shape", "result"), FUSER_CASES, ids=lambda v: getattr(v, "__name__", None)
)
def test_fuse_model_gives_the_public_fusers_result_bit_for_bit(
    fuser: Callable[..., nn.Module],
    build: Callable[[], list[nn.Module]],
    shape: tuple[int, ...],
    result: str,
) -> None:
    """fuse_model (which reuses the model's own modules) yields exactly what the fuser returns."""
    torch.manual_seed(0)
    model = nn.Sequential(*[_randomize_bn(m) for m in build()])
    expected = fuser(*copy.deepcopy(list(model)))
    pattern = FusionPattern(tuple(type(m) for m in model), fuser, "test")
    fuse_model(model, find_fusion_groups(model, None, [pattern]))
    fused = model[0]
    assert type(fused).__name__ == result
    assert fused.training == expected.training
    mine, theirs = fused.state_dict(), expected.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(model(x), expected(x))


def test_fuse_model_leaves_a_refused_group_untouched() -> None:
    """A group the fuser refuses (a ReLU6 after conv-bn) raises and leaves model and hooks as they were."""
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6()))
    conv = model[0]
    seen: list[str] = []
    conv.register_forward_pre_hook(lambda m, a: seen.append("pre"))
    weight = conv.weight.detach().clone()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        before = model(x)
    pattern = FusionPattern((nn.Conv2d, nn.BatchNorm2d, nn.ReLU6), fuse_conv_bn_relu, "test")
    with pytest.raises(UnsupportedModuleError, match="expected nn.ReLU, got ReLU6"):
        fuse_model(model, find_fusion_groups(model, None, [pattern]))
    assert model[0] is conv and torch.equal(conv.weight, weight)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert seen == ["pre", "pre"]


class TiedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.relu = nn.ReLU()
        self.second = nn.Linear(3, 3)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.relu(self.first(x)))


def test_fuse_model_leaves_a_weight_tied_elsewhere_to_its_other_user() -> None:
    """Fusing a Linear whose weight another module shares gives the fused module its own copy."""
    model = TiedLinear().eval()
    x = torch.randn(2, 3)
    with torch.no_grad():
        expected = model(x)
    shared = model.second.weight
    groups = find_fusion_groups(model, trace(model, (x,)), PATTERNS)
    assert _paths(groups) == [("first", "relu")]
    fuse_model(model, groups)
    assert model.second.weight is shared
    assert model.first[0].weight is not shared
    assert torch.equal(model.first[0].weight, shared)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_fuser_keeps_training_flag() -> None:
    """A fuser folds eval statistics but returns a module in the first module's train mode."""
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    fused = fuse_conv_bn_relu(conv, bn, nn.ReLU())
    assert fused.training and conv.training and bn.training


def test_fusers_refuse_what_they_cannot_fuse() -> None:
    """Fusers say what is wrong with their inputs instead of failing inside torch."""
    with pytest.raises(UnsupportedModuleError) as info:
        fuse_conv_bn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert str(info.value) == (
        "cannot fold BatchNorm2d without running statistics (track_running_stats=False); "
        "leave it unfused"
    )
    with pytest.raises(UnsupportedModuleError) as info:
        fuse_conv_bn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5))
    assert str(info.value) == "cannot fold BatchNorm2d(5) into Conv2d with 4 output channels"
    with pytest.raises(UnsupportedModuleError) as info:
        fuse_bn_relu(nn.BatchNorm1d(4), nn.ReLU())
    assert str(info.value) == (
        "no fused ReLU container for BatchNorm1d; supported: "
        "Conv1d, Conv2d, Conv3d, Linear, BatchNorm2d, BatchNorm3d"
    )
    with pytest.raises(UnsupportedModuleError) as info:
        fuse_conv_relu(nn.Conv2d(3, 4, 3), nn.ReLU6())
    assert str(info.value) == "expected nn.ReLU, got ReLU6"


def test_pack_fusers_exist() -> None:
    """Every fuser that a registry pack names as qswap.fuse.<name> exists and is callable."""
    named = []
    for pack in sorted((REPO / "registry").glob("*.yaml")):
        for entry in yaml.safe_load(pack.read_text()).get("fusions", []):
            module, _, name = entry["fuser"].rpartition(".")
            if module == "qswap.fuse":
                named.append(name)
    assert named, "no pack references qswap.fuse"
    assert all(callable(getattr(qfuse, name)) and name in qfuse.__all__ for name in named)


# --------------------------------------------------------------------------- forum models


def test_vgg_traced_groups_and_fused_outputs(x: torch.Tensor) -> None:
    """VGG: the trace finds all 8 conv-bn-relu chains; the fused model equals the float one."""
    model = _randomize_bn(vgg(width=0.25))
    t = trace(model, (x,))
    groups = find_fusion_groups(model, t, PATTERNS)
    starts = [0, 4, 8, 11, 15, 18, 22, 25]
    assert _paths(groups) == [
        (f"features.{i}", f"features.{i + 1}", f"features.{i + 2}") for i in starts
    ]
    assert all(g.types == (nn.Conv2d, nn.BatchNorm2d, nn.ReLU) for g in groups)
    assert {g.origin for g in groups} == {"test:4"}
    assert groups[0].reason == (
        "traced: features.0 -> features.1 -> features.2 run back to back and each "
        "intermediate tensor has exactly one consumer"
    )
    fused = copy.deepcopy(model)
    fuse_model(fused, groups)
    assert [type(fused.features[i]).__name__ for i in range(3)] == [
        "ConvReLU2d",
        "Identity",
        "Identity",
    ]
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
    assert explain_unfused(model, t, PATTERNS, groups) == {
        "classifier.0": (
            "followed by classifier.1 (Linear); no registered pattern continues Linear with Linear"
        ),
        "classifier.1": "its output is only a model output",
    }


RESNET_GROUPS = [("conv1", "bn1", "relu")] + [
    group
    for layer in (1, 2, 3, 4)
    for block in (0, 1)
    for group in (
        (f"layer{layer}.{block}.conv1", f"layer{layer}.{block}.bn1", f"layer{layer}.{block}.relu"),
        (f"layer{layer}.{block}.conv2", f"layer{layer}.{block}.bn2"),
    )
    + (
        ((f"layer{layer}.0.downsample.0", f"layer{layer}.0.downsample.1"),)
        if block == 0 and layer > 1
        else ()
    )
]


def test_resnet_traced_groups_and_fused_outputs(x: torch.Tensor) -> None:
    """ResNet-18: conv-bn-relu fuses in the stem and blocks (the shared relu stays), conv2-bn2 too."""
    model = _randomize_bn(resnet18(width=0.25))
    t = trace(model, (x,))
    groups = find_fusion_groups(model, t, PATTERNS)
    assert _paths(groups) == RESNET_GROUPS
    assert len(groups) == 20
    block_groups = [g for g in groups if g.paths[-1].endswith(".relu") and g.paths[0] != "conv1"]
    assert len(block_groups) == 8
    assert all(g.kept == (g.paths[-1],) for g in block_groups)
    assert "layer1.0.relu also runs elsewhere" in block_groups[0].reason
    fused = copy.deepcopy(model)
    fuse_model(fused, groups)
    assert type(fused.conv1).__name__ == "ConvReLU2d"
    assert type(fused.relu) is nn.Identity
    assert type(fused.layer1[0].conv1).__name__ == "ConvReLU2d"
    assert type(fused.layer1[0].bn1) is nn.Identity
    assert type(fused.layer1[0].relu) is nn.ReLU  # still needed after `out += identity`
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
    reasons = explain_unfused(model, t, PATTERNS, groups)
    assert sorted(reasons) == ["fc"]


def test_sequential_adjacency_without_trace() -> None:
    """Without a trace, VGG's Sequential gives the same 8 groups; ResNet only its downsample pairs."""
    model = vgg(width=0.25).eval()
    groups = find_fusion_groups(model, None, PATTERNS)
    assert len(groups) == 8
    assert groups[0].paths == ("features.0", "features.1", "features.2")
    assert groups[0].reason == "no example inputs: consecutive children of nn.Sequential 'features'"
    resnet_groups = find_fusion_groups(resnet18(width=0.25), None, PATTERNS)
    assert _paths(resnet_groups) == [
        (f"layer{i}.0.downsample.0", f"layer{i}.0.downsample.1") for i in (2, 3, 4)
    ]


# --------------------------------------------------------------------------- matching rules


def test_longest_pattern_first_and_one_group_per_module() -> None:
    """conv-bn-relu beats conv-bn and bn-relu; among equals the first pattern claims the module."""
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    t = trace(model, (torch.randn(1, 3, 6, 6),))
    assert _paths(find_fusion_groups(model, t, PATTERNS)) == [("0", "1", "2")]
    bn_relu, conv_bn = PATTERNS[12], PATTERNS[1]
    assert _paths(find_fusion_groups(model, t, [bn_relu, conv_bn])) == [("1", "2")]
    assert _paths(find_fusion_groups(model, t, [conv_bn, bn_relu])) == [("0", "1")]
    assert _paths(find_fusion_groups(model, None, [bn_relu, conv_bn])) == [("1", "2")]


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv2(self.bn(self.conv(x))))


def test_module_called_twice_never_fuses() -> None:
    """A BatchNorm run after two different convs fuses with neither, and the reason says so."""
    model = _randomize_bn(CalledTwice())
    t = trace(model, (torch.randn(1, 3, 4, 4),))
    groups = find_fusion_groups(model, t, PATTERNS)
    assert groups == []
    assert explain_unfused(model, t, PATTERNS, groups) == {
        "conv": "followed by bn, which runs 2 times in the forward",
        "bn": "runs 2 times in the forward; a module that runs more than once cannot be fused",
        "conv2": "followed by bn, which runs 2 times in the forward",
    }


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.norm = nn.BatchNorm2d(3)
        self.bn_alias = self.norm  # one object, two paths, called once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_alias(self.conv(x))


def test_module_shared_at_two_paths_fuses_at_both() -> None:
    """A module called once under an alias fuses; every path naming it becomes the Identity."""
    model = _randomize_bn(Aliased())
    x = torch.randn(1, 3, 4, 4)
    groups = find_fusion_groups(model, trace(model, (x,)), PATTERNS)
    assert _paths(groups) == [("conv", "norm")]
    fused = copy.deepcopy(model)
    fuse_model(fused, groups)
    assert type(fused.norm) is nn.Identity and type(fused.bn_alias) is nn.Identity
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.relu(self.bn(y)) + y


def test_intermediate_with_another_consumer_does_not_fuse() -> None:
    """conv's output also feeds `+`, so conv-bn never fuses; bn-relu still does."""
    model = _randomize_bn(Residual())
    t = trace(model, (torch.randn(1, 3, 4, 4),))
    groups = find_fusion_groups(model, t, PATTERNS)
    assert _paths(groups) == [("bn", "relu")]
    assert explain_unfused(model, t, PATTERNS, groups) == {
        "conv": "its output goes to bn (BatchNorm2d) and torch.Tensor.add"
    }


class Containers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.ModuleDict({"conv": nn.Conv2d(3, 3, 3, padding=1), "bn": nn.BatchNorm2d(3)})
                for _ in range(2)
            ]
        )
        self.act = nn.ModuleList([nn.ReLU(), nn.ReLU()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, act in zip(self.blocks, self.act, strict=False):
            x = act(block["bn"](block["conv"](x)))
        return x


def test_fuse_inside_modulelist_and_moduledict() -> None:
    """Chains across ModuleList/ModuleDict entries are found by the trace and fused in place."""
    model = _randomize_bn(Containers())
    x = torch.randn(2, 3, 5, 5)
    groups = find_fusion_groups(model, trace(model, (x,)), PATTERNS)
    assert _paths(groups) == [
        ("blocks.0.conv", "blocks.0.bn", "act.0"),
        ("blocks.1.conv", "blocks.1.bn", "act.1"),
    ]
    fused = copy.deepcopy(model)
    fuse_model(fused, groups)
    assert type(fused.blocks[1]["conv"]).__name__ == "ConvReLU2d"
    assert type(fused.act[0]) is nn.Identity
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)


def test_hooks_move_to_the_fused_module() -> None:
    """The first module's pre-hook and the last module's forward hook fire on the fused module."""
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    seen: list[str] = []
    model[0].register_forward_pre_hook(lambda m, a: seen.append(f"pre:{type(m).__name__}"))
    model[2].register_forward_hook(lambda m, a, o: seen.append(f"post:{type(m).__name__}"))
    groups = find_fusion_groups(model, None, PATTERNS)
    fuse_model(model, groups)
    model(torch.randn(1, 3, 5, 5))
    assert seen == ["pre:ConvReLU2d", "post:ConvReLU2d"]
    assert isinstance(model[0], nni.ConvReLU2d)


def test_fuse_group_refuses_a_fused_model() -> None:
    """Fusing the same group twice fails with a message that says the model looks fused."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    (group,) = find_fusion_groups(model, None, PATTERNS)
    fuse_group(model, group)
    with pytest.raises(PlanError) as info:
        fuse_group(model, group)
    assert str(info.value) == (
        "fusion group ['0', '1']: 0 is a LinearReLU, expected Linear; was the model fused already?"
    )


def test_trace_of_another_model_is_refused() -> None:
    """A trace recorded on a differently built model cannot drive fusion of this one."""
    traced = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    other = nn.Sequential(nn.Conv1d(2, 2, 1), nn.ReLU())
    with pytest.raises(PlanError) as info:
        find_fusion_groups(other, trace(traced, (torch.randn(1, 2),)), PATTERNS)
    assert str(info.value) == (
        "the trace does not match the model: 0 is a Linear in the trace but Conv1d in "
        "Sequential; trace the model you fuse"
    )


def test_fuser_that_returns_no_module() -> None:
    """A registered fuser returning something else fails on use, naming where it was registered."""

    def bad(a: nn.Module, b: nn.Module) -> Any:
        return 42

    pattern = FusionPattern((nn.Linear, nn.ReLU), bad, "mine.py:7")
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(RegistrationError, match="mine.py:7.*returned int, not a torch.nn.Module"):
        fuse_model(model, find_fusion_groups(model, None, [pattern]))


# --------------------------------------------------------------------------- explicit groups


def test_explicit_groups_checked_against_the_trace(x: torch.Tensor) -> None:
    """Correct explicit groups pass and carry the matching pattern."""
    model = _randomize_bn(resnet18(width=0.25))
    t = trace(model, (x,))
    groups = check_explicit_groups(
        model, [["conv1", "bn1", "relu"], ["layer1.0.conv2", "layer1.0.bn2"]], t, PATTERNS
    )
    assert _paths(groups) == [("conv1", "bn1", "relu"), ("layer1.0.conv2", "layer1.0.bn2")]
    assert [g.origin for g in groups] == ["test:4", "test:1"]
    assert groups[0].reason == "explicit group, checked against the trace"
    untraced = check_explicit_groups(model, [["conv1", "bn1", "relu"]], None, PATTERNS)
    assert untraced[0].reason == (
        "explicit group, not checked: pass example inputs to check it against a trace"
    )


def _explicit_error(model: nn.Module, groups: list[list[str]], traced: bool = True) -> str:
    t = trace(model, (torch.randn(1, 3, 32, 32),)) if traced else None
    with pytest.raises(PlanError) as info:
        check_explicit_groups(model, groups, t, PATTERNS)
    return str(info.value)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return _randomize_bn(resnet18(width=0.25))


def test_explicit_unknown_path(resnet: nn.Module) -> None:
    """A mistyped module path is refused with the nearest real name."""
    assert _explicit_error(resnet, [["layer1.0.con1", "layer1.0.bn1"]]) == (
        "fusion[0] = ['layer1.0.con1', 'layer1.0.bn1']: no module named 'layer1.0.con1' in "
        "ResNet; did you mean 'layer1.0.conv1'?"
    )


def test_explicit_forum_names() -> None:
    """The forum's `conv2d` names (PyTorch: AttributeError) get a message showing real names."""
    assert _explicit_error(vgg(width=0.25).eval(), [["conv2d", "bn"]], traced=False) == (
        "fusion[0] = ['conv2d', 'bn']: no module named 'conv2d' in Cifar_VGG; its modules have "
        "names like 'features', 'features.0', 'features.1'"
    )


def test_explicit_no_pattern(resnet: nn.Module) -> None:
    """Types without a registered pattern are refused, listing the patterns that start alike."""
    assert _explicit_error(resnet, [["conv1", "maxpool"]]) == (
        "fusion[0] = ['conv1', 'maxpool']: no fusion pattern is registered for "
        "(Conv2d, MaxPool2d) (patterns starting with Conv2d: (Conv2d, BatchNorm2d, ReLU), "
        "(Conv2d, BatchNorm2d), (Conv2d, ReLU)); register one with "
        "reg.register_fusion(types, fuser) or change the group"
    )


def test_explicit_not_consecutive(resnet: nn.Module) -> None:
    """Modules that do not run back to back are refused, saying where the output goes."""
    assert _explicit_error(resnet, [["layer1.0.conv1", "layer1.0.bn2"]]) == (
        "fusion[0] = ['layer1.0.conv1', 'layer1.0.bn2']: layer1.0.conv1 and layer1.0.bn2 are "
        "not consecutive in the forward: the output of layer1.0.conv1 goes to "
        "layer1.0.bn1 (BatchNorm2d)"
    )


def test_explicit_shared_relu(resnet: nn.Module) -> None:
    """The forum's fuse list [conv2, bn2, relu] is refused: that ReLU runs twice per block."""
    assert _explicit_error(resnet, [["layer1.0.conv2", "layer1.0.bn2", "layer1.0.relu"]]) == (
        "fusion[0] = ['layer1.0.conv2', 'layer1.0.bn2', 'layer1.0.relu']: layer1.0.relu runs "
        "2 times in the forward; a module that runs more than once cannot be fused"
    )


def test_explicit_intermediate_used_elsewhere() -> None:
    """A group whose intermediate tensor has another consumer is refused, naming it."""
    model = _randomize_bn(Residual())
    t = trace(model, (torch.randn(1, 3, 4, 4),))
    with pytest.raises(PlanError) as info:
        check_explicit_groups(model, [["conv", "bn"]], t, PATTERNS)
    assert str(info.value) == (
        "fusion[0] = ['conv', 'bn']: the output of conv is also used by torch.Tensor.add; "
        "fusing would change what that code sees"
    )


def test_explicit_model_output_and_unused_module() -> None:
    """An intermediate that is also returned, or a module that never runs, is refused."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.relu = nn.ReLU()
            self.spare = nn.Linear(2, 2)
            self.spare_relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.lin(x)
            return y, self.relu(y)

    model = M()
    t = trace(model, (torch.randn(1, 2),))
    with pytest.raises(PlanError) as info:
        check_explicit_groups(model, [["lin", "relu"]], t, PATTERNS)
    assert str(info.value) == (
        "fusion[0] = ['lin', 'relu']: the output of lin is also a model output; fusing would "
        "change it"
    )
    with pytest.raises(PlanError) as info:
        check_explicit_groups(model, [["spare", "spare_relu"]], t, PATTERNS)
    assert str(info.value) == (
        "fusion[0] = ['spare', 'spare_relu']: spare does not run in the traced forward"
    )


def test_explicit_duplicate_and_short_groups() -> None:
    """A module in two groups, or a group of one, is refused."""
    model = vgg(width=0.25).eval()
    assert _explicit_error(
        model, [["features.0", "features.1"], ["features.1", "features.2"]], traced=False
    ) == (
        "fusion[1] = ['features.1', 'features.2']: 'features.1' is already in fusion[0]; "
        "a module can join one group only"
    )
    assert _explicit_error(model, [["features.0"]], traced=False) == (
        "fusion[0] = ['features.0']: a fusion group needs at least two modules"
    )


def test_explicit_untraced_sequential_gap() -> None:
    """Without a trace, non-adjacent children of one nn.Sequential are refused."""
    assert _explicit_error(
        vgg(width=0.25).eval(), [["features.0", "features.2"]], traced=False
    ) == (
        "fusion[0] = ['features.0', 'features.2']: these are not consecutive children of "
        "nn.Sequential 'features'; list modules that run one after the other, in forward order"
    )
