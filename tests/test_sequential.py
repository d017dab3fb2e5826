"""Sequential calibration: weight methods solved block by block, the same result in less memory."""

from __future__ import annotations

import gc
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import qswap
from qswap.backends.packed import PackedLinear
from qswap.registry import Registry, default_registry
from qswap.rounding import GPTQ, QParams, Rounded, RoundToNearest, Solved
from qswap.slots import input_method

GPTQ4 = {"extends": ["w4_packed"], "weight": {"method": "gptq"}}
AWQ4 = {"extends": ["w4_packed"], "weight": {"method": "awq"}}
SMOOTH8 = {"extends": ["x86_dynamic_int8"], "weight": {"method": "smoothquant"}}
STATIC_GPTQ = {"extends": ["x86_int8"], "weight": {"method": "gptq"}}


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: Tensor, *, scale: Tensor) -> Tensor:
        return x + self.down(torch.relu(self.up(x))) * scale


class Stack(nn.Module):
    """Embed, blocks that carry a hidden state (with a shared keyword input), head."""

    def __init__(self, width: int = 32, depth: int = 3, chained: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 8)
        self.chained = chained

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        scale = torch.full((1,), 0.5)
        if not self.chained:  # the blocks side by side: none takes another's output
            return self.head(sum(block(h, scale=scale) for block in self.blocks))
        for block in self.blocks:
            h = block(h, scale=scale)
        return self.head(h)


def _batches(n: int = 4) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=g) * torch.linspace(0.2, 5, 16) for _ in range(n)]


def _both(model: nn.Module, config: Any, batches: list[Any]) -> tuple[nn.Module, nn.Module]:
    whole = qswap.quantize(model, config, calib_data=batches, progress=False)
    blockwise = qswap.quantize(model, config, calib_data=batches, progress=False, sequential=True)
    return whole, blockwise


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        other = sb[key]
        if isinstance(value, Tensor):
            assert torch.equal(value, other), key
        elif hasattr(value, "__getstate__") and not isinstance(value, (int, float, str)):
            continue  # torch.ao's packed parameters: compared through the outputs
        else:
            assert value == other, key


@pytest.mark.parametrize("config", [GPTQ4, AWQ4, SMOOTH8, STATIC_GPTQ])
def test_sequential_gives_what_whole_model_calibration_gives(config: Any) -> None:
    """Each block sees the float outputs of the one before it, as in a whole-model pass: the
    weights, qparams and input scales come out identical, and so do the outputs."""
    model = Stack().eval()
    whole, blockwise = _both(model, config, _batches())
    _same_state(whole, blockwise)
    x = _batches(1)[0]
    with torch.no_grad():
        assert torch.equal(whole(x), blockwise(x))
    for name, layer in whole._qswap.layers.items():  # type: ignore[union-attr]
        assert blockwise._qswap.layers[name].qparams.keys() == layer.qparams.keys()  # type: ignore[union-attr]
        for slot, qp in layer.qparams.items():
            other = blockwise._qswap.layers[name].qparams[slot]  # type: ignore[union-attr]
            assert torch.equal(qp.scale, other.scale), (name, slot)


def test_sequential_on_a_transformers_decoder_is_exact_and_generates() -> None:
    pytest.importorskip("transformers")
    from zoo_models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(vocab=256, layers=3)
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 256, (2, 24), generator=g)} for _ in range(3)]
    whole, blockwise = _both(model, GPTQ4, batches)
    _same_state(whole, blockwise)
    ids = torch.randint(0, 256, (1, 12), generator=g)
    assert blockwise.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 16)


@pytest.mark.parametrize("config", [GPTQ4, AWQ4])
def test_quantized_sequential_feeds_each_block_the_rounded_blocks_outputs(config: Any) -> None:
    """sequential="quantized": block 1 calibrates on what the quantized block 0 computes
    (its packed layers, to float-sum order: 1e-5); block 0 itself sees the same float inputs
    as with sequential=True and comes out identical, later blocks differ."""
    torch.manual_seed(0)
    model = Stack().eval()
    batches = _batches()
    prepared = qswap.prepare(model, config, example_inputs=batches[0])
    seen: list[Tensor] = []
    hook = prepared.blocks[1].register_forward_pre_hook(  # type: ignore[union-attr]
        lambda _m, a: seen.append(a[0].clone())
    )
    qswap.calibrate(prepared, batches, progress=False, sequential="quantized")
    hook.remove()
    rounded = qswap.convert(prepared, inplace=True)
    plain = qswap.quantize(model, config, calib_data=batches, progress=False, sequential=True)
    half = torch.full((1,), 0.5)
    with torch.no_grad():
        expected = [rounded.blocks[0](model.embed(x), scale=half) for x in batches]
        floats = [model.blocks[0](model.embed(x), scale=half) for x in batches]
    got = seen[-len(batches) :]  # the first call is the first batch's probe run, float
    for g, e, f in zip(got, expected, floats, strict=True):
        assert torch.allclose(g, e, atol=1e-5) and not torch.allclose(g, f, atol=1e-3)
    _same_state(rounded.blocks[0], plain.blocks[0])
    assert not torch.equal(rounded.blocks[1].up.qweight, plain.blocks[1].up.qweight)
    # the float model is untouched and the option is checked by name
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    with pytest.raises(qswap.CalibrationError, match="sequential must be"):
        qswap.calibrate(qswap.prepare(model, config), batches, sequential="float")  # type: ignore[arg-type]


@pytest.mark.parametrize(("family", "config"), [("llama", GPTQ4), ("gpt2", AWQ4)])
def test_quantized_sequential_on_a_decoder_with_a_kv_cache(family: str, config: Any) -> None:
    """A transformers decoder passes its blocks a KV cache that grows on every call: the
    rounded run of a block starts from the cache as it was, so block 1 calibrates on exactly
    what the converted model's block 0 gives it (embeddings kept float here, so both start
    from the same input). GPT-2's Conv1D holds its weight transposed, AWQ's input scale
    along its rows."""
    transformers = pytest.importorskip("transformers")
    from zoo_models import tiny_llama

    torch.manual_seed(0)
    if family == "llama":
        model = tiny_llama(vocab=256, layers=2)
    else:
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256)
        model = transformers.GPT2LMHeadModel(cfg).eval()
    blocks = "model.layers" if family == "llama" else "transformer.h"
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 256, (2, 24), generator=g)} for _ in range(3)]
    cfg = {
        **config,
        "weight": {**config["weight"], "group_size": 32},
        "rules": [{"match": {"type": "Embedding"}, "skip": True}],
    }
    prepared = qswap.prepare(model, cfg, example_inputs=batches[0])
    seen: list[Tensor] = []

    def watch(root: nn.Module) -> Any:
        block = root.get_submodule(blocks)[1]
        return block.register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))

    hook = watch(prepared)
    qswap.calibrate(prepared, batches, progress=False, sequential="quantized")
    hook.remove()
    calibrated, seen = seen[-len(batches) :], []
    q = qswap.convert(prepared, inplace=True)
    hook = watch(q)
    with torch.no_grad():
        for batch in batches:
            q(**batch)
    hook.remove()
    for got, expected in zip(calibrated, seen, strict=True):
        assert torch.allclose(got, expected, atol=1e-6)


class Watching(GPTQ):
    """GPTQ that counts, each time a layer is solved, the methods alive in the process (not
    only in the model: anything that keeps a replaced method keeps its Hessian) that still
    hold statistics."""

    held: ClassVar[list[int]] = []

    def solve(self, weight: Tensor, qparams: QParams, rtn: RoundToNearest) -> Rounded:
        gc.collect()
        live = [m for m in gc.get_objects() if type(m) is Watching and m.hessian.numel()]
        Watching.held.append(len(live))
        return super().solve(weight, qparams, rtn)


class Overriding(Stack):
    """A model whose ``train`` is its own (as transformers' models have): calibration calls it."""

    def train(self, mode: bool = True) -> Overriding:
        return super().train(mode)


@pytest.mark.parametrize("kind", ["eval", "train", "override"])
@pytest.mark.parametrize(("sequential", "most"), [(False, 3 * 2 + 2), (True, 2)])
def test_sequential_holds_one_blocks_statistics_at_a_time(
    sequential: bool, most: int, kind: str
) -> None:
    """Whole-model calibration holds every layer's Hessian until convert; sequential only the
    block being solved (2 layers here), freeing each as it goes, whatever mode the model is
    in (calibration used to keep every module to restore its mode: every Hessian too)."""
    registry = Registry("watch", parent=default_registry())
    registry.register_method("watching", Watching)
    config = {"extends": ["w4_packed"], "weight": {"method": "watching"}}
    model = Overriding() if kind == "override" else Stack()
    model.train(kind == "train")
    prepared = qswap.prepare(model, config, registry=registry, example_inputs=_batches(1)[0])
    was = {name: m.training for name, m in prepared.named_modules()}
    Watching.held = []
    qswap.calibrate(prepared, _batches(), sequential=sequential, progress=False)
    # the modes come back as they were (but a Solved, new in a solved method's place)
    now = {n: m.training for n, m in prepared.named_modules() if not isinstance(m, Solved)}
    assert now == {n: t for n, t in was.items() if n in now}
    assert now[""] == (kind == "train")
    solved = [m for m in map(input_method, prepared.modules()) if isinstance(m, Solved)]
    assert len(solved) == (6 if sequential else 0)
    assert "solved" in repr(solved[0]) if solved else True
    qswap.convert(prepared)
    assert max(Watching.held) == most and len(Watching.held) == 3 * 2 + 2


def test_sequential_refuses_blocks_that_do_not_chain_and_changes_nothing() -> None:
    model = Stack(chained=False)
    prepared = qswap.prepare(model, GPTQ4, example_inputs=_batches(1)[0])
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    with pytest.raises(qswap.CalibrationError, match=r"block 1's input is not block 0's output"):
        qswap.calibrate(prepared, _batches(), sequential=True, progress=False)
    after = prepared.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    flat = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    with pytest.raises(qswap.CalibrationError, match=r"no nn.ModuleList.*sequential=False"):
        qswap.quantize(flat, GPTQ4, calib_data=_batches(), sequential=True)
    solved = qswap.prepare(Stack(), GPTQ4, example_inputs=_batches(1)[0])
    qswap.calibrate(solved, _batches(), sequential=True, progress=False)
    with pytest.raises(qswap.CalibrationError, match="rounded its weight already"):
        qswap.calibrate(solved, _batches(), progress=False)


@pytest.mark.parametrize("sequential", [False, True])
def test_a_method_on_a_tied_lm_head_leaves_the_embedding_alone(sequential: bool) -> None:
    """lm_head and the embedding share one weight in many language models: AWQ writes W * s
    and GPTQ its rounded W into the layer, which must not reach the embedding. The layer is
    untied (its own copy), and the plan says so."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    float_embedding = model.model.embed_tokens.weight.detach().clone()
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=g)} for _ in range(2)]
    q = qswap.quantize(model, AWQ4, calib_data=batches, progress=False, sequential=sequential)
    # the embedding holds the float embedding rounded to nearest, as without a method
    plain = qswap.quantize(model, "w4_packed")
    assert torch.equal(q.model.embed_tokens.qweight, plain.model.embed_tokens.qweight)
    assert torch.equal(model.model.embed_tokens.weight, float_embedding)  # the user's unchanged
    assert q.lm_head.qweight is not q.model.embed_tokens.qweight  # AWQ's own copy
    layers = q._qswap.layers  # type: ignore[union-attr]
    notes = layers["lm_head"].notes
    assert any("untied from 'model.embed_tokens.weight'" in n for n in notes), notes
    assert any("untied from model.embed_tokens.weight: weight method 'awq'" in n for n in notes)
    assert any("rounded to nearest" in n for n in layers["model.embed_tokens"].notes)
    assert q.lm_head.input_scale.numel() == 64  # AWQ's scales live in the layer
