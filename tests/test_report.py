"""Per-layer reports: SQNR that matches a direct computation, sensitivity ranking, exports, errors."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
from forum_models import vgg
from torch import nn

import qswap
from qswap.exceptions import CalibrationError, PlanError
from qswap.report import report, sqnr_db

X = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))
CALIB = [X[:32]]
EVAL = [X[32:40], X[40:48]]


def forum_vgg() -> nn.Module:
    """A width-0.25 VGG with BatchNorm statistics from random batches, in eval mode."""
    torch.manual_seed(0)
    model = vgg(width=0.25).train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def fake_vgg() -> tuple[nn.Module, nn.Module]:
    """The float VGG and its w8a8 min-max fake-quantized copy."""
    model = forum_vgg()
    q = qswap.quantize(
        model, "w8a8_minmax", calib_data=CALIB, example_inputs=(X[:1],), progress=False
    )
    return model, q


def outputs_of(model: nn.Module, module: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """The outputs of ``module`` inside ``model`` over ``batches``, concatenated."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat([s.dequantize() if s.is_quantized else s for s in seen])


def test_layer_sqnr_agrees_with_a_direct_computation(fake_vgg: tuple[nn.Module, nn.Module]) -> None:
    """features.0 (conv+bn+relu) and the model output match SQNRs computed by hand from hooks."""
    model, q = fake_vgg
    r = report(model, q, EVAL)
    float_relu = outputs_of(model, model.features[2], EVAL)  # the end of the fused group
    quant_conv = outputs_of(q, q.features[0], EVAL)
    assert r["features.0"].sqnr_db == pytest.approx(sqnr_db(float_relu, quant_conv), abs=0.02)
    with torch.no_grad():
        ref = torch.cat([model(b) for b in EVAL])
        out = torch.cat([q(b) for b in EVAL])
    assert r.output_sqnr_db == pytest.approx(sqnr_db(ref, out), abs=1e-6)
    assert r["classifier.1"].sqnr_db == pytest.approx(r.output_sqnr_db, abs=0.02)
    # the first layer sees the float input, so alone it makes all of its own error
    assert r["features.0"].local_sqnr_db == pytest.approx(r["features.0"].sqnr_db, abs=0.02)
    assert r.batches == 2


def test_error_shares_sum_to_one_and_bytes_shrink_fourfold(
    fake_vgg: tuple[nn.Module, nn.Module],
) -> None:
    """Shares of per-layer error add up to 1; an int8 Linear stores 1 byte per weight plus its scales."""
    model, q = fake_vgg
    r = report(model, q, EVAL[:1])
    shares = [row.error_share for row in r.rows if row.error_share is not None]
    assert sum(shares) == pytest.approx(1.0)
    last = r["classifier.1"]
    linear = model.classifier[1]
    assert last.params_before == 4 * (linear.weight.numel() + linear.bias.numel())
    # int8 weights + float bias + one float scale and one int8 zero point per output channel
    out = linear.out_features
    assert last.params_after == linear.weight.numel() + 4 * out + out * (4 + 1)
    conv, bn = model.features[0], model.features[1]  # folded into one conv with a bias
    assert r["features.0"].params_before == 4 * (conv.weight.numel() + conv.bias.numel() + 2 * 16)
    assert r["features.0"].params_after == conv.weight.numel() + 4 * 16 + 16 * (4 + 1)
    assert bn.num_features == 16


def trained_mlp() -> tuple[nn.Module, torch.Tensor]:
    """A 4-layer MLP trained for a moment on 10 Gaussian clusters, and held-out inputs."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 32, generator=g) * 2
    labels = torch.randint(0, 10, (1024,), generator=g)
    inputs = centers[labels] + torch.randn(1024, 32, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        batch = slice(64 * (step % 14), 64 * (step % 14) + 64)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
        optimizer.step()
    return model.eval(), inputs[896:]


def test_sensitivity_ranks_a_deliberately_damaged_layer_first() -> None:
    """With 3-bit weights in the middle layer, quantizing it alone hurts most and it is ranked first."""
    model, held_out = trained_mlp()
    config = {
        "extends": ["w8a8_minmax"],
        "rules": [{"match": {"name": "2"}, "weight": {"bits": 3}}],
    }
    q = qswap.quantize(model, config, calib_data=[held_out[:64]], progress=False)
    r = report(model, q, [held_out[64:]], sensitivity=True)
    assert r.ranking()[0] == "2"
    others = [row.sensitivity_db for row in r.rows if row.name != "2"]
    assert r["2"].sensitivity_db < min(o for o in others if o is not None) - 6.0  # type: ignore[operator]
    assert r.sorted("sensitivity").rows[0].name == "2"
    assert "sensitivity dB" in str(r)
    assert r["2"].bits.startswith("w3/ch")


def test_report_exports_json_and_csv(tmp_path: Path, fake_vgg: tuple[nn.Module, nn.Module]) -> None:
    """JSON and CSV hold one entry per row with the same numbers; files are written whole."""
    model, q = fake_vgg
    r = report(model, q, EVAL[:1])
    data = json.loads(r.to_json(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert [layer["name"] for layer in data["layers"]] == [row.name for row in r.rows]
    assert data["layers"][0]["sqnr_db"] == pytest.approx(r.rows[0].sqnr_db)
    rows = list(csv.DictReader(io.StringIO(r.to_csv(tmp_path / "r.csv"))))
    assert len(rows) == len(r.rows)
    assert float(rows[-1]["sqnr_db"]) == pytest.approx(r.rows[-1].sqnr_db)
    assert (tmp_path / "r.csv").read_text() == r.to_csv()
    worst_first = r.sorted("sqnr")
    values = [row.sqnr_db for row in worst_first.rows if row.sqnr_db is not None]
    assert values == sorted(values)


def test_int8_report_has_rows_for_every_layer_and_inf_for_exact_passthroughs() -> None:
    """On x86 int8, MaxPool layers add no error of their own (inf) and convs show finite SQNR."""
    model = forum_vgg()
    config = {"extends": ["x86_int8"], "activation": {"observer": "minmax"}}
    q = qswap.quantize(model, config, calib_data=CALIB, example_inputs=(X[:1],), progress=False)
    r = report(model, q, EVAL[:1])
    assert r["features.3"].local_sqnr_db == math.inf
    assert 15.0 < r["features.0"].sqnr_db < 80.0  # type: ignore[operator]
    assert json.loads(r.to_json())["layers"][1]["local_sqnr_db"] is None  # inf is JSON null


def test_report_plot_writes_a_png(tmp_path: Path, fake_vgg: tuple[nn.Module, nn.Module]) -> None:
    """With matplotlib installed, plot() writes a PNG file."""
    pytest.importorskip("matplotlib")
    model, q = fake_vgg
    report(model, q, EVAL[:1]).plot(tmp_path / "sqnr.png")
    assert (tmp_path / "sqnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_swapped_or_unquantized_models(
    fake_vgg: tuple[nn.Module, nn.Module],
) -> None:
    """Arguments in the wrong order, a plain model, or no batches are clear errors."""
    model, q = fake_vgg
    with pytest.raises(PlanError, match="second argument must be a model"):
        report(model, model, EVAL)
    with pytest.raises(PlanError, match="first argument is a qswap model"):
        report(q, q, EVAL)
    with pytest.raises(CalibrationError, match="saw no batch"):
        report(model, q, [])
    with pytest.raises(PlanError, match="sensitivity=True"):
        report(model, q, EVAL[:1]).ranking()
