"""qswap's ``ort_int8`` against ONNX Runtime's own ``quantize_static``, same process, same weights.

For the forum VGG and ResNet-18 (trained on scikit-learn digits, as in ``bench_int8.py``) and
two zoo models (torchvision's ResNet-18 layout and a BERT-style encoder, random-init, built
in code: ``tests/zoo_models.py``), it builds from the same float model and the same
calibration batches:

* ORT float: the float model exported with ``qswap.export_onnx``;
* ORT ``quantize_static`` with each of its calibrators (MinMax, Entropy, Percentile): QDQ,
  per-channel int8 weights, uint8 activations, ``reduce_range`` where this CPU's ONNX Runtime
  saturates (no VNNI), after ``quant_pre_process`` (shape inference and graph optimization);
* qswap ``ort_int8`` (backend ``onnxruntime``), and the same with histogram activation
  observers (``ort_int8+hist``).

It prints SQNR of each int8 model's output against the float model's, accuracy where labels
exist, and median latency at batch 1 and 64 with 1 and 2 threads (interleaved rounds), as
ratios qswap / best ORT calibrator. The noise floor is the same ORT float session timed
twice in the same rounds: ``|1 - a/b|`` of its two medians.

    python bench/bench_ort.py            # about 5 minutes on 2 cores
    python bench/bench_ort.py --quick    # fewer epochs and repetitions
"""

from __future__ import annotations

import functools
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples"), str(HERE.parent / "tests")]

from forum_models import load_digits_dataset, resnet18, train, vgg
from measure import median_ms, parse_options, write_json

import qswap
from qswap.cpu import capability
from qswap.export.onnx import export_onnx, onnx_session, onnxruntime_saturates, ort_optimized_ops

CALIBRATORS = ("MinMax", "Entropy", "Percentile")


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).double().pow(2).mean()
    return (
        float("inf") if noise == 0 else float(10 * torch.log10(ref.double().pow(2).mean() / noise))
    )


def _feed(example: Any, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(example, dict):
        values = list(example.values())
    elif isinstance(example, (tuple, list)):
        values = list(example)
    else:
        values = [example]
    return {n: v.numpy() for n, v in zip(names, values, strict=True) if n}


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def _call(model: Any, example: Any) -> Any:
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(example)


def ort_static(float_path: Path, calib: list[Any], out: Path, method: str) -> Path:
    """ONNX Runtime's own static quantization of ``float_path`` (QDQ, per-channel)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i.name for i in onnx_session(float_path).get_inputs()]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = iter([_feed(b, names) for b in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    source = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(float_path), str(source))
    except Exception:  # shape inference fails on some graphs: quantize the export as it is
        source = float_path
    quantize_static(
        str(source),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=onnxruntime_saturates(),
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
    )
    return out


def _models(epochs: int) -> list[tuple[str, torch.nn.Module, list[Any], Any, torch.Tensor | None]]:
    """(name, float model, calibration batches, evaluation input, labels or None)."""
    import zoo_models

    data = load_digits_dataset(seed=0)
    calib = list(data.x_train[:256].split(32))
    out: list[tuple[str, torch.nn.Module, list[Any], Any, torch.Tensor | None]] = []
    for label, build in (("forum VGG", vgg), ("forum ResNet-18", resnet18)):
        torch.manual_seed(0)
        model = build(width=0.25)
        train(model, data, epochs=epochs)
        out.append((label, model.eval(), calib, data.x_test, data.y_test))
    for name in ("tv_resnet18", "hf_bert"):
        zm = zoo_models.build(name)
        out.append((name, zm.model.eval(), list(zm.calib), zm.example, None))
    return out


def main(argv: list[str] | None = None) -> int:
    options = parse_options(__doc__, argv)
    import onnxruntime

    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, qswap "
        f"{qswap.__version__}, {platform.processor() or platform.machine()}, torch CPU "
        f"capability {capability()}, ONNX Runtime u8s8 saturates here: {onnxruntime_saturates()}"
    )
    results: dict[str, dict[str, Any]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="qswap-bench-ort-"))
    for label, model, calib, evaluation, labels in _models(options.epochs):
        torch.set_num_threads(2)
        stem = tmp / label.replace(" ", "_")
        example = calib[0]
        float_path = export_onnx(model, example, stem.with_suffix(".float.onnx"))
        names = [i.name for i in onnx_session(float_path).get_inputs()]
        paths: dict[str, Path] = {"ort float": float_path}
        for method in CALIBRATORS:
            paths[f"ORT {method}"] = ort_static(
                float_path, calib, tmp / f"{stem.name}.{method}.onnx", method
            )
        for key, cfg in (
            ("qswap ort_int8", "ort_int8"),
            (
                "qswap ort_int8+hist",
                {"extends": ["ort_int8"], "activation": {"observer": "histogram"}},
            ),
        ):
            q = qswap.quantize(model, cfg, calib_data=calib, progress=False)
            paths[key] = q.save_onnx(tmp / f"{stem.name}.{key.split()[-1]}.onnx")
        with torch.no_grad():
            ref = _logits(_call(model, evaluation))
        row: dict[str, Any] = {"sqnr": {}, "acc": {}, "ms": {}}
        feed = _feed(evaluation, names)
        for key, path in paths.items():
            got = torch.from_numpy(onnx_session(path).run(None, feed)[0])
            row["sqnr"][key] = sqnr_db(ref, got)
            if labels is not None:
                row["acc"][key] = float((got.argmax(1) == labels).float().mean())
        row["ops qswap"] = ort_optimized_ops(paths["qswap ort_int8"])
        row["ops ORT"] = ort_optimized_ops(paths["ORT MinMax"])
        best = max(CALIBRATORS, key=lambda m: row["sqnr"][f"ORT {m}"])
        row["best ORT"] = best
        timed = {"ort float": paths["ort float"], "ort float (again)": paths["ort float"]}
        timed[f"ORT {best}"] = paths[f"ORT {best}"]
        timed["qswap ort_int8"] = paths["qswap ort_int8"]
        for threads in (1, 2):
            sessions = {k: onnx_session(p, threads=threads) for k, p in timed.items()}
            for batch in (1, 64):
                fb = {k: _slice(v, batch) for k, v in feed.items()}
                runners: dict[str, Callable[[], object]] = {
                    k: functools.partial(s.run, None, fb) for k, s in sessions.items()
                }
                row["ms"][f"t{threads} b{batch}"] = median_ms(
                    runners, options.reps[batch], options.warmup
                )
        results[label] = row
        _print_row(label, row)
    write_json(options.json, results)
    return 0


def _slice(a: np.ndarray, batch: int) -> np.ndarray:
    if a.shape[0] >= batch:
        return a[:batch]
    reps = -(-batch // a.shape[0])
    return np.concatenate([a] * reps)[:batch]


def _print_row(label: str, row: dict[str, Any]) -> None:
    best = f"ORT {row['best ORT']}"
    print(f"\n## {label}")
    print("| model | SQNR dB | accuracy |")
    print("|---|---|---|")
    for key, value in row["sqnr"].items():
        acc = row["acc"].get(key)
        print(f"| {key} | {value:.2f} | {'' if acc is None else f'{acc:.4f}'} |")
    gain = row["sqnr"]["qswap ort_int8"] - row["sqnr"][best]
    print(f"qswap ort_int8 - best ORT calibrator ({row['best ORT']}): {gain:+.2f} dB")
    print(
        "| threads, batch | ORT float ms | best ORT int8 ms | qswap ms | qswap / ORT int8 | noise floor |"
    )
    print("|---|---|---|---|---|---|")
    for cell, ms in row["ms"].items():
        noise = abs(1 - ms["ort float"] / ms["ort float (again)"])
        ratio = ms["qswap ort_int8"] / ms[best]
        print(
            f"| {cell} | {ms['ort float']:.3f} | {ms[best]:.3f} | {ms['qswap ort_int8']:.3f} | "
            f"{ratio:.2f} | ±{noise:.2f} |"
        )
    print(f"ONNX Runtime's kernels, qswap: {row['ops qswap']}")
    print(f"ONNX Runtime's kernels, ORT MinMax: {row['ops ORT']}")


if __name__ == "__main__":
    sys.exit(main())
