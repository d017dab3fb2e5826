"""ONNX Runtime int8 (qswap's QDQ export) against ONNX Runtime float and PyTorch int8, same process.

Trains the forum VGG and ResNet-18 (width 0.25) on scikit-learn digits, quantizes each with
qswap (``x86_int8``: real int8 in PyTorch; and the same config on the ``fake`` backend),
exports the int8 model and the float model to ONNX, and prints:

* quality: SQNR against the float logits of PyTorch int8, ORT int8 and qswap's fake-quant
  model, and how closely ORT reproduces qswap (SQNR of ORT against qswap, share of logits
  within one output quantization step, largest difference in steps);
* speed: median ms per call of PyTorch float, PyTorch int8 (qswap ``x86``), ORT float and
  ORT int8 (at ``ORT_ENABLE_EXTENDED``, where QDQ becomes QLinearConv/QGemm/QLinearAdd),
  measured in interleaved rounds, and the ratios ORT int8 / ORT float and
  ORT int8 / PyTorch int8 (below 1: ORT int8 is faster);
* layer by layer (``compare_layers``: each layer fed ORT's integer input): the largest
  difference in steps over all layers and the share of layer outputs that differ at all;
* qswap against itself: its fake model run one image at a time against the whole test set
  in one batch (float rounding changes with the batch size), as a yardstick for the
  end-to-end numbers;
* which integer kernels ORT runs after fusing the QDQ graph.

    python bench/bench_onnx.py            # a few minutes on 2 cores
    python bench/bench_onnx.py --quick    # fewer epochs and repetitions
"""

from __future__ import annotations

import functools
import platform
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

from forum_models import load_digits_dataset, resnet18, train, vgg
from measure import median_ms, parse_options, write_json

import qswap
from qswap.export.onnx import compare_layers, export_onnx, onnx_session, ort_optimized_ops


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref``, in dB."""
    noise = (ref - out).pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).mean() / noise))


def main(argv: list[str] | None = None) -> int:
    options = parse_options(__doc__, argv)
    epochs, reps, warmup = options.epochs, options.reps, options.warmup

    import onnxruntime

    data = load_digits_dataset(seed=0)
    calib = list(data.x_train[:256].split(32))
    example = (data.x_test[:1],)
    fake_x86 = {"extends": ["x86_int8"], "backend": "fake"}
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, qswap "
        f"{qswap.__version__}, {platform.processor() or platform.machine()}; {epochs} epochs, "
        f"calibration on 256 training images, test set {len(data.y_test)} images"
    )
    results: dict[str, dict[str, object]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="qswap-bench-onnx-"))
    for label, build in (("VGG", vgg), ("ResNet-18", resnet18)):
        torch.manual_seed(0)
        torch.set_num_threads(2)
        model = build(width=0.25)
        train(model, data, epochs=epochs)
        model.eval()
        int8 = qswap.quantize(
            model, "x86_int8", calib_data=calib, example_inputs=example, progress=False
        )
        fake = qswap.quantize(
            model, fake_x86, calib_data=calib, example_inputs=example, progress=False
        )
        paths = {
            "float": export_onnx(model, example, tmp / f"{label}_float.onnx"),
            "int8": export_onnx(int8, example, tmp / f"{label}_int8.onnx"),
            "fake": export_onnx(fake, example, tmp / f"{label}_fake.onnx"),
        }
        row: dict[str, object] = {"ort_ops_int8": ort_optimized_ops(paths["int8"])}
        x = data.x_test
        with torch.no_grad():
            ref = model(x)
            out_int8 = int8(x)
            out_fake = fake(x)
        step_int8 = float(list(int8._qswap.layers.values())[-1].qparams["output"].scale)  # type: ignore[union-attr]
        step_fake = float(list(fake._qswap.layers.values())[-1].qparams["output"].scale)  # type: ignore[union-attr]
        for name, qout, step in (("int8", out_int8, step_int8), ("fake", out_fake, step_fake)):
            session = onnx_session(paths[name])
            got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
            steps = (got - qout).abs() / step
            row[f"sqnr_ort_{name}_vs_float"] = sqnr_db(ref, got)
            row[f"sqnr_ort_vs_qswap_{name}"] = sqnr_db(qout, got)
            row[f"within_one_step_{name}"] = float((steps <= 1.001).float().mean())
            row[f"max_steps_{name}"] = float(steps.max())
            layers = compare_layers(int8 if name == "int8" else fake, paths[name], x)
            row[f"layer_max_steps_{name}"] = max(r.max_steps for r in layers)
            row[f"layer_differing_{name}"] = sum(r.differing for r in layers) / sum(
                r.elements for r in layers
            )
            row[f"layers_ok_{name}"] = f"{sum(r.ok for r in layers)}/{len(layers)}"
        with torch.no_grad():
            one_by_one = torch.cat([fake(image[None]) for image in x])
        steps = (one_by_one - out_fake).abs() / step_fake
        row["within_one_step_fake_batch1"] = float((steps <= 1.001).float().mean())
        row["max_steps_fake_batch1"] = float(steps.max())
        row["sqnr_torch_int8_vs_float"] = sqnr_db(ref, out_int8)
        row["sqnr_fake_vs_float"] = sqnr_db(ref, out_fake)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            sessions = {k: onnx_session(paths[k], threads=threads) for k in ("float", "int8")}
            for batch in (1, 64):
                xb = data.x_test[:batch]
                feed = {"input": xb.numpy()}
                with torch.no_grad():
                    ms = median_ms(
                        {
                            "torch_float": functools.partial(model, xb),
                            "torch_int8": functools.partial(int8, xb),
                            "ort_float": functools.partial(sessions["float"].run, None, feed),
                            "ort_int8": functools.partial(sessions["int8"].run, None, feed),
                        },
                        reps[batch],
                        warmup,
                    )
                row[f"ms_t{threads}_b{batch}"] = ms
        results[label] = row
    report(results)
    write_json(options.json, results)
    return 0


def report(results: dict[str, dict[str, object]]) -> None:
    print("\nQuality on the test set (SQNR in dB against the float logits)")
    print(
        "| model | PyTorch int8 | ORT int8 | qswap fake | ORT fake | ORT vs qswap int8 "
        "| within 1 step (int8) | max steps (int8) | ORT vs qswap fake | within 1 step (fake) "
        "| max steps (fake) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(
            f"| {label} | {r['sqnr_torch_int8_vs_float']:.1f} | {r['sqnr_ort_int8_vs_float']:.1f} | "
            f"{r['sqnr_fake_vs_float']:.1f} | {r['sqnr_ort_fake_vs_float']:.1f} | "
            f"{r['sqnr_ort_vs_qswap_int8']:.1f} | {100 * r['within_one_step_int8']:.1f} % | "  # type: ignore[operator]
            f"{r['max_steps_int8']:.0f} | {r['sqnr_ort_vs_qswap_fake']:.1f} | "
            f"{100 * r['within_one_step_fake']:.1f} % | {r['max_steps_fake']:.0f} |"  # type: ignore[operator]
        )
    print("\nLayer by layer (each layer fed ORT's integer input), and qswap against itself")
    print(
        "| model | layers within 1 step (int8) | max steps (int8) | outputs differing (int8) "
        "| layers within 1 step (fake) | max steps (fake) | outputs differing (fake) "
        "| qswap fake batch 1 vs 360: within 1 step | max steps |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(
            f"| {label} | {r['layers_ok_int8']} | {r['layer_max_steps_int8']} | "
            f"{100 * r['layer_differing_int8']:.3f} % | {r['layers_ok_fake']} | "  # type: ignore[operator]
            f"{r['layer_max_steps_fake']} | {100 * r['layer_differing_fake']:.3f} % | "  # type: ignore[operator]
            f"{100 * r['within_one_step_fake_batch1']:.1f} % | {r['max_steps_fake_batch1']:.0f} |"  # type: ignore[operator]
        )
    print("\nLatency, median ms per call (ratios < 1: ORT int8 is faster)")
    print(
        "| model | threads | batch | torch float | torch int8 | ORT float | ORT int8 "
        "| ORT int8 / ORT float | ORT int8 / torch int8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        for threads in (1, 2):
            for batch in (1, 64):
                ms = r[f"ms_t{threads}_b{batch}"]
                assert isinstance(ms, dict)
                print(
                    f"| {label} | {threads} | {batch} | {ms['torch_float']:.2f} | "
                    f"{ms['torch_int8']:.2f} | {ms['ort_float']:.2f} | {ms['ort_int8']:.2f} | "
                    f"{ms['ort_int8'] / ms['ort_float']:.2f} | {ms['ort_int8'] / ms['torch_int8']:.2f} |"
                )
    print("\nKernels ONNX Runtime runs for the int8 export (ORT_ENABLE_EXTENDED)")
    for label, r in results.items():
        print(f"  {label}: {r['ort_ops_int8']}")


if __name__ == "__main__":
    raise SystemExit(main())
