"""Tests for qswap.trace: the dataflow of one forward pass, on models torch.fx cannot trace."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from forum_models import resnet18, vgg
from torch import nn

from qswap.trace import Trace, trace


def _targets(t: Trace) -> list[str]:
    return [c.target for c in t.calls]


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_vgg_calls_in_forward_order(x: torch.Tensor) -> None:
    """VGG records its 32 leaf-module calls and the view between them; x.size(0) is not a call."""
    model = vgg(width=0.25).eval()
    t = trace(model, (x,))
    features = [f"features.{i}" for i in range(29)]
    assert _targets(t) == [
        *features,
        "avgpool",
        "torch.Tensor.view",
        "classifier.0",
        "classifier.1",
    ]
    view = t.calls[30]
    assert view.kind == "function" and view.module_type is None
    assert t.values[view.inputs[0]].shape == (2, 128, 1, 1)
    assert t.values[view.outputs[0]].shape == (2, 128)
    assert [c.target for c in t.consumers(t.calls[0].outputs[0])] == ["features.1"]
    assert t.outputs == t.calls[-1].outputs
    assert t.output_paths == ("output",)
    assert t.values[t.inputs[0]].name == "args[0]"


def test_inplace_relu_makes_a_new_value(x: torch.Tensor) -> None:
    """ReLU(inplace=True) outputs a new version of its input tensor, so the dataflow stays a DAG."""
    model = vgg(width=0.25).eval()
    t = trace(model, (x,))
    bn, relu = t.calls[1], t.calls[2]
    assert relu.target == "features.2"
    (new,) = relu.outputs
    assert relu.inputs == bn.outputs
    assert new != bn.outputs[0]
    assert t.values[new].version_of == bn.outputs[0]
    assert t.producer(new) is relu
    assert [c.target for c in t.consumers(bn.outputs[0])] == ["features.2"]


def test_resnet_skip_add_and_shared_relu(x: torch.Tensor) -> None:
    """ResNet-18: `out += identity` is one add_ call, the block's single ReLU runs twice."""
    model = resnet18(width=0.25).eval()
    t = trace(model, (x,))
    relu_calls = t.calls_of("layer1.0.relu")
    assert len(relu_calls) == 2
    bn2 = t.calls_of("layer1.0.bn2")[0]
    (add,) = t.consumers(bn2.outputs[0])
    assert add.target == "torch.Tensor.add_"
    maxpool = t.calls_of("maxpool")[0]
    assert add.inputs == (bn2.outputs[0], maxpool.outputs[0])
    assert t.values[add.outputs[0]].version_of == bn2.outputs[0]
    assert t.consumers(add.outputs[0]) == [relu_calls[1]]
    assert [c.target for c in t.consumers(maxpool.outputs[0])] == [
        "layer1.0.conv1",
        "torch.Tensor.add_",
    ]
    downsample = t.calls_of("layer2.0.downsample.1")[0]
    assert t.consumers(downsample.outputs[0])[0].target == "torch.Tensor.add_"
    assert _targets(t)[-3:] == ["avgpool", "torch.flatten", "fc"]
    assert sum(c.kind == "module" for c in t.calls) == 60
    assert sum(c.target == "torch.Tensor.add_" for c in t.calls) == 8


def test_container_scopes(x: torch.Tensor) -> None:
    """Each container call is a Scope spanning the calls that ran inside it."""
    model = resnet18(width=0.25).eval()
    t = trace(model, (x,))
    block = next(s for s in t.scopes if s.target == "layer1.0")
    inside = t.calls[block.start : block.stop]
    assert [c.target for c in inside] == [
        "layer1.0.conv1",
        "layer1.0.bn1",
        "layer1.0.relu",
        "layer1.0.conv2",
        "layer1.0.bn2",
        "torch.Tensor.add_",
        "layer1.0.relu",
    ]
    assert block.inputs == t.calls_of("maxpool")[0].outputs
    assert block.outputs == inside[-1].outputs
    assert block.module_type.__name__ == "BasicBlock"


class ControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.pos = nn.ReLU()
        self.neg = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):  # a Python loop calling one module three times
            x = self.lin(x)
        if x.sum() > 0:  # data-dependent branch: torch.fx cannot trace this
            return self.pos(x)
        return self.neg(x)


def test_control_flow_and_loops() -> None:
    """A data-dependent `if` and a loop trace fine; the taken branch and every call are recorded."""
    model = ControlFlow()
    x = torch.randn(2, 4)
    t = trace(model, (x,))
    with torch.no_grad():
        taken = "pos" if model.lin(model.lin(model.lin(x))).sum() > 0 else "neg"
    assert _targets(t) == [
        "lin",
        "lin",
        "lin",
        "torch.Tensor.sum",
        "torch.Tensor.gt",
        "torch.Tensor.__bool__",
        taken,
    ]
    lin_calls = t.calls_of("lin")
    assert [c.index for c in lin_calls] == [0, 1, 2]
    assert lin_calls[1].inputs == lin_calls[0].outputs
    assert [c.target for c in t.consumers(lin_calls[2].outputs[0])] == ["torch.Tensor.sum", taken]
    assert t.calls[5].outputs == ()


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(3, 5)
        self.scale = nn.Parameter(torch.full((5,), 2.0))

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, mask: torch.Tensor) -> dict[str, Any]:
        h = self.a(x) + self.b(y) * self.scale
        return {"logits": h * mask, "extras": [h, torch.cat([x, y], dim=1)]}


def test_several_inputs_kwargs_and_dict_output() -> None:
    """Positional and keyword inputs, a parameter used in forward and a nested dict output are traced."""
    x, y, mask = torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 5)
    t = trace(TwoInputs(), (x, y), {"mask": mask})
    names = [t.values[v].name for v in t.inputs]
    assert names == ["args[0]", "args[1]", "kwargs['mask']"]
    assert _targets(t) == [
        "a",
        "b",
        "torch.Tensor.mul",
        "torch.Tensor.add",
        "torch.Tensor.mul",
        "torch.cat",
    ]
    mul = t.calls[2]
    assert t.values[mul.inputs[1]].name == "scale"
    assert t.producer(mul.inputs[1]) is None
    assert t.output_paths == ("output['logits']", "output['extras'][0]", "output['extras'][1]")
    add = t.calls[3]
    assert t.outputs[1] == add.outputs[0]
    assert t.calls[5].inputs == t.inputs[:2]
    assert t.is_output(add.outputs[0]) and not t.is_output(mul.outputs[0])


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.first = nn.Linear(4, 4)
        self.alias = self.act  # the same module object under a second name
        self.second = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alias(self.second(self.act(self.first(x))))


def test_module_shared_at_two_paths() -> None:
    """A module reachable at two paths is one object: each call lists both paths."""
    t = trace(Shared(), (torch.randn(1, 4),))
    assert _targets(t) == ["first", "act", "second", "act"]
    assert t.calls[1].paths == ("act", "alias")
    assert t.calls_of("alias") == t.calls_of("act") == [t.calls[1], t.calls[3]]
    assert t.calls_of("nothing") == []


class InnerOps(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x * 2 + 1).flatten(1)


def test_ops_inside_leaf_modules_are_not_calls() -> None:
    """Torch functions run inside a leaf module belong to its call, not to the function list."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), InnerOps(), nn.Linear(8, 2))
    t = trace(model, (torch.randn(1, 1, 4, 4),))
    assert _targets(t) == ["0", "1", "2"]
    assert [c.kind for c in t.calls] == ["module"] * 3


def test_leaf_predicate_makes_a_container_one_call(x: torch.Tensor) -> None:
    """`leaf=` records a module with children as one call and hides its insides."""
    model = resnet18(width=0.25).eval()
    t = trace(model, (x,), leaf=lambda path, m: type(m).__name__ == "BasicBlock")
    assert _targets(t) == [
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        "layer1.0",
        "layer1.1",
        "layer2.0",
        "layer2.1",
        "layer3.0",
        "layer3.1",
        "layer4.0",
        "layer4.1",
        "avgpool",
        "torch.flatten",
        "fc",
    ]


def test_fused_intrinsic_modules_are_leaves() -> None:
    """torch.ao.nn.intrinsic containers (ConvReLU2d) are one call, as they run as one op."""
    import torch.ao.nn.intrinsic as nni

    model = nn.Sequential(nni.ConvReLU2d(nn.Conv2d(1, 2, 3), nn.ReLU()), nn.Flatten())
    t = trace(model, (torch.randn(1, 1, 4, 4),))
    assert [(c.target, c.module_type) for c in t.calls] == [
        ("0", nni.ConvReLU2d),
        ("1", nn.Flatten),
    ]


def test_layer_with_qswap_activation_slots_is_one_leaf() -> None:
    """A fake-quantized layer (qswap's input/output slots) is one call fed by its real producer."""
    from qswap import slots as fake
    from qswap.config import QuantSpec
    from qswap.quantizers import AffineQuantizer, fake_quantize, qparams_from_range

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    seen: list[str] = []
    model[2].register_forward_pre_hook(lambda m, a: seen.append("user pre"))
    spec = QuantSpec(signed=False, scheme="affine")
    qp = qparams_from_range(-2.0, 2.0, spec)
    for which in ("input", "output"):
        quantizer = AffineQuantizer(spec)
        quantizer.set_qparams(qp)
        fake.attach_activation(model[2], which, fake.ActivationSlot(quantizer=quantizer))
    assert (fake.INPUT_SLOT, fake.OUTPUT_SLOT) == ("qswap_input", "qswap_output")
    order = list(model[2]._forward_pre_hooks)
    x = torch.randn(3, 4)
    t = trace(model, (x,))
    assert [(c.target, c.module_type) for c in t.calls] == [
        ("0", nn.Linear),
        ("1", nn.ReLU),
        ("2", nn.Linear),
    ]
    relu, last = t.calls[1], t.calls[2]
    assert last.inputs == relu.outputs  # not the slot's fake-quantized copy
    assert t.outputs == last.outputs
    assert seen == ["user pre"]
    assert list(model[2]._forward_pre_hooks) == order
    with torch.no_grad():
        h = model[1](model[0](x))
        expected = fake_quantize(
            nn.functional.linear(fake_quantize(h, qp), model[2].weight, model[2].bias), qp
        )
        assert torch.equal(model(x), expected)


def test_user_hooks_untouched_and_firing() -> None:
    """User hooks fire and remain; a leaf's hook ops are part of its call, a container's are dataflow."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2)))
    fired: list[str] = []

    def pre(module: nn.Module, args: Any) -> None:
        fired.append("pre")
        _ = args[0] * 3  # a hook's own torch ops are not part of the dataflow

    def post(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        fired.append("post")
        return output + 1

    model[0].register_forward_pre_hook(pre)
    model[0].register_forward_hook(post)
    model[2].register_forward_hook(post)
    before = _hook_count(model)
    t = trace(model, (torch.randn(1, 2),))
    assert fired == ["pre", "post", "post"]
    assert _targets(t) == ["0", "1", "2.0", "torch.Tensor.add"]
    assert t.calls[1].inputs == t.calls[0].outputs
    assert t.outputs == t.calls[3].outputs
    assert _hook_count(model) == before == 3
    model(torch.randn(1, 2))
    assert fired == ["pre", "post", "post"] * 2


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        raise RuntimeError("boom in forward")


def test_hooks_removed_when_forward_raises() -> None:
    """An exception in forward propagates and leaves no hook or function mode behind."""
    model = Boom()
    with pytest.raises(RuntimeError, match="boom in forward"):
        trace(model, (torch.randn(1, 2),))
    assert _hook_count(model) == 0
    t = trace(nn.Sequential(nn.Linear(2, 2)), (torch.randn(1, 2),))
    assert _targets(t) == ["0"]


def test_model_not_mutated_in_train_mode() -> None:
    """Tracing a training-mode model leaves BatchNorm statistics and train flags as they were."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trace(model, (torch.randn(2, 3, 8, 8) + 5,))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())


def test_setitem_and_identity() -> None:
    """`x[0] = 0` makes a new value without an output; nn.Identity returns its input's value."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ident = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 1
            y[0] = 0
            return self.ident(y)

    t = trace(M(), (torch.randn(2, 2),))
    mul, setitem, ident = t.calls
    assert setitem.target == "torch.Tensor.__setitem__"
    assert t.values[setitem.outputs[0]].version_of == mul.outputs[0]
    assert ident.outputs == ident.inputs == setitem.outputs


def test_functional_model_and_mutation_through_a_view() -> None:
    """A model without submodules is traced op by op; writing through a view re-versions the base."""

    class Functional(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 2
            y.view(-1).add_(1)
            return y + 0

    t = trace(Functional(), (torch.randn(2, 2),))
    assert _targets(t) == [
        "torch.Tensor.mul",
        "torch.Tensor.view",
        "torch.Tensor.add_",
        "torch.Tensor.add",
    ]
    mul, _, _, add = t.calls
    stale = add.inputs[0]
    assert stale != mul.outputs[0]
    assert t.values[stale].version_of == mul.outputs[0]
    assert t.producer(stale) is None


def test_inference_mode_inplace() -> None:
    """Under torch.inference_mode (no version counters) in-place ops are still new values."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True))
    with torch.inference_mode():
        t = trace(model, (torch.randn(1, 2),))
    lin, relu = t.calls
    assert relu.outputs != lin.outputs
    assert t.values[relu.outputs[0]].version_of == lin.outputs[0]


def test_single_tensor_input_and_str() -> None:
    """A bare tensor is accepted as the inputs, and str(trace) lists each call on one line."""
    t = trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), torch.randn(1, 2))
    assert str(t) == "inputs: %0\n#0 %1 = 0 [Linear](%0)\n#1 %2 = 1 [ReLU](%1)\noutputs: %2"


def test_trace_of_a_4000_module_model_records_every_call() -> None:
    """A plain 4000-module model traces to 4000 module calls in order (timings live in bench/)."""
    layers: list[nn.Module] = []
    for _ in range(2000):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    deep = nn.Sequential(*layers)
    t = trace(deep, (torch.randn(1, 8),))
    assert len(t.calls) == 4000
    assert [c.target for c in t.calls[:3]] == ["0", "1", "2"]
    assert t.calls[-1].target == "3999"


# --------------------------------------------------------------------------- fused_view


class _Skip(nn.Module):
    """Conv-BN-ReLU blocks with a skip add, an in-place ReLU used twice and a data-dependent branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 3)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(out))
        y += out
        y = self.relu(y)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1)
        if float(pooled.sum()) < 0:  # data-dependent: torch.fx cannot trace this
            pooled = -pooled
        return {"logits": self.heads["a"](pooled), "pooled": pooled}


def _canonical(t: Trace) -> tuple[Any, ...]:
    """The trace with value ids renamed by first appearance, so two traces compare by structure."""
    names: dict[int, int] = {}

    def ids(vids: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(names.setdefault(v, len(names)) for v in vids)

    inputs = ids(t.inputs)
    calls = [
        (c.index, c.kind, c.target, c.module_type, c.paths, ids(c.inputs), ids(c.outputs))
        for c in t.calls
    ]
    return inputs, calls, ids(t.outputs), t.output_paths


@pytest.mark.parametrize(
    ("build", "shape", "config"),
    [
        (lambda: vgg(width=0.25), (2, 3, 32, 32), "x86_int8"),
        (lambda: resnet18(width=0.25), (2, 3, 32, 32), "x86_int8"),
        (_Skip, (2, 3, 8, 8), "x86_int8"),
        (_Skip, (2, 3, 8, 8), {"extends": ["x86_int8"], "mode": "qat"}),
        (
            _Skip,
            (2, 3, 8, 8),
            {"extends": ["x86_int8"], "rules": [{"match": {"name": "conv2"}, "skip": True}]},
        ),
    ],
    ids=["vgg", "resnet18", "skip-add", "skip-add-qat", "skip-add-conv2-float"],
)
def test_lowering_reads_the_plan_trace_as_a_new_trace_would_record_it(
    monkeypatch: pytest.MonkeyPatch, build: Any, shape: tuple[int, ...], config: Any
) -> None:
    """The fused model's dataflow derived from the plan's trace equals tracing it anew."""
    import qswap
    from qswap.backends import torch_int8 as ti

    seen: list[tuple[Trace | None, Trace]] = []

    def both(model: nn.Module, args: tuple[Any, ...], kwargs: Any) -> Trace:
        derived = model._qswap.plan.fused_trace(model, args, kwargs)  # type: ignore[union-attr,operator]
        fresh = trace(model, args, kwargs)
        seen.append((derived, fresh))
        return fresh

    monkeypatch.setattr(ti, "_dataflow", both)
    torch.manual_seed(0)
    model = build().eval()
    x = torch.rand(*shape)
    qswap.quantize(model, config, calib_data=[x], example_inputs=(x,), progress=False)
    assert len(seen) == 1
    derived, fresh = seen[0]
    assert derived is not None
    assert _canonical(derived) == _canonical(fresh)


def test_plan_trace_is_not_reused_for_other_inputs_or_training_mode() -> None:
    """Another example input, or a model traced in training mode, gets a new trace."""
    import qswap

    model = _Skip().eval()
    x = torch.rand(2, 3, 8, 8)
    the_plan = qswap.plan(model, "x86_int8", example_inputs=(x,))
    assert the_plan.fused_trace(model, (x,), {}) is not None
    assert the_plan.fused_trace(model, (x.clone(),), {}) is None
    training = qswap.plan(model.train(), "x86_int8", example_inputs=(x,))
    assert training.fused_trace(model, (x,), {}) is None
