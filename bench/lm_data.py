"""A small byte-level Llama trained on the Python standard library's own source, and its data.

No download: the text is the ``*.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages``, the test suites, ``encodings``
and ``pydoc_data``: about 10 MB), read as bytes (vocabulary 256, no special tokens), in sorted
path order. Files whose sorted index is a multiple of 10 are held out for evaluation (about
1 MB); the rest is the training text.

The model is ``transformers.LlamaForCausalLM`` with a small config (hidden 256, 4 layers,
4 heads, intermediate 640 -- every ``nn.Linear`` input a multiple of 128, so group-128
quantizers apply to all of them -- untied embeddings), trained with AdamW (warmup, cosine
decay) on seeded random windows of 128 bytes for a time budget. The budget becomes a step
count after 10 timed steps, so the schedule is complete. The trained checkpoint is cached
under ``bench/results/`` (git-ignored), keyed by a hash of the data, the config and the
training settings, and reused when present.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Corpus",
    "TrainSettings",
    "Trained",
    "eval_windows",
    "load_corpus",
    "model_config",
    "train_windows",
    "trained_model",
]

RESULTS = Path(__file__).resolve().parent / "results"
SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    | {"pydoc_data", "encodings"}  # a topics blob and codec tables: data, not code
)
HOLD_OUT_EVERY = 10  # files whose sorted index % 10 == 0 are the evaluation text
SEQ_LEN = 128
TRAIN_THREADS = 2

MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 640,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}


@dataclass(frozen=True)
class Corpus:
    """The training and held-out text as uint8 tensors, and what they were made from."""

    train: torch.Tensor  # 1-D uint8, the training files concatenated
    held_out: torch.Tensor  # 1-D uint8, the held-out files concatenated
    files: int
    held_out_files: int
    digest: str  # sha256 of both texts and the file list

    def describe(self) -> str:
        return (
            f"{self.files} stdlib .py files, {self.train.numel() / 1e6:.2f} MB training text, "
            f"{self.held_out.numel() / 1e6:.2f} MB held out ({self.held_out_files} files, "
            f"sorted index % {HOLD_OUT_EVERY} == 0), sha256 {self.digest[:12]}"
        )


def load_corpus() -> Corpus:
    """The standard library's own ``*.py`` files as bytes, split deterministically."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])
    )
    digest = hashlib.sha256()
    train: list[bytes] = []
    held: list[bytes] = []
    for i, rel in enumerate(files):
        data = (root / rel).read_bytes()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        (held if i % HOLD_OUT_EVERY == 0 else train).append(data)

    def joined(parts: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)

    return Corpus(joined(train), joined(held), len(files), len(held), digest.hexdigest())


def eval_windows(corpus: Corpus, count: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """``count`` windows of ``seq_len`` bytes at evenly spaced offsets of the held-out text."""
    text = corpus.held_out
    step = (text.numel() - seq_len) // count
    return torch.stack([text[i * step : i * step + seq_len] for i in range(count)]).long()


def train_windows(
    corpus: Corpus, count: int, generator: torch.Generator, seq_len: int = SEQ_LEN
) -> torch.Tensor:
    """``count`` windows of ``seq_len`` bytes at random offsets of the training text."""
    text = corpus.train
    starts = torch.randint(0, text.numel() - seq_len, (count,), generator=generator)
    return torch.stack([text[s : s + seq_len] for s in starts.tolist()]).long()


def model_config() -> Any:
    """The small Llama config (a ``transformers.LlamaConfig``)."""
    from transformers import LlamaConfig

    return LlamaConfig(**MODEL_CONFIG)


@dataclass(frozen=True)
class TrainSettings:
    """How the model is trained; all of it goes into the checkpoint's cache key."""

    seconds: float | None  # a time budget, turned into a step count after 10 timed steps
    steps: int | None  # or an exact step count (wins over seconds)
    batch: int = 16
    seq_len: int = SEQ_LEN
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0

    def key(self, corpus: Corpus) -> str:
        text = json.dumps(
            {"data": corpus.digest, "model": MODEL_CONFIG, "train": asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Trained:
    """The trained float model and how it was trained (or where it was loaded from)."""

    model: torch.nn.Module
    meta: dict[str, Any]
    cached: bool
    path: Path


def _lr(step: int, total: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = min(1.0, (step - s.warmup) / max(1, total - s.warmup))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(corpus: Corpus, s: TrainSettings, log_every: int = 100) -> tuple[Any, dict[str, Any]]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    model = LlamaForCausalLM(model_config()).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": s.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=s.lr,
        betas=s.betas,
    )
    total = s.steps or 10**9  # known after the first 10 steps when training for a time budget
    losses: list[float] = []
    step_times: list[float] = []
    start = time.perf_counter()
    step = 0
    while step < total:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, s)
        batch = train_windows(corpus, s.batch, generator, s.seq_len)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        step_times.append(time.perf_counter() - t0)
        step += 1
        if s.steps is None and step == 10 and s.seconds is not None:
            elapsed = time.perf_counter() - start
            per_step = statistics.median(step_times)
            total = max(step + 1, step + int((s.seconds - elapsed) / per_step))
            print(f"  training: {per_step * 1e3:.0f} ms/step -> {total} steps", flush=True)
        if step % log_every == 0 or step == total:
            recent = statistics.fmean(losses[-log_every:])
            print(
                f"  step {step}/{total}: train loss {recent:.3f} nats/byte, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    tail = losses[-min(100, len(losses)) :]
    meta = {
        "steps": step,
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_loss_last100": statistics.fmean(tail),
        "tokens_seen": step * s.batch * s.seq_len,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return model.eval(), meta


def trained_model(
    corpus: Corpus, settings: list[TrainSettings], *, results: Path = RESULTS
) -> Trained:
    """The first of ``settings`` with a cached checkpoint, else trained with the last of them."""
    from transformers import LlamaForCausalLM

    for s in settings:
        key = s.key(corpus)
        path = results / f"llm_{key}.pt"
        meta_path = path.with_suffix(".json")
        if path.exists() and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key:
                model = LlamaForCausalLM(model_config())
                model.load_state_dict(torch.load(path, weights_only=True))
                return Trained(model.eval(), meta, True, path)
    s = settings[-1]
    key = s.key(corpus)
    path = results / f"llm_{key}.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        what = f"{s.steps} steps" if s.steps else f"about {s.seconds:.0f} s"
        print(f"training the byte-level Llama ({what}, {TRAIN_THREADS} threads)", flush=True)
        model, meta = _train(corpus, s)
    finally:
        torch.set_num_threads(threads)
    meta = {
        "key": key,
        "data": corpus.digest,
        "model": MODEL_CONFIG,
        "train": asdict(s),
        **meta,
    }
    results.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return Trained(model, meta, False, path)
