"""QDQ ONNX export: ONNX Runtime reproduces qswap's outputs and runs integer kernels."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import FORUM_X, INT8_MINMAX, fake_for_ort, forum_model, quantized_forum
from forum_models import resnet18, vgg
from torch import nn

import qswap
from qswap.exceptions import UnsupportedModuleError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from qswap.export.onnx import export_onnx, onnx_session, ort_optimized_ops

TEST = FORUM_X[32:]


def output_step(qmodel: nn.Module) -> float:
    """The scale of the model output's quantization (its last layer's output qparams)."""
    last = list(qmodel._qswap.layers.values())[-1]  # type: ignore[union-attr]
    return float(last.qparams["output"].scale)


def run(path: Path, x: torch.Tensor, optimization: str = "extended") -> torch.Tensor:
    """ONNX Runtime's output for ``x``."""
    session = onnx_session(path, optimization=optimization)  # type: ignore[arg-type]
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """SQNR in dB."""
    noise = (ref - out).pow(2).mean()
    return math.inf if noise == 0 else float(10 * torch.log10(ref.pow(2).mean() / noise))


@pytest.mark.parametrize(
    ("build", "share"), [(vgg, 1.0), (resnet18, 0.95)], ids=["vgg", "resnet18"]
)
def test_fake_model_graph_reproduces_qswap_within_one_output_step(
    tmp_path: Path, build: object, share: float
) -> None:
    """Evaluated as written (no fusion), the graph matches qswap within one output step.

    All of VGG's outputs; for the ResNet at least 95 %: float rounding ties that flip one
    step somewhere in its 20 layers propagate along the float skip connections.
    """
    qmodel = quantized_forum(build, fake_for_ort())  # CPU-dependent weight bits: no warning
    path = export_onnx(qmodel, (FORUM_X[:1],), tmp_path / "m.onnx")
    with torch.no_grad():
        expected = qmodel(TEST)
    steps = (run(path, TEST, optimization="disable") - expected).abs() / output_step(qmodel)
    assert (steps <= 1.001).float().mean() >= share


def test_vgg_on_ort_integer_kernels_within_one_output_step(tmp_path: Path) -> None:
    """On ONNX Runtime's integer kernels (extended), VGG stays within one output step, fake and int8.

    CPU-dependent: the fake config keeps weights to 7 bits where ORT saturates 8-bit pairs.
    """
    for config in (fake_for_ort(), INT8_MINMAX):
        qmodel = quantized_forum(vgg, config)
        path = export_onnx(qmodel, (FORUM_X[:1],), tmp_path / "vgg.onnx")
        ops = ort_optimized_ops(path)
        assert ops.get("QLinearConv") == 8 and ops.get("QGemm") == 2
        with torch.no_grad():
            expected = qmodel(TEST)
        got = run(path, TEST)
        assert (got - expected).abs().max() <= output_step(qmodel) * 1.001, config


@pytest.mark.parametrize("config", ["fake", "int8"])
def test_resnet_on_ort_integer_kernels_is_closer_to_qswap_than_qswap_to_float(
    tmp_path: Path, config: str
) -> None:
    """ORT's integer ResNet deviates from qswap less than quantization deviates from float.

    CPU-dependent: the fake config keeps weights to 7 bits where ORT saturates 8-bit pairs.
    """
    qmodel = quantized_forum(resnet18, INT8_MINMAX if config == "int8" else fake_for_ort())
    path = export_onnx(qmodel, (FORUM_X[:1],), tmp_path / "r.onnx")
    with torch.no_grad():
        expected = qmodel(TEST)
        reference = forum_model(resnet18)(TEST)
    got = run(path, TEST)
    assert sqnr(expected, got) > sqnr(reference, expected)
    assert ort_optimized_ops(path).get("QLinearConv") == 20


def test_int8_resnet_runs_fully_integer_in_ort(tmp_path: Path) -> None:
    """An int8 ResNet exports with skip connections as QLinearAdd and one Q/DQ pair at the ends."""
    qmodel = quantized_forum(resnet18, INT8_MINMAX)
    path = export_onnx(qmodel, (FORUM_X[:1],), tmp_path / "r.onnx")
    ops = ort_optimized_ops(path)
    assert ops["QLinearAdd"] == 8
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1
    assert "Conv" not in ops and "Add" not in ops


def test_per_tensor_weights_batch_sizes_and_opset_13(tmp_path: Path) -> None:
    """qnnpack-style per-tensor weights export at opset 13 and run at any batch size."""
    config = {"extends": ["qnnpack_int8"], "backend": "fake", "activation": {"observer": "minmax"}}
    qmodel = quantized_forum(vgg, config)
    path = export_onnx(qmodel, (FORUM_X[:1],), tmp_path / "v13.onnx", opset=13)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == 13
    weight_dq = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and any(
            i.name == n.input[0] and i.data_type == onnx.TensorProto.INT8
            for i in model.graph.initializer
        )
    ]
    scales = {i.name: i for i in model.graph.initializer}
    assert len(weight_dq) == 10
    assert all(len(scales[n.input[1]].dims) == 0 for n in weight_dq)  # one scale per tensor
    for batch in (1, 5):
        with torch.no_grad():
            expected = qmodel(TEST[:batch])
        assert run(path, TEST[:batch], "disable").shape == (batch, 10)
        assert (run(path, TEST[:batch], "disable") - expected).abs().max() <= output_step(
            qmodel
        ) * 1.001


def test_quantize_bias_stores_int32_biases(tmp_path: Path) -> None:
    """quantize_bias=True writes each conv and GEMM bias as int32 behind a DequantizeLinear.

    CPU-dependent: the fake config keeps weights to 7 bits where ORT saturates 8-bit pairs.
    """
    qmodel = quantized_forum(vgg, fake_for_ort())
    path = export_onnx(qmodel, (FORUM_X[:1],), tmp_path / "b.onnx", quantize_bias=True)
    model = onnx.load(path)
    int32 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT32]
    assert len(int32) >= 10
    with torch.no_grad():
        expected = qmodel(TEST)
    assert (run(path, TEST) - expected).abs().max() <= 2 * output_step(qmodel)


def test_export_refuses_what_qdq_cannot_hold(tmp_path: Path) -> None:
    """4-bit weights, a model not converted yet, and a bad opset are clear errors; no file appears."""
    config = {
        "extends": ["w8a8_minmax"],
        "rules": [{"match": {"name": "classifier.1"}, "weight": {"bits": 4}}],
    }
    with pytest.raises(UnsupportedModuleError, match="'classifier.1'.*slot 'weight'.*bits: 8"):
        export_onnx(quantized_forum(vgg, config), (FORUM_X[:1],), tmp_path / "a.onnx")
    prepared = qswap.prepare(forum_model(vgg), "w8a8_minmax", example_inputs=(FORUM_X[:1],))
    with pytest.raises(UnsupportedModuleError, match="convert"):
        export_onnx(prepared, (FORUM_X[:1],), tmp_path / "b.onnx")
    with pytest.raises(UnsupportedModuleError, match="opset"):
        export_onnx(
            quantized_forum(vgg, "w8a8_minmax"), (FORUM_X[:1],), tmp_path / "c.onnx", opset=11
        )
    assert not list(tmp_path.iterdir())
