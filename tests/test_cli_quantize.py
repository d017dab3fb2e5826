"""`qswap plan`, `qswap quantize` and `qswap report`: files written whole, exit 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import qswap
from qswap.cli import main
from qswap.persist.artifact import load_calibration
from qswap.persist.model_file import load

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
        ).eval()

    def calib():
        g = torch.Generator().manual_seed(0)
        return [torch.rand(8, 3, 8, 8, generator=g) for _ in range(2)]

    def test_data():
        g = torch.Generator().manual_seed(1)
        return [torch.rand(8, 3, 8, 8, generator=g)]

    def not_a_model():
        return [1, 2, 3]

    def broken():
        raise RuntimeError("the dataset is not downloaded")

    EMPTY = []

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 64)

        def forward(self, x):
            return x + torch.relu(self.linear(x))

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(3))
            self.head = nn.Linear(64, 8)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    def blocks():
        torch.manual_seed(0)
        return Blocks().eval()

    def vectors():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(16, 64, generator=g) for _ in range(3)]
    """
)


@pytest.fixture()
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module file with model and data factories, importable as `cli_factory` from the cwd."""
    (tmp_path / "cli_factory.py").write_text(FACTORY, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cli_factory", raising=False)
    return "cli_factory"


def test_plan_prints_one_row_per_module(factory: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`qswap plan` shows the fused conv, its folded BatchNorm and the Linear with exit 0."""
    assert (
        main(
            [
                "plan",
                "--model",
                f"{factory}:model",
                "--config",
                "w8a8_minmax",
                "--calib",
                f"{factory}:calib",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "qswap plan for Sequential" in out
    assert "fused into '0'" in out and "quantize" in out
    assert (
        main(["plan", "--model", f"{factory}:model", "--config", "w8a8_minmax", "--explain", "5"])
        == 0
    )
    assert "5 (torch.nn.Linear): quantize" in capsys.readouterr().out


def test_quantize_writes_artifact_model_report_and_onnx(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`qswap quantize --onnx` writes every file, checks the ONNX file layer by layer in ONNX
    Runtime, and the saved model reloads to identical outputs."""
    out = tmp_path / "out"
    args = [
        "quantize",
        "--model",
        f"{factory}:model",
        "--config",
        "x86_int8",
        "--calib",
        f"{factory}:calib",
    ]
    pytest.importorskip("onnx")
    assert main([*args, "--out", str(out), "--onnx", "--eval", f"{factory}:test_data"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {
        "calibration.pt",
        "model.pt",
        "config.yaml",
        "plan.txt",
        "report.txt",
        "report.json",
        "report.csv",
        "model.onnx",
        "onnx_check.txt",
    }
    checked = (out / "onnx_check.txt").read_text().splitlines()  # the conv and the linear
    assert [r.split()[0] for r in checked] == ["0", "5"]
    assert all("max 0 step" in r or "max 1 step" in r for r in checked), checked
    assert "ONNX Runtime check: 2/2 layers within one" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], (
        "no temporary folder left"
    )
    from cli_factory import model, test_data  # type: ignore[import-not-found]

    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "x86" and report["layers"][0]["name"] == "0"
    loaded = load(out / "model.pt", model())
    reference = qswap.quantize(
        model(), "x86_int8", calib_data=_calib(), example_inputs=_calib()[0], progress=False
    )
    x = test_data()[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
    assert qswap.load_config(out / "config.yaml") == qswap.load_config("x86_int8")


def _calib() -> list[torch.Tensor]:
    from cli_factory import calib  # type: ignore[import-not-found]

    return calib()  # type: ignore[no-any-return]


def test_failed_onnx_check_exits_1_and_names_the_cause(
    factory: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--onnx` whose layer check fails writes the files, exits 1 and names the likely cause."""
    pytest.importorskip("onnx")
    from qswap.export import onnx as qonnx

    def failing(*args: object, **kwargs: object) -> list[qonnx.LayerAgreement]:
        return [qonnx.LayerAgreement("0", "/0/Conv", 512, 300, 69, True, saturates=True)]

    monkeypatch.setattr(qonnx, "compare_layers", failing)
    out = tmp_path / "out"
    code = main(
        [
            "quantize",
            "--model",
            f"{factory}:model",
            "--config",
            "x86_int8",
            "--calib",
            f"{factory}:calib",
            "--out",
            str(out),
            "--onnx",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "likely cause: this CPU has no VNNI" in captured.out
    assert "the ONNX Runtime check failed on 1 layer(s), likely because of the CPU" in captured.err
    assert (out / "model.onnx").exists() and "max 69 step(s)" in (
        out / "onnx_check.txt"
    ).read_text()


def test_existing_out_is_refused_without_force_and_replaced_with_it(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing --out stays untouched (exit 2) unless --force, which replaces the folder qswap wrote whole."""
    out = tmp_path / "out"
    args = [
        "quantize",
        "--model",
        f"{factory}:model",
        "--config",
        "w8a8_minmax",
        "--calib",
        f"{factory}:calib",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    (out / "plan.txt").write_text("from the first run")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert (out / "plan.txt").read_text() == "from the first run"
    assert main([*args, "--force"]) == 0
    assert "qswap plan" in (out / "plan.txt").read_text() and (out / "model.pt").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".qswap-" in p.name] == []


def test_quantize_reuses_an_artifact_and_report_reads_the_folder(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--calibration reuses a saved artifact; `qswap report --quantized` prints and writes the table."""
    base = ["--model", f"{factory}:model", "--config", "w8a8_minmax"]
    assert (
        main(["quantize", *base, "--calib", f"{factory}:calib", "--out", str(tmp_path / "a")]) == 0
    )
    assert (
        main(
            [
                "quantize",
                *base,
                "--calib",
                f"{factory}:test_data",
                "--out",
                str(tmp_path / "b"),
                "--calibration",
                str(tmp_path / "a" / "calibration.pt"),
            ]
        )
        == 0
    )
    a = load_calibration(tmp_path / "a" / "calibration.pt")
    b = load_calibration(tmp_path / "b" / "calibration.pt")
    assert all(
        torch.equal(a.qparams[n][s].scale, b.qparams[n][s].scale)
        for n in a.qparams
        for s in a.qparams[n]
    )
    capsys.readouterr()
    assert (
        main(
            [
                "report",
                "--model",
                f"{factory}:model",
                "--quantized",
                str(tmp_path / "a"),
                "--data",
                f"{factory}:test_data",
                "--sensitivity",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "qswap report for Sequential" in out and "most damaging layers first" in out
    assert json.loads((tmp_path / "r.json").read_text())["layers"][0]["sensitivity_db"] is not None


@pytest.mark.parametrize(
    ("model_spec", "message"),
    [
        ("no_such_module_xyz:model", "importing 'no_such_module_xyz' failed"),
        ("cli_factory:modle", "did you mean 'model'"),
        ("cli_factory:not_a_model", "gave a list, not a torch.nn.Module"),
        (
            "cli_factory:broken",
            "calling broken() raised RuntimeError: the dataset is not downloaded",
        ),
        ("cli_factory", "expected MODULE:NAME"),
        ("missing/file.py:model", "no such file"),
    ],
)
def test_bad_factories_exit_2_with_one_message(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], model_spec: str, message: str
) -> None:
    """Each bad --model gives exit 2, one `error:` line naming the problem, and writes nothing."""
    out = tmp_path / "out"
    code = main(
        [
            "quantize",
            "--model",
            model_spec,
            "--config",
            "w8a8_minmax",
            "--calib",
            f"{factory}:calib",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("error:") == 1
    assert not out.exists()


def test_bad_data_and_bad_artifact_exit_2(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Empty calibration data and a corrupt --calibration file are clear errors, with nothing written."""
    base = [
        "quantize",
        "--model",
        f"{factory}:model",
        "--config",
        "w8a8_minmax",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*base, "--calib", f"{factory}:EMPTY"]) == 2
    assert "gave no batch" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip file")
    assert main([*base, "--calib", f"{factory}:calib", "--calibration", str(bad)]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_input_in_a_fresh_process_shows_no_traceback(factory: str, tmp_path: Path) -> None:
    """`python -m qswap quantize` with a factory that raises exits 2 without a Python traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qswap",
            "quantize",
            "--model",
            f"{factory}:broken",
            "--config",
            "w8a8_minmax",
            "--calib",
            f"{factory}:calib",
            "--out",
            str(tmp_path / "o"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "the dataset is not downloaded" in proc.stderr


def test_data_that_does_not_fit_the_model_is_one_error_line(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Calibration batches of the wrong shape give exit 2 and one line naming the model's complaint."""
    (tmp_path / "wrong_data.py").write_text("import torch\nBATCHES = [torch.rand(2, 5)]\n")
    code = main(
        [
            "quantize", "--model", f"{factory}:model", "--config", "w8a8_minmax",
            "--calib", "wrong_data.py:BATCHES", "--out", str(tmp_path / "o"),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: qswap quantize failed: RuntimeError")
    assert err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_quantize_with_a_weight_method_writes_the_model_without_a_calibration_file(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GPTQ rounds the weights themselves, which calibration.pt (qparams only) cannot hold:
    the folder has model.pt alone and says why, instead of failing after calibrating.
    --sequential calibrates block by block, as the Python API's sequential= does."""
    config = "{extends: [w4_packed], weight: {method: gptq, group_size: 32}}"
    out = tmp_path / "out"
    args = ["quantize", "--model", f"{factory}:blocks", "--config", config]
    args += ["--calib", f"{factory}:vectors", "--out", str(out), "--sequential", "quantized"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "no calibration.pt: weight method(s) GPTQ rounded the weights" in printed
    assert "model.pt" in {p.name for p in out.iterdir()}
    assert "calibration.pt" not in {p.name for p in out.iterdir()}
    from cli_factory import blocks, vectors  # type: ignore[import-not-found]

    expected = qswap.quantize(
        blocks(), qswap.load_config(config), calib_data=vectors(), sequential="quantized"
    )
    loaded = load(out / "model.pt", blocks())
    x = vectors()[0]
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected(x), atol=1e-6)
