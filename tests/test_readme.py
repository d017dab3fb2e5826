"""The README's Python examples run as written (the ones that need no cluster or stub)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from forum_models import resnet18, vgg

import qswap

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def _find(fragment: str) -> str:
    found = [b for b in _blocks() if fragment in b]
    assert len(found) == 1, f"expected one README block with {fragment!r}"
    return found[0]


def _namespace(model: torch.nn.Module) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    batches = [x, torch.rand(4, 3, 32, 32)]
    return {"model": model.eval(), "x": x, "batches": batches, "vgg": vgg, "qswap": qswap}


def test_step_by_step_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """plan / explain / prepare / calibrate / convert, on the ResNet the block names a layer of."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.yaml").write_text("extends: [x86_int8]\nactivation: {observer: minmax}\n")
    ns = _namespace(resnet18(width=0.25))
    exec(_find("qswap.plan(model, cfg"), ns)  # noqa: S102 - the README's own code
    assert ns["qmodel"](ns["x"]).shape == (4, 10)


def test_keep_it_and_ship_it_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Artifact, report, save/load, ONNX export and the layer-by-layer check, on VGG."""
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    ns = _namespace(vgg(width=0.25))
    cfg = {"extends": ["x86_int8"], "activation": {"observer": "minmax"}}
    ns["prepared"] = qswap.calibrate(
        qswap.prepare(ns["model"], cfg, example_inputs=(ns["x"],)), ns["batches"], progress=False
    )
    exec(_find("qswap.save_calibration(prepared"), ns)  # noqa: S102 - the README's own code
    assert {p.name for p in tmp_path.iterdir()} >= {"vgg.qcal", "vgg_int8.qswap", "vgg-int8.onnx"}


def test_transformers_block_runs() -> None:
    """The dynamic int8 GPT-2 example quantizes without data and generates four tokens."""
    pytest.importorskip("transformers")
    ns: dict[str, Any] = {"qswap": qswap, "torch": torch}
    exec(_find('qswap.quantize(lm, "x86_dynamic_int8")'), ns)  # noqa: S102 - the README's own code
    assert ns["qlm"].generate(ns["ids"], max_new_tokens=4, do_sample=False).shape == (1, 12)
