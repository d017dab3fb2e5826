"""Backend ``onnxruntime`` (preset ``ort_int8``): qswap calibrates, ONNX Runtime runs the int8 model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FORUM_CALIB, FORUM_X, TwoInputs, forum_model
from forum_models import resnet18, vgg
from torch import nn

import qswap
from qswap.export.onnx import compare_layers, onnx_session, ort_optimized_ops
from qswap.registry import Registry, default_registry

pytest.importorskip("onnxruntime")


def _registry(saturates: bool) -> Registry:
    """The built-ins, with ONNX Runtime's saturation probe answering ``saturates``."""
    reg = Registry("cpu", parent=default_registry())
    ort = default_registry().backend("onnxruntime")
    reg.register_backend(dataclasses.replace(ort, saturates=lambda: saturates), replace=True)
    return reg


@pytest.fixture(scope="module")
def forum_vgg() -> tuple[nn.Module, nn.Module]:
    model = forum_model(vgg)
    return model, qswap.quantize(model, "ort_int8", calib_data=FORUM_CALIB, progress=False)


@pytest.mark.parametrize("saturates", [True, False])
def test_weight_bits_follow_what_the_cpu_computes(saturates: bool) -> None:
    """Without VNNI (the probe says ORT saturates) every conv/linear keeps 7-bit weights, with
    the reason in the plan; with VNNI all 8. A pure function of what the CPU reports."""
    model = forum_model(resnet18)
    p = qswap.plan(model, "ort_int8", example_inputs=FORUM_X[:2], registry=_registry(saturates))
    weighted = [n for n, layer in p.layers.items() if layer.weight is not None]
    assert weighted
    assert p.config.vnni is (not saturates)  # what auto measured, recorded
    if saturates:
        assert sorted(p.narrowed) == sorted(weighted)
        assert all(p.layers[n].weight.quant_range() == (-64, 63) for n in weighted)
        assert "weights kept to 7 bits (reduce_range)" in p.explain(weighted[0])
    else:
        assert p.narrowed == ()
        assert all(p.layers[n].weight.quant_range() == (-128, 127) for n in weighted)


@pytest.mark.parametrize(("vnni", "bits"), [(True, (-128, 127)), (False, (-64, 63))])
def test_vnni_names_the_cpu_the_model_will_run_on(vnni: bool, bits: tuple[int, int]) -> None:
    model = forum_model(vgg)
    cfg = {"extends": ["ort_int8"], "vnni": vnni}
    p = qswap.plan(model, cfg, example_inputs=FORUM_X[:2], registry=_registry(not vnni))
    assert {layer.weight.quant_range() for layer in p.layers.values() if layer.weight} == {bits}


def test_quantize_returns_a_module_onnx_runtime_runs(
    forum_vgg: tuple[nn.Module, nn.Module],
) -> None:
    """ONNX Runtime computes the output: every conv a QLinearConv, every linear a QGemm, and
    each layer within one output step of the torch twin (CPU-independent: the plan narrowed
    the weights where this CPU's ORT would saturate)."""
    model, q = forum_vgg
    assert isinstance(q, qswap.OrtModel)
    assert q.extra_repr().startswith("ONNX Runtime")
    x = FORUM_X[32:64]
    with torch.no_grad():
        ort_out, twin_out, ref = q(x), q.torch_twin(x), model(x)
    assert not torch.equal(ort_out, ref)  # quantized
    # the logits stay float (only the model returns them): they differ by what one step of
    # difference in the last layer's input (the runtimes round alike, not identically) makes
    name, last = list(q._qswap.layers.items())[-1]  # type: ignore[union-attr]
    assert last.output is None
    weight = model.get_submodule(name).weight.detach()
    bound = float(last.qparams["input"].scale) * float(weight.abs().sum(1).max())
    assert float((ort_out - twin_out).abs().max()) <= bound
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    ops = ort_optimized_ops(q.save_onnx(Path(pytest.importorskip("tempfile").mkdtemp()) / "m.onnx"))
    assert ops.get("QLinearConv") == convs and ops.get("QGemm") == linears
    assert "Conv" not in ops and "Gemm" not in ops


def test_layers_agree_with_the_torch_twin(
    forum_vgg: tuple[nn.Module, nn.Module], tmp_path: Path
) -> None:
    _, q = forum_vgg
    rows = compare_layers(q, q.save_onnx(tmp_path / "m.onnx"), FORUM_X[32:48])
    assert rows and all(row.ok for row in rows), "\n".join(map(str, rows))


def test_the_onnx_file_runs_without_qswap(
    forum_vgg: tuple[nn.Module, nn.Module], tmp_path: Path
) -> None:
    """save_onnx writes what a deployment loads with onnxruntime alone: the same outputs."""
    _, q = forum_vgg
    path = q.save_onnx(tmp_path / "deploy.onnx")
    x = FORUM_X[40:45]
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "x = np.load(sys.argv[2]); np.save(sys.argv[3], s.run(None, {s.get_inputs()[0].name: x})[0])\n"
    )
    import numpy as np

    np.save(tmp_path / "x.npy", x.numpy())
    subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True,
    )
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "y.npy")), q(x))


def test_save_and_load_rebuild_the_same_model(
    forum_vgg: tuple[nn.Module, nn.Module], tmp_path: Path
) -> None:
    _, q = forum_vgg
    path = qswap.save(q, tmp_path / "vgg.qswap")
    back = qswap.load(path, vgg(width=0.25))
    assert isinstance(back, qswap.OrtModel)
    x = FORUM_X[32:40]
    assert torch.equal(back(x), q(x))


def test_report_measures_layers_on_the_twin_and_the_output_through_ort(
    forum_vgg: tuple[nn.Module, nn.Module],
) -> None:
    model, q = forum_vgg
    rep = qswap.report(model, q, [FORUM_X[32:64]])
    assert rep.backend == "onnxruntime"
    assert all(row.sqnr_db is not None for row in rep.rows if row.decision == "quantize")
    with torch.no_grad():
        ref, out = model(FORUM_X[32:64]), q(FORUM_X[32:64])
    expected = float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))
    assert rep.output_sqnr_db == pytest.approx(expected, abs=0.05)


def test_weight_changes_are_exported_again(forum_vgg: tuple[nn.Module, nn.Module]) -> None:
    """load_state_dict (or refresh() after an in-place change) exports again: ORT sees it."""
    _, q = forum_vgg
    q = __import__("copy").deepcopy(q)
    x = FORUM_X[32:36]
    before = q(x)
    state = q.state_dict()
    bias = [k for k in state if k.endswith(".bias")][-1]  # the last layer's
    state[bias] = state[bias] + 1.0
    q.load_state_dict(state)
    assert not torch.equal(q(x), before)


def test_keyword_inputs_and_dict_outputs() -> None:
    torch.manual_seed(0)
    model = TwoInputs().eval()
    batches = [{"x": torch.randn(8, 4), "y": torch.randn(8, 2)} for _ in range(2)]
    q = qswap.quantize(model, "ort_int8", calib_data=batches, progress=False)
    out = q(y=batches[0]["y"], x=batches[0]["x"])  # keyword order does not matter
    assert isinstance(out, dict) and set(out) == {"sum", "a"}
    with torch.no_grad():
        ref = model(**batches[0])
    assert torch.allclose(out["sum"], ref["sum"], atol=0.1)
    assert torch.allclose(q(**batches[1])["a"], q.torch_twin(**batches[1])["a"], atol=0.05)


def test_what_onnx_runtime_cannot_run_stays_float_with_its_reason() -> None:
    """Per-group weights have no QLinear kernel: the plan says so and the layer stays float."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    cfg = {
        "extends": ["ort_int8"],
        "rules": [
            {"match": {"name": "2"}, "weight": {"granularity": "per_group", "group_size": 4}}
        ],
    }
    p = qswap.plan(model, cfg)
    assert p.decisions["2"].kind == "skip" or p.layers.get("2") is None
    assert "per-group" in p.explain("2")
    q = qswap.quantize(model, cfg, calib_data=[torch.randn(4, 8)], progress=False)
    assert isinstance(q, qswap.OrtModel)


def test_dynamic_mode_is_refused_by_the_plan_not_at_inference() -> None:
    cfg = {"extends": ["ort_int8"], "mode": "dynamic"}
    p = qswap.plan(nn.Sequential(nn.Linear(4, 4)), cfg)
    assert "static" in p.explain("0")


def test_cli_writes_the_onnx_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ort_factory.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def model():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).eval()\n"
        "def calib():\n    return [torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))]\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from qswap.cli import main

    code = main(
        [
            "quantize",
            "--model",
            "ort_factory:model",
            "--calib",
            "ort_factory:calib",
            "--config",
            "ort_int8",
            "--out",
            "out",
        ]
    )
    assert code == 0
    session = onnx_session(tmp_path / "out" / "model.onnx")
    x = torch.rand(2, 3, 8, 8)
    assert session.run(None, {"input": x.numpy()})[0].shape == (2, 2)
    assert (tmp_path / "out" / "onnx_check.txt").read_text().strip()


def test_seven_bit_weights_export_and_agree_everywhere(tmp_path: Path) -> None:
    """vnni: false (a CPU without VNNI): 7-bit weights on int8 storage export and run, and
    ORT agrees layer by layer on any CPU (no pair of products reaches 16 bits)."""
    model = forum_model(resnet18)
    cfg = {"extends": ["ort_int8"], "vnni": False}
    q = qswap.quantize(model, cfg, calib_data=FORUM_CALIB, progress=False)
    assert q._qswap.plan.narrowed  # type: ignore[union-attr]
    rows = compare_layers(q, q.save_onnx(tmp_path / "r.onnx"), FORUM_X[32:40])
    assert rows and all(row.ok for row in rows), "\n".join(map(str, rows))


def test_layers_that_only_the_model_returns_keep_float_outputs() -> None:
    """ORT's QGemm dequantizes inside, so a classifier's logits are not rounded to 8 bits: the
    plan drops that output quantizer and says so, and the model gets closer to float."""
    model = forum_model(vgg)
    p = qswap.plan(model, "ort_int8", example_inputs=FORUM_X[:2])
    floats = [n for n, layer in p.layers.items() if layer.output is None]
    assert len(floats) == 1 and "only the model returns it" in p.explain(floats[0])
    assert all(p.layers[n].output is not None for n in p.layers if n not in floats)

    reg = Registry("rounded", parent=default_registry())
    ort = default_registry().backend("onnxruntime")
    reg.register_backend(dataclasses.replace(ort, float_outputs=False), replace=True)
    rounded = qswap.quantize(
        model, "ort_int8", calib_data=FORUM_CALIB, registry=reg, progress=False
    )
    q = qswap.quantize(model, "ort_int8", calib_data=FORUM_CALIB, progress=False)
    with torch.no_grad():
        ref = model(FORUM_X)
    err, err_rounded = (q(FORUM_X) - ref).pow(2).mean(), (rounded(FORUM_X) - ref).pow(2).mean()
    assert err < err_rounded
