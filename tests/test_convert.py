"""convert and quantize: calibrated models become fake-quantized (or int8) without rewriting a layer."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TwoInputs, assert_unchanged, snapshot
from forum_models import resnet18, vgg
from torch import nn
from torch.nn.utils import parametrize

import qswap
from qswap.calibrate import calibrate
from qswap.convert import convert, quantize
from qswap.plan import plan
from qswap.prepare import prepare
from qswap.registry import Registry, default_registry
from qswap.state import state_of

FAKE = "w8a8_minmax"


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref, out = ref.detach(), out.detach()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def on_grid(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> bool:
    """Whether every value is scale * (integer - zero_point)."""
    steps = values / scale + zero_point
    return bool(torch.allclose(steps, steps.round(), atol=1e-3))


# --------------------------------------------------------------------------- models


class Mixer(nn.Module):
    """A custom layer with a parameter named ``kernel`` (stored transposed) and functional ops."""

    def __init__(self, n_in: int = 4, n_out: int = 3) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel


class Branchy(nn.Module):
    """Control flow on data, a module called twice, an inplace activation and functional ops."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.heads = nn.ModuleDict({"out": nn.Linear(8, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        for _ in range(2):  # fc2 runs twice
            h = self.fc2(h)
        if x.mean() > 0:  # data-dependent branch  # noqa: SIM108 - a branch the trace records
            h = self.blocks[0](h)
        else:
            h = self.blocks[1](h)
        h = torch.cat([h[:, :4], F.gelu(h[:, 4:])], dim=1) + 1.0
        return self.heads["out"](self.act(h))


# --------------------------------------------------------------------------- forum models


@pytest.mark.parametrize("build", [vgg, resnet18], ids=["vgg", "resnet18"])
def test_forum_models_quantize_with_one_call(build: Any) -> None:
    """The forum models, unedited, fake-quantize in one call close to float; the user's model is untouched."""
    torch.manual_seed(0)
    model = build(width=0.25).eval()
    x = torch.rand(16, 3, 32, 32)
    before = snapshot(model)
    qmodel = quantize(model, FAKE, calib_data=[x[:8], x[8:]], example_inputs=(x[:2],))
    assert_unchanged(before, model)
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert sqnr(ref, out) > 25
    the_plan = state_of(qmodel).plan
    assert the_plan.counts()["quantize"] == (10 if build is vgg else 21)
    assert not the_plan.uncovered


def test_resnet_to_int8_with_one_call() -> None:
    """The hand-written ResNet-18 lowers to int8 on x86 with no stubs; the plan decided everything."""
    torch.manual_seed(0)
    model = resnet18(width=0.25).eval()
    x = torch.rand(8, 3, 32, 32)
    before = snapshot(model)
    qmodel = quantize(model, "x86_int8", calib_data=[x], example_inputs=(x[:1],))
    assert_unchanged(before, model)
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) > 20
    assert type(qmodel.fc).__name__ == "QuantizedLinear"


# --------------------------------------------------------------------------- numbers


def test_fake_outputs_lie_on_the_output_grid() -> None:
    """Every output value of a fake-quantized layer is scale * (q - zero_point) for its qparams."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(32, 4)
    qmodel = quantize(model, FAKE, calib_data=[x])
    qp = state_of(qmodel).layers["2"].qparams["output"]
    out = qmodel(torch.randn(64, 4)).detach()
    assert on_grid(out, qp.scale, qp.zero_point)
    assert len(out.unique()) > 10
    weight_qp = state_of(qmodel).layers["0"].qparams["weight"]
    assert on_grid(
        qmodel[0].weight.detach(), weight_qp.scale[:, None], weight_qp.zero_point[:, None]
    )


def test_skipped_first_and_last_layers_stay_float() -> None:
    """A rule skipping the first and last layers leaves their outputs exactly the float ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    cfg = {"extends": [FAKE], "rules": [{"match": {"regex": "0|4"}, "skip": True}]}
    x = torch.randn(16, 4)
    qmodel = quantize(model, cfg, calib_data=[x])
    the_plan = state_of(qmodel).plan
    assert the_plan["0"].reason.startswith("rules[0] skips it") and the_plan["4"].kind == "skip"
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in ("0", "4"):
        qmodel.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: seen.__setitem__(name, (a[0], o))
        )
    qmodel(x)
    assert torch.equal(seen["0"][1], model[0](x))
    last_in, last_out = seen["4"]
    assert torch.equal(last_out, model[4](last_in))
    assert not parametrize.is_parametrized(qmodel[0]) and parametrize.is_parametrized(qmodel[2])


def test_custom_kernel_is_wrapped_on_the_grid() -> None:
    """A custom layer's ``kernel`` is fake-quantized per channel on the axis a rule sets, with no registration."""
    torch.manual_seed(0)
    model = nn.Sequential(Mixer(), nn.Tanh())
    cfg = {
        "extends": [FAKE],
        "rules": [{"match": {"type": "Mixer"}, "slots": {"kernel": {"axis": 1}}}],
    }
    x = torch.randn(16, 4)
    qmodel = quantize(model, cfg, calib_data=[x])
    layer = state_of(qmodel).layers["0"]
    qp = layer.qparams["kernel"]
    assert qp.scale.shape == (3,) and qp.axis == 1
    kernel = qmodel[0].kernel.detach()
    assert on_grid(kernel, qp.scale[None, :], qp.zero_point[None, :])
    assert not torch.equal(kernel, model[0].kernel)
    assert torch.allclose(qmodel(x), model(x), atol=0.1)
    assert state_of(qmodel).plan.uncovered == ["0"]


def test_gradients_pass_straight_through() -> None:
    """The fake-quantized model trains: gradients reach the float weights."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    qmodel = quantize(model, FAKE, calib_data=[torch.randn(8, 4)])
    qmodel(torch.randn(8, 4)).sum().backward()
    original = qmodel[0].parametrizations.weight.original
    assert original.grad is not None and original.grad.abs().sum() > 0


def test_weight_only_and_dynamic_modes() -> None:
    """weight_only leaves activations float; dynamic quantizes each batch's input with its own range."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(8, 4)
    wo = quantize(
        model,
        {"mode": "weight_only", "weight": {"bits": 4, "granularity": "per_channel", "axis": 0}},
        calib_data=[x],
    )
    assert torch.allclose(wo(x), F.linear(x, wo[0].weight, wo[0].bias))
    assert sorted(state_of(wo).layers["0"].qparams) == ["weight"]
    act = {"bits": 4, "signed": True, "scheme": "symmetric"}
    dyn = quantize(model, {"mode": "dynamic", "activation": act}, calib_data=[x])
    y = 100 * torch.randn(8, 4)  # far outside the calibration range
    out = dyn(y)
    assert torch.allclose(out, F.linear(_q4(y), dyn[0].weight, dyn[0].bias), atol=1e-4)


def _q4(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor symmetric signed 4-bit fake-quant of ``x`` with its own max."""
    scale = x.abs().max() / 7.5
    return torch.clamp(torch.round(x / scale), -8, 7) * scale


def test_never_run_layer_is_a_calibration_error() -> None:
    """A layer calibration never reached gets an error that says how to fix it."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 2)
            self.unused = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    prepared = calibrate(prepare(Gated(), FAKE), [torch.randn(2, 4)])
    with pytest.raises(qswap.CalibrationError) as info:
        convert(prepared)
    assert str(info.value) == (
        "layer 'unused' (Linear) never ran during calibration, so its input has no range. Make "
        "the calibration batches reach it, or keep it float with a rule: "
        "{match: {name: 'unused'}, skip: true}"
    )


def test_layer_whose_parent_reads_its_weight_keeps_quantized_weights_only() -> None:
    """nn.MultiheadAttention never calls out_proj, it reads out_proj.weight: no error there.

    A small transformer language model quantizes with one call on fake and on x86 (where
    the attention stays float); out_proj's weight is fake-quantized, it has no activations.
    """

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 50)

        def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.head(self.enc(self.emb(ids)))}

    torch.manual_seed(0)
    model = TinyLM().eval()
    batches = [torch.randint(0, 50, (4, 10)) for _ in range(3)]
    ids = torch.randint(0, 50, (8, 10))
    for config in ("w8a8_minmax", "x86_int8"):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            qmodel = qswap.quantize(model, config, calib_data=batches, example_inputs=(batches[0],))
        fallbacks = [str(w.message) for w in said if w.category is qswap.FallbackWarning]
        if config == "x86_int8":  # attention and norms fall back, said in one line
            assert len(fallbacks) == 1 and "cannot run on backend 'x86'" in fallbacks[0]
        else:
            assert fallbacks == []
        with torch.no_grad():
            ref, out = model(ids)["logits"], qmodel(ids)["logits"]
        assert 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()) > 20
    fake: Any = qswap.quantize(model, "w8a8_minmax", calib_data=batches)
    spec = fake._qswap.layers["enc.layers.0.self_attn.out_proj"]
    assert spec.input is None and spec.output is None and "weight" in spec.qparams
    scale = spec.qparams["weight"].scale
    weight = fake.enc.layers[0].self_attn.out_proj.weight  # what attention reads: on the grid
    steps = weight / (scale.reshape(-1, 1) if scale.dim() else scale)
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert not torch.equal(weight, model.enc.layers[0].self_attn.out_proj.weight)


def test_convert_errors() -> None:
    """convert refuses unprepared, already converted and other-backend models."""
    with pytest.raises(
        qswap.PlanError, match=r"convert\(\) needs a model returned by qswap.prepare\(\)"
    ):
        convert(nn.Linear(2, 2))
    prepared = calibrate(prepare(nn.Linear(4, 2), FAKE), [torch.randn(2, 4)])
    with pytest.raises(qswap.PlanError, match="prepared for backend 'fake', not 'x86'"):
        convert(prepared, backend="x86")
    converted = convert(prepared)
    with pytest.raises(qswap.PlanError, match="already converted"):
        convert(converted)


# --------------------------------------------------------------------------- structure


def test_control_flow_shared_calls_and_containers() -> None:
    """Control flow, a module run twice, an inplace ReLU, cat/gelu, ModuleList and ModuleDict all quantize."""
    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(32, 4)
    batches = [x + 1, x - 1]  # both branches run during calibration
    before = snapshot(model)
    qmodel = quantize(model, FAKE, calib_data=batches, example_inputs=(x,))
    assert_unchanged(before, model)
    kinds = {d.name: d.kind for d in state_of(qmodel).plan}
    assert (
        kinds["fc2"] == kinds["blocks.0"] == kinds["blocks.1"] == kinds["heads.out"] == "quantize"
    )
    with torch.no_grad():
        for batch in batches:
            assert sqnr(model(batch), qmodel(batch)) > 25
    # fc2 ran twice per batch: its observers saw both calls
    assert set(state_of(qmodel).layers["fc2"].qparams) == {"weight", "input", "output"}


def test_shared_module_is_quantized_once() -> None:
    """A module reachable at two paths stays one object, quantized once, in the result."""
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    qmodel = quantize(model, FAKE, calib_data=[torch.randn(8, 4)])
    assert qmodel[0] is qmodel[2]
    assert len(qmodel[0].parametrizations.weight) == 1
    assert state_of(qmodel).plan["2"].shared_with == "0"


def test_user_hooks_kept_and_firing() -> None:
    """Forward hooks the user registered keep firing on the quantized model (and see its output)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    calls: list[torch.Tensor] = []
    model[2].register_forward_hook(lambda m, a, o: calls.append(o))
    qmodel = quantize(model, FAKE, calib_data=[torch.randn(8, 4)])
    calls.clear()
    out = qmodel(torch.randn(3, 4))
    assert len(calls) == 1 and torch.equal(calls[0], out)
    assert len(model[2]._forward_hooks) == 1


def test_multi_input_dict_output_model() -> None:
    """A forward with two inputs and a dict output calibrates from dict batches and quantizes."""
    torch.manual_seed(0)
    model = TwoInputs()
    batches = [{"x": torch.randn(8, 4), "y": torch.randn(8, 2)} for _ in range(3)]
    qmodel = quantize(model, FAKE, calib_data=batches, example_inputs=batches[0])
    out = qmodel(**batches[0])
    ref = model(**batches[0])
    assert set(out) == {"sum", "a"}
    assert sqnr(ref["sum"], out["sum"]) > 25


def test_convert_leaves_prepared_model_reusable() -> None:
    """convert(inplace=False) does not consume the prepared model: converting twice gives the same model."""
    prepared = calibrate(
        prepare(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), FAKE), [torch.randn(8, 4)]
    )
    x = torch.randn(5, 4)
    a, b = convert(prepared), convert(prepared)
    assert torch.equal(a(x), b(x))
    assert state_of(prepared).stage == "prepared"


def test_converted_state_dict_round_trips() -> None:
    """A converted fake model's state_dict (quantizer parameters included) loads into a fresh conversion."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    a = quantize(model, FAKE, calib_data=[torch.randn(8, 4)])
    b = quantize(model, FAKE, calib_data=[10 * torch.randn(8, 4)])
    x = torch.randn(4, 4)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))


def test_float64_model_stays_float64() -> None:
    """Quantization keeps the model's dtype."""
    model = nn.Sequential(nn.Linear(4, 2)).double()
    qmodel = quantize(model, FAKE, calib_data=[torch.randn(4, 4, dtype=torch.float64)])
    assert qmodel(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


def test_four_bit_on_x86_falls_back_to_fake() -> None:
    """A 4-bit layer on x86 runs fake-quantized inside the int8 model, as the plan said."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    cfg = {"extends": ["x86_int8"], "rules": [{"match": {"name": "2"}, "weight": {"bits": 4}}]}
    x = torch.randn(16, 4)
    with pytest.warns(
        qswap.FallbackWarning,
        match=r"1 of 2 layers cannot run on backend 'x86' and fall back to fake .*: Linear x1",
    ):
        qmodel = quantize(model, cfg, calib_data=[x], example_inputs=(x,))
    assert type(qmodel[0]).__name__ == "QuantizedLinear"
    assert parametrize.is_parametrized(qmodel[2], "weight")
    assert state_of(qmodel).plan["2"].fallback
    assert qmodel(x).shape == (16, 2)


def test_plan_prepare_convert_are_the_pieces_of_quantize() -> None:
    """plan -> prepare -> calibrate -> convert gives the same model as quantize."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)
    ).eval()
    x = torch.rand(4, 3, 4, 4)
    the_plan = plan(model, FAKE, example_inputs=(x,))
    stepwise = convert(calibrate(prepare(model, the_plan, example_inputs=(x,)), [x]))
    oneshot = quantize(model, FAKE, calib_data=[x], example_inputs=(x,))
    assert torch.equal(stepwise(x), oneshot(x))
    assert copy.deepcopy(oneshot)(x).shape == (4, 2)


def test_user_parametrizations_are_kept() -> None:
    """A weight the user parametrized (weight_norm) is quantized after it; the user's model keeps its own."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(16, 4)
    the_plan = plan(model, FAKE)
    assert the_plan["0"].kind == "quantize" and the_plan["0"].module_type is nn.Linear
    assert the_plan["0.parametrizations.weight"].kind == "passthrough"
    qmodel = quantize(model, FAKE, calib_data=[x])
    kinds = [type(p).__name__ for p in qmodel[0].parametrizations.weight]
    assert kinds == ["_WeightNorm", "AffineQuantizer"]
    assert [type(p).__name__ for p in model[0].parametrizations.weight] == ["_WeightNorm"]
    assert sqnr(model(x), qmodel(x)) > 25


def test_child_registry_components_and_counterparts() -> None:
    """registry= carries a custom observer and a custom counterpart whose from_float returns a new module."""
    from qswap.observers import MinMaxObserver

    reg = Registry("mine", parent=default_registry())
    made: list[str] = []

    @reg.register_observer("tracking_minmax")
    class TrackingMinMax(MinMaxObserver):
        def observe(self, x: torch.Tensor) -> None:
            made.append("observed")
            super().observe(x)

    class Doubled(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.inner(x)

    @reg.register_mapping(Mixer, backend="fake", slots={"kernel": 1})
    class QuantizedMixer:
        @classmethod
        def from_float(cls, module: nn.Module, spec: Any) -> nn.Module:
            assert set(spec.qparams) == {"kernel", "input", "output"}
            return Doubled(module)

    torch.manual_seed(0)
    model = nn.Sequential(Mixer(), nn.Tanh(), Mixer(3, 3))
    cfg = {"extends": [FAKE], "activation": {"observer": "tracking_minmax"}}
    x = torch.randn(8, 4)
    qmodel = quantize(model, cfg, calib_data=[x], registry=reg)
    assert made and type(qmodel[0]) is Doubled and type(qmodel[2]) is Doubled
    assert state_of(qmodel).layers["0"].qparams["kernel"].axis == 1  # the mapping's slot axis
    # the counterpart received the float layer, stripped of qswap's observers
    assert not parametrize.is_parametrized(qmodel[0].inner)
    assert torch.allclose(qmodel(x), 2 * model[2](torch.tanh(2 * model[0](x))), atol=1e-6)
    assert not state_of(qmodel).plan.uncovered
    with pytest.raises(qswap.ConfigError, match="unknown observer 'tracking_minmax'"):
        quantize(model, cfg, calib_data=[x])  # the default registry does not know it


class _SkippedDropout(nn.Module):
    """A model holding a Dropout its forward never calls (transformers' SDPA attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("config", ["x86_int8", "w8a8_minmax"])
def test_never_called_module_without_parameters_is_a_no_op(config: str) -> None:
    """A parameter-free module that never runs converts as it is, on every backend."""
    torch.manual_seed(0)
    model = _SkippedDropout().eval()
    x = torch.randn(32, 8)
    q = quantize(model, config, calib_data=[x], example_inputs=(x,), progress=False)
    assert type(q.drop) is nn.Dropout
    layer = q._qswap.layers.get("drop")  # type: ignore[union-attr]
    assert layer is None or not layer.qparams  # x86 plans it (int8 passthrough); fake does not
    with torch.no_grad():
        ref = model(x)
        assert (q(x) - ref).abs().max() < 0.05 * ref.abs().max()


class _TiedLM(nn.Module):
    """T5/Bart-style ties: a never-called `shared` table, an embedding and a head that share it."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(32, 8)
        self.embed = nn.Embedding(32, 8)
        self.embed.weight = self.shared.weight
        self.head = nn.Linear(8, 32, bias=False)
        self.head.weight = self.shared.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


@pytest.mark.parametrize("config", ["w8a8_minmax", "x86_int8", "w4_per_group"])
def test_tied_weight_is_quantized_once_and_stays_one_tensor(config: str, tmp_path: Any) -> None:
    """A weight three layers share is quantized once and stays one tensor, through save/load."""
    torch.manual_seed(0)
    model = _TiedLM().eval()
    ids = torch.randint(0, 32, (4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qswap.FallbackWarning)  # x86: embeddings run fake
        q = quantize(model, config, calib_data=[ids], example_inputs=(ids,), progress=False)
    p = q._qswap.plan  # type: ignore[union-attr]
    assert "weight tied to shared.weight: quantized once, with its spec" in p["head"].reason
    tensors = {t.data_ptr() for n, t in q.named_parameters(remove_duplicate=False)}
    assert len(tensors) == 1  # one float table: the tie survives
    quantizers = {id(m.parametrizations.weight[-1]) for m in (q.shared, q.embed, q.head)}
    assert len(quantizers) == 1  # one quantizer, so one quantized tensor
    assert torch.equal(q.embed.weight, q.head.weight)
    if config == "x86_int8":
        assert p["head"].backend == "fake" and "is tied to shared.weight" in p["head"].reason
    path = qswap.save(q, tmp_path / "tied.qswap")
    loaded = qswap.load(path, _TiedLM().eval())
    with torch.no_grad():
        assert torch.equal(q(ids), loaded(ids))
    assert len({t.data_ptr() for _, t in loaded.named_parameters(remove_duplicate=False)}) == 1


def test_weight_only_needs_no_data_and_static_says_what_it_needs() -> None:
    """quantize() without calib_data runs weight-only, and refuses static naming what is missing."""
    model = nn.Sequential(nn.Linear(8, 8))
    q = quantize(model, "w4_per_group")
    assert "weight" in q._qswap.layers["0"].qparams  # type: ignore[union-attr]
    with pytest.raises(
        qswap.CalibrationError,
        match=r"quantize\(\) got no calib_data, but mode 'static' calibrates activation ranges",
    ):
        quantize(model, "w8a8_minmax", calib_data=None)


# --------------------------------------------------------------------------- first batch as example


def _calls(n: int, x: torch.Tensor) -> Any:
    for _ in range(n):
        yield x


@pytest.mark.parametrize("kind", ["list", "generator", "loader"])
def test_quantize_traces_the_first_batch_when_given_no_example(kind: str) -> None:
    # ResNet's BasicBlock calls conv1 -> bn1 -> relu in forward(), not in a Sequential: only
    # a trace finds those groups. quantize() traces its first calibration batch, so the
    # one-call flow fuses what prepare(example_inputs=...) fuses, from any iterable of batches.
    torch.manual_seed(0)
    model = resnet18().eval()
    x = torch.randn(4, 3, 32, 32)
    batches: Any = {
        "list": [x, x],
        "generator": _calls(2, x),
        "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=2),
    }[kind]
    if kind == "loader":
        batches = [b[0] for b in batches]
    q = quantize(model, "w8a8_minmax", calib_data=batches, progress=False)
    traced = plan(model, "w8a8_minmax", example_inputs=x)
    assert state_of(q).plan.fusion_groups == traced.fusion_groups
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())  # all folded
    assert len(traced.fusion_groups) > len(plan(model, "w8a8_minmax").fusion_groups)


def test_quantize_calibrates_every_batch_of_a_one_shot_iterable() -> None:
    # taking the first batch out to trace must not lose it for calibration: the range seen
    # is that of both batches, the large one first
    model = nn.Sequential(nn.Linear(4, 4))
    big, small = torch.full((2, 4), 8.0), torch.full((2, 4), 1.0)
    q = quantize(model, "w8a8_minmax", calib_data=iter([big, small]), progress=False)
    slot = state_of(q).layers["0"]
    assert slot.qparams is not None
    in_scale = float(slot.qparams["input"].scale)
    assert in_scale * 255 >= 8.0 - 1e-4  # the first batch's range was observed


def test_quantize_with_an_empty_iterable_says_so() -> None:
    with pytest.raises(qswap.CalibrationError, match="saw no batch"):
        quantize(nn.Sequential(nn.Linear(4, 4)), "w8a8_minmax", calib_data=iter([]), progress=False)
