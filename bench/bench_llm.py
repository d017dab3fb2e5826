"""Weight-only (LLM) quantization of a byte-level Llama trained here: qswap beside its peers.

One process, one trained model, the same held-out text for every row. The model is
``transformers.LlamaForCausalLM`` (hidden 256, 4 layers, 4 heads, intermediate 640, vocabulary
256 bytes, untied embeddings) trained with AdamW on the Python standard library's own source
(``lm_data.py``: no download; the checkpoint is cached under ``bench/results/`` and reused). The
rows, each built from a copy of the same float model:

* float (fp32);
* torch.ao ``quantize_dynamic(copy, {nn.Linear}, dtype=torch.qint8)``;
* torchao, when ``import torchao`` works (a peer, never a dependency: ``pip install --no-deps
  torchao``): ``Int8WeightOnlyConfig()``, ``Int8DynamicActivationInt8WeightConfig()``,
  ``Int4WeightOnlyConfig(group_size=128)`` in each packing format (in torchao 0.18 none runs on a
  CPU: the errors are printed and the row skipped), and ``IntxWeightOnlyConfig(torch.int4,
  PerGroup(128))``, the int4 group-128 weight-only flow that does run on a CPU (int4 values
  stored one per int8);
* ONNX Runtime: the float model exported (``torch.onnx.export``, no KV cache), and
  ``matmul_nbits_quantizer``'s RTN and GPTQ (4-bit, block 128, symmetric; GPTQ calibrated on
  the calibration windows) -- perplexity and prefill only: the export has no KV cache, so no
  decode latency;
* qswap: each ``(label, config)`` of ``QSWAP_ROWS`` (packed weight-only int8/int4 with RTN,
  GPTQ and AWQ; dynamic w8a8 on x86 without and with SmoothQuant), as ``qswap.quantize(copy, config,
  calib_data=calib, progress=False)`` with 16 training windows (4 batches of 4 x 128 bytes) as
  calibration data; a row whose config does not exist (yet) prints ``not available``; the
  packed RTN and GPTQ int4 models are also exported by ``qswap.export_onnx`` (``MatMulNBits``)
  and run in ONNX Runtime (perplexity and prefill, as ORT's own rows); GPTQ int4 is also built
  with ``sequential=True`` (block by block): the most GPTQ statistics alive at once, against
  whole-model calibration, and whether the weights come out the same.

Per row: perplexity (``exp`` of the mean next-byte NLL) on held-out windows of 128 bytes, the
model's bytes (its ``state_dict`` as stored: torch.ao's packed weights as their quantized
tensors, torchao's tensor subclasses as their inner tensors, ORT's initializers), prefill
latency (batch 1, 128 tokens, no cache) and decode latency (batch 1: a 64-byte prompt, then 32
greedy steps with the KV cache, ``past_key_values``, timed per token), median over interleaved
rounds (ABBA order, the float model timed twice: the noise floor). It ends with a markdown
table and the targets: the fraction of RTN int4's perplexity gap to float that GPTQ and AWQ
close, the int4 bytes ratio against 0.16, each qswap int8 row against its torchao peer, the
best decode ratio.

    python bench/bench_llm.py                 # about 4 min training (once), then about 6 min
    python bench/bench_llm.py --quick         # 60 s training if no checkpoint, fewer rounds
    python bench/bench_llm.py --threads 1 2 --json bench/results/llm.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

for _name in ("torchao", "torch.utils._pytree"):  # a CPU build's missing CUDA kernels, enum notes
    logging.getLogger(_name).setLevel(logging.ERROR)

import lm_data
import peers
from measure import write_json

import qswap

#: qswap's rows: (label, config). The packed configs are being added to qswap; a row whose
#: config is missing prints ``not available`` and the run goes on.
GPTQ_W4: dict[str, Any] = {"extends": ["w4_packed"], "weight": {"method": "gptq"}}
AWQ_W4: dict[str, Any] = {"extends": ["w4_packed"], "weight": {"method": "awq"}}
QSWAP_ROWS: list[tuple[str, str | dict[str, Any]]] = [
    ("qswap RTN int8 (w8_packed)", "w8_packed"),
    ("qswap RTN int4 g128 (w4_packed)", "w4_packed"),
    ("qswap GPTQ int4 g128", GPTQ_W4),
    ("qswap AWQ int4 g128", AWQ_W4),
    ("qswap fake w4 g128 (simulation)", "w4_per_group"),
    ("qswap dynamic w8a8 (x86_dynamic_int8)", "x86_dynamic_int8"),
    (
        "qswap SmoothQuant w8a8 dynamic",
        {"extends": ["x86_dynamic_int8"], "weight": {"method": "smoothquant"}},
    ),
]
#: rows built with quantize's keyword arguments too
QSWAP_KW_ROWS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("qswap GPTQ int4 g128, sequential=quantized", GPTQ_W4, {"sequential": "quantized"}),
    ("qswap AWQ int4 g128, sequential=quantized", AWQ_W4, {"sequential": "quantized"}),
]
RTN4, GPTQ4, AWQ4 = (label for label, _ in QSWAP_ROWS[1:4])
GPTQ4Q, AWQ4Q = (label for label, _, _ in QSWAP_KW_ROWS)
RTN8, DYN8, SMOOTH8 = QSWAP_ROWS[0][0], QSWAP_ROWS[5][0], QSWAP_ROWS[6][0]
#: qswap's int8 rows and the torchao row each is held against (perplexity and latency)
INT8_PEERS = (
    (RTN8, "torchao Int8WeightOnly"),
    (DYN8, "torchao Int8DynActInt8Weight"),
    (SMOOTH8, "torchao Int8DynActInt8Weight"),
)
INT4_ROWS = (RTN4, GPTQ4, AWQ4)  # held against the 0.16 bytes target
INT4_BYTES_TARGET = 0.16
FLOAT, FLOAT_AGAIN = "float (fp32)", "float (fp32) again"
ORT_FLOAT, ORT_RTN, ORT_GPTQ = "ORT float (fp32)", "ORT RTN int4 b128", "ORT GPTQ int4 b128"
PROMPT_LEN, NEW_TOKENS = 64, 32
CALIB_WINDOWS, CALIB_BATCH, CALIB_SEED = 16, 4, 1234
DEFAULT_TRAIN_SECONDS, QUICK_TRAIN_SECONDS = 240.0, 60.0


@dataclass(frozen=True)
class Timing:
    """Rounds of blocks of calls: each block about ``block_ms`` of calls (``min_calls`` at least)."""

    rounds: int  # ABBA rounds (even)
    block_ms: float
    min_calls: int
    warmup_s: float  # untimed calls per runner before the first round


FULL = Timing(rounds=8, block_ms=250.0, min_calls=3, warmup_s=0.5)
QUICK = Timing(rounds=4, block_ms=80.0, min_calls=2, warmup_s=0.2)


@dataclass
class Row:
    """One model of the table and what was measured on it."""

    label: str
    kind: str  # "torch" or "ort"
    build_s: float | None = None
    error: str | None = None  # "Type: first line" when it could not be built or run
    quantized: str = ""  # which layers it quantized
    bytes: int | None = None
    ppl: float | None = None
    nll: list[float] = field(default_factory=list, repr=False)  # per held-out window
    note: str = ""
    prefill_ms: dict[int, float] = field(default_factory=dict)  # by thread count
    decode_ms: dict[int, float] = field(default_factory=dict)  # per token, by thread count


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Third-party chatter (deprecations, progress bars on stdout) kept out of the report."""
    with (
        warnings.catch_warnings(),
        peers.torch_ao_quiet(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- sizes


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` holds as stored: a quantized tensor with its per-channel qparams, a tensor
    subclass (torchao) as the sum of its inner tensors."""
    if t.is_quantized:
        n = t.numel() * t.element_size()
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales, zeros = t.q_per_channel_scales(), t.q_per_channel_zero_points()
            n += scales.numel() * scales.element_size() + zeros.numel() * zeros.element_size()
        return n
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, name) for name in names)
        return sum(tensor_bytes(x) for x in inner if isinstance(x, torch.Tensor))
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module) -> int:
    """The bytes of ``model.state_dict()`` (parameters and persistent buffers, as stored)."""
    seen: set[tuple[int, int]] = set()

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            plain = type(value) in (torch.Tensor, nn.Parameter) and not value.is_quantized
            key = (value.data_ptr(), value.numel())
            if plain and key in seen:
                return 0
            seen.add(key)
            return tensor_bytes(value)
        if isinstance(value, (tuple, list)):
            return sum(walk(v) for v in value)
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        return 0  # dtypes, ints: metadata

    return sum(walk(v) for v in model.state_dict().values())


def coverage(reference: nn.Module, model: nn.Module) -> str:
    """Which of the float model's Linear/Embedding layers are no longer plain float in ``model``."""
    linears = embeds = 0
    changed: list[str] = []
    for name, module in reference.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        is_linear = isinstance(module, nn.Linear)
        linears += is_linear
        embeds += not is_linear
        try:
            other = model.get_submodule(name)
        except AttributeError:
            changed.append(name)
            continue
        weight = getattr(other, "weight", None)
        plain = (
            type(other) in (nn.Linear, nn.Embedding)
            and isinstance(weight, torch.Tensor)
            and type(weight) in (torch.Tensor, nn.Parameter)
            and weight.dtype == torch.float32
        )
        if not plain:
            changed.append(name)
    body = sum(1 for n in changed if n.startswith("model.layers."))
    head = "lm_head" in changed
    embed = "model.embed_tokens" in changed
    return (
        f"{body}/{linears - 1} block linears, lm_head {'q' if head else 'float'}, "
        f"embedding {'q' if embed else 'float'}"
    )


# --------------------------------------------------------------------------- quality


def window_nll(
    logits_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor
) -> list[float]:
    """Each window's mean next-byte negative log-likelihood (run in chunks of 16 windows)."""
    out: list[float] = []
    with torch.no_grad():
        for chunk in windows.split(16):
            logits = logits_of(chunk).float()
            nll = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), chunk[:, 1:], reduction="none"
            ).double()
            out += nll.mean(dim=1).tolist()
    return out


def perplexity_of(nll: list[float]) -> float:
    """``exp`` of the mean negative log-likelihood (windows are of equal length)."""
    return math.exp(statistics.fmean(nll))


def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor) -> float:
    """``exp`` of the mean next-byte negative log-likelihood over ``windows``."""
    return perplexity_of(window_nll(logits_of, windows))


def gap_share(
    float_nll: list[float], base_nll: list[float], nll: list[float]
) -> tuple[float, float]:
    """The share of ``base``'s log-perplexity gap to float that ``nll`` closes, and its standard
    error over the held-out windows (paired: the same windows in all three)."""
    n = len(nll)
    gap = statistics.fmean(b - f for b, f in zip(base_nll, float_nll, strict=True))
    gains = [b - q for b, q in zip(base_nll, nll, strict=True)]
    error = statistics.stdev(gains) / math.sqrt(n) if n > 1 else math.inf
    return statistics.fmean(gains) / gap, error / abs(gap)


def torch_logits(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(input_ids=ids, use_cache=False).logits
        return out

    return run


# --------------------------------------------------------------------------- timing


def prefill_runner(model: nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    def run() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            return (time.perf_counter() - start) * 1e3

    return run


def decode_runner(model: nn.Module, prompt: torch.Tensor) -> Callable[[], float]:
    """Prefill ``prompt`` (untimed), then ``NEW_TOKENS`` greedy steps with the KV cache: ms/token."""

    def run() -> float:
        with torch.no_grad():
            out = model(input_ids=prompt, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(NEW_TOKENS):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return (time.perf_counter() - start) * 1e3 / NEW_TOKENS

    return run


def ort_runner(session: Any, ids: torch.Tensor) -> Callable[[], float]:
    feed = {session.get_inputs()[0].name: ids.numpy()}

    def run() -> float:
        start = time.perf_counter()
        session.run(None, feed)
        return (time.perf_counter() - start) * 1e3

    return run


def interleaved_ms(runners: dict[str, Callable[[], float]], t: Timing) -> dict[str, float]:
    """Median ms of each runner: the median over ABBA rounds of each round's block median."""
    calls: dict[str, int] = {}
    for name, run in runners.items():
        walls: list[float] = []  # a call's wall time: decode's untimed prefill sizes blocks too
        end = time.perf_counter() + t.warmup_s
        while len(walls) < 2 or time.perf_counter() < end:
            start = time.perf_counter()
            run()
            walls.append((time.perf_counter() - start) * 1e3)
        calls[name] = max(t.min_calls, math.ceil(t.block_ms / statistics.median(walls)))
    names = list(runners)
    blocks: dict[str, list[float]] = {name: [] for name in names}
    for r in range(t.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            blocks[name].append(statistics.median(runners[name]() for _ in range(calls[name])))
    return {name: statistics.median(b) for name, b in blocks.items()}


# --------------------------------------------------------------------------- the rows


def timed_build(row: Row, build: Callable[[], Any]) -> Any:
    """``build()`` with its wall time in ``row.build_s``, or None with ``row.error`` set."""
    start = time.perf_counter()
    try:
        with quiet():
            built = build()
    except Exception as err:
        row.error = first_line(err)
        return None
    row.build_s = time.perf_counter() - start
    return built


def torchao_rows(float_model: nn.Module) -> list[tuple[Row, nn.Module | None]]:
    """torchao's configs on copies of the float model (none if torchao is not installed)."""
    try:
        with quiet():
            import torchao
            from torchao.quantization import (
                Int4WeightOnlyConfig,
                Int8DynamicActivationInt8WeightConfig,
                Int8WeightOnlyConfig,
                IntxWeightOnlyConfig,
                quantize_,
            )
            from torchao.quantization.granularity import PerGroup
    except ImportError as err:
        print(f"torchao not installed ({first_line(err)}): its rows are skipped")
        return []
    print(f"torchao {torchao.__version__}")

    def applied(config: Any, dtype: torch.dtype = torch.float32) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            work = copy.deepcopy(float_model).to(dtype)
            quantize_(work, config)
            return work

        return build

    out: list[tuple[Row, nn.Module | None]] = []
    for label, build in (
        ("torchao Int8WeightOnly", applied(Int8WeightOnlyConfig())),
        ("torchao Int8DynActInt8Weight", applied(Int8DynamicActivationInt8WeightConfig())),
    ):
        row = Row(label, "torch")
        out.append((row, timed_build(row, build)))
    # Int4WeightOnlyConfig: every packing format of this torchao, first fp32 then bf16
    from torchao.quantization.quantize_.workflows.int4.int4_packing_format import (
        Int4PackingFormat,
    )

    int4_errors: list[str] = []
    for fmt, dtype in [(f, d) for f in Int4PackingFormat for d in (torch.float32, torch.bfloat16)]:
        row = Row(f"torchao Int4WeightOnly g128 ({fmt.value}, {dtype})", "torch")
        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format=fmt)
        model = timed_build(row, applied(config, dtype))
        if model is not None:
            try:
                with quiet(), torch.no_grad():
                    model(input_ids=torch.zeros(1, 8, dtype=torch.long), use_cache=False)
            except Exception as err:
                row.error = first_line(err)
        if row.error is None:
            out.append((row, model))
            break
        int4_errors.append(f"{fmt.value}, {str(dtype).removeprefix('torch.')}: {row.error}")
    else:
        print(
            "torchao Int4WeightOnlyConfig(group_size=128) runs in no layout on this CPU; skipped:"
        )
        print("\n".join(f"  {line}" for line in int4_errors))
    row = Row("torchao IntxWeightOnly int4 g128", "torch")
    row.note = "int4 values stored one per int8 byte (IntxUnpackedToInt8Tensor)"
    out.append((row, timed_build(row, applied(IntxWeightOnlyConfig(torch.int4, PerGroup(128))))))
    return out


class Logits(nn.Module):
    """A causal LM's forward without cache: the logits of ``input_ids`` (what is exported)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # an explicit mask: without one transformers looks for packed sequences (aten::diff)
        out: torch.Tensor = self.inner(
            input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False
        ).logits
        return out


def export_float(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The float model's forward without cache (logits of input_ids) as ONNX, TorchScript exporter."""
    torch.onnx.export(
        Logits(model),
        (example,),
        str(path),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def ort_nbits(source: Path, out: Path, algo: str, calib: list[torch.Tensor]) -> Path:
    """ONNX Runtime's ``MatMulNBitsQuantizer``: 4 bits, block 128, symmetric, RTN or GPTQ."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
        RTNWeightOnlyQuantConfig,
    )

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = iter([{"input_ids": b.numpy()} for b in calib])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

        def rewind(self) -> None:
            self.__init__()  # type: ignore[misc]

    config: Any
    if algo == "gptq":
        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=128)
    else:
        config = RTNWeightOnlyQuantConfig()
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(source)), bits=4, block_size=128, is_symmetric=True, algo_config=config
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def onnx_bytes_and_ops(path: Path) -> tuple[int, str]:
    """Bytes of the model's initializers as stored, and its MatMulNBits / MatMul / Gather count."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    size = sum(numpy_helper.to_array(init).nbytes for init in graph.initializer)
    ops = [n.op_type for n in graph.node]
    nbits = [n.name for n in graph.node if n.op_type == "MatMulNBits"]
    head = any("lm_head" in name for name in nbits)
    text = (
        f"{len(nbits)} MatMulNBits (lm_head {'q' if head else 'float'}), "
        f"{ops.count('MatMul')} MatMul, {ops.count('Gather')} Gather"
    )
    return size, text


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_rows(
    float_model: nn.Module, example: torch.Tensor, calib: list[torch.Tensor], tmp: Path
) -> list[tuple[Row, Path | None]]:
    """The float model exported to ONNX, and ORT's own RTN and GPTQ int4 of it."""
    try:
        with quiet():
            import onnxruntime  # noqa: F401
            from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401
    except ImportError as err:
        print(f"ONNX Runtime's matmul_nbits_quantizer unavailable ({first_line(err)}): skipped")
        return []
    out: list[tuple[Row, Path | None]] = []
    row = Row(ORT_FLOAT, "ort", note="prefill only: the export has no KV cache")
    source = timed_build(row, lambda: export_float(float_model, example, tmp / "float.onnx"))
    out.append((row, source))
    if source is None:
        return out
    for label, algo in ((ORT_RTN, "rtn"), (ORT_GPTQ, "gptq")):
        row = Row(label, "ort", note="prefill only: the export has no KV cache")
        path = timed_build(
            row, functools.partial(ort_nbits, source, tmp / f"{algo}.onnx", algo, calib)
        )
        out.append((row, path))
    return out


def qswap_ort_rows(
    built: list[tuple[Row, Any]], example: torch.Tensor, tmp: Path
) -> list[tuple[Row, Path | None]]:
    """qswap's packed int4 models exported by ``qswap.export_onnx`` (MatMulNBits), run in ORT."""
    try:
        with quiet():
            import onnxruntime  # noqa: F401
    except ImportError as err:
        print(f"ONNX Runtime unavailable ({first_line(err)}): qswap's ONNX rows skipped")
        return []
    models = {r.label: m for r, m in built if m is not None}
    out: list[tuple[Row, Path | None]] = []
    for label in (RTN4, GPTQ4):
        if label not in models:
            continue
        row = Row(f"{label} -> ORT", "ort", note="prefill only: the export has no KV cache")
        path = tmp / f"qswap-{len(out)}.onnx"
        export = functools.partial(
            qswap.export_onnx,
            Logits(models[label]),
            example,
            path,
            input_names=["input_ids"],
            output_names=["logits"],
        )
        out.append((row, timed_build(row, export)))
    return out


def sequential_memory(float_model: nn.Module, calib: list[torch.Tensor]) -> dict[str, Any]:
    """GPTQ int4 calibrated on the whole model and block by block (``sequential=True``): the
    most bytes of GPTQ statistics (Hessians) alive when a layer is solved, build time, and
    whether the packed weights are the same."""
    import gc

    from qswap.rounding import GPTQ

    config = GPTQ_W4
    solve = GPTQ.solve
    out: dict[str, Any] = {}
    models = {}
    for sequential in (False, True):
        peak = [0]

        def watched(self: GPTQ, *args: Any, peak: list[int] = peak) -> Any:
            live = [o for o in gc.get_objects() if isinstance(o, GPTQ) and o.hessian.numel()]
            peak[0] = max(peak[0], sum(o.hessian.numel() * o.hessian.element_size() for o in live))
            return solve(self, *args)

        GPTQ.solve = watched  # type: ignore[method-assign]
        try:
            start = time.perf_counter()
            with quiet():
                models[sequential] = qswap.quantize(
                    float_model, config, calib_data=calib, progress=False, sequential=sequential
                )
            seconds = time.perf_counter() - start
        finally:
            GPTQ.solve = solve  # type: ignore[method-assign]
        out["sequential" if sequential else "whole"] = {"peak_bytes": peak[0], "build_s": seconds}
    a, b = (m.state_dict() for m in (models[False], models[True]))
    out["identical"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return out


def qswap_rows(float_model: nn.Module, calib: list[torch.Tensor]) -> list[tuple[Row, Any]]:
    out: list[tuple[Row, Any]] = []
    for label, config, kwargs in [(lab, c, {}) for lab, c in QSWAP_ROWS] + QSWAP_KW_ROWS:
        row = Row(label, "torch")
        build = functools.partial(
            qswap.quantize, float_model, config, calib_data=calib, progress=False, **kwargs
        )
        model = timed_build(row, build)
        if model is None:
            print(f"{label}: not available ({row.error})", flush=True)
        out.append((row, model))
    return out


# --------------------------------------------------------------------------- report


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def table(rows: list[Row], threads: int) -> str:
    by = {r.label: r for r in rows}
    f = by[FLOAT]
    lines = [
        "| row | perplexity | ppl / float ppl | bytes | bytes / fp32 | prefill ms | "
        "prefill / float | decode ms/token | decode / float | build s |",
        "|---" * 10 + "|",
    ]
    for r in rows:
        if r.label == FLOAT_AGAIN:
            continue
        if r.error:
            lines.append(f"| {r.label} | n/a: {r.error} |" + " |" * 8)
            continue
        p, d = r.prefill_ms.get(threads), r.decode_ms.get(threads)
        lines.append(
            f"| {r.label} | {_f(r.ppl, '.4f')} | {_f(_ratio(r.ppl, f.ppl), '.4f')} | "
            f"{'-' if r.bytes is None else f'{r.bytes:,}'} | "
            f"{_f(_ratio(r.bytes, f.bytes), '.3f')} | {_f(p, '.2f')} | "
            f"{_f(_ratio(p, f.prefill_ms.get(threads)), '.3f')} | {_f(d, '.3f')} | "
            f"{_f(_ratio(d, f.decode_ms.get(threads)), '.3f')} | {_f(r.build_s, '.2f')} |"
        )
    return "\n".join(lines)


def noise(rows: list[Row], threads: int) -> tuple[float, float]:
    """|1 - float again / float| for prefill and decode: the run's noise floor."""
    by = {r.label: r for r in rows}
    a, b = by[FLOAT], by[FLOAT_AGAIN]
    return (
        abs(1 - b.prefill_ms[threads] / a.prefill_ms[threads]),
        abs(1 - b.decode_ms[threads] / a.decode_ms[threads]),
    )


def targets(rows: list[Row], threads: int) -> list[str]:
    by = {r.label: r for r in rows if r.error is None}
    f = by[FLOAT]
    out: list[str] = []

    def gap_closed(label: str, rtn: str) -> str:
        if label not in by or rtn not in by:
            missing = label if label not in by else rtn
            return f"{label}: n/a ({missing} not available)"
        q, base = by[label].ppl, by[rtn].ppl
        assert q is not None and base is not None and f.ppl is not None
        gap = base - f.ppl
        if gap <= 0:
            return f"{label}: n/a ({rtn} ppl {base:.4f} is not above float's {f.ppl:.4f})"
        share, error = gap_share(f.nll, by[rtn].nll, by[label].nll)
        return (
            f"{label}: closes {share:.1%} ± {error:.1%} of {rtn}'s perplexity gap (in log "
            f"perplexity; ± one standard error over the held-out windows; float {f.ppl:.4f}, "
            f"RTN {base:.4f}, it {q:.4f})"
        )

    out += [gap_closed(label, RTN4) for label in (GPTQ4, AWQ4, GPTQ4Q, AWQ4Q)]
    out.append(gap_closed(ORT_GPTQ, ORT_RTN))
    for label in INT4_ROWS:
        ratio = _ratio(by[label].bytes, f.bytes) if label in by else None
        verdict = "n/a" if ratio is None else ("PASS" if ratio <= INT4_BYTES_TARGET else "MISS")
        out.append(
            f"{label}: bytes / fp32 {_f(ratio, '.3f')} (target <= {INT4_BYTES_TARGET}: {verdict})"
        )
    # perplexity is deterministic; a time counts as missed only beyond the noise floor
    floors = (0.0, *noise(rows, threads))
    for mine, peer in INT8_PEERS:
        if mine not in by or peer not in by:
            out.append(f"{mine} vs {peer}: n/a (not available)")
            continue
        a, b = by[mine], by[peer]
        ratios = (
            _ratio(a.ppl, b.ppl),
            _ratio(a.prefill_ms.get(threads), b.prefill_ms.get(threads)),
            _ratio(a.decode_ms.get(threads), b.decode_ms.get(threads)),
        )
        missed = [
            name
            for name, r, floor in zip(
                ("perplexity", "prefill", "decode"), ratios, floors, strict=True
            )
            if r is None or r > 1 + floor
        ]
        verdict = "PASS" if not missed else f"MISS on {', '.join(missed)}"
        out.append(
            f"{mine} / {peer}: perplexity {_f(ratios[0], '.4f')}, prefill "
            f"{_f(ratios[1], '.3f')}, decode {_f(ratios[2], '.3f')} (target <= 1 each, times "
            f"within the noise floor: {verdict})"
        )
    fd = f.decode_ms.get(threads)
    decoded = [
        (r.decode_ms[threads] / fd, r.label)
        for r in by.values()
        if fd and threads in r.decode_ms and r.label not in (FLOAT, FLOAT_AGAIN)
    ]
    decode_noise = floors[2]
    if decoded:
        best, label = min(decoded)
        out.append(
            f"best decode / float ({threads} thread(s)): {best:.3f} ({label}); noise floor "
            f"±{decode_noise:.3f}"
        )
        mine = [d for d in decoded if d[1].startswith("qswap")]
        if mine:
            best, label = min(mine)
            out.append(f"best qswap decode / float: {best:.3f} ({label})")
    return out


# --------------------------------------------------------------------------- main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"fewer eval windows and timing rounds; {QUICK_TRAIN_SECONDS:.0f} s training "
        "if no full checkpoint is cached",
    )
    parser.add_argument(
        "--train-seconds",
        type=float,
        help=f"training time budget (default {DEFAULT_TRAIN_SECONDS:.0f}, "
        f"--quick {QUICK_TRAIN_SECONDS:.0f})",
    )
    parser.add_argument("--train-steps", type=int, help="train exactly this many steps instead")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1], help="torch/ORT threads to time (default 1)"
    )
    parser.add_argument("--eval-windows", type=int, help="held-out windows (default 256, quick 64)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def train_settings(args: argparse.Namespace) -> list[lm_data.TrainSettings]:
    """The checkpoints to look for, in order; the last is trained when none is cached."""
    if args.train_steps:
        return [lm_data.TrainSettings(seconds=None, steps=args.train_steps)]
    if args.train_seconds:
        return [lm_data.TrainSettings(seconds=args.train_seconds, steps=None)]
    full = lm_data.TrainSettings(seconds=DEFAULT_TRAIN_SECONDS, steps=None)
    if not args.quick:
        return [full]
    return [full, lm_data.TrainSettings(seconds=QUICK_TRAIN_SECONDS, steps=None)]


def measure_quality(
    rows: list[tuple[Row, Any]], float_model: nn.Module, windows: torch.Tensor
) -> None:
    """Perplexity, bytes and layer coverage of every row that was built."""
    for row, built in rows:
        if built is None:
            continue
        try:
            with quiet():
                if row.kind == "ort":
                    session = ort_session(built, threads=torch.get_num_threads())
                    name = session.get_inputs()[0].name

                    def logits(ids: torch.Tensor, s: Any = session, n: str = name) -> torch.Tensor:
                        return torch.from_numpy(s.run(None, {n: ids.numpy()})[0])

                    row.nll = window_nll(logits, windows)
                    row.ppl = perplexity_of(row.nll)
                    row.bytes, row.quantized = onnx_bytes_and_ops(built)
                else:
                    row.nll = window_nll(torch_logits(built), windows)
                    row.ppl = perplexity_of(row.nll)
                    row.bytes = state_bytes(built)
                    row.quantized = coverage(float_model, built)
        except Exception as err:
            row.error = first_line(err)


def measure_latency(
    rows: list[tuple[Row, Any]],
    threads: int,
    ids: torch.Tensor,
    prompt: torch.Tensor,
    timing: Timing,
) -> None:
    """Prefill and decode latency of every working row at ``threads``, interleaved."""
    torch.set_num_threads(threads)
    prefill: dict[str, Callable[[], float]] = {}
    decode: dict[str, Callable[[], float]] = {}
    for row, built in rows:
        if built is None or row.error:
            continue
        try:
            with quiet():
                if row.kind == "ort":
                    prefill[row.label] = ort_runner(ort_session(built, threads), ids)
                    prefill[row.label]()
                else:
                    prefill[row.label] = prefill_runner(built, ids)
                    prefill[row.label]()
                    decode[row.label] = decode_runner(built, prompt)
                    decode[row.label]()
        except Exception as err:
            row.error = first_line(err)
            prefill.pop(row.label, None)
            decode.pop(row.label, None)
    by = {row.label: row for row, _ in rows}
    for runners in (prefill, decode):  # float first, float again last in each round
        if FLOAT_AGAIN in runners:
            runners[FLOAT_AGAIN] = runners.pop(FLOAT_AGAIN)
    with quiet():
        for label, ms in interleaved_ms(prefill, timing).items():
            by[label].prefill_ms[threads] = ms
        for label, ms in interleaved_ms(decode, timing).items():
            by[label].decode_ms[threads] = ms


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    timing = QUICK if args.quick else FULL
    windows_n = args.eval_windows or (64 if args.quick else 256)
    import transformers

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    torch.set_num_threads(max(args.threads))
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, qswap "
        f"{qswap.__version__}, Python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}, cpu "
        f"{torch.backends.cpu.get_cpu_capability()}; {'quick' if args.quick else 'full'} "
        f"timing {timing}",
        flush=True,
    )
    start = time.perf_counter()
    corpus = lm_data.load_corpus()
    print(corpus.describe(), flush=True)
    trained = lm_data.trained_model(corpus, train_settings(args))
    float_model = trained.model
    meta = trained.meta
    print(
        f"model: LlamaForCausalLM {lm_data.MODEL_CONFIG['hidden_size']} hidden, "
        f"{lm_data.MODEL_CONFIG['num_hidden_layers']} layers, "
        f"{sum(p.numel() for p in float_model.parameters()):,} parameters; "
        f"{'cached' if trained.cached else 'trained'} checkpoint {trained.path.name}: "
        f"{meta['steps']} steps ({meta['train_seconds']} s, {meta['tokens_seen']:,} bytes seen), "
        f"train loss {meta['train_loss_last100']:.4f} nats/byte (last 100 steps)",
        flush=True,
    )
    torch.manual_seed(0)
    windows = lm_data.eval_windows(corpus, windows_n)
    calib = list(
        lm_data.train_windows(
            corpus, CALIB_WINDOWS, torch.Generator().manual_seed(CALIB_SEED)
        ).split(CALIB_BATCH)
    )
    ids, prompt = windows[:1], windows[:1, :PROMPT_LEN]
    float_ppl = perplexity(torch_logits(float_model), windows)
    print(
        f"float: held-out perplexity {float_ppl:.4f} ({math.log(float_ppl):.4f} nats/byte) on "
        f"{windows_n} windows of {lm_data.SEQ_LEN} bytes; calibration: {CALIB_WINDOWS} training "
        f"windows in batches of {CALIB_BATCH}",
        flush=True,
    )

    rows: list[tuple[Row, Any]] = [
        (Row(FLOAT, "torch", build_s=0.0), float_model),
        (Row(FLOAT_AGAIN, "torch", build_s=0.0), float_model),
    ]
    row = Row("torch.ao quantize_dynamic int8", "torch")

    def dynamic() -> nn.Module:
        from torch.ao.quantization import quantize_dynamic

        out: nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            copy.deepcopy(float_model), {nn.Linear}, dtype=torch.qint8
        )
        return out

    rows.append((row, timed_build(row, dynamic)))
    rows += torchao_rows(float_model)
    tmp = Path(tempfile.mkdtemp(prefix="qswap-bench-llm-"))
    rows += ort_rows(float_model, ids, calib, tmp)
    built = qswap_rows(float_model, calib)
    rows += built
    memory = sequential_memory(float_model, calib)
    rows += qswap_ort_rows(built, ids, tmp)
    print(f"built {len(rows)} rows in {time.perf_counter() - start:.0f} s", flush=True)
    measure_quality(rows, float_model, windows)
    print(f"perplexity measured: {time.perf_counter() - start:.0f} s", flush=True)
    for threads in args.threads:
        measure_latency(rows, threads, ids, prompt, timing)
        print(f"timed at {threads} thread(s): {time.perf_counter() - start:.0f} s", flush=True)

    shown = [r for r, _ in rows if not r.label.startswith("torchao Int4WeightOnly") or not r.error]
    print("\nwhat each row quantized:")
    for r in shown:
        if r.label != FLOAT_AGAIN:
            what = r.quantized or "-"
            print(f"  {r.label}: {what}{f'; {r.note}' if r.note else ''}")
    for threads in args.threads:
        prefill_noise, decode_noise = noise(shown, threads)
        print(
            f"\n## {threads} thread(s): prefill batch 1 x {lm_data.SEQ_LEN} tokens, decode batch 1 "
            f"({PROMPT_LEN}-byte prompt, {NEW_TOKENS} greedy steps with the KV cache); noise floor "
            f"|1 - float again / float|: prefill ±{prefill_noise:.3f}, decode ±{decode_noise:.3f}"
        )
        print(table(shown, threads))
        print("\ntargets (printed, never asserted):")
        print("\n".join(f"  {line}" for line in targets(shown, threads)))
    whole, blockwise = memory["whole"], memory["sequential"]
    print(
        f"\nGPTQ statistics alive at once (most, when a layer is solved): whole-model "
        f"calibration {whole['peak_bytes'] / 1e6:.2f} MB ({whole['build_s']:.2f} s), "
        f"sequential=True {blockwise['peak_bytes'] / 1e6:.2f} MB ({blockwise['build_s']:.2f} s): "
        f"{blockwise['peak_bytes'] / max(whole['peak_bytes'], 1):.3f}x; same packed weights: "
        f"{memory['identical']}"
    )
    unavailable = [r for r in shown if r.error]
    if unavailable:
        print("\nnot available:")
        print("\n".join(f"  {r.label}: {r.error}" for r in unavailable))
    print(f"\n{time.perf_counter() - start:.0f} s")
    write_json(
        args.json,
        {
            "run": {
                "torch": torch.__version__,
                "qswap": qswap.__version__,
                "threads": args.threads,
                "quick": args.quick,
                "eval_windows": windows_n,
                "data": corpus.describe(),
                "checkpoint": trained.path.name,
                "train": meta,
            },
            "rows": {r.label: asdict(r) for r, _ in rows},
            "sequential": memory,
            "targets": {str(t): targets(shown, t) for t in args.threads},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
