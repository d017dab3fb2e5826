"""Backend ``packed`` (weight-only int8/int4 stored packed) and weight methods (GPTQ, AWQ,
SmoothQuant)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import qswap
from qswap.backends.packed import (
    PackedEmbedding,
    PackedLinear,
    pack_nibbles,
    unpack_nibbles,
)
from qswap.quantizers import QParams
from qswap.registry import Registry, default_registry
from qswap.rounding import Rounded, RoundToNearest, WeightMethod


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 128)).eval()


def _correlated(n: int, seed: int, loud: int = 0) -> Tensor:
    """Inputs whose features are mixed (a Hessian far from diagonal), ``loud`` of them 20x."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(256, 256, generator=torch.Generator().manual_seed(99)) / 16
    x = torch.randn(n, 256, generator=g) @ mix * 3
    if loud:
        x[:, :loud] *= 20
    return x


def _same_kernels(src: nn.Module, dst: nn.Module) -> None:
    """``dst``'s packed layers use the kernels ``src``'s chose when it ran (a timing decides
    between a kernel and dequantize-then-matmul, whose float sums differ in the last bits)."""
    for name, module in src.named_modules():
        if isinstance(module, PackedLinear):
            dst.get_submodule(name).chosen = dict(module.chosen)


def _out_error(model: nn.Module, q: nn.Module, x: Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - q(x)).pow(2).mean())


@pytest.mark.parametrize(
    ("config", "kernel", "dtype", "width"),
    [("w8_packed", "int8pack", torch.int8, 256), ("w4_packed", "int4pack", torch.uint8, 128)],
)
def test_packed_layers_store_integers_and_compute_what_fake_quant_simulates(
    config: str, kernel: str, dtype: torch.dtype, width: int
) -> None:
    model = _mlp()
    q = qswap.quantize(model, config)
    fake = qswap.quantize(model, {"extends": [config], "backend": "fake"})
    first = q[0]
    assert isinstance(first, PackedLinear) and first.kernel == kernel
    assert first.qweight.dtype == dtype and tuple(first.qweight.shape) == (384, width)
    assert "weight" not in dict(q.named_parameters(recurse=True))  # no float weight left
    # the same integers as the simulation: identical dequantized weights
    assert torch.equal(first.weight, fake[0].weight.detach())
    x = torch.randn(8, 256)
    with torch.no_grad():
        assert torch.allclose(q(x), fake(x), atol=1e-5)
    assert f"kernel={kernel}" in repr(first)


def test_packed_model_bytes() -> None:
    """int8 ~0.25x and int4 g128 (with its fp32 scales and int32 zero points) <= 0.16x fp32."""
    model = _mlp()
    fp32 = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    def size(config: str) -> int:
        sd = qswap.quantize(model, config).state_dict()
        return sum(t.numel() * t.element_size() for t in sd.values())

    assert size("w8_packed") / fp32 < 0.27
    assert size("w4_packed") / fp32 <= 0.16


def test_nibbles_round_trip_exactly() -> None:
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), codes)


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_other_widths_dequantize_then_matmul(bits: int) -> None:
    model = _mlp()
    cfg = {"extends": ["w4_packed"], "weight": {"bits": bits}}
    q, fake = qswap.quantize(model, cfg), qswap.quantize(model, {**cfg, "backend": "fake"})
    assert q[0].kernel == "dequant"
    assert torch.equal(q[0].weight, fake[0].weight.detach())


def test_what_packed_cannot_run_is_decided_in_the_plan() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 4))
    p = qswap.plan(model, "w4_packed")
    # no packed convolution: it stays float (the presets' fallback), and the plan says so
    assert "0" not in p.layers and p.layers["2"].counterpart is PackedLinear
    assert "no mapping for backend 'packed'; stays float (fallback: float)" in p.explain("0")
    q = qswap.quantize(model, "w4_packed")
    assert isinstance(q[2], PackedLinear) and type(q[0]) is nn.Conv2d
    assert q(torch.randn(1, 3, 4, 4)).shape == (1, 4)
    # with fallback: fake it is simulated instead, as the plan says
    p = qswap.plan(model, {"extends": ["w4_packed"], "fallback": "fake"})
    assert p.layers["0"].backend == "fake"
    cfg = {"extends": ["w8_packed"], "weight": {"granularity": "per_tensor", "axis": None}}
    p = qswap.plan(nn.Linear(8, 8), cfg)
    assert p.decisions[""].kind == "skip" and "" not in p.layers
    assert "not per tensor" in p.explain("")


def test_save_and_load_keep_the_packed_bytes(tmp_path: Path) -> None:
    model = _mlp()
    calib = [_correlated(64, i) for i in range(4)]
    cfg = {"extends": ["w4_packed"], "weight": {"method": "gptq"}}
    q = qswap.quantize(model, cfg, calib_data=calib, progress=False)
    path = qswap.save(q, tmp_path / "m.qswap")
    back = qswap.load(path, _mlp(seed=5))  # other float weights: the file's bytes win
    for name in ("0", "2"):
        assert torch.equal(back.get_submodule(name).qweight, q.get_submodule(name).qweight)
    x = torch.randn(4, 256)
    with torch.no_grad():
        expected = q(x)
        _same_kernels(q, back)
        assert torch.equal(back(x), expected)


def test_gptq_reduces_the_layer_output_error_of_round_to_nearest() -> None:
    """GPTQ minimizes ||X W^T - X Q^T|| on the calibration inputs: less than RTN's, on held-out
    inputs from the same distribution too."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 128).eval()
    calib = [_correlated(256, i) for i in range(8)]
    held = _correlated(512, 100)
    rtn = qswap.quantize(layer, "w4_packed")
    gptq = qswap.quantize(
        layer, {"extends": ["w4_packed"], "weight": {"method": "gptq"}}, calib_data=calib
    )
    ordered = qswap.quantize(
        layer,
        {"extends": ["w4_packed"], "weight": {"method": {"name": "gptq", "act_order": True}}},
        calib_data=calib,
    )
    err_rtn, err_gptq = _out_error(layer, rtn, held), _out_error(layer, gptq, held)
    assert err_gptq < 0.8 * err_rtn
    assert _out_error(layer, ordered, held) < err_rtn
    assert gptq.kernel == "int4pack"  # still the packed int4 layer


def test_awq_scales_loud_input_channels() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(256, 128).eval()
    calib = [_correlated(128, i, loud=4) for i in range(4)]
    held = _correlated(512, 100, loud=4)
    rtn = qswap.quantize(layer, "w4_packed")
    awq = qswap.quantize(
        layer, {"extends": ["w4_packed"], "weight": {"method": "awq"}}, calib_data=calib
    )
    assert awq.input_scale.shape == (256,)
    assert _out_error(layer, awq, held) < 0.8 * _out_error(layer, rtn, held)
    # AWQ's clipping search (on by default) does its part: measured 0.0508 with it, 0.0561
    # without, 0.0892 for RTN
    unclipped = qswap.quantize(
        layer,
        {"extends": ["w4_packed"], "weight": {"method": {"name": "awq", "clip": False}}},
        calib_data=calib,
        progress=False,
    )
    assert _out_error(layer, awq, held) < 0.95 * _out_error(layer, unclipped, held)


SMOOTH = {"extends": ["x86_dynamic_int8"], "weight": {"method": "smoothquant"}}


def test_smoothquant_moves_outliers_out_of_the_dynamic_int8_input(tmp_path: Path) -> None:
    """SmoothQuant minimizes the error of quantizing the layer's input per tensor at run time
    (w8a8 dynamic): with a few loud input channels it is far below plain dynamic int8's.
    The int8 kernel's exact output depends on the CPU (VNNI or not); the ratio holds on both."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 128).eval()
    calib = [_correlated(128, i, loud=4) for i in range(4)]
    held = _correlated(512, 100, loud=4)
    plain = qswap.quantize(layer, "x86_dynamic_int8")
    smooth = qswap.quantize(layer, SMOOTH, calib_data=calib, progress=False)
    assert smooth.input_scale.shape == (256,) and "input_scale" in repr(smooth)
    assert float(smooth.input_scale[:4].max()) < float(smooth.input_scale[4:].min())
    assert _out_error(layer, smooth, held) < 0.5 * _out_error(layer, plain, held)
    # the migration strength is an option; 0 moves nothing (the scales are then 1/max|W_j|)
    cfg = {**SMOOTH, "weight": {"method": {"name": "smoothquant", "alpha": 0.0}}}
    none = qswap.quantize(layer, cfg, calib_data=calib, progress=False)
    expected = layer.weight.detach().abs().amax(0)
    assert torch.allclose(none.input_scale, expected, rtol=1e-6)
    path = qswap.save(smooth, tmp_path / "sq.qswap")
    back = qswap.load(path, nn.Linear(256, 128))
    with torch.no_grad():
        assert torch.equal(back(held), smooth(held))


def test_smoothquant_statistics_merge_as_maxima() -> None:
    from qswap.config import QuantSpec
    from qswap.rounding import SmoothQuant

    a, b = SmoothQuant(QuantSpec()), SmoothQuant(QuantSpec())
    a(torch.tensor([[1.0, -5.0], [3.0, 0.0]]))
    b(torch.tensor([[-4.0, 2.0]]))
    a.merge(b)
    assert a.absmax.tolist() == [4.0, 5.0]
    with pytest.raises(qswap.CalibrationError, match="3 features after 2"):
        a(torch.zeros(1, 3))


def test_awq_statistics_are_sums_that_merge_exactly() -> None:
    """AWQ keeps sums (second moments, magnitudes, a count), not a sample: two halves merged
    are the whole, so distributed calibration gives what one process gives."""
    from qswap.config import QuantSpec
    from qswap.rounding import AWQ

    x = _correlated(64, 3, loud=4)
    whole, a, b = AWQ(QuantSpec()), AWQ(QuantSpec()), AWQ(QuantSpec())
    whole(x)
    a(x[:40])
    b(x[40:])
    a.merge(b)
    top = float(whole.moments.abs().max())  # float sums in another order
    assert int(a.rows) == 64
    assert torch.allclose(a.moments, whole.moments, rtol=1e-5, atol=1e-6 * top)
    assert torch.allclose(a.magnitude, whole.magnitude, rtol=1e-5)
    assert torch.allclose(whole.magnitude / 64, x.abs().mean(0))
    with pytest.raises(qswap.CalibrationError, match="3 features after 256"):
        a(torch.zeros(1, 3))


def test_methods_are_chosen_from_yaml_and_shown_in_the_plan(tmp_path: Path) -> None:
    path = tmp_path / "q.yaml"
    path.write_text(
        "version: 1\nextends: [w4_packed]\nweight:\n  method: {name: gptq, damp: 0.05}\n"
        "rules:\n  - match: {name: '2'}\n    weight: {method: rtn}\n"
    )
    cfg = qswap.load_config(path)
    p = qswap.plan(_mlp(), cfg)
    assert "method=gptq" in p.explain("0") and "damp" in p.explain("0")
    assert "method=rtn" in p.explain("2")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nextends: [w4_packed]\nweight: {method: {name: gptq, dmp: 1}}\n")
    with pytest.raises(qswap.ConfigError, match="dmp"):
        qswap.load_config(bad)
    bad.write_text("version: 1\nextends: [w4_packed]\nweight: {method: gtpq}\n")
    with pytest.raises(qswap.ConfigError, match="gptq"):  # did you mean
        qswap.load_config(bad)


class HalfStep(WeightMethod):
    """A user's own method: rounds every weight down (toward -inf) on the observer's grid."""

    calls: ClassVar[list[int]] = []

    def observe(self, x: Tensor) -> None:
        HalfStep.calls.append(x.shape[-1])

    def _merge_state(self, other: Any) -> None:
        pass

    def solve(self, weight: Tensor, qparams: QParams, rtn: RoundToNearest) -> Rounded:
        scale = qparams.scale.reshape(-1, 1) if qparams.scale.dim() == 1 else qparams.scale
        floor = torch.floor(weight / scale).clamp(qparams.quant_min, qparams.quant_max) * scale
        return Rounded(floor, qparams)


def test_a_users_own_method_registers_like_the_built_ins() -> None:
    reg = Registry("mine", parent=default_registry())
    reg.register_method("floor", HalfStep)
    model = nn.Linear(64, 8)
    HalfStep.calls.clear()
    cfg = {"extends": ["w8_packed"], "weight": {"method": "floor"}}
    q = qswap.quantize(model, cfg, calib_data=[torch.randn(4, 64)], registry=reg)
    assert HalfStep.calls == [64]  # it saw the layer's input during calibration
    scale = q.scales  # (out, 1)
    assert torch.equal(q.weight, torch.floor(model.weight.detach() / scale) * scale)
    with pytest.raises(qswap.ConfigError, match="floor"):
        qswap.load_config(cfg)  # not in the default registry


def test_methods_refuse_what_they_cannot_do_before_calibration() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    cfg = {"extends": ["w4_per_group"], "weight": {"group_size": 27, "method": "gptq"}}
    with pytest.raises(qswap.PlanError, match=r"'0'.*2-D weights.*method: rtn"):
        qswap.prepare(conv, cfg)
    with pytest.raises(qswap.PlanError, match=r"awq.*scales the layer's inputs.*packed"):
        qswap.prepare(nn.Linear(128, 8), {"extends": ["w4_per_group"], "weight": {"method": "awq"}})
    static = {"extends": ["x86_int8"], "weight": {"method": "smoothquant"}}
    with pytest.raises(qswap.PlanError, match=r"mode 'static'.*mode: dynamic"):
        qswap.prepare(nn.Sequential(nn.Linear(16, 8)), static, example_inputs=torch.randn(2, 16))
    prepared = qswap.prepare(
        nn.Linear(256, 8), {"extends": ["w4_packed"], "weight": {"method": "gptq"}}
    )
    qswap.calibrate(prepared, [torch.randn(4, 256)])
    with pytest.raises(qswap.PlanError, match="calibration file"):
        qswap.save_calibration(prepared, Path("unused.qcal"))


def test_generate_runs_on_a_packed_decoder() -> None:
    pytest.importorskip("transformers")
    from zoo_models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(vocab=256, hidden=128, intermediate=256)
    ids = torch.randint(0, 256, (1, 16))
    q = qswap.quantize(
        model,
        {"extends": ["w4_packed"], "weight": {"method": "gptq"}},
        calib_data=[{"input_ids": ids}],
        progress=False,
    )
    packed = [n for n, m in q.named_modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    out = q.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 24)


@pytest.mark.parametrize(("config", "width"), [("w8_packed", 128), ("w4_packed", 64)])
def test_embeddings_pack_and_a_tied_lm_head_shares_their_bytes(
    config: str, width: int, tmp_path: Path
) -> None:
    pytest.importorskip("transformers")
    from zoo_models import tiny_llama

    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    sizes = {}
    for tied in (True, False):
        torch.manual_seed(0)
        model = tiny_llama(vocab=256, hidden=128, intermediate=256, tie=tied)
        q = qswap.quantize(model, config)
        fake = qswap.quantize(model, {"extends": [config], "backend": "fake"})
        embed = q.model.embed_tokens
        assert isinstance(embed, PackedEmbedding) and embed.qweight.shape == (256, width)
        assert "weight" not in dict(q.named_parameters())  # no float embedding left
        # the same integers as the simulation, gathered row by row
        with torch.no_grad():
            assert torch.equal(embed(ids), fake.model.embed_tokens(ids))
            assert torch.allclose(q(ids).logits, fake(ids).logits, atol=1e-4)
        # a tied head holds the embedding's bytes, not a copy; an untied one its own
        assert (q.lm_head.qweight is embed.qweight) is tied
        assert (q.lm_head.scales is embed.scales) is tied
        path = qswap.save(q, tmp_path / f"{tied}.qswap")
        sizes[tied] = path.stat().st_size
        back = qswap.load(path, tiny_llama(vocab=256, hidden=128, intermediate=256, tie=tied))
        assert (back.lm_head.qweight is back.model.embed_tokens.qweight) is tied
        with torch.no_grad():
            expected = q(ids).logits
            _same_kernels(q, back)
            assert torch.equal(back(ids).logits, expected)
    # the shared bytes are written once: the tied file is smaller by about one packed matrix
    assert sizes[False] - sizes[True] >= 256 * width


def test_a_tied_lm_head_a_method_untied_loads_its_own_bytes(tmp_path: Path) -> None:
    """GPTQ gives a tied lm_head its own copy (same grid as the embedding's); the float model
    it loads onto is tied, so the rebuilt packed layers share bytes until load gives the
    lm_head its own again: before, the lm_head's rounded bytes overwrote the embedding's."""
    pytest.importorskip("transformers")
    from zoo_models import tiny_llama

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 256, (2, 24), generator=g)} for _ in range(3)]
    model = tiny_llama(vocab=256, hidden=128, intermediate=256, tie=True)
    cfg = {"extends": ["w4_packed"], "weight": {"method": "gptq"}}
    q = qswap.quantize(model, cfg, calib_data=batches, progress=False)
    assert q.lm_head.qweight is not q.model.embed_tokens.qweight
    back = qswap.load(qswap.save(q, tmp_path / "m.qswap"), model)
    _same_kernels(q, back)
    assert back.lm_head.qweight is not back.model.embed_tokens.qweight
    saved, loaded = q.state_dict(), back.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_stays_in_its_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    """Packed layers compute in float32 and hand back the model's own dtype: a packed
    embedding's rows are bfloat16 for a bfloat16 model (float32 rows would silently turn
    the rest of the model float32), through save and load too."""
    pytest.importorskip("transformers")
    from zoo_models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(vocab=256, hidden=128, intermediate=256, tie=True).to(dtype)
    ids = torch.randint(0, 256, (1, 12))
    q = qswap.quantize(model, "w4_packed", progress=False)
    seen: list[torch.dtype] = []
    hook = q.model.layers[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0].dtype))
    with torch.no_grad():
        logits = q(ids).logits
    hook.remove()
    assert seen == [dtype] and logits.dtype == dtype
    assert f"dtype={dtype}" in repr(q.model.embed_tokens)
    back = qswap.load(qswap.save(q, tmp_path / "m.qswap"), model)
    _same_kernels(q, back)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, logits)


@pytest.mark.parametrize(
    ("preset", "group"),
    [("w4_packed", 8), ("w8_packed", None), ("w8_packed", 8), ("w8_affine", None)],
)
def test_packed_embedding_reads_rows_as_nn_embedding_does(preset: str, group: int | None) -> None:
    """padding_idx and max_norm behave as in nn.Embedding, on the rounded rows; int8 codes
    with zero points 0 take a shorter path (no offset), affine ones the general one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(32, 16, padding_idx=3, max_norm=2.5), nn.Linear(16, 16))
    ids = torch.tensor([[3, 1, 7, 1], [0, 31, 3, 5]])
    weight: dict[str, Any] = {"scheme": "affine"} if preset == "w8_affine" else {}
    if group:
        weight.update(granularity="per_group", group_size=group)
    cfg = {"extends": ["w8_packed" if preset == "w8_affine" else preset], "weight": weight}
    q = qswap.quantize(model, cfg)
    assert isinstance(q[0], PackedEmbedding) and q[0].group_size == (group or 16)
    assert "padding_idx=3, max_norm=2.5" in repr(q[0])
    rounded = q[0].weight.clone()  # the dequantized rows
    before = q[0].qweight.clone()
    with torch.no_grad():
        got = q[0](ids)
        want = nn.functional.embedding(ids, rounded.clone(), 3, 2.5)
    assert torch.allclose(got, want, atol=1e-6)
    assert bool((got.norm(dim=-1) <= 2.5 + 1e-5).all())
    assert torch.equal(q[0].qweight, before)  # reading never rewrites the packed rows


def test_gpt2_conv1d_packs_its_transposed_weight(tmp_path: Path) -> None:
    """Conv1D holds its weight as (in, out): packed as (out, in), saved with the float
    layout's shape (load checks the model it rebuilds on against it) and loaded exactly."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=128, n_layer=1, n_head=4, vocab_size=256, n_positions=64
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    q = qswap.quantize(model, "w8_packed")
    fake = qswap.quantize(model, {"extends": ["w8_packed"], "backend": "fake"})
    attn = q.transformer.h[0].attn.c_attn
    assert isinstance(attn, PackedLinear) and attn.kernel == "int8pack"
    assert (attn.out_features, attn.in_features) == (384, 128)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.allclose(q(ids).logits, fake(ids).logits, atol=1e-4)
    assert attn.transposed and attn.float_shape("weight") == (128, 384)
    back = qswap.load(qswap.save(q, tmp_path / "gpt2.qswap"), transformers.GPT2LMHeadModel(config))
    _same_kernels(q, back)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)
    # an ONNX graph takes and returns tensors: the KV cache and a flag are named, no file,
    # and the model's training modes are as they were
    q.train()
    with pytest.raises(qswap.UnsupportedModuleError, match="returns a DynamicCache.*wrap"):
        qswap.export_onnx(q, ids, tmp_path / "gpt2.onnx")
    flag = {"input_ids": ids, "use_cache": False}
    with pytest.raises(qswap.UnsupportedModuleError, match="'use_cache' is a bool.*wrap"):
        qswap.export_onnx(q, flag, tmp_path / "gpt2.onnx")
    assert not (tmp_path / "gpt2.onnx").exists()
    assert all(m.training for m in q.modules())


def test_weight_methods_show_progress_over_their_layers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = {"extends": ["w4_packed"], "weight": {"method": "gptq"}}
    qswap.quantize(_mlp(), cfg, calib_data=[_correlated(64, 0)], progress=True)
    err = capsys.readouterr().err
    assert "qswap weight methods" in err and "2/2" in err
    qswap.quantize(_mlp(), cfg, calib_data=[_correlated(64, 0)], progress=False)
    assert "qswap weight methods" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "config",
    [
        {"extends": ["w4_packed"], "weight": {"method": "gptq"}},
        {"extends": ["w4_packed"], "weight": {"group_size": 32, "method": "awq"}},
        "w8_packed",
        {"extends": ["w8_packed"], "weight": {"bits": 6, "scheme": "affine"}},
    ],
)
def test_packed_models_export_to_matmulnbits_and_run_in_onnx_runtime(
    tmp_path: Path, config: Any
) -> None:
    """Each packed layer becomes ONNX Runtime's MatMulNBits, its bytes as stored: ONNX Runtime
    computes what qswap computes (float sums in another order: 1e-5), in a file of about the
    packed model's size. 200 input features: a last block shorter than the others."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Linear(200, 640), nn.GELU(), nn.Linear(640, 96)).eval()
    calib = [torch.randn(16, 200) for _ in range(2)]
    q = qswap.quantize(model, config, calib_data=calib, progress=False)
    path = qswap.export_onnx(q, calib[0], tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == 2 and "MatMul" not in ops and "Gemm" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 200)
    with torch.no_grad():
        expected = q(x)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert torch.allclose(got, expected, atol=1e-5)
    # the packed bytes, blocks padded to whole blocks (200 -> 208..256 inputs), and the graph
    stored = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert path.stat().st_size < 1.3 * stored < 0.4 * sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize("preset", ["w4_packed", "w8_packed"])
def test_packed_embeddings_export_as_a_gather_of_their_bytes_and_run_in_onnx_runtime(
    tmp_path: Path, preset: str
) -> None:
    """A packed embedding exports as a gather of its packed rows, dequantized in the graph:
    ONNX Runtime reads the same rows qswap reads (the exporter's trace used to lose the
    in-place dequantization, and ONNX has no bitwise AND for the int4 nibbles)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32)).eval()
    q = qswap.quantize(model, preset, progress=False)
    ids = torch.randint(0, 64, (3, 9))
    path = qswap.export_onnx(q, ids, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = torch.randint(0, 64, (3, 9))
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0])
    with torch.no_grad():
        expected = q(probe)
    assert torch.allclose(got, expected, atol=1e-5)


def test_groups_matmulnbits_cannot_hold_are_refused_by_name(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    model = nn.Sequential(nn.Linear(96, 8))
    q = qswap.quantize(model, {"extends": ["w4_packed"], "weight": {"group_size": 48}})
    with pytest.raises(qswap.UnsupportedModuleError, match=r"'0'.*groups of 48.*MatMulNBits"):
        qswap.export_onnx(q, torch.randn(2, 96), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
