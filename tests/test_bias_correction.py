"""Bias correction: the recorded input means, the shift they give, and convert applying it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qswap
from qswap.bias_correction import InputMeanObserver, correctable, shift_of
from qswap.config import QuantSpec
from qswap.distributed import reduction_of

SPEC = QuantSpec(signed=False, scheme="affine")
# 4-bit weights make the shift large; 16-bit activations keep their own noise negligible
COARSE = {
    "version": 1,
    "extends": ["w8a8_minmax"],
    "weight": {"bits": 4, "granularity": "per_tensor"},
    "activation": {"bits": 16},
}


def _data(shape: tuple[int, ...], batches: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a clear non-zero mean per feature, as post-ReLU activations have
    return [torch.rand(*shape, generator=g) * 2 + 0.5 for _ in range(batches)]


def test_means_per_feature_and_per_position() -> None:
    """Linear inputs average over every axis but the last; conv inputs over the batch only."""
    x = _data((3, 5, 6))
    linear = InputMeanObserver(SPEC, kind="linear")
    conv = InputMeanObserver(SPEC, kind="conv")
    for batch in x:
        linear(batch)
        conv(batch.reshape(3, 5, 2, 3))
    stacked = torch.cat(x)
    torch.testing.assert_close(linear.mean().float(), stacked.reshape(-1, 6).mean(0))
    torch.testing.assert_close(conv.mean().float(), stacked.reshape(-1, 5, 2, 3).mean(0))


def test_conv_inputs_of_changing_size_fall_back_to_channel_means() -> None:
    """When the spatial size changes, the mean becomes one value per channel, over all positions."""
    a, b = torch.rand(2, 3, 4, 4), torch.rand(5, 3, 2, 6)
    obs = InputMeanObserver(SPEC, kind="conv")
    obs(a)
    obs(b)
    both = torch.cat(
        [a.permute(1, 0, 2, 3).reshape(3, -1), b.permute(1, 0, 2, 3).reshape(3, -1)], 1
    )
    torch.testing.assert_close(obs.mean().float(), both.mean(1))


@pytest.mark.parametrize("sizes", [((2, 3, 4, 4), (5, 3, 4, 4)), ((2, 3, 4, 4), (5, 3, 2, 2))])
def test_merge_equals_observing_both_streams(sizes: tuple[tuple[int, ...], ...]) -> None:
    """Merging two observers (as ``Observer.merge`` does in process) gives one stream's mean."""
    assert reduction_of(InputMeanObserver) == "custom"  # its own reduce_state
    a, b = (torch.rand(*s) for s in sizes)
    one = InputMeanObserver(SPEC, kind="conv")
    one(a)
    one(b)
    left, right = InputMeanObserver(SPEC, kind="conv"), InputMeanObserver(SPEC, kind="conv")
    left(a)
    right(b)
    total = copy.deepcopy(left)
    total.load_state_dict(left.state_dict())
    other = copy.deepcopy(left)
    other.load_state_dict(right.state_dict())
    total.merge(other)
    torch.testing.assert_close(total.mean(), one.mean())
    assert int(total.num_batches) == 2


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(6, 4),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv1d(4, 3, 5, padding=2),
    ],
    ids=["linear", "conv-padded", "conv-strided-grouped", "conv-reflect", "conv1d"],
)
def test_shift_is_the_mean_output_change_of_the_weight_error(layer: nn.Module) -> None:
    """``shift_of`` equals E[(Wq - W) x] computed by running the layer's op on every input."""
    torch.manual_seed(0)
    core: Any = layer
    shape = (
        (8, 6)
        if isinstance(layer, nn.Linear)
        else (8, 4, 7)
        if core.weight.dim() == 3
        else (8, 4, 7, 7)
    )
    x = torch.cat(_data(shape))
    obs = InputMeanObserver(SPEC, kind="linear" if isinstance(layer, nn.Linear) else "conv")
    obs(x)
    error = torch.randn_like(core.weight) * 0.05
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            direct = F.linear(x, error).mean(0)
        else:
            direct = core._conv_forward(x, error, None)
            direct = direct.mean(dim=(0, *range(2, direct.dim())))
    torch.testing.assert_close(shift_of(layer, error, obs), direct, atol=1e-5, rtol=1e-4)


def test_correctable_layers() -> None:
    """Linear and convolutions with a bias (first child of a fused container) are corrected."""
    assert correctable(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())) is not None
    assert correctable(nn.Linear(3, 4, bias=False)) is None
    assert correctable(nn.ConvTranspose2d(3, 4, 3)) is None
    assert correctable(nn.BatchNorm2d(3)) is None


def _quantized(config: dict[str, Any], model: nn.Module, data: list[torch.Tensor]) -> nn.Module:
    return qswap.quantize(model, config, calib_data=data, example_inputs=(data[0],), progress=False)


def _mean_error(model: nn.Module, qmodel: nn.Module, data: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([qmodel(x) - model(x) for x in data]).mean(0).abs()


def test_correction_removes_the_mean_output_error_on_the_calibration_data() -> None:
    """With coarse weights the output is off on average; the corrected model is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    data = _data((16, 32))
    plain = _quantized(COARSE, model, data)
    corrected = _quantized({**COARSE, "bias_correction": True}, model, data)
    before, after = _mean_error(model, plain, data), _mean_error(model, corrected, data)
    assert before.mean() > 0.02
    assert after.max() < before.mean() / 20
    shift = corrected._qswap.layers["0"].bias_shift  # type: ignore[union-attr]
    torch.testing.assert_close(corrected[0].bias, model[0].bias - shift)
    assert plain._qswap.layers["0"].bias_shift is None  # type: ignore[union-attr]


def test_x86_int8_kernels_get_the_corrected_bias() -> None:
    """The int8 conv packs the folded, corrected bias; the prepared model keeps its own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    data = _data((4, 3, 6, 6))
    cfg = {"extends": ["x86_int8"], "activation": {"observer": "minmax"}}
    prepared = qswap.calibrate(
        qswap.prepare(model, cfg, example_inputs=(data[0],)), data, progress=False
    )
    folded_bias = prepared[0][0].bias.detach().clone()
    qmodel = qswap.convert(prepared)
    shift = qmodel._qswap.layers["0"].bias_shift  # type: ignore[union-attr]
    assert shift is not None and shift.abs().max() > 0
    torch.testing.assert_close(qmodel[0].bias(), folded_bias - shift)
    assert torch.equal(prepared[0][0].bias, folded_bias)  # convert left the prepared model alone


def test_artifact_carries_the_shift(tmp_path: Path) -> None:
    """Converting from a saved calibration gives the same corrected model as converting directly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = _data((16, 32))
    cfg = {**COARSE, "bias_correction": True}
    prepared = qswap.calibrate(
        qswap.prepare(model, cfg, example_inputs=(data[0],)), data, progress=False
    )
    path = qswap.save_calibration(prepared, tmp_path / "c.qcal")
    direct = qswap.convert(prepared)
    fresh = qswap.prepare(model, cfg, example_inputs=(data[0],))
    reused = qswap.convert(fresh, calibration=path)
    assert direct.state_dict().keys() == reused.state_dict().keys()
    for key, value in direct.state_dict().items():
        assert torch.equal(value, reused.state_dict()[key]), key
    assert set(qswap.load_calibration(path).bias_shifts) == {"0", "2"}


def test_weight_only_mode_corrects_too_and_dynamic_does_not() -> None:
    """Weight-only layers record their input mean (no activation observer) and are corrected;
    dynamic mode quantizes inputs per batch and records nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    data = _data((16, 32))
    weight_only = {**COARSE, "mode": "weight_only"}
    plain = _quantized(weight_only, model, data)
    corrected = _quantized({**weight_only, "bias_correction": True}, model, data)
    before, after = _mean_error(model, plain, data), _mean_error(model, corrected, data)
    assert after.max() < before.mean() / 20
    assert not [n for n, _ in corrected.named_modules() if "qswap_input" in n]  # slot removed
    dynamic = _quantized({**COARSE, "mode": "dynamic", "bias_correction": True}, model, data)
    assert dynamic._qswap.layers["0"].bias_shift is None  # type: ignore[union-attr]
    torch.testing.assert_close(dynamic[0].bias, model[0].bias)


def test_a_layer_left_in_float_keeps_its_own_bias() -> None:
    """A conv torch's int8 kernels refuse (string padding) stays float with its bias as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    data = _data((4, 3, 6, 6))
    cfg = {"extends": ["x86_int8"], "activation": {"observer": "minmax"}}
    qmodel = _quantized(cfg, model, data)
    assert "stays float" in str(qmodel._qswap_int8.notes)  # type: ignore[union-attr]
    assert isinstance(qmodel[0][0], nn.Conv2d)
    torch.testing.assert_close(qmodel[0][0].bias, model[0].bias)
    assert qmodel._qswap.layers["2"].bias_shift is not None  # type: ignore[union-attr]
