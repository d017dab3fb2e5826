"""Calibration artifacts: exact reuse, what they record, and clear refusals of bad files or models."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from forum_models import resnet18, vgg
from torch import nn

import qswap
from qswap.exceptions import CalibrationError, PlanError
from qswap.persist.artifact import load_calibration, save_calibration

# x86 int8 with min-max activation observers: the preset's histograms are slow to calibrate
INT8 = {"extends": ["x86_int8"], "activation": {"observer": "minmax"}}


def forum(build: type[nn.Module] | object, **kwargs: object) -> nn.Module:
    """A width-0.25 forum model with BatchNorm statistics from two random batches, in eval mode."""
    torch.manual_seed(0)
    model: nn.Module = build(width=0.25, **kwargs)  # type: ignore[operator]
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(16, 3, 32, 32))
    return model.eval()


X = torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
CALIB = [X[:16], X[16:32]]
EXAMPLE = (X[:1],)


def calibrated(model: nn.Module, config: object) -> nn.Module:
    """A prepared model calibrated on CALIB."""
    prepared = qswap.prepare(model, config, example_inputs=EXAMPLE)  # type: ignore[arg-type]
    return qswap.calibrate(prepared, CALIB, progress=False)


@pytest.mark.parametrize(
    ("build", "config"),
    [(vgg, "x86_int8"), (resnet18, INT8), (resnet18, "w8a8_minmax")],
    ids=["vgg-x86", "resnet-x86-minmax", "resnet-fake"],
)
def test_artifact_then_convert_equals_calibrating_again(
    tmp_path: Path, build: object, config: object
) -> None:
    """convert(prepared, calibration=file) gives the same model, bit for bit, as the calibrated convert."""
    model = forum(build)
    prepared = calibrated(model, config)
    path = save_calibration(prepared, tmp_path / "model.qcal")
    expected = qswap.convert(prepared)
    fresh = qswap.prepare(model, config, example_inputs=EXAMPLE)
    reused = qswap.convert(fresh, calibration=path)
    with torch.no_grad():
        assert torch.equal(expected(X[32:]), reused(X[32:]))
    for (ka, va), (kb, vb) in zip(
        expected.state_dict().items(), reused.state_dict().items(), strict=False
    ):
        assert ka == kb
        if isinstance(va, torch.Tensor) and va.is_quantized:
            assert torch.equal(va.int_repr(), vb.int_repr()), ka
        elif isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), ka


def test_artifact_records_qparams_config_versions_and_observers(tmp_path: Path) -> None:
    """The file loads weights-only and holds the exact qparams, config, versions and observer states."""
    prepared = calibrated(forum(vgg), "w8a8_minmax")
    path = save_calibration(prepared, tmp_path / "vgg.qcal")
    raw = torch.load(path, weights_only=True)
    assert raw["qswap"] == "qswap-calibration"
    cal = load_calibration(path)
    converted = qswap.convert(prepared)
    layers = converted._qswap.layers  # type: ignore[union-attr]
    assert set(cal.qparams) == set(layers)
    for name, layer in layers.items():
        for slot, qp in layer.qparams.items():
            got = cal.qparams[name][slot]
            assert torch.equal(got.scale, qp.scale) and torch.equal(got.zero_point, qp.zero_point)
            assert (got.quant_min, got.quant_max, got.axis) == (qp.quant_min, qp.quant_max, qp.axis)
    assert cal.meta["qswap_version"] == qswap.__version__
    assert cal.meta["torch_version"] == torch.__version__
    assert qswap.load_config(cal.config_text) == qswap.load_config("w8a8_minmax")
    observed = cal.layers_meta["features.0"]["observers"]
    assert observed["input"]["name"] == "minmax"
    assert observed["input"]["max_val"] == pytest.approx(float(X[:32].max()), rel=1e-6)
    # a tensor observed once: the next conv's input is the first conv's (pooled) output
    assert cal.layers_meta["features.4"]["observers"]["input"] == {
        "observed_as": "features.0 output"
    }
    assert torch.equal(
        cal.qparams["features.4"]["input"].scale, cal.qparams["features.0"]["output"].scale
    )
    table = str(cal)
    assert "features.0" in table and "per_channel(axis=0)" in table
    assert "as features.0 output" in table


def test_missing_artifact_is_a_clear_error(tmp_path: Path) -> None:
    """A path that does not exist names the path and how to make an artifact."""
    prepared = qswap.prepare(forum(vgg), "w8a8_minmax", example_inputs=EXAMPLE)
    missing = tmp_path / "nope.qcal"
    with pytest.raises(CalibrationError, match="does not exist") as info:
        qswap.convert(prepared, calibration=missing)
    assert str(missing) in str(info.value) and "save_calibration" in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other_torch_file", "empty"])
def test_corrupt_artifact_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    """Truncated, random, empty or foreign files are refused with the path and no half result."""
    good = save_calibration(calibrated(forum(vgg), "w8a8_minmax"), tmp_path / "good.qcal")
    bad = tmp_path / "bad.qcal"
    data = good.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(bytes(range(256)) * 8)
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        buffer = io.BytesIO()
        torch.save({"weight": torch.ones(2)}, buffer)
        bad.write_bytes(buffer.getvalue())
    with pytest.raises(CalibrationError) as info:
        load_calibration(bad)
    assert str(bad) in str(info.value)
    assert "Traceback" not in str(info.value)


def test_newer_format_is_refused_with_upgrade_hint(tmp_path: Path) -> None:
    """An artifact from a newer qswap says to upgrade instead of misreading it."""
    path = save_calibration(calibrated(forum(vgg), "w8a8_minmax"), tmp_path / "c.qcal")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(CalibrationError, match="upgrade qswap"):
        load_calibration(path)


def test_artifact_for_another_model_names_the_first_module_that_differs(tmp_path: Path) -> None:
    """A VGG 'A' artifact applied to a VGG 'B' names features.3 (MaxPool2d there, Conv2d here)."""
    path = save_calibration(calibrated(forum(vgg), "w8a8_minmax"), tmp_path / "a.qcal")
    other = qswap.prepare(forum(vgg, cfg="B"), "w8a8_minmax", example_inputs=EXAMPLE)
    with pytest.raises(PlanError, match="another model") as info:
        qswap.convert(other, calibration=path)
    message = str(info.value)
    assert "'features.3'" in message
    assert "MaxPool2d" in message and "Conv2d" in message


def test_artifact_for_another_config_names_layer_and_slot(tmp_path: Path) -> None:
    """Changing one layer's weight bits after calibrating is refused, naming that layer and slot."""
    path = save_calibration(calibrated(forum(vgg), "w8a8_minmax"), tmp_path / "c.qcal")
    config = {
        "extends": ["w8a8_minmax"],
        "rules": [{"match": {"name": "classifier.1"}, "weight": {"bits": 4}}],
    }
    prepared = qswap.prepare(forum(vgg), config, example_inputs=EXAMPLE)
    with pytest.raises(PlanError, match="'classifier.1' slot 'weight'") as info:
        qswap.convert(prepared, calibration=path)
    assert "int8" in str(info.value) and "int4" in str(info.value)


def test_artifact_refuses_changed_weights(tmp_path: Path) -> None:
    """Weights changed since calibration (e.g. more training) are refused, naming the layer."""
    model = forum(vgg)
    path = save_calibration(calibrated(model, "w8a8_minmax"), tmp_path / "c.qcal")
    with torch.no_grad():
        model.classifier[0].weight.mul_(1.5)
    prepared = qswap.prepare(model, "w8a8_minmax", example_inputs=EXAMPLE)
    with pytest.raises(PlanError, match="'classifier.0'.*Calibrate again"):
        qswap.convert(prepared, calibration=path)


def test_artifact_refuses_other_fusion_and_says_to_pass_example_inputs(tmp_path: Path) -> None:
    """A ResNet prepared without example inputs fuses differently; the error says how to fix it."""
    model = forum(resnet18)
    path = save_calibration(calibrated(model, "w8a8_minmax"), tmp_path / "c.qcal")
    prepared = qswap.prepare(model, "w8a8_minmax")
    with pytest.raises(PlanError, match="fusion groups.*example_inputs"):
        qswap.convert(prepared, calibration=path)


def test_artifact_supplies_example_shapes_for_int8_lowering(tmp_path: Path) -> None:
    """An int8 convert from an artifact works without example inputs: it traces zeros of the saved shapes."""
    model = forum(vgg, cfg="A")
    prepared = calibrated(model, INT8)
    path = save_calibration(prepared, tmp_path / "c.qcal")
    meta = json.loads(torch.load(path, weights_only=True)["meta"])
    assert meta["example_inputs"] == {
        "args": [{"shape": [1, 3, 32, 32], "dtype": "float32"}],
        "kwargs": {},
    }
    expected = qswap.convert(prepared)
    fresh = qswap.prepare(model, INT8)  # VGG fuses the same without a trace
    reused = qswap.convert(fresh, calibration=path)
    with torch.no_grad():
        assert torch.equal(expected(X[32:]), reused(X[32:]))


def test_save_calibration_refuses_a_plain_model(tmp_path: Path) -> None:
    """A model qswap never prepared cannot be saved as an artifact, and no file appears."""
    with pytest.raises(CalibrationError, match="qswap did not prepare"):
        save_calibration(nn.Linear(2, 2), tmp_path / "x.qcal")
    assert not list(tmp_path.iterdir())


def test_a_file_with_pickled_code_is_refused_without_running_it(tmp_path: Path) -> None:
    """A torch file holding an arbitrary Python object is refused by the weights-only loader."""
    evil = tmp_path / "evil.qcal"
    torch.save({"qswap": "qswap-calibration", "payload": Path("x")}, evil)
    with pytest.raises(CalibrationError, match="could run code"):
        load_calibration(evil)
