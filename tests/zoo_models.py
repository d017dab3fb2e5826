"""A zoo of third-party architectures: tiny, random-init, deterministic, CPU, in eval mode.

``build(name)`` returns a :class:`ZooModel`: the model, one eval batch (``example``) and four
calibration batches of other random data (``calib``), each as qswap takes inputs -- a tensor,
a tuple of positional arguments or a dict of keyword arguments. ``NAMES`` lists every model,
grouped by family (``FAMILIES``):

- ``transformers``: Hugging Face models built from their config classes (hidden 64, 2 layers,
  4 heads, vocabulary 256), default attention implementation;
- ``timm``: ``timm.create_model(..., pretrained=False, num_classes=10)`` at 32x32
  (see :func:`import_timm` for why timm needs help to import here);
- ``torchvision``: torchvision's CNN designs written out below (torchvision is not imported),
  narrowed with width multipliers, for 32x32 images.

BatchNorm running statistics are warmed up on random images before ``.eval()``, so they are
not the trivial initial ones. A model takes 1-15 ms per eval batch on one CPU thread.
"""

from __future__ import annotations

import enum
import importlib.machinery
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FAMILIES",
    "NAMES",
    "ZooModel",
    "batch1",
    "build",
    "call",
    "family_of",
    "generate_inputs",
    "import_timm",
]

#: what a model is called with: one positional tensor, positional arguments, or keyword arguments
Example = torch.Tensor | tuple[Any, ...] | dict[str, Any]

BATCH = 4  # eval batch
SEQ = 16  # tokens per sequence (encoder side)
DEC_SEQ = 8  # decoder tokens (encoder-decoder models)
VOCAB = 256
IMAGE = 32  # image side
CLASSES = 10
CALIB_BATCHES = 4


@dataclass
class ZooModel:
    """A built zoo model with its eval batch and calibration batches.

    ``generate`` says whether ``model.generate(**generate_inputs(zm), max_new_tokens=...)``
    works on the float model (checked when the zoo was written).
    """

    name: str
    family: str
    model: nn.Module
    example: Example
    calib: list[Example]
    generate: bool = False
    modality: str = "image"  # "text", "image" or "audio"


def _map_tensors(example: Example, fn: Callable[[torch.Tensor], torch.Tensor]) -> Example:
    if isinstance(example, torch.Tensor):
        return fn(example)
    if isinstance(example, dict):
        return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
    return tuple(fn(v) if isinstance(v, torch.Tensor) else v for v in example)


def batch1(example: Example) -> Example:
    """The same inputs at batch 1: every tensor sliced to its first row."""
    return _map_tensors(example, lambda t: t[:1])


def call(model: nn.Module, example: Example) -> Any:
    """Run ``model`` on ``example`` as qswap does (tensor, positional tuple or keyword dict)."""
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


def generate_inputs(zm: ZooModel) -> dict[str, Any]:
    """Keyword arguments for ``zm.model.generate`` at batch 1: the example less decoder inputs."""
    if not isinstance(zm.example, dict):
        raise TypeError(f"{zm.name} takes no keyword inputs to generate from")
    one = batch1(zm.example)
    assert isinstance(one, dict)
    return {k: v for k, v in one.items() if not k.startswith("decoder_")}


# --------------------------------------------------------------------------- shared helpers


def _warm_up_batchnorm(model: nn.Module, make_batch: Callable[[], Example], steps: int = 4) -> None:
    """Give BatchNorm layers running statistics from ``steps`` random batches (no grad).

    Momentum is set to ``None`` (a plain average over the batches) for the warm-up and
    restored after, so layers with a small momentum (MobileNetV3's 0.01) move off their
    initial statistics too.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            call(model, make_batch())
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def _images(gen: torch.Generator, batch: int = BATCH, side: int = IMAGE) -> torch.Tensor:
    return torch.rand(batch, 3, side, side, generator=gen)


def _vision(name: str, family: str, model: nn.Module, seed: int) -> ZooModel:
    """Warm ``model``'s BatchNorm up and wrap it with image batches (a positional tensor)."""
    gen = torch.Generator().manual_seed(seed)
    _warm_up_batchnorm(model, lambda: _images(gen, 8))
    example = _images(gen)
    calib: list[Example] = [_images(gen) for _ in range(CALIB_BATCHES)]
    return ZooModel(name, family, model, example, calib)


def _tokens(gen: torch.Generator, length: int = SEQ, batch: int = BATCH) -> torch.Tensor:
    # ids 0-2 are pad / bos / eos in every config below: random text avoids them
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def _text(gen: torch.Generator, decoder: bool) -> dict[str, Any]:
    ids = _tokens(gen)
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if decoder:
        dec = _tokens(gen, DEC_SEQ)
        dec[:, 0] = 0  # decoder_start_token_id
        batch["decoder_input_ids"] = dec
    return batch


# --------------------------------------------------------------------------- transformers

_SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
T = TypeVar("T")


def _config(cls: Callable[..., T], **kwargs: Any) -> T:
    """``cls(**kwargs)``: HF configs take generic keys (``num_labels``...) their signatures omit."""
    return cls(**kwargs)


def _hf(
    name: str,
    model: nn.Module,
    make_batch: Callable[[torch.Generator], dict[str, Any]],
    *,
    generate: bool = False,
    modality: str = "text",
) -> ZooModel:
    gen = torch.Generator().manual_seed(1)
    model.eval()
    example = make_batch(gen)
    calib: list[Example] = [make_batch(gen) for _ in range(CALIB_BATCHES)]
    return ZooModel(name, "transformers", model, example, calib, generate, modality)


def _text_batches(decoder: bool = False) -> Callable[[torch.Generator], dict[str, Any]]:
    return partial(_text, decoder=decoder)


def hf_gpt2() -> ZooModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = _config(
        GPT2Config, vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, **_SPECIAL
    )
    return _hf("hf_gpt2", GPT2LMHeadModel(cfg), _text_batches(), generate=True)


def hf_bert() -> ZooModel:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = _config(
        BertConfig,
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=CLASSES,
        pad_token_id=0,
    )
    return _hf("hf_bert", BertForSequenceClassification(cfg), _text_batches())


def hf_distilbert() -> ZooModel:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = _config(
        DistilBertConfig,
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=4,
        hidden_dim=128,
        max_position_embeddings=64,
        num_labels=CLASSES,
        pad_token_id=0,
    )
    return _hf("hf_distilbert", DistilBertForSequenceClassification(cfg), _text_batches())


def tiny_llama(
    *,
    vocab: int = VOCAB,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 128,
    tie: bool = False,
) -> nn.Module:
    """A randomly initialized ``LlamaForCausalLM`` (4 heads, 2 key/value heads), in eval mode.

    ``tie``: its ``lm_head`` shares the embedding's weight (``tie_word_embeddings``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = _config(
        LlamaConfig,
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        **_SPECIAL,
    )
    return cast(nn.Module, LlamaForCausalLM(cfg).eval())


def hf_llama() -> ZooModel:
    return _hf("hf_llama", tiny_llama(), _text_batches(), generate=True)


def hf_t5() -> ZooModel:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = _config(
        T5Config,
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(cfg)
    return _hf("hf_t5", model, _text_batches(decoder=True), generate=True)


def hf_bart() -> ZooModel:
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = _config(
        BartConfig,
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
        decoder_start_token_id=0,
        forced_eos_token_id=None,
        **_SPECIAL,
    )
    model = BartForConditionalGeneration(cfg)
    return _hf("hf_bart", model, _text_batches(decoder=True), generate=True)


def hf_vit() -> ZooModel:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = _config(
        ViTConfig,
        image_size=IMAGE,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=CLASSES,
    )

    def batch(gen: torch.Generator) -> dict[str, Any]:
        return {"pixel_values": _images(gen)}

    return _hf("hf_vit", ViTForImageClassification(cfg), batch, modality="image")


WHISPER_MELS = 16
WHISPER_POSITIONS = 16  # encoder positions; the input has twice as many frames (stride-2 conv)


def hf_whisper() -> ZooModel:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = _config(
        WhisperConfig,
        vocab_size=VOCAB,
        num_mel_bins=WHISPER_MELS,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=WHISPER_POSITIONS,
        max_target_positions=32,
        decoder_start_token_id=0,
        suppress_tokens=None,  # the defaults name ids of the real 51865-token vocabulary
        begin_suppress_tokens=None,
        **_SPECIAL,
    )

    def batch(gen: torch.Generator) -> dict[str, Any]:
        frames = 2 * WHISPER_POSITIONS
        dec = _tokens(gen, DEC_SEQ)
        dec[:, 0] = 0
        features = torch.randn(BATCH, WHISPER_MELS, frames, generator=gen)
        return {"input_features": features, "decoder_input_ids": dec}

    model = WhisperForConditionalGeneration(cfg)
    return _hf("hf_whisper", model, batch, generate=True, modality="audio")


# --------------------------------------------------------------------------- timm


_STAND_IN_DOC = """A stand-in for torchvision, installed by tests/zoo_models.py:import_timm.

PyPI's torchvision wheel is a CUDA build that cannot load beside torch 2.13.0+cpu, and timm
imports a few torchvision names at import time. This package holds only those names:
``torchvision.ops.misc.FrozenBatchNorm2d`` (a faithful copy, used by timm's freeze helpers),
``torchvision.transforms.functional.InterpolationMode`` (the enum), and placeholders for
``torchvision.transforms.ToTensor`` and six ``torchvision.datasets`` classes that timm's data
pipeline names at import time; the placeholders raise ImportError when instantiated.
"""


class FrozenBatchNorm2d(nn.Module):
    """torchvision's ``FrozenBatchNorm2d``: BatchNorm2d with fixed statistics and affine buffers."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm2d's state loads too
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


class InterpolationMode(enum.Enum):
    """torchvision's ``transforms.functional.InterpolationMode`` (its members and values)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _placeholder(qualname: str) -> type:
    """A class timm can name (and subclass) at import time, which raises when instantiated."""

    def __init__(self: object, *args: Any, **kwargs: Any) -> None:
        raise ImportError(
            f"{qualname} is a placeholder of the torchvision stand-in installed by "
            "tests/zoo_models.py (the real torchvision cannot load beside torch 2.13.0+cpu)"
        )

    module, _, name = qualname.rpartition(".")
    return type(name, (), {"__init__": __init__, "__module__": module})


_DATASETS = ("CIFAR100", "CIFAR10", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder")


def _stand_in_modules() -> dict[str, types.ModuleType]:
    """The stand-in's modules by name: torchvision and its ops, transforms and datasets parts."""
    mods: dict[str, types.ModuleType] = {}
    for name in (
        "torchvision",
        "torchvision.ops",
        "torchvision.ops.misc",
        "torchvision.transforms",
        "torchvision.transforms.functional",
        "torchvision.datasets",
    ):
        package = name.count(".") == 0 or not name.endswith(("misc", "functional"))
        mod = types.ModuleType(name, _STAND_IN_DOC if name == "torchvision" else None)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
        if package:
            mod.__path__ = []  # submodules not listed here do not exist: importing one fails
        mods[name] = mod
    mods["torchvision"].__version__ = "0.0.0+stand-in"  # type: ignore[attr-defined]
    mods["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d  # type: ignore[attr-defined]
    functional = mods["torchvision.transforms.functional"]
    functional.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    transforms = mods["torchvision.transforms"]
    to_tensor = _placeholder("torchvision.transforms.ToTensor")
    transforms.ToTensor = to_tensor  # type: ignore[attr-defined]
    for name in _DATASETS:
        setattr(mods["torchvision.datasets"], name, _placeholder(f"torchvision.datasets.{name}"))
    for name, mod in mods.items():  # parents hold their submodules, as after a real import
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    return mods


def _caused_by_torchvision(err: BaseException) -> bool:
    """Whether an import error comes from torchvision (missing, or a build that cannot load)."""
    if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == "torchvision":
        return True
    frames = traceback.extract_tb(err.__traceback__)
    return "torchvision" in str(err) or any("/torchvision/" in f.filename for f in frames)


def _drop_modules(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def _holders(objects: list[object], skip: tuple[str, ...]) -> list[str]:
    """Modules (but ``skip`` and their submodules) whose globals hold one of ``objects``."""
    ids = {id(o) for o in objects}
    out = []
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] in skip or mod is sys.modules.get(__name__):
            continue
        if any(id(v) in ids for v in list(getattr(mod, "__dict__", {}).values())):
            out.append(name)
    return out


#: what import_timm did: None before the first call, else "real torchvision", "stand-in
#: removed", "stand-in left in sys.modules: ..." or "failed: ..."
TIMM_STATUS: str | None = None


def import_timm() -> types.ModuleType:
    """Import timm, with a torchvision stand-in if the real torchvision cannot be imported.

    PyPI's torchvision wheel is a CUDA build that cannot load beside torch 2.13.0+cpu, and
    timm imports torchvision at import time: ``torchvision.ops.misc.FrozenBatchNorm2d``
    (``timm/layers/create_norm.py``, ``layers/norm_act.py``, ``utils/model.py``),
    ``torchvision.transforms.ToTensor`` (subclassed in ``timm/data/transforms.py``),
    ``torchvision.transforms.functional.InterpolationMode`` (unguarded in
    ``timm/data/naflex_transforms.py``) and six ``torchvision.datasets`` classes
    (``timm/data/dataset_factory.py``) -- ``timm/data`` is imported by every model module
    for its mean/std constants. ``timm/layers/_fx.py`` (feature extraction) and four more
    dataset imports are guarded by ``try/except ImportError`` and stay unavailable. None of
    the zoo models uses any of these names. timm also needs pillow (``timm/data``), which
    torchvision would have brought in.

    When ``import timm`` fails because of torchvision, this installs the stand-in in
    ``sys.modules`` (see ``_stand_in_modules``), imports timm, and removes the stand-in again
    when no module outside timm took a reference to it (timm keeps its own references, so it
    keeps working; a later ``import torchvision`` fails as before). Raises ``ImportError``
    with the reason when timm still cannot be imported (pillow, timm's other missing
    dependency, for instance).
    """
    global TIMM_STATUS
    try:
        import timm
    except (ModuleNotFoundError, OSError, RuntimeError) as err:
        if not _caused_by_torchvision(err):
            TIMM_STATUS = f"failed: {type(err).__name__}: {err}"
            raise ImportError(f"timm cannot be imported here: {type(err).__name__}: {err}") from err
    else:
        TIMM_STATUS = TIMM_STATUS or "real torchvision"
        return timm
    _drop_modules("timm")  # whatever the failed import left half-initialised
    _drop_modules("torchvision")
    mods = _stand_in_modules()
    sys.modules.update(mods)
    try:
        import timm
    except Exception as err:
        _drop_modules("timm")
        _drop_modules("torchvision")
        TIMM_STATUS = f"failed with the torchvision stand-in: {type(err).__name__}: {err}"
        raise ImportError(
            "timm cannot be imported even with the torchvision stand-in: "
            f"{type(err).__name__}: {err}"
        ) from err
    objects: list[object] = [*mods.values()]
    objects += [v for m in mods.values() for v in vars(m).values() if isinstance(v, type)]
    holders = _holders(objects, skip=("timm", "torchvision"))
    if holders:
        TIMM_STATUS = "stand-in left in sys.modules: referenced by " + ", ".join(holders)
    else:
        _drop_modules("torchvision")
        TIMM_STATUS = "stand-in removed"
    return timm


def _timm(arch: str, **kwargs: Any) -> Callable[[], ZooModel]:
    def make() -> ZooModel:
        timm = import_timm()
        model = timm.create_model(arch, pretrained=False, num_classes=CLASSES, **kwargs)
        return _vision(f"timm_{arch}", "timm", model, seed=2)

    make.__name__ = f"timm_{arch}"
    make.__doc__ = f"timm's ``{arch}`` (random init, 10 classes){' with ' if kwargs else ''}" + (
        ", ".join(f"{k}={v}" for k, v in kwargs.items())
    )
    return make


# --------------------------------------------------------------------------- torchvision designs


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's channel rounding: to a multiple of ``divisor``, never 10 % below ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvNormActivation(nn.Sequential):
    """torchvision's ``Conv2dNormActivation``: conv (no bias), BatchNorm, optional activation."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: Callable[..., nn.Module] | None = nn.ReLU,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            norm(out_ch),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision's squeeze-excitation: pool, 1x1 conv, activation, 1x1 conv, gate, multiply."""

    def __init__(
        self,
        channels: int,
        squeeze: int,
        activation: Callable[..., nn.Module] = nn.ReLU,
        scale_activation: Callable[..., nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale: torch.Tensor = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        gate: torch.Tensor = self.scale_activation(scale)
        return gate * x


# -- MobileNetV2


class InvertedResidualV2(nn.Module):
    """MobileNetV2 block: expand 1x1 (ReLU6), depthwise 3x3 (ReLU6), project 1x1; skip add."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(inp, hidden, 1, activation=nn.ReLU6))
        layers += [
            ConvNormActivation(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        if self.use_res_connect:
            return x + out
        return out


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (same settings and strides), narrowed by ``width``."""

    #: expand ratio, channels, blocks, first stride (torchvision's table)
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, width: float = 0.25, num_classes: int = CLASSES) -> None:
        super().__init__()
        inp = _make_divisible(32 * width)
        self.last_channel = _make_divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [ConvNormActivation(3, inp, 3, 2, activation=nn.ReLU6)]
        for t, c, n, s in self.SETTINGS:
            out = _make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidualV2(inp, out, s if i == 0 else 1, t))
                inp = out
        features.append(ConvNormActivation(inp, self.last_channel, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        logits: torch.Tensor = self.classifier(torch.flatten(x, 1))
        return logits


# -- ResNet-18


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: 2 3x3 conv-BN, one ReLU module used twice, ``out += identity``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        result: torch.Tensor = self.relu(out)
        return result


class ResNet18(nn.Module):
    """torchvision's ResNet-18 (7x7 stem, max pool, 4 stages of 2 blocks), narrowed by ``width``."""

    def __init__(self, width: float = 0.25, num_classes: int = CLASSES) -> None:
        super().__init__()
        planes = [int(64 * width * 2**i) for i in range(4)]
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(planes[0], 1)
        self.layer2 = self._make_layer(planes[1], 2)
        self.layer3 = self._make_layer(planes[2], 2)
        self.layer4 = self._make_layer(planes[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3], num_classes)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        first = BasicBlock(self.inplanes, planes, stride)
        self.inplanes = planes
        return nn.Sequential(first, BasicBlock(planes, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits: torch.Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits


# -- SqueezeNet 1.1


class Fire(nn.Module):
    """SqueezeNet's Fire module: squeeze 1x1, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [
                self.expand1x1_activation(self.expand1x1(x)),
                self.expand3x3_activation(self.expand3x3(x)),
            ],
            1,
        )


class SqueezeNet(nn.Module):
    """torchvision's SqueezeNet 1.1 (no BatchNorm; conv classifier), narrowed by ``width``."""

    #: squeeze and expand channels of the eight Fire modules (torchvision's 1.1)
    FIRES = ((16, 64), (16, 64), (32, 128), (32, 128), (48, 192), (48, 192), (64, 256), (64, 256))

    def __init__(self, width: float = 0.25, num_classes: int = CLASSES) -> None:
        super().__init__()

        def c(v: int) -> int:
            return max(4, int(v * width))

        inp = c(64)
        fires: list[Fire] = []
        for squeeze, expand in self.FIRES:
            fires.append(Fire(inp, c(squeeze), c(expand), c(expand)))
            inp = 2 * c(expand)
        pool = partial(nn.MaxPool2d, 3, 2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, c(64), 3, 2),
            nn.ReLU(inplace=True),
            pool(),
            *fires[:2],
            pool(),
            *fires[2:4],
            pool(),
            *fires[4:],
        )
        final_conv = nn.Conv2d(inp, num_classes, 1)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), final_conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


# -- ShuffleNetV2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's channel shuffle: view as groups, transpose, flatten back."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: split (``chunk``) or two branches, ``cat``, channel shuffle."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch, 1, bias=False),
                nn.BatchNorm2d(branch),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False),
            nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision's ShuffleNetV2 (stages of 4, 8, 4 units) with the x0.5 channels, conv5 halved."""

    def __init__(
        self,
        channels: tuple[int, ...] = (24, 48, 96, 192, 512),
        repeats: tuple[int, ...] = (4, 8, 4),
        num_classes: int = CLASSES,
    ) -> None:
        super().__init__()
        self.conv1 = ConvNormActivation(3, channels[0], 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inp = channels[0]
        stages: list[nn.Module] = []
        for n, out in zip(repeats, channels[1:4], strict=True):
            units = [ShuffleUnit(inp, out, 2)] + [ShuffleUnit(out, out, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            inp = out
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = ConvNormActivation(inp, channels[-1], 1)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        logits: torch.Tensor = self.fc(x.mean([2, 3]))  # global pool as torchvision writes it
        return logits


# -- MobileNetV3 and EfficientNet


class StochasticDepth(nn.Module):
    """torchvision's ``StochasticDepth`` (row mode): drops whole samples in training only."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x * keep.bernoulli_(1.0 - self.p).div_(1.0 - self.p)


class InvertedResidualV3(nn.Module):
    """MobileNetV3 block: expand, depthwise, SE (Hardsigmoid gate), project, ``+=`` skip."""

    def __init__(
        self, inp: int, kernel: int, expanded: int, out: int, se: bool, act: str, stride: int
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and inp == out
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != inp:
            layers.append(ConvNormActivation(inp, expanded, 1, activation=activation, norm=_bn_v3))
        layers.append(
            ConvNormActivation(
                expanded, expanded, kernel, stride, expanded, activation=activation, norm=_bn_v3
            )
        )
        if se:
            squeeze = _make_divisible(expanded // 4, 8)
            layers.append(SqueezeExcitation(expanded, squeeze, scale_activation=nn.Hardsigmoid))
        layers.append(ConvNormActivation(expanded, out, 1, activation=None, norm=_bn_v3))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.block(x)
        if self.use_res_connect:
            result += x
        return result


def _bn_v3(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels, eps=0.001, momentum=0.01)


class MobileNetV3Small(nn.Module):
    """torchvision's mobilenet_v3_small (its 11 block settings), narrowed by ``width``."""

    #: kernel, expanded, out, squeeze-excite, activation, stride (torchvision's table)
    SETTINGS = (
        (3, 16, 16, True, "RE", 2),
        (3, 72, 24, False, "RE", 2),
        (3, 88, 24, False, "RE", 1),
        (5, 96, 40, True, "HS", 2),
        (5, 240, 40, True, "HS", 1),
        (5, 240, 40, True, "HS", 1),
        (5, 120, 48, True, "HS", 1),
        (5, 144, 48, True, "HS", 1),
        (5, 288, 96, True, "HS", 2),
        (5, 576, 96, True, "HS", 1),
        (5, 576, 96, True, "HS", 1),
    )

    def __init__(self, width: float = 0.5, num_classes: int = CLASSES) -> None:
        super().__init__()

        def c(v: int) -> int:
            return _make_divisible(v * width, 8)

        inp = c(16)
        layers: list[nn.Module] = [
            ConvNormActivation(3, inp, 3, 2, activation=nn.Hardswish, norm=_bn_v3)
        ]
        for k, e, o, se, act, s in self.SETTINGS:
            layers.append(InvertedResidualV3(inp, k, c(e), c(o), se, act, s))
            inp = c(o)
        last_conv = 6 * inp
        layers.append(ConvNormActivation(inp, last_conv, 1, activation=nn.Hardswish, norm=_bn_v3))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = c(1024)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last),
            nn.Hardswish(inplace=True),
            nn.Dropout(0.2, inplace=True),
            nn.Linear(last, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
        return logits


class MBConv(nn.Module):
    """EfficientNet's MBConv: expand (SiLU), depthwise (SiLU), SE (SiLU, Sigmoid), project, skip."""

    def __init__(
        self, inp: int, out: int, kernel: int, stride: int, expand: int, drop: float
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and inp == out
        hidden = _make_divisible(inp * expand, 8)
        layers: list[nn.Module] = []
        if hidden != inp:
            layers.append(ConvNormActivation(inp, hidden, 1, activation=nn.SiLU))
        layers.append(ConvNormActivation(hidden, hidden, kernel, stride, hidden, nn.SiLU))
        layers.append(SqueezeExcitation(hidden, max(1, inp // 4), activation=nn.SiLU))
        layers.append(ConvNormActivation(hidden, out, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNet(nn.Module):
    """torchvision's efficientnet_b0 (its MBConv table, stochastic depth 0.2) at ``width``."""

    #: expand ratio, kernel, stride, in, out, layers (torchvision's B0 table)
    SETTINGS = (
        (1, 3, 1, 32, 16, 1),
        (6, 3, 2, 16, 24, 2),
        (6, 5, 2, 24, 40, 2),
        (6, 3, 2, 40, 80, 3),
        (6, 5, 1, 80, 112, 3),
        (6, 5, 2, 112, 192, 4),
        (6, 3, 1, 192, 320, 1),
    )

    def __init__(self, width: float = 0.25, num_classes: int = CLASSES) -> None:
        super().__init__()

        def c(v: int) -> int:
            return _make_divisible(v * width, 8)

        layers: list[nn.Module] = [ConvNormActivation(3, c(32), 3, 2, activation=nn.SiLU)]
        total = sum(s[-1] for s in self.SETTINGS)
        done = 0
        for expand, kernel, stride, inp, out, n in self.SETTINGS:
            stage: list[nn.Module] = []
            for i in range(n):
                drop = 0.2 * done / total
                stage.append(
                    MBConv(
                        c(inp) if i == 0 else c(out),
                        c(out),
                        kernel,
                        stride if i == 0 else 1,
                        expand,
                        drop,
                    )
                )
                done += 1
            layers.append(nn.Sequential(*stage))
        last = 4 * c(320)
        layers.append(ConvNormActivation(c(320), last, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
        return logits


def _tv(name: str, make: Callable[[], nn.Module]) -> Callable[[], ZooModel]:
    def build_it() -> ZooModel:
        return _vision(name, "torchvision", make(), seed=3)

    build_it.__name__ = name
    build_it.__doc__ = make.__doc__
    return build_it


# --------------------------------------------------------------------------- the zoo

_BUILDERS: dict[str, dict[str, Callable[[], ZooModel]]] = {
    "transformers": {
        "hf_gpt2": hf_gpt2,
        "hf_bert": hf_bert,
        "hf_distilbert": hf_distilbert,
        "hf_llama": hf_llama,
        "hf_t5": hf_t5,
        "hf_bart": hf_bart,
        "hf_vit": hf_vit,
        "hf_whisper": hf_whisper,
    },
    "timm": {
        "timm_efficientnet_b0": _timm("efficientnet_b0"),
        "timm_mobilenetv3_small_100": _timm("mobilenetv3_small_100"),
        "timm_vit_tiny_patch16_224": _timm("vit_tiny_patch16_224", img_size=IMAGE, patch_size=8),
        "timm_convnext_atto": _timm("convnext_atto"),
        "timm_regnetx_002": _timm("regnetx_002"),
        "timm_resnet18": _timm("resnet18"),
    },
    "torchvision": {
        "tv_mobilenet_v2": _tv("tv_mobilenet_v2", MobileNetV2),
        "tv_resnet18": _tv("tv_resnet18", ResNet18),
        "tv_squeezenet": _tv("tv_squeezenet", SqueezeNet),
        "tv_shufflenet_v2": _tv("tv_shufflenet_v2", ShuffleNetV2),
        "tv_mobilenet_v3": _tv("tv_mobilenet_v3", MobileNetV3Small),
        "tv_efficientnet": _tv("tv_efficientnet", EfficientNet),
    },
}

#: every model name by family, in build order
FAMILIES: dict[str, tuple[str, ...]] = {f: tuple(b) for f, b in _BUILDERS.items()}
#: every model name, grouped by family
NAMES: tuple[str, ...] = tuple(n for names in FAMILIES.values() for n in names)


def family_of(name: str) -> str:
    """The family of the zoo model ``name``."""
    for family, names in FAMILIES.items():
        if name in names:
            return family
    raise KeyError(f"no zoo model named {name!r}; the zoo has {', '.join(NAMES)}")


def build(name: str) -> ZooModel:
    """Build zoo model ``name`` with ``torch.manual_seed(0)``, in eval mode, with its inputs.

    Raises ``ImportError`` when the model's library cannot be imported here (pytest's
    ``importorskip``-style callers can skip on it).
    """
    make = _BUILDERS[family_of(name)][name]
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(0)
        return make()


if __name__ == "__main__":  # print each model's size, build time and forward time
    import time

    torch.set_num_threads(1)  # two threads on a busy 2-core machine make the times noise
    for name in NAMES:
        start = time.perf_counter()
        try:
            zm = build(name)
        except ImportError as err:
            print(f"{name:30} skipped: {err}")
            continue
        built = time.perf_counter() - start
        params = sum(p.numel() for p in zm.model.parameters())
        with torch.no_grad():
            call(zm.model, zm.example)
            start = time.perf_counter()
            for _ in range(5):
                call(zm.model, zm.example)
        ms = (time.perf_counter() - start) / 5 * 1e3
        print(
            f"{name:30} {zm.family:12} {params:>9,} params  build {built:5.2f} s  "
            f"forward {ms:6.1f} ms  generate={zm.generate}"
        )
    print(f"timm: {TIMM_STATUS}")
