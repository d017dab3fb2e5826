"""Saving and loading quantized models: bit-identical outputs, weights-only files, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from forum_models import resnet18, vgg
from torch import nn

import qswap
from qswap.exceptions import CalibrationError, PlanError
from qswap.persist.model_file import load, save

X = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(2))


# x86 int8 with min-max activation observers: the preset's histograms are slow to calibrate
INT8 = {"extends": ["x86_int8"], "activation": {"observer": "minmax"}}


def forum(build: object, seed: int = 0, **kwargs: object) -> nn.Module:
    """A width-0.25 forum model with BatchNorm statistics from random batches, in eval mode."""
    torch.manual_seed(seed)
    model: nn.Module = build(width=0.25, **kwargs)  # type: ignore[operator]
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32))
    return model.eval()


def quantized(build: object, config: object) -> nn.Module:
    """The forum model quantized with ``config`` on 32 random images."""
    return qswap.quantize(
        forum(build), config, calib_data=[X[:16], X[16:32]], example_inputs=(X[:1],), progress=False
    )


@pytest.mark.parametrize(
    ("build", "config"),
    [(vgg, "x86_int8"), (resnet18, INT8), (resnet18, "w8a8_minmax")],
    ids=["vgg-x86", "resnet-x86-minmax", "resnet-fake"],
)
def test_save_then_load_reproduces_outputs_bit_for_bit(
    tmp_path: Path, build: object, config: object
) -> None:
    """A model loaded onto a freshly built (differently initialised) float model gives identical outputs."""
    qmodel = quantized(build, config)
    path = save(qmodel, tmp_path / "model.qswap")
    fresh = forum(build, seed=123)
    loaded = load(path, fresh)
    with torch.no_grad():
        assert torch.equal(qmodel(X[32:]), loaded(X[32:]))
    assert loaded._qswap.plan.config == qmodel._qswap.plan.config  # type: ignore[union-attr]
    assert str(loaded._qswap.plan) == str(qmodel._qswap.plan)  # type: ignore[union-attr]
    for p in fresh.parameters():  # the float model passed in is left as it was
        assert not hasattr(p, "_qswap")
    assert state_dict_equal(forum(build, seed=123), fresh)


def state_dict_equal(a: nn.Module, b: nn.Module) -> bool:
    """Whether two float models hold the same tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_saved_file_loads_weights_only_and_keeps_config_and_plan(tmp_path: Path) -> None:
    """The file is tensors plus JSON text: torch.load(weights_only=True) reads it, config and plan included."""
    qmodel = quantized(vgg, INT8)
    path = save(qmodel, tmp_path / "vgg.qswap")
    raw = torch.load(path, weights_only=True)
    assert raw["qswap"] == "qswap-model"
    assert all(not t.is_quantized for t in raw["tensors"].values())
    import json

    meta = json.loads(raw["meta"])
    assert qswap.load_config(meta["config"]) == qswap.load_config(INT8)
    assert "features.0" in meta["plan"] and "QuantizedConvReLU2d" in meta["plan"]
    assert not list(tmp_path.glob("*.tmp")), "no temporary file is left behind"


def test_load_refuses_a_model_of_another_class(tmp_path: Path) -> None:
    """Loading a VGG file onto a ResNet names both classes."""
    path = save(quantized(vgg, "w8a8_minmax"), tmp_path / "vgg.qswap")
    with pytest.raises(PlanError, match="Cifar_VGG.*not a.*ResNet"):
        load(path, forum(resnet18))


def test_load_refuses_another_width_naming_the_layer(tmp_path: Path) -> None:
    """A same-class model with other layer widths is refused, naming the first layer whose shape differs."""
    path = save(quantized(vgg, "w8a8_minmax"), tmp_path / "vgg.qswap")
    torch.manual_seed(0)
    wider = vgg(width=0.5).eval()
    with pytest.raises(PlanError, match="'features.0' has a weight of shape"):
        load(path, wider)


def test_save_refuses_a_model_that_is_not_converted(tmp_path: Path) -> None:
    """Saving a prepared model says to convert it (or save the calibration) and writes nothing."""
    prepared = qswap.prepare(forum(vgg), "w8a8_minmax", example_inputs=(X[:1],))
    with pytest.raises(PlanError, match="save_calibration"):
        save(prepared, tmp_path / "p.qswap")
    assert not list(tmp_path.iterdir())


def test_load_of_a_corrupt_or_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """A truncated file and a missing one both name the path."""
    path = save(quantized(vgg, "w8a8_minmax"), tmp_path / "vgg.qswap")
    data = path.read_bytes()
    path.write_bytes(data[:100])
    with pytest.raises(CalibrationError, match="cannot be read"):
        load(path, forum(vgg))
    with pytest.raises(CalibrationError, match="does not exist"):
        load(tmp_path / "missing.qswap", forum(vgg))


def test_dynamic_int8_model_saves_and_loads_bit_for_bit(tmp_path: Path) -> None:
    """A dynamic int8 model (x86_dynamic_int8) round-trips through save/load to equal outputs."""
    torch.manual_seed(0)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()

    q = qswap.quantize(build(), "x86_dynamic_int8")
    path = qswap.save(q, tmp_path / "dynamic.qswap")
    loaded = qswap.load(path, build())
    x = torch.randn(5, 8)
    assert torch.equal(q(x), loaded(x))
    assert type(loaded[0]).__name__ == "QuantizedDynamicLinearReLU"
