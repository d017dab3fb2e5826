"""The README's snippets run as written, in order, on one model (those that need no cluster).

The Python blocks share one namespace, as a reader pasting them into one session would, and
the config block is saved as ``q.yaml`` where the README says to. Blocks that start a
``torch.distributed`` process group or train under DDP are left to
``examples/distributed_calibrate.py``, which the suite runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import qswap

README = Path(__file__).resolve().parents[1] / "README.md"
CLUSTER = ("dist.init_process_group", "DistributedDataParallel")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_every_python_block_runs_in_order_on_one_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """quantize, the pipeline, the config file, your own layers, keep-and-ship, transformers."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    configs = [b for b in _blocks("yaml") if "extends: [x86_int8]" in b]
    assert len(configs) == 1
    (tmp_path / "q.yaml").write_text(configs[0])
    blocks = [b for b in _blocks("python") if not any(c in b for c in CLUSTER)]
    assert len(blocks) == 7
    ns: dict[str, Any] = {}
    torch.manual_seed(0)
    for block in blocks:
        exec(block, ns)
    out = capsys.readouterr().out
    assert "qswap plan for ResNet" in out and "layer4.1.conv2 (torch.nn.Conv2d)" in out
    assert {p.name for p in tmp_path.iterdir()} >= {
        "resnet.qcal",
        "resnet_int8.qswap",
        "resnet-int8.onnx",
        "layers.csv",
        "resnet-ort.onnx",
        "resnet_ort.qswap",
        "mlp-int4.onnx",
    }
    assert ns["qlm"] is not None and "torch.Size([1, 12])" in out
    assert "kernel=int4pack" in out and "torch.Size([1, 36])" in out  # packed int4 generates
    assert ns["q8"].model.layers[0].mlp.up_proj.input_scale.numel() == 128  # SmoothQuant's
    assert (tmp_path / "mlp-int4.onnx").stat().st_size < 0.2 * 4 * (256 * 512 + 512 * 64)


def test_the_config_block_plans_the_readme_model() -> None:
    """The README's q.yaml matches the README's model under strict matching (rules hit)."""
    from forum_models import resnet18

    text = next(b for b in _blocks("yaml") if "extends: [x86_int8]" in b)
    p = qswap.plan(resnet18(width=0.25).eval(), qswap.load_config(text))
    assert p["conv1"].kind == "skip"
    assert p["fc"].layer is not None and p["fc"].layer.weight is not None
    assert p["fc"].layer.weight.granularity == "per_tensor"
