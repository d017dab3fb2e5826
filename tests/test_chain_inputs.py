"""Fake layers fed by another layer's quantized output take its qparams, as int8 layers do."""

from __future__ import annotations

import torch
from torch import nn

import qswap
from qswap.slots import activation_slot

STATIC = {"extends": ["x86_int8"], "backend": "fake", "activation": {"observer": "minmax"}}


class Net(nn.Module):
    """conv -> relu -> maxpool -> conv -> relu -> avgpool -> flatten -> linear, and a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.avg(self.relu2(self.conv2(x)))
        x = self.fc(torch.flatten(x, 1))
        return self.head(torch.sigmoid(x))  # a float op: head keeps its own input qparams


def _quantized(config: object) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Net().eval()
    data = [torch.rand(8, 3, 8, 8) for _ in range(3)]
    qmodel = qswap.quantize(
        model, config, calib_data=data, example_inputs=(data[0],), progress=False
    )
    return model, qmodel, data


def test_inputs_after_grid_preserving_ops_take_the_producer_output_qparams() -> None:
    """Through ReLU, max/avg pooling and flatten, the next layer's input uses the producer's output."""
    _, qmodel, _ = _quantized(STATIC)
    layers = qmodel._qswap.layers  # type: ignore[union-attr]
    assert layers["conv2"].qparams["input"] is layers["conv1"].qparams["output"]
    assert layers["fc"].qparams["input"] is layers["conv2"].qparams["output"]
    head_in, fc_out = layers["head"].qparams["input"], layers["fc"].qparams["output"]
    assert not torch.equal(head_in.scale, fc_out.scale)  # after a sigmoid: its own observer
    assert "input" in layers["conv1"].qparams  # the model input: its own observer


def test_fake_model_computes_what_the_int8_model_computes() -> None:
    """The same config on fake and on x86 int8: outputs within one output step nearly everywhere."""
    _, fake, _ = _quantized(STATIC)
    _, int8, _ = _quantized({**STATIC, "backend": "x86"})
    step = float(int8._qswap.layers["head"].qparams["output"].scale)  # type: ignore[union-attr]
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        steps = (fake(x) - int8(x)).abs() / step
    assert float((steps <= 1.001).float().mean()) >= 0.99


def test_qat_trains_one_quantizer_per_tensor() -> None:
    """QAT ties a chained input to its producer's output quantizer, so it trains the int8 graph.

    The tied slot has no observer of its own, a training step moves the shared learned step
    with the gradients of both uses, and convert gives the chained input the producer's qparams.
    """
    torch.manual_seed(0)
    model = Net()
    data = [torch.rand(8, 3, 8, 8) for _ in range(3)]
    config = {
        **STATIC,
        "mode": "qat",
        "activation": {"observer": "minmax", "quantizer": "lsq"},
    }
    prepared = qswap.prepare(model, config, example_inputs=(data[0],))
    qswap.calibrate(prepared, data, progress=False)
    tied = activation_slot(prepared.conv2, "input")
    producer = activation_slot(prepared.conv1, "output")  # conv1 + relu1 fused
    assert tied is not None and producer is not None and producer.quantizer is not None
    assert tied.follows == "conv1" and tied.observer is None
    assert tied.quantizer is producer.quantizer
    head = activation_slot(prepared.head, "input")
    assert head is not None and head.follows is None  # after the sigmoid: its own quantizer
    prepared.train()
    step = next(p for p in producer.quantizer.parameters())
    prepared(data[0]).square().mean().backward()
    assert step.grad is not None and float(step.grad.abs().sum()) > 0
    qmodel = qswap.convert(prepared.eval())
    layers = qmodel._qswap.layers  # type: ignore[union-attr]
    assert layers["conv2"].qparams["input"] is layers["conv1"].qparams["output"]
    assert layers["head"].qparams["input"] is not layers["fc"].qparams["output"]


def _observers(prepared: nn.Module) -> dict[str, bool]:
    """Per layer: whether its input slot has an observer of its own."""
    out = {}
    for name in ("conv1", "conv2", "fc", "head"):
        slot = activation_slot(prepared.get_submodule(name), "input")
        out[name] = slot is not None and slot.observer is not None
    return out


def test_static_prepare_observes_each_tensor_once() -> None:
    """A chained input gets no observer: its producer's output observer sees the same tensor.

    The spec records the producer and convert gives the input the producer's qparams, on
    fake and on int8. Without example inputs there is no trace, and every input keeps its own.
    """
    torch.manual_seed(0)
    model = Net().eval()
    data = [torch.rand(8, 3, 8, 8) for _ in range(3)]
    producers = ("conv1", "conv2")
    for backend in ("fake", "x86"):
        prepared = qswap.prepare(model, {**STATIC, "backend": backend}, example_inputs=(data[0],))
        assert _observers(prepared) == {"conv1": True, "conv2": False, "fc": False, "head": True}
        specs = prepared._qswap.layers  # type: ignore[union-attr]
        assert (specs["conv2"].input_from, specs["fc"].input_from) == producers
        if backend == "x86":  # int8 runs the pools as they are: they keep conv1's, conv2's grid
            assert (specs["pool"].input_from, specs["avg"].input_from) == producers
            for pool in (prepared.pool, prepared.avg):  # so they observe nothing
                assert activation_slot(pool, "input") is None
                assert activation_slot(pool, "output") is None
        assert specs["conv1"].input_from is None and specs["head"].input_from is None
        mean_only = activation_slot(prepared.conv2, "input")  # the preset corrects biases
        assert mean_only is not None and "mean" in mean_only._modules
        qmodel = qswap.convert(qswap.calibrate(prepared, data, progress=False))
        layers = qmodel._qswap.layers  # type: ignore[union-attr]
        for name, producer in zip(("conv2", "fc"), producers, strict=True):
            assert layers[name].qparams["input"] is layers[producer].qparams["output"]
            assert layers[name].bias_shift is not None
        if backend == "x86":
            for pool, producer in zip(("pool", "avg"), producers, strict=True):
                qp = layers[pool].qparams
                assert qp["input"] is qp["output"] is layers[producer].qparams["output"]
    separate = qswap.prepare(model, STATIC)  # no trace to tell producers: each input observed
    assert all(_observers(separate).values())
    assert all(layer.input_from is None for layer in separate._qswap.layers.values())  # type: ignore[union-attr]


def test_an_input_with_another_spec_keeps_its_own_observer() -> None:
    """A layer whose input spec differs from its producer's output spec quantizes the tensor again."""
    torch.manual_seed(0)
    model = Net().eval()
    data = [torch.rand(8, 3, 8, 8) for _ in range(2)]
    config = {**STATIC, "rules": [{"match": {"name": "fc"}, "input": {"bits": 6}}]}
    prepared = qswap.prepare(model, config, example_inputs=(data[0],))
    assert _observers(prepared) == {"conv1": True, "conv2": False, "fc": True, "head": True}
    qmodel = qswap.convert(qswap.calibrate(prepared, data, progress=False))
    fc_in = qmodel._qswap.layers["fc"].qparams["input"]  # type: ignore[union-attr]
    assert (fc_in.quant_min, fc_in.quant_max) == (0, 63)


class Block(nn.Module):
    """The forum's BasicBlock shape: one ReLU module used after conv1 and after the skip add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def test_int8_pass_through_layers_keep_their_input_grid_and_adds_keep_their_own_range() -> None:
    """Chaining looks through layers int8 runs as they are, and never past a skip add.

    conv2 is fed conv1's int8 tensor through the shared ReLU (whose observer also sees the
    add's output), so its input is conv1's output, not the ReLU's. The next block's conv1 is
    fed the add's output: it keeps its own observer, whose qparams requantize the add.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Block(4), Block(4)).eval()
    for block in (model[1], model[2]):
        nn.init.uniform_(block.bn1.running_mean, -0.2, 0.2)
        nn.init.uniform_(block.bn2.running_var, 0.5, 2.0)
    data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    prepared = qswap.prepare(model, STATIC | {"backend": "x86"}, example_inputs=(data[0],))
    specs = prepared._qswap.layers  # type: ignore[union-attr]
    assert specs["1.conv2"].input_from == "1.conv1"
    assert specs["2.conv1"].input_from is None and specs["1.relu"].input_from is None
    qmodel = qswap.convert(qswap.calibrate(prepared, data, progress=False))
    layers = qmodel._qswap.layers  # type: ignore[union-attr]
    adds = [op for op in qmodel._qswap_int8.ops if op.kind == "add_relu"]  # type: ignore[union-attr]
    assert len(adds) == 2
    next_input = layers["2.conv1"].qparams["input"]
    assert adds[0].scale == float(next_input.scale)
    assert adds[0].zero_point == int(next_input.zero_point)
