"""compare_layers: an export checked layer by layer against qswap, and broken exports caught."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import (
    FORUM_CALIB,
    FORUM_X,
    INT8_MINMAX,
    fake_for_ort,
    forum_model,
    ort_saturates,
    quantized_forum,
)
from forum_models import resnet18, vgg
from torch import nn

import qswap
from qswap.exceptions import PlanError, UnsupportedModuleError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import numpy_helper

from qswap.export.onnx import compare_layers, export_onnx

TEST = FORUM_X[32:48]  # 16 held-out images: compare_layers runs ORT layer by layer


def exported(tmp_path: Path, build: Any, kind: str) -> tuple[nn.Module, Path]:
    """A quantized forum model and its QDQ export (CPU-dependent fake config: ``fake_for_ort``)."""
    qmodel = quantized_forum(build, fake_for_ort() if kind == "fake" else INT8_MINMAX)
    return qmodel, export_onnx(qmodel, (FORUM_X[:1],), tmp_path / f"{kind}.onnx")


def node_after(model: Any, op_type: str, name_part: str, follow: str) -> Any:
    """The first ``follow`` node fed by the first ``op_type`` node whose name has ``name_part``."""
    node = next(n for n in model.graph.node if n.op_type == op_type and name_part in n.name)
    return next(n for n in model.graph.node if n.op_type == follow and node.output[0] in n.input)


def scaled_initializer(model: Any, node: Any, slot: int, factor: float) -> None:
    """Give ``node`` its own copy of input ``slot`` (an initializer), multiplied by ``factor``."""
    old = next(i for i in model.graph.initializer if i.name == node.input[slot])
    value = numpy_helper.to_array(old) * factor
    name = f"{old.name}_broken"
    model.graph.initializer.append(numpy_helper.from_array(value.astype(value.dtype), name))
    node.input[slot] = name


@pytest.mark.parametrize("kind", ["fake", "int8"])
@pytest.mark.parametrize(("build", "layers"), [(vgg, 10), (resnet18, 21)], ids=["vgg", "resnet18"])
def test_every_layer_on_ort_integer_kernels_is_within_one_step(
    tmp_path: Path, build: Any, layers: int, kind: str
) -> None:
    """Each conv and linear layer, fed ONNX Runtime's integer input, matches qswap within one step."""
    qmodel, path = exported(tmp_path, build, kind)
    rows = compare_layers(qmodel, path, TEST)
    assert len(rows) == layers
    assert all(row.ok for row in rows), "\n".join(map(str, rows))
    # rounding ties only: a tiny share of each layer's outputs (one in a small layer) moves
    # by one step; which ties flip depends on the CPU's kernels
    assert all(row.differing <= max(1, 0.005 * row.elements) for row in rows), "\n".join(
        map(str, rows)
    )
    assert rows[0].layer == ("conv1" if build is resnet18 else "features.0")
    assert rows[-1].layer == ("fc" if build is resnet18 else "classifier.1")


@pytest.mark.parametrize("kind", ["fake", "int8"])
def test_wrong_output_scale_is_caught_at_its_layer(tmp_path: Path, kind: str) -> None:
    """A conv whose output QuantizeLinear has a 25 % larger scale is the one layer reported."""
    qmodel, path = exported(tmp_path, vgg, kind)
    model = onnx.load(path)
    scaled_initializer(model, node_after(model, "Conv", "features.4", "QuantizeLinear"), 1, 1.25)
    onnx.save(model, path)
    rows = compare_layers(qmodel, path, TEST)
    bad = [row for row in rows if not row.ok]
    assert [row.layer for row in bad] == ["features.4"]
    assert not bad[0].qparams_match and bad[0].max_steps > 10


def test_wrong_bias_is_caught_with_matching_grids(tmp_path: Path) -> None:
    """A bias shifted by three output steps shows as a three-step difference in that layer."""
    qmodel, path = exported(tmp_path, resnet18, "int8")
    model = onnx.load(path)
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and "layer2.1/conv1/" in n.name)
    step = float(qmodel.get_submodule("layer2.1.conv1").scale)
    bias = next(i for i in model.graph.initializer if i.name == conv.input[2])
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 3 * step, bias.name))
    onnx.save(model, path)
    rows = {row.layer: row for row in compare_layers(qmodel, path, TEST)}
    assert [name for name, row in rows.items() if not row.ok] == ["layer2.1.conv1"]
    assert rows["layer2.1.conv1"].qparams_match
    assert rows["layer2.1.conv1"].max_steps in (3, 4)


def test_wrong_skip_add_scale_is_caught_at_the_next_layer(tmp_path: Path) -> None:
    """An int8 ResNet's quantized add written with another scale shows at the layer it feeds."""
    qmodel, path = exported(tmp_path, resnet18, "int8")
    model = onnx.load(path)
    add_q = node_after(model, "Add", "layer1.0", "QuantizeLinear")
    scaled_initializer(model, add_q, 1, 1.25)
    consumer_dq = [n for n in model.graph.node if add_q.output[0] in n.input]
    for dq in consumer_dq:
        dq.input[1] = add_q.input[1]
    onnx.save(model, path)
    bad = [row for row in compare_layers(qmodel, path, TEST) if not row.ok]
    assert [row.layer for row in bad] == ["layer1.1.conv1"]
    assert not bad[0].qparams_match


def test_changed_weights_or_another_model_are_errors(tmp_path: Path) -> None:
    """A file whose weights differ from the model's names the layer; an unconverted model is refused."""
    qmodel, path = exported(tmp_path, vgg, "fake")
    model = onnx.load(path)
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and "features.8" in n.name)
    dq = next(n for n in model.graph.node if n.output[0] == conv.input[1])
    weight = next(i for i in model.graph.initializer if i.name == dq.input[0])
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = -values.flat[0] if values.flat[0] else 1
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, tmp_path / "changed.onnx")
    with pytest.raises(PlanError, match=r"layer 'features\.8': no Conv, Gemm or MatMul node in .*"):
        compare_layers(qmodel, tmp_path / "changed.onnx", TEST)
    _, other_path = exported(tmp_path, resnet18, "int8")
    with pytest.raises(PlanError, match=r"layer 'features\.0'.*export_onnx"):
        compare_layers(qmodel, other_path, TEST)
    with pytest.raises(UnsupportedModuleError, match="not converted"):
        compare_layers(forum_model(vgg), path, TEST)
    # weights quantized, activations left float: no layer has integers on both sides
    weight_only = qswap.quantize(
        forum_model(vgg),
        {"extends": ["w8a8_minmax"], "mode": "weight_only"},
        calib_data=FORUM_CALIB,
        progress=False,
    )
    with pytest.raises(PlanError, match="nothing to compare layer by layer"):
        compare_layers(weight_only, path, TEST)


def test_saturating_pairs_are_named_as_the_likely_cause(tmp_path: Path) -> None:
    """CPU-dependent: 8-bit activations and weights are flagged where ORT saturates them, only there.

    Every conv and linear layer of ``w8a8_minmax`` pairs 8-bit activations with 8-bit weights
    (``saturating_layers``). Where ONNX Runtime adds such pairs in 16 bits (no VNNI) the export
    warns and each failing row of ``compare_layers`` names the CPU as the likely cause;
    elsewhere the file is exact and nothing is said.
    """
    from qswap.export.onnx import saturating_layers

    qmodel = quantized_forum(vgg, "w8a8_minmax")
    assert len(saturating_layers(qmodel)) == 10
    assert saturating_layers(quantized_forum(vgg, INT8_MINMAX)) == []  # 7-bit activations
    if ort_saturates():
        with pytest.warns(UserWarning, match=r"ONNX Runtime on this CPU will compute saturated"):
            path = export_onnx(qmodel, (FORUM_X[:1],), tmp_path / "v.onnx")
        rows = compare_layers(qmodel, path, TEST)
        bad = [row for row in rows if not row.ok]
        assert bad and all(row.saturates for row in rows)
        assert "likely cause: this CPU has no VNNI" in str(bad[0])
    else:
        path = export_onnx(qmodel, (FORUM_X[:1],), tmp_path / "v.onnx")
        rows = compare_layers(qmodel, path, TEST)
        assert all(row.ok and not row.saturates for row in rows), "\n".join(map(str, rows))
