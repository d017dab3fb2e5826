"""Third-party models quantize end to end with the presets and no per-model rules.

Twenty models (``tests/zoo_models.py``: 8 transformers, 6 timm, 6 torchvision-style CNNs;
tiny, random init, BatchNorm statistics warmed up) go through ``x86_int8`` and
``w8a8_minmax``; the transformers also through ``x86_dynamic_int8`` and their language models
through ``w4_per_group``. Each quantized model runs at the eval batch and at batch 1, and
each decoder generates with its KV cache. Marked ``zoo`` (``-m "not zoo"`` skips it).
``bench/zoo.py`` puts the same cells beside PyTorch's own flows.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import assert_unchanged, snapshot
from zoo_models import FAMILIES, NAMES, ZooModel, batch1, build, call, generate_inputs

import qswap

# static int8 runs a transformer's embeddings and norms simulated: said by a FallbackWarning,
# checked in test_x86_int8_layers_of_a_transformer_really_run_int8
pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore::qswap.FallbackWarning")]

pytest.importorskip("transformers")

LANGUAGE = ("hf_gpt2", "hf_bert", "hf_distilbert", "hf_llama", "hf_t5", "hf_bart", "hf_whisper")


def presets_of(name: str) -> tuple[str, ...]:
    """The presets a model goes through: int8 and fake for all; dynamic and 4-bit for text."""
    if name in FAMILIES["transformers"]:
        extra = ("x86_dynamic_int8", "w4_per_group") if name in LANGUAGE else ("x86_dynamic_int8",)
        return ("x86_int8", "w8a8_minmax", *extra)
    return ("x86_int8", "w8a8_minmax")


CELLS = [(name, preset) for name in NAMES for preset in presets_of(name)]

#: output SQNR floors (dB) where a model quantizes meaningfully. Random-init networks of
#: depthwise convolutions with squeeze-excitation (efficientnet, mobilenet, shufflenet) do
#: not, for PyTorch's FX flow either (it scores below 3 dB on them: bench/zoo.py), so only
#: their outputs' shapes and finiteness are checked. Measured values sit 4-15 dB above these.
FLOORS: dict[str, float] = {
    "x86_int8": 15.0,
    "w8a8_minmax": 15.0,
    "x86_dynamic_int8": 30.0,
    "w4_per_group": 8.0,
}
QUANTIZABLE_VISION = (
    "timm_convnext_atto",
    "timm_regnetx_002",
    "timm_resnet18",
    "timm_vit_tiny_patch16_224",
    "tv_resnet18",
    "tv_squeezenet",
)
VISION_FLOOR = 10.0

_BUILT: dict[str, ZooModel] = {}


def zoo(name: str) -> ZooModel:
    """``build(name)``, once per session (skipped where the model's library cannot import)."""
    if name not in _BUILT:
        try:
            _BUILT[name] = build(name)
        except ImportError as exc:
            pytest.skip(f"{name}: {exc}")
    return _BUILT[name]


def logits(out: Any) -> torch.Tensor:
    """The model's main output tensor (``.logits`` of a Hugging Face output, else the tensor)."""
    found = getattr(out, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(f"no output tensor in {type(out).__name__}")


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """SQNR of ``out`` against ``ref`` in dB."""
    noise = (ref.double() - out.double()).pow(2).mean()
    return math.inf if noise == 0 else float(10 * torch.log10(ref.double().pow(2).mean() / noise))


@pytest.mark.parametrize(("name", "preset"), CELLS, ids=[f"{n}-{p}" for n, p in CELLS])
def test_model_quantizes_and_runs_at_eval_batch_and_batch_1(name: str, preset: str) -> None:
    """Quantize with the preset alone; the model runs at both batch sizes with its float shapes."""
    zm = zoo(name)
    before = snapshot(zm.model)
    qmodel = qswap.quantize(
        zm.model, preset, calib_data=zm.calib, example_inputs=zm.example, progress=False
    )
    assert_unchanged(before, zm.model)
    for example in (zm.example, batch1(zm.example)):
        with torch.no_grad():
            ref, out = logits(call(zm.model, example)), logits(call(qmodel, example))
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert bool(torch.isfinite(out).all())
        if zm.family == "transformers":
            assert sqnr(ref, out) >= FLOORS[preset], f"{name} {preset}: {sqnr(ref, out):.1f} dB"
        elif name in QUANTIZABLE_VISION:
            assert sqnr(ref, out) >= VISION_FLOOR, f"{name} {preset}: {sqnr(ref, out):.1f} dB"


GENERATE = [
    (name, preset)
    for name in ("hf_gpt2", "hf_llama", "hf_t5", "hf_bart", "hf_whisper")
    for preset in ("x86_int8", "x86_dynamic_int8", "w4_per_group")
]


@pytest.mark.parametrize(("name", "preset"), GENERATE, ids=[f"{n}-{p}" for n, p in GENERATE])
def test_decoder_generates_with_its_cache(name: str, preset: str) -> None:
    """generate() with the default KV cache runs on the quantized decoder and adds the tokens."""
    zm = zoo(name)
    qmodel = qswap.quantize(
        zm.model, preset, calib_data=zm.calib, example_inputs=zm.example, progress=False
    )
    inputs = generate_inputs(zm)
    with torch.no_grad():
        tokens = qmodel.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt = inputs.get("input_ids")
    start = prompt.shape[1] if prompt is not None and not zm.model.config.is_encoder_decoder else 1
    assert tokens.shape[0] == 1 and tokens.shape[1] >= start + 1
    assert int(tokens.min()) >= 0 and int(tokens.max()) < zm.model.config.vocab_size


def test_x86_int8_layers_of_a_transformer_really_run_int8() -> None:
    """GPT-2's Conv1D layers run on torch's int8 kernels on x86, per output channel."""
    from qswap.backends.torch_int8 import QuantizedTransposedLinear, describe_lowering

    zm = zoo("hf_gpt2")
    # the embeddings and the head tied to the embedding run fake (the norms run int8)
    with pytest.warns(qswap.FallbackWarning, match=r": Embedding x2, Linear x1\."):
        qmodel = qswap.quantize(
            zm.model, "x86_int8", calib_data=zm.calib, example_inputs=zm.example, progress=False
        )
    attn = qmodel.transformer.h[0].attn.c_attn
    assert isinstance(attn, QuantizedTransposedLinear)
    assert attn.weight().q_per_channel_scales().numel() == zm.model.transformer.h[0].attn.c_attn.nf
    assert "transformer.h.1.mlp.c_proj: QuantizedTransposedLinear" in describe_lowering(qmodel)


def test_timm_batchnorm_act_folds_into_the_conv_before_it() -> None:
    """timm's BatchNormAct2d is planned as BN + act: the BN folds, no BatchNorm is left float."""
    zm = zoo("timm_efficientnet_b0")
    p = qswap.plan(zm.model, "x86_int8", example_inputs=zm.example)
    folded = [d for d in p if d.kind == "fuse" and d.name.endswith(".bn")]
    assert len(folded) >= 40
    assert not [d for d in p if "BatchNorm" in d.module_type.__name__ and d.kind == "skip"]
    assert p.uncovered == []
