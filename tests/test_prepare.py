"""prepare and calibrate: observers attached without rewriting layers, data run through them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TwoInputs, assert_unchanged, snapshot
from torch import nn
from torch.nn.utils import parametrize

import qswap
from qswap.calibrate import calibrate
from qswap.convert import convert
from qswap.observers import Observer
from qswap.plan import plan
from qswap.prepare import prepare
from qswap.slots import ActivationSlot, WeightObserver
from qswap.state import copy_model, state_of

FAKE = "w8a8_minmax"


def test_prepare_copies_and_attaches_observers() -> None:
    """The prepared copy observes weights via parametrize and activations via hooks; the user's model is untouched."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)
    )
    model.train()
    before = snapshot(model)
    prepared = prepare(model, FAKE)
    assert_unchanged(before, model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert type(prepared[0]).__name__ == "ConvReLU2d" and type(prepared[1]) is nn.Identity
    conv = prepared[0][0]
    assert parametrize.is_parametrized(conv, "weight")
    assert isinstance(conv.parametrizations.weight[0], WeightObserver)
    assert isinstance(conv.parametrizations.weight[0].observer, Observer)
    assert isinstance(conv.qswap_input, ActivationSlot) and isinstance(
        prepared[0][1].qswap_output, ActivationSlot
    )
    assert isinstance(prepared[4].qswap_output.observer, Observer)
    assert "_qswap" not in dict(prepared.named_modules())
    assert not any("_qswap" in k for k in prepared.state_dict())
    assert state_of(prepared) is not None and state_of(prepared).stage == "prepared"
    assert prepared.training  # the copy keeps the flags it had


def test_prepare_keeps_dtype_device_and_user_hooks() -> None:
    """A float64 model stays float64 and its forward hooks still fire on the prepared copy."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    seen: list[int] = []
    model[2].register_forward_hook(lambda m, a, o: seen.append(o.shape[0]))
    prepared = prepare(model, FAKE)
    out = prepared(torch.randn(3, 4, dtype=torch.float64))
    assert out.dtype == torch.float64 and seen == [3]
    assert prepared[0].weight.dtype == torch.float64
    assert prepared[0].weight.device == model[0].weight.device


def test_weight_only_attaches_no_activation_observers() -> None:
    """mode weight_only observes weights and nothing else."""
    prepared = prepare(nn.Sequential(nn.Linear(4, 2)), {"mode": "weight_only"})
    assert parametrize.is_parametrized(prepared[0], "weight")
    assert not any(isinstance(m, ActivationSlot) for m in prepared.modules())


def test_prepare_inplace_and_twice() -> None:
    """inplace=True prepares the given object; preparing a prepared model is refused."""
    model = nn.Sequential(nn.Linear(4, 2))
    prepared = prepare(model, FAKE, inplace=True)
    assert prepared is model and parametrize.is_parametrized(model[0])
    with pytest.raises(qswap.PlanError, match="already prepared or converted by qswap"):
        prepare(model, FAKE)


def test_prepare_from_a_plan() -> None:
    """A Plan made for the model can be passed instead of a config; another model is refused."""
    model = nn.Sequential(nn.Linear(4, 2))
    the_plan = plan(model, FAKE)
    assert state_of(prepare(model, the_plan)).plan is the_plan
    with pytest.raises(
        qswap.PlanError, match="the plan was made for a Sequential, not for this Linear"
    ):
        prepare(nn.Linear(4, 2), the_plan)


def test_calibrate_accepts_tensor_tuple_and_dict_batches() -> None:
    """A batch may be a tensor, a tuple of arguments or a dict of keyword arguments."""
    prepared = prepare(TwoInputs(), FAKE)
    x, y = torch.randn(2, 4), torch.randn(2, 2)
    calibrate(prepared, [(x, y), {"x": x, "y": y}, [x, y]], progress=False)
    assert int(prepared.a.qswap_input.observer.num_batches) == 6  # a runs twice per batch
    single = prepare(nn.Linear(4, 2), FAKE)
    calibrate(single, [x, x], progress=False)
    assert int(single.qswap_output.observer.num_batches) == 2


def test_calibrate_max_batches_and_example_inputs() -> None:
    """max_batches stops early; the first batch becomes the example input when prepare had none."""
    prepared = prepare(nn.Linear(4, 2), FAKE)
    batches = iter([torch.full((1, 4), float(i)) for i in range(10)])
    assert calibrate(prepared, batches, max_batches=3, progress=False) is prepared
    assert int(prepared.qswap_input.observer.num_batches) == 3
    assert len(list(batches)) == 7  # nothing beyond the third batch was pulled
    st = state_of(prepared)
    assert st.example_args is not None and torch.equal(st.example_args[0], torch.zeros(1, 4))


def test_calibrate_runs_in_eval_without_grad() -> None:
    """Calibration uses eval mode (dropout off, BN running stats untouched) and restores the flags."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9), nn.Linear(4, 2)).train()
    prepared = prepare(model, {"fusion": "off"})
    grads: list[bool] = []
    prepared[2].register_forward_hook(lambda m, a, o: grads.append(o.requires_grad))
    x = torch.ones(8, 4)
    calibrate(prepared, [x], progress=False)
    assert grads == [False] and prepared.training and prepared[1].training
    # in eval mode dropout is the identity, so the observed input of layer 2 is layer 0's output
    expected = model[0](x).detach()
    obs = prepared[2].qswap_input.observer
    assert torch.allclose(obs.max_val, expected.max()) and torch.allclose(
        obs.min_val, expected.min()
    )


def test_calibrate_progress(capsys: pytest.CaptureFixture[str]) -> None:
    """progress=True draws a tqdm bar on stderr; False and a non-terminal stderr stay silent."""
    x = torch.randn(2, 4)
    calibrate(prepare(nn.Linear(4, 2), FAKE), [x, x], progress=True)
    err = capsys.readouterr().err
    assert "qswap calibrate" in err and "2/2" in err
    calibrate(prepare(nn.Linear(4, 2), FAKE), [x, x], progress=False)
    calibrate(prepare(nn.Linear(4, 2), FAKE), [x, x])  # captured stderr is not a TTY
    assert capsys.readouterr().err == ""


def test_calibration_errors() -> None:
    """Unprepared models, empty data, bad max_batches and (inputs, labels) pairs get clear errors."""
    with pytest.raises(qswap.CalibrationError) as info:
        calibrate(nn.Linear(4, 2), [torch.randn(1, 4)])
    assert str(info.value) == (
        "calibrate() needs a model returned by qswap.prepare(), got a Linear that qswap did not "
        "prepare; call prepared = qswap.prepare(model, config) first and calibrate that"
    )
    prepared = prepare(nn.Linear(4, 2), FAKE)
    with pytest.raises(
        qswap.CalibrationError,
        match=r"^calibrate\(\) saw no batch: the iterable of batches was empty",
    ):
        calibrate(prepared, [])
    with pytest.raises(
        qswap.CalibrationError, match="max_batches must be a positive number of batches"
    ):
        calibrate(prepared, [torch.randn(1, 4)], max_batches=0)
    with pytest.raises(
        qswap.CalibrationError, match=r"If the batches are \(inputs, labels\) pairs, pass "
    ):
        calibrate(prepared, [(torch.randn(1, 4), torch.tensor([1]))])
    converted = convert(calibrate(prepared, [torch.randn(1, 4)]))
    with pytest.raises(qswap.CalibrationError, match="already converted"):
        calibrate(converted, [torch.randn(1, 4)])


def test_copy_model_matches_deepcopy() -> None:
    """The fast copy equals copy.deepcopy: new tensors, same values, tied weights still tied."""
    emb = nn.Embedding(5, 4)
    model = nn.Sequential(emb, nn.Linear(4, 5))
    model[1].weight = emb.weight  # tied
    model.extra = [1, 2]  # a plain attribute
    c = copy_model(model)
    d = copy.deepcopy(model)
    assert c[1].weight is c[0].weight and c[0].weight is not emb.weight
    assert c.extra == [1, 2] and c.extra is not model.extra
    assert [k for k, _ in c.state_dict().items()] == [k for k, _ in d.state_dict().items()]
    x = torch.tensor([[0, 3]])
    assert torch.equal(c(x), model(x))


def test_copy_of_prepared_model_is_independent() -> None:
    """Stripping a deep copy of a prepared model never breaks the original (parametrize shares classes)."""
    x = torch.randn(3, 4)
    prepared = prepare(
        nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), "x86_int8", example_inputs=(x,)
    )
    calibrate(prepared, [x], progress=False)
    copied = copy.deepcopy(prepared)
    qmodel = convert(copied, inplace=True)  # the integer backend strips every parametrization
    assert not any(parametrize.is_parametrized(m) for m in copied.modules())
    assert prepared[0].weight.shape == (4, 4)  # the original still resolves its weight
    assert isinstance(prepared[0].parametrizations.weight[0].observer, Observer)
    assert qmodel(x).shape == (3, 2)


def test_weights_are_observed_once_per_value() -> None:
    """An unchanged weight is observed once however many batches run; a written weight again."""
    prepared = prepare(nn.Sequential(nn.Linear(4, 2)), FAKE)
    calibrate(prepared, [torch.randn(2, 4)] * 5, progress=False)
    observer = prepared[0].parametrizations.weight[0].observer
    assert int(observer.num_batches) == 1
    with torch.no_grad():
        prepared[0].parametrizations.weight.original.mul_(2)
    calibrate(prepared, [torch.randn(2, 4)], progress=False)
    assert int(observer.num_batches) == 2


def test_qat_mode_fake_quantizes_while_observing() -> None:
    """In mode qat the prepared model already fake-quantizes (weights on the grid) and trains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    prepared = prepare(model, {"mode": "qat", "weight": {"bits": 4, "granularity": "per_tensor"}})
    x = torch.randn(8, 4)
    prepared(x).sum().backward()
    weight = prepared[0].weight.detach()
    assert len(weight.unique()) <= 16  # 4-bit grid
    assert not torch.equal(weight, model[0].weight.detach())
    assert prepared[0].parametrizations.weight.original.grad is not None


def test_prepare_keeps_tied_weights_tied() -> None:
    """A weight tied between two modules is one Parameter in the prepared copy too; the user's model is untouched."""
    emb = nn.Embedding(5, 4)
    model = nn.Sequential(emb, nn.Linear(4, 5))
    model[1].weight = emb.weight  # tied
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare(model, FAKE)
    params = dict(prepared.named_parameters(remove_duplicate=False))
    tied = [p for name, p in params.items() if name.startswith(("0.", "1.")) and "weight" in name]
    assert len(tied) == 2 and tied[0] is tied[1]
    assert all(p is not emb.weight for p in tied)
    assert model[1].weight is model[0].weight is emb.weight
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
