"""Quantization-aware training: STE and LSQ gradients, trainable conv+BN, conversion like PTQ."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations as cls_of

import qswap
from qswap.qat import TrainableFusion, freeze_bn_stats
from qswap.slots import activation_slot

FAKE_QAT = {"version": 1, "backend": "fake", "mode": "qat"}


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def _batches(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _prepared(cfg: dict[str, Any] = FAKE_QAT, model: nn.Module | None = None) -> nn.Module:
    model = _net() if model is None else model
    prepared = qswap.prepare(model, cfg, example_inputs=(_batches(1)[0],))
    return qswap.calibrate(prepared, _batches(), progress=False)


def _fold(bn: nn.BatchNorm2d) -> torch.Tensor:
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().reshape(-1, 1, 1, 1)


def test_qat_keeps_batchnorm_training_and_its_statistics_updating() -> None:
    """In mode qat the conv+BN+ReLU group stays unfolded and a training step moves BN's statistics."""
    prepared = _prepared()
    group = prepared[0]
    assert type(group) is TrainableFusion
    assert type(prepared[1]) is nn.Identity and type(prepared[2]) is nn.Identity
    before = group.bn.running_mean.clone()
    prepared.train()
    prepared(_batches(1)[0] + 1.0)
    assert not torch.equal(group.bn.running_mean, before)


def test_qat_fake_quantizes_the_weight_as_batchnorm_will_fold_it() -> None:
    """The conv sees fake_quant(w * s) / s: times the BN fold factor, it sits on the 8-bit grid."""
    prepared = _prepared()
    group = prepared[0]
    conv = group[0]
    folded = conv.weight.detach() * _fold(group.bn)
    quantizer = conv.parametrizations.weight[-1].quantizer
    scale = quantizer.qparams.scale.reshape(-1, 1, 1, 1)
    steps = folded / scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    raw = conv.parametrizations.weight.original / scale
    assert not torch.allclose(raw, raw.round(), atol=1e-3)


def test_qat_gradients_reach_float_weights_and_batchnorm() -> None:
    """A backward pass through the fake-quantized model gives the float weights and BN gamma gradients."""
    prepared = _prepared()
    prepared.train()
    prepared(_batches(1)[0]).pow(2).sum().backward()
    conv_weight = prepared[0][0].parametrizations.weight.original
    linear_weight = prepared[8].parametrizations.weight.original
    for grad in (conv_weight.grad, linear_weight.grad, prepared[0].bn.weight.grad):
        assert grad is not None and float(grad.abs().sum()) > 0


def test_lsq_steps_are_model_parameters_that_training_moves() -> None:
    """With quantizer lsq, every weight and activation step is in parameters(), gets a gradient,
    moves with the optimizer, and convert keeps the learned value."""
    cfg = {
        **FAKE_QAT,
        "weight": {"bits": 4, "granularity": "per_channel", "axis": 0, "quantizer": "lsq"},
        "activation": {"signed": False, "scheme": "affine", "quantizer": "lsq"},
    }
    prepared = _prepared(cfg)
    steps = {n: p for n, p in prepared.named_parameters() if n.endswith("quantizer.step")}
    # three weights, three outputs and the model's input: the inputs of layers 3 and 8 come
    # from the layer before (through pooling and flatten) and share its output step
    assert len(steps) == 3 + 3 + 1
    weight_step = prepared[0][0].parametrizations.weight[-1].quantizer.step
    assert any(p is weight_step for p in steps.values())
    before = {n: p.detach().clone() for n, p in steps.items()}
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.5)
    prepared.train()
    prepared(_batches(1)[0]).pow(2).mean().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in steps.values())
    optimizer.step()
    moved = [n for n, p in steps.items() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(steps)
    qmodel = qswap.convert(prepared.eval())
    learned = qmodel._qswap.layers["0"].qparams["weight"].scale
    assert torch.allclose(learned, weight_step.detach().abs())


def test_calibrate_starts_lsq_from_the_whole_calibration_range() -> None:
    """After calibrate, an activation's LSQ step equals the range observed over all batches."""
    cfg = {**FAKE_QAT, "activation": {"signed": False, "scheme": "affine", "quantizer": "lsq"}}
    prepared = _prepared(cfg)
    slot: Any = activation_slot(prepared[0], "input")  # the model's input: its own observer
    assert torch.equal(slot.quantizer.step.detach(), slot.observer.calculate_qparams().scale)
    assert slot.observer.num_batches.item() == 3


def test_freeze_bn_stats_keeps_running_statistics_fixed_through_train() -> None:
    """Frozen, BN statistics stop changing in training mode, even after model.train(); unfrozen they move."""
    prepared = _prepared()
    assert freeze_bn_stats(prepared) == 2
    prepared.train()
    group = prepared[0]
    assert not group.bn.training
    before = group.bn.running_mean.clone()
    prepared(_batches(1)[0] + 1.0)
    assert torch.equal(group.bn.running_mean, before)
    assert freeze_bn_stats(prepared, freeze=False) == 2
    prepared.train()
    prepared(_batches(1)[0] + 1.0)
    assert not torch.equal(group.bn.running_mean, before)


def test_converted_fake_model_computes_what_the_trained_model_computes_in_eval() -> None:
    """convert folds BN and freezes qparams: its output equals the QAT model's eval output."""
    prepared = _prepared()
    prepared.train()
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for x in _batches():
        optimizer.zero_grad()
        prepared(x).pow(2).mean().backward()
        optimizer.step()
    prepared.eval()
    x = _batches(4)[3]
    with torch.no_grad():
        trained = prepared(x)
        qmodel = qswap.convert(prepared)
        converted = qmodel(x)
    assert [cls_of(m).__name__ for m in qmodel][:3] == ["ConvReLU2d", "Identity", "Identity"]
    assert torch.allclose(converted, trained, atol=1e-4)


def test_qat_converts_to_the_same_int8_model_as_ptq() -> None:
    """On x86, QAT then convert gives the same int8 modules as PTQ, with outputs close to QAT's."""
    x = _batches(1)[0]
    ptq = qswap.quantize(_net(), "x86_int8", calib_data=_batches(), example_inputs=(x,))
    prepared = _prepared({"extends": ["x86_int8"], "mode": "qat"}).eval()
    with torch.no_grad():
        fake = prepared(x)
        qat = qswap.convert(prepared)
        out = qat(x)
    names = [type(m).__name__ for m in ptq.modules()]
    assert [type(m).__name__ for m in qat.modules()] == names
    assert names.count("QuantizedConvReLU2d") == 2
    assert torch.allclose(out, fake, atol=0.02 * float(fake.abs().max()))
