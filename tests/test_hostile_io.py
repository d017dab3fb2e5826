"""Hostile files and paths (issue 12): tampered artifacts and model files, no numpy, atomic
writes, CLI edge cases and bad output paths each end in a clear qswap error or the right result."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from torch import nn

import qswap
from qswap.cli import main
from qswap.exceptions import CalibrationError, FileError, PlanError, QSwapError
from qswap.persist.artifact import write_atomic

T = TypeVar("T")

# x86 int8 with min-max observers: the preset's histograms are slow to calibrate
INT8 = {"extends": ["x86_int8"], "activation": {"observer": "minmax"}}
X = torch.rand(24, 3, 4, 4, generator=torch.Generator().manual_seed(0))
EXAMPLE = (X[:1],)
LIMIT = 120.0  # seconds any one step may take before the test calls it hung


def small(width: int = 8) -> nn.Module:
    """A conv, ReLU and linear classifier on 3x4x4 inputs, the same weights for the same width."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(width * 16, 4)
    ).eval()


def bounded(call: Callable[[], T], seconds: float = LIMIT) -> T:
    """Run ``call`` in a thread and fail the test if it has not returned within ``seconds``."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: it hangs"
    if "error" in result:
        raise result["error"]
    return result["value"]  # type: ignore[no-any-return]


def artifact(tmp_path: Path, config: object = "w8a8_minmax") -> Path:
    """A calibration artifact of the small model."""
    prepared = qswap.prepare(small(), config, example_inputs=EXAMPLE)  # type: ignore[arg-type]
    qswap.calibrate(prepared, [X[:16]], progress=False)
    return qswap.save_calibration(prepared, tmp_path / "small.qcal")


def model_file(tmp_path: Path) -> Path:
    """A saved x86 int8 model of the small model."""
    q = qswap.quantize(small(), INT8, calib_data=[X[:16]], example_inputs=EXAMPLE, progress=False)
    return qswap.save(q, tmp_path / "small.qswap")


def tamper(
    path: Path, edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], None], *, keep: bool
) -> None:
    """Edit the meta and tensors of a qswap file; without ``keep`` its checksum goes too (as in an
    older file, or a hand-made one), so what is checked is the fields themselves."""
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    edit(meta, payload["tensors"])
    payload["meta"] = json.dumps(meta)
    if not keep:
        payload.pop("checksum", None)
    torch.save(payload, path)


def layer(meta: dict[str, Any], name: str) -> dict[str, Any]:
    """The entry of one layer in a file's layer table."""
    return next(e for e in meta["layers"] if e["name"] == name)


def key(meta: dict[str, Any], name: str, slot: str) -> str:
    """The tensor key of one slot's qparams."""
    return str(layer(meta, name)["slots"][slot]["tensor"])


def refusal(load: Callable[[], object], path: Path, error: type[Exception]) -> str:
    """The message of the error ``load`` refuses with, checked to name the file and be no raw error."""
    with pytest.raises(error) as info:
        bounded(load)
    message = str(info.value)
    assert str(path) in message, message
    assert not isinstance(info.value, (IndexError, KeyError, AttributeError))
    return message


# --------------------------------------------------------------------------- 1. tampered files


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (float("nan"), ("layer '0' slot 'weight' has a non-finite scale (1 such value(s), e.g. "
                        "nan at index [2])")),
        (float("inf"), "layer '0' slot 'weight' has a non-finite scale (1 such value(s), e.g. inf"),
        (0.0, "layer '0' slot 'weight' has a zero or negative scale (1 such value(s), e.g. 0.0"),
        (-0.5, "layer '0' slot 'weight' has a zero or negative scale (1 such value(s), e.g. -0.5"),
    ],
    ids=["nan", "inf", "zero", "negative"],
)  # fmt: skip
def test_artifact_with_a_bad_scale_value_is_refused(
    tmp_path: Path, value: float, expected: str
) -> None:
    """A NaN, infinite, zero or negative scale is refused naming the file, layer, slot and value."""
    path = artifact(tmp_path)

    def edit(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{key(meta, '0', 'weight')}.scale"][2] = value

    tamper(path, edit, keep=False)
    message = refusal(lambda: qswap.load_calibration(path), path, CalibrationError)
    assert expected in message and "Write it again with qswap.save_calibration" in message
    prepared = qswap.prepare(small(), "w8a8_minmax", example_inputs=EXAMPLE)
    refusal(lambda: qswap.convert(prepared, calibration=path), path, CalibrationError)


def test_artifact_with_scales_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    """Scales of another shape are refused, both against the layer table and against the weight."""
    path = artifact(tmp_path)

    def shorter(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        k = key(meta, "0", "weight")
        tensors[f"{k}.scale"] = tensors[f"{k}.scale"][:3].clone()
        tensors[f"{k}.zero_point"] = tensors[f"{k}.zero_point"][:3].clone()

    tamper(path, shorter, keep=False)
    message = refusal(lambda: qswap.load_calibration(path), path, CalibrationError)
    assert "layer '0' slot 'weight' has a scale of shape [3] but the layer table records [8]" in (
        message
    )

    def table_too(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        info = layer(meta, "0")["slots"]["weight"]
        info["shape"] = [3]
        scale = tensors[f"{info['tensor']}.scale"]
        info["scale_min"], info["scale_max"] = float(scale.min()), float(scale.max())

    tamper(path, table_too, keep=False)  # a consistent file, but 3 scales for 8 channels
    prepared = qswap.prepare(small(), "w8a8_minmax", example_inputs=EXAMPLE)
    message = refusal(lambda: qswap.convert(prepared, calibration=path), path, PlanError)
    assert (
        "layer '0' slot 'weight': it has 3 scale(s) along axis 0, but the weight of shape "
        "[8, 3, 3, 3] has 8 channel(s) there" in message
    )


def test_artifact_with_zero_points_of_the_wrong_shape_or_range_is_refused(tmp_path: Path) -> None:
    """A zero point whose shape differs from its scale's, or outside the integer range, is refused."""
    path = artifact(tmp_path)

    def reshape(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{key(meta, '3', 'input')}.zero_point"] = torch.zeros(5, dtype=torch.int32)

    tamper(path, reshape, keep=False)
    message = refusal(lambda: qswap.load_calibration(path), path, CalibrationError)
    assert "layer '3' slot 'input' has a scale of shape [] but a zero point of shape [5]" in message

    path = artifact(tmp_path)

    def outside(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{key(meta, '3', 'input')}.zero_point"].fill_(1000)

    tamper(path, outside, keep=False)
    message = refusal(lambda: qswap.load_calibration(path), path, CalibrationError)
    assert "layer '3' slot 'input' has a zero point outside its integer range" in message


def test_artifact_whose_structure_hash_alone_was_changed_is_a_clear_error(tmp_path: Path) -> None:
    """A changed structure hash over an unchanged module list is a PlanError saying so, no IndexError."""
    path = artifact(tmp_path)

    def edit(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        meta["structure_hash"] = "0" * 64

    tamper(path, edit, keep=False)
    prepared = qswap.prepare(small(), "w8a8_minmax", example_inputs=EXAMPLE)
    message = refusal(lambda: qswap.convert(prepared, calibration=path), path, PlanError)
    assert "its structure hash does not match the module list recorded beside it" in message


def _drop(field: str) -> Callable[[dict[str, Any], dict[str, torch.Tensor]], None]:
    def edit(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        del layer(meta, "0")["slots"]["weight"][field]

    return edit


CORRUPTIONS: dict[str, tuple[Callable[[dict[str, Any], dict[str, torch.Tensor]], None], str]] = {
    "layer not a table": (
        lambda m, t: m["layers"].__setitem__(0, "conv"),
        "layer #0 is a str, not a table",
    ),
    "no layer name": (
        lambda m, t: m["layers"][0].pop("name"),
        "layer #0 has the name None, not a module path",
    ),
    "no slots": (lambda m, t: layer(m, "0").pop("slots"), "layer '0' slots is a NoneType"),
    "no range": (_drop("quant_min"), "layer '0' slot 'weight' has the integer range [None, 127]"),
    "text range": (
        lambda m, t: layer(m, "0")["slots"]["weight"].__setitem__("quant_max", "127"),
        "layer '0' slot 'weight' has the integer range [-128, '127']",
    ),
    "no tensor key": (_drop("tensor"), "layer '0' slot 'weight' names no tensors"),
    "missing tensor": (
        lambda m, t: t.pop(f"{key(m, '0', 'weight')}.scale"),
        "layer '0' slot 'weight' has no scale tensor",
    ),
    "float zero point": (
        lambda m, t: t.__setitem__(
            f"{key(m, '0', 'weight')}.zero_point", torch.zeros(8, dtype=torch.float32)
        ),
        "layer '0' slot 'weight' has a zero point of dtype torch.float32, not integer",
    ),
    "dropped weight": (
        lambda m, t: layer(m, "0").__setitem__("dropped", ["weight"]),
        "layer '0' lists ['weight'] as dropped slots",
    ),
    "bias shift missing": (
        lambda m, t: layer(m, "0").__setitem__("bias_shift", "9.bias_shift"),
        "layer '0' names the bias shift '9.bias_shift', which is not in the file",
    ),
    "duplicate layer": (
        lambda m, t: m["layers"].append(m["layers"][0]),
        "layer '0' appears twice in the layer table",
    ),
    "no layer table": (lambda m, t: m.pop("layers"), "its layer table ('layers') is missing"),
    "bad hash": (
        lambda m, t: m.__setitem__("structure_hash", 7),
        "its structure hash is 7, not a SHA-256 hex digest",
    ),
    "bad example dtype": (
        lambda m, t: m["example_inputs"]["args"][0].__setitem__("dtype", "float99"),
        "example input #0 has dtype 'float99', not a torch dtype",
    ),
    "bad observers": (
        lambda m, t: layer(m, "0").__setitem__("observers", []),
        "layer '0' observers is a list, not a table",
    ),
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_artifact_with_a_corrupt_field_names_the_field(tmp_path: Path, damage: str) -> None:
    """Each corrupt field is a CalibrationError naming the file and the field, never a raw error."""
    path = artifact(tmp_path)
    edit, expected = CORRUPTIONS[damage]
    tamper(path, edit, keep=False)
    message = refusal(lambda: qswap.load_calibration(path), path, CalibrationError)
    assert expected in message, message


def test_any_edit_or_damaged_byte_is_caught_by_the_checksum(tmp_path: Path) -> None:
    """A file changed after qswap wrote it -- an edit, or one flipped byte of a tensor -- is refused."""
    path = artifact(tmp_path)
    good = path.read_bytes()

    def nudge(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{key(meta, '3', 'output')}.scale"].mul_(1.01)  # plausible, and wrong

    tamper(path, nudge, keep=True)
    message = refusal(lambda: qswap.load_calibration(path), path, CalibrationError)
    assert "was changed after qswap wrote it" in message
    data = bytearray(good)
    record = next(i for i in zipfile.ZipFile(io.BytesIO(good)).infolist() if "/data/" in i.filename)
    start = record.header_offset
    name_len, extra_len = struct.unpack("<HH", data[start + 26 : start + 30])
    data[start + 30 + name_len + extra_len] ^= 0x01  # the lowest bit of the first tensor byte
    path.write_bytes(bytes(data))
    message = refusal(lambda: qswap.load_calibration(path), path, CalibrationError)
    assert "was changed after qswap wrote it" in message


def test_recorded_example_shape_too_large_is_refused_not_allocated(tmp_path: Path) -> None:
    """A recorded example shape of 10^12 elements is refused at once instead of filling the memory."""
    path = artifact(tmp_path)

    def edit(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        meta["example_inputs"]["args"][0]["shape"] = [1_000_000, 1_000_000]

    tamper(path, edit, keep=False)
    prepared = qswap.prepare(small(), "w8a8_minmax")  # no example inputs: the recorded ones count
    with pytest.raises(CalibrationError, match="too many to build zeros.*example_inputs="):
        bounded(lambda: qswap.convert(prepared, calibration=path), 30)


@pytest.mark.parametrize(
    ("entry", "edit", "expected"),
    [
        ("0.weight", lambda e, t: t[f"state.{e['scales']}"].__setitem__(1, float("nan")),
         "state entry '0.weight' has scales that are not all positive finite numbers"),
        ("0.weight", lambda e, t: e.__setitem__("axis", 7),
         "state entry '0.weight' has the axis 7, not one of the 4 axes"),
        ("0.weight", lambda e, t: e.__setitem__("dtype", "qint4"),
         "state entry '0.weight' has the quantized dtype 'qint4'"),
        ("0.weight", lambda e, t: t.__setitem__(f"state.{e['zero_points']}",
                                                torch.zeros(3, dtype=torch.int64)),
         "state entry '0.weight' has zero points of shape [3] (torch.int64), not 8 integers"),
        ("0.bias", lambda e, t: e.__setitem__("t", "s999"),
         "state entry '0.bias' names the tensor 's999', which is not in the file"),
        ("0.scale", lambda e, t: t[f"state.{e['t']}"].fill_(float("nan")),
         "state entry '0.scale' is a quantization scale that is not positive and finite"),
        ("3.input_scale", lambda e, t: t[f"state.{e['t']}"].fill_(-1.0),
         "state entry '3.input_scale' is a quantization scale that is not positive and finite"),
    ],
    ids=["nan-scales", "axis", "dtype", "zero-point-shape", "missing-tensor", "nan-output-scale",
         "negative-input-scale"],
)  # fmt: skip
def test_model_file_with_a_bad_state_entry_is_refused(
    tmp_path: Path, entry: str, edit: Callable[[dict[str, Any], Any], None], expected: str
) -> None:
    """A tampered entry of a saved int8 model's state is refused naming the file and the entry."""
    path = model_file(tmp_path)

    def change(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        edit(meta["state"][entry], tensors)

    tamper(path, change, keep=False)
    message = refusal(lambda: qswap.load(path, small()), path, CalibrationError)
    assert expected in message and "model file" in message and "qswap.save" in message


def test_model_file_with_a_bad_calibration_scale_is_refused(tmp_path: Path) -> None:
    """The calibration inside a model file is checked too, and the message calls it a model file."""
    path = model_file(tmp_path)

    def edit(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{key(meta, '3', 'output')}.scale"].fill_(float("nan"))

    tamper(path, edit, keep=False)
    message = refusal(lambda: qswap.load(path, small()), path, CalibrationError)
    assert message.startswith(f"model file {str(path)!r}: layer '3' slot 'output' has a non-finite")


def test_model_file_against_another_model_says_model_file(tmp_path: Path) -> None:
    """Loading a saved model onto a model of other structure says 'model file', not 'calibration artifact'."""
    path = model_file(tmp_path)
    other = nn.Sequential(*small(), nn.ReLU()).eval()
    message = refusal(lambda: qswap.load(path, other), path, PlanError)
    assert message.startswith(f"model file {str(path)!r} was saved from another model")
    assert "calibration artifact" not in message and "module '4' (torch.nn.ReLU)" in message
    assert "Pass a freshly built model of the class and with the arguments of the saved one" in (
        message
    )


# --------------------------------------------------------------------------- 2. no numpy

NO_NUMPY = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["numpy"] = None  # as after `pip install -e .` with torch's CPU wheel alone
    warnings.simplefilter("ignore")  # torch says once that it found no numpy
    import json, torch, qswap
    from torch import nn
    from qswap.cli import main

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.arange(64, dtype=torch.float32).reshape(16, 4) / 64
    prepared = qswap.prepare(model, "x86_int8", example_inputs=(x[:1],))
    qswap.calibrate(prepared, [x], progress=False)
    path = qswap.save_calibration(prepared, "c.qcal")
    fresh = qswap.prepare(model, "x86_int8", example_inputs=(x[:1],))
    reused = qswap.convert(fresh, calibration=path)
    assert torch.equal(reused(x), qswap.convert(prepared)(x))
    weight = model[0].weight.detach().contiguous()
    print(json.dumps({
        "digest": json.loads(torch.load(path, weights_only=True)["meta"])["layers"][0]
                  ["weight_digests"]["weight"],
        "values": weight.flatten().tolist(),
        "shape": list(weight.shape),
    }))
    with open("factory.py", "w") as fh:
        fh.write("import torch\\nfrom torch import nn\\n"
                 "def model():\\n    torch.manual_seed(0)\\n"
                 "    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\\n"
                 "def calib():\\n    return [torch.rand(16, 4)]\\n")
    sys.exit(main(["quantize", "--model", "factory:model", "--config", "x86_int8",
                   "--calib", "factory:calib", "--out", "out"]))
    """
)


def test_save_calibration_and_cli_quantize_work_without_numpy(tmp_path: Path) -> None:
    """Without numpy, save_calibration, convert(calibration=) and `qswap quantize --out` work, and the
    weight digests are the same bytes' SHA-256 as before (older artifacts still load)."""
    script = tmp_path / "no_numpy.py"
    script.write_text(NO_NUMPY, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.splitlines()[0])
    raw = struct.pack(f"<{len(found['values'])}f", *found["values"])
    assert found["digest"] == hashlib.sha256(b"torch.float32" + raw).hexdigest()[:16]
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"model.pt", "calibration.pt"}


def test_files_from_before_the_checksum_still_load(tmp_path: Path) -> None:
    """An artifact and a model file without a checksum, as earlier qswap wrote them, load as before."""
    cal, saved = artifact(tmp_path), model_file(tmp_path)
    for path in (cal, saved):
        tamper(path, lambda meta, tensors: None, keep=False)
        assert "checksum" not in torch.load(path, weights_only=True)
    prepared = qswap.prepare(small(), "w8a8_minmax", example_inputs=EXAMPLE)
    qswap.calibrate(prepared, [X[:16]], progress=False)
    reused = bounded(
        lambda: qswap.convert(
            qswap.prepare(small(), "w8a8_minmax", example_inputs=EXAMPLE), calibration=cal
        )
    )
    q = qswap.quantize(small(), INT8, calib_data=[X[:16]], example_inputs=EXAMPLE, progress=False)
    loaded = bounded(lambda: qswap.load(saved, small()))
    with torch.no_grad():
        assert torch.equal(reused(X[16:]), qswap.convert(prepared)(X[16:]))
        assert torch.equal(loaded(X[16:]), q(X[16:]))


# --------------------------------------------------------------------------- 3. atomic writes


@pytest.fixture()
def umask_027() -> Iterator[int]:
    """Run with umask 027 (group may read, others nothing), restored afterwards."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_written_files_and_folders_honour_the_umask(
    tmp_path: Path, umask_027: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Artifacts, model files, reports, schemas and `qswap quantize --out` get 0o666/0o777 less the umask."""
    expected_file, expected_dir = 0o666 & ~umask_027, 0o777 & ~umask_027
    files = [artifact(tmp_path), model_file(tmp_path)]
    rep = qswap.report(small(), qswap.quantize(small(), "w8a8_minmax", calib_data=[X[:16]],
                                               progress=False), [X[16:]])  # fmt: skip
    rep.to_csv(tmp_path / "r.csv")
    rep.to_json(tmp_path / "r.json")
    files += [tmp_path / "r.csv", tmp_path / "r.json"]
    assert main(["schema", "--write", "--dir", str(tmp_path / "schemas")]) == 0
    files += list((tmp_path / "schemas").iterdir())
    out = _quantize_folder(tmp_path, monkeypatch)
    files += list(out.iterdir())
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == expected_file, path
    assert stat.S_IMODE(out.stat().st_mode) == expected_dir
    assert not [p for p in tmp_path.rglob("*") if ".qswap-tmp-" in p.name or p.suffix == ".tmp"]


def test_failed_write_removes_its_temporary_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    """A write that fails midway leaves the existing file as it was and no temporary file behind."""
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    seen: list[str] = []

    def failing(fh: Any) -> None:
        fh.write(b"new, half")
        seen.extend(p.name for p in tmp_path.iterdir() if p != target)
        raise RuntimeError("the disk went away")

    with pytest.raises(RuntimeError, match="the disk went away"):
        write_atomic(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]
    assert len(seen) == 1 and seen[0].startswith(".data.bin.qswap-tmp-"), seen


def test_write_syncs_the_file_and_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes are fsync'ed before the rename, and the folder after it (on POSIX)."""
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_atomic(tmp_path / "x.bin", b"1234")
    assert (tmp_path / "x.bin").read_bytes() == b"1234"
    assert synced == (["file", "folder"] if os.name == "posix" else ["file"])


KILLED = textwrap.dedent(
    """
    import sys, time
    from qswap.persist.artifact import write_atomic

    def slow(fh):
        fh.write(b"partial")
        fh.flush()
        print("writing", flush=True)
        time.sleep(600)

    write_atomic(sys.argv[1], slow)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_a_killed_write_leaves_the_old_file_and_a_recognisable_temporary(tmp_path: Path) -> None:
    """kill -9 during a write keeps the old file whole; the one leftover is named .<name>.qswap-tmp-*."""
    target = tmp_path / "model.pt"
    target.write_bytes(b"old model")
    script = tmp_path / "killed.py"
    script.write_text(KILLED, encoding="utf-8")
    with subprocess.Popen(
        [sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            line = bounded(proc.stdout.readline, 60)
            assert line.strip() == "writing"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert target.read_bytes() == b"old model"
    left = [p.name for p in tmp_path.iterdir() if p.name not in {"model.pt", "killed.py"}]
    assert len(left) == 1 and left[0].startswith(".model.pt.qswap-tmp-"), left


# --------------------------------------------------------------------------- 4. command line

FACTORY = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)).eval()

    def calib():
        return [torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))]

    def one_tensor():
        return torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def exits():
        raise SystemExit(0)

    def exits_in_calib():
        sys.exit(0)

    class Quitter(nn.Module):
        def forward(self, x):
            sys.exit(0)

    def quitter():
        return Quitter()
    """
)


@pytest.fixture()
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module with model and data factories, importable as `hostile_factory` from the cwd."""
    (tmp_path / "hostile_factory.py").write_text(FACTORY, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "hostile_factory", raising=False)
    return "hostile_factory"


def quantize_args(factory: str, out: str, model: str = "model", calib: str = "calib") -> list[str]:
    """`qswap quantize` arguments for the factory module."""
    return [
        "quantize", "--model", f"{factory}:{model}", "--config", "w8a8_minmax",
        "--calib", f"{factory}:{calib}", "--out", out,
    ]  # fmt: skip


def _quantize_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An output folder written by `qswap quantize` (from the test's own factory module)."""
    (tmp_path / "umask_factory.py").write_text(FACTORY, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "umask_factory", raising=False)
    out = tmp_path / "qout"
    assert bounded(lambda: main(quantize_args("umask_factory", str(out)))) == 0
    return out


@pytest.mark.parametrize(
    ("model", "calib", "expected"),
    [
        ("exits", "calib", ("--model 'hostile_factory:exits': calling exits() called "
                            "sys.exit(0) instead of returning; exits() must return the model")),
        ("model", "exits_in_calib", ("--calib 'hostile_factory:exits_in_calib': calling "
                                     "exits_in_calib() called sys.exit(0) instead of returning")),
        ("quitter", "calib", ("qswap quantize failed: the code it ran (the model or the data of "
                              "--model/--calib/--data) called sys.exit(0); nothing was written")),
    ],
    ids=["model-factory", "calib-function", "model-forward"],
)  # fmt: skip
def test_user_code_calling_exit_is_an_error_not_success(
    factory: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: str,
    calib: str,
    expected: str,
) -> None:
    """sys.exit(0) in a factory, a calibration function or the model exits 2 naming it, writing nothing."""
    out = tmp_path / "out"
    assert bounded(lambda: main(quantize_args(factory, str(out), model, calib))) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("error:") == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".qswap-" in p.name]


def test_user_code_calling_exit_fails_the_process(factory: str, tmp_path: Path) -> None:
    """`python -m qswap quantize` with a factory that exits 0 ends with status 2, not 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "qswap", *quantize_args(factory, "out", "exits")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )
    assert proc.returncode == 2
    assert "called sys.exit(0)" in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        ({"thesis.tex": "years of work"}, "holds files `qswap quantize` did not write (thesis.tex)"),
        ({"report.csv": "a,b"}, "lacks config.yaml and model.pt, so `qswap quantize` did not write"),
    ],
    ids=["foreign-file", "not-a-qswap-folder"],
)  # fmt: skip
def test_force_replaces_only_a_folder_qswap_wrote(
    factory: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    contents: dict[str, str],
    expected: str,
) -> None:
    """--force refuses a folder with files qswap did not write, leaving them as they were."""
    out = tmp_path / "out"
    out.mkdir()
    for name, text in contents.items():
        (out / name).write_text(text)
    assert bounded(lambda: main([*quantize_args(factory, str(out)), "--force"])) == 2
    err = capsys.readouterr().err
    assert expected in err and "--force replaces only a folder qswap wrote" in err
    assert {p.name: p.read_text() for p in out.iterdir()} == contents


def test_force_with_a_file_added_to_a_qswap_folder_is_refused(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder qswap wrote, plus the user's notes, is not replaced: the notes would be lost."""
    out = tmp_path / "out"
    assert bounded(lambda: main(quantize_args(factory, str(out)))) == 0
    (out / "notes.txt").write_text("keep me")
    assert bounded(lambda: main([*quantize_args(factory, str(out)), "--force"])) == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model.pt").is_file()


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_out_of_the_current_folder_or_above_is_refused_cleanly(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str
) -> None:
    """--out . (or ..) --force is refused with a message and leaves no stray folder behind."""
    before = {p.name for p in tmp_path.iterdir()}
    parent_before = {p.name for p in tmp_path.parent.iterdir()}
    assert bounded(lambda: main([*quantize_args(factory, out), "--force"])) == 2
    err = capsys.readouterr().err
    assert f"--out {out!r} is the current folder or a folder above it" in err
    assert "give it a folder of its own" in err
    assert {p.name for p in tmp_path.iterdir()} == before
    assert {p.name for p in tmp_path.parent.iterdir()} == parent_before


def test_registry_list_with_a_bare_name_matches_it_whole_in_any_case(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`qswap registry list Conv2d` (or conv2d) lists the Conv2d mappings and fusions, and no Conv1d."""
    assert bounded(lambda: main(["registry", "list", "Conv2d"])) == 0
    out = capsys.readouterr().out.split()
    assert "mapping:x86:torch.nn.Conv2d" in out and "mapping:fake:torch.nn.Conv2d" in out
    assert "fusion:torch.nn.Conv2d+torch.nn.ReLU" in out
    assert all("Conv2d" in line for line in out)
    assert bounded(lambda: main(["registry", "list", "conv2d"])) == 0
    assert capsys.readouterr().out.split() == out
    assert bounded(lambda: main(["registry", "list", "minmax"])) == 0
    assert capsys.readouterr().out.split() == ["observer:minmax"]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("Conv", "no registry entry matches 'Conv'; did you mean 'Conv1d', 'Conv2d', 'Conv3d'?"),
        ("minmx", "no registry entry matches 'minmx'; did you mean 'minmax'"),
        ("*Nothing*", "no registry entry matches '*Nothing*'"),
    ],
)
def test_registry_list_without_a_match_exits_1_with_a_suggestion(
    capsys: pytest.CaptureFixture[str], pattern: str, expected: str
) -> None:
    """A name or glob that matches nothing exits 1 saying so, with close names and the glob hint."""
    assert bounded(lambda: main(["registry", "list", pattern])) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert expected in captured.err and "a glob such as" in captured.err


def test_a_tensor_given_to_calib_is_one_batch(
    factory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --calib function returning one tensor calibrates on it as one batch of 8, as --help says."""
    out = tmp_path / "out"
    assert bounded(lambda: main(quantize_args(factory, str(out), calib="one_tensor"))) == 0
    cal = qswap.load_calibration(out / "calibration.pt")
    assert cal.meta["example_inputs"]["args"][0]["shape"] == [8, 3, 4, 4]
    assert json.loads((out / "report.json").read_text())["batches"] == 1
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "one tensor is one batch" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------- 5. bad paths


def _report() -> qswap.Report:
    q = qswap.quantize(small(), "w8a8_minmax", calib_data=[X[:16]], progress=False)
    return qswap.report(small(), q, [X[16:]])


@pytest.mark.parametrize("write", ["to_csv", "to_json", "plot"])
def test_report_onto_a_folder_or_under_a_file_is_a_clear_error(tmp_path: Path, write: str) -> None:
    """Writing a report onto a folder, or under a file, names the user's path, not a temporary one."""
    if write == "plot":
        pytest.importorskip("matplotlib")
    rep = _report()
    folder = tmp_path / "existing"
    folder.mkdir()
    with pytest.raises(FileError) as info:
        bounded(lambda: getattr(rep, write)(folder))
    message = str(info.value)
    assert message.startswith(f"cannot write {str(folder)!r}: it is a folder; pass a file path")
    assert "qswap-tmp" not in message and ".tmp" not in message
    (tmp_path / "plain").write_text("x")
    with pytest.raises(FileError, match="'.*plain' is a file, not a folder"):
        bounded(lambda: getattr(rep, write)(tmp_path / "plain" / "r.out"))
    assert [p.name for p in folder.iterdir()] == []


def test_save_and_save_calibration_onto_a_folder_are_clear_errors(tmp_path: Path) -> None:
    """qswap.save and save_calibration onto a folder raise FileError (also an OSError) naming it."""
    q = qswap.quantize(small(), "w8a8_minmax", calib_data=[X[:16]], progress=False)
    with pytest.raises(FileError, match="it is a folder"):
        bounded(lambda: qswap.save(q, tmp_path))
    with pytest.raises(OSError, match="it is a folder"):
        bounded(lambda: qswap.save_calibration(q, tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_export_onnx_onto_a_folder_is_refused_before_exporting(tmp_path: Path) -> None:
    """export_onnx onto an existing folder is a FileError naming it, and writes nothing."""
    pytest.importorskip("onnx")
    q = qswap.quantize(small(), INT8, calib_data=[X[:16]], example_inputs=EXAMPLE, progress=False)
    with pytest.raises(FileError) as info:
        bounded(lambda: qswap.export_onnx(q, X[:2], tmp_path))
    assert str(info.value).startswith(f"cannot write {str(tmp_path)!r}: it is a folder")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing", "folder"])
def test_compare_layers_on_a_corrupt_onnx_file_is_a_clear_error(
    tmp_path: Path, damage: str
) -> None:
    """A truncated, random, empty, missing or folder ONNX path is a FileError naming it and the fix."""
    pytest.importorskip("onnxruntime")
    q = qswap.quantize(small(), INT8, calib_data=[X[:16]], example_inputs=EXAMPLE, progress=False)
    good = qswap.export_onnx(q, X[:2], tmp_path / "good.onnx")
    bad = tmp_path / "bad.onnx"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "garbage":
        bad.write_bytes(bytes(range(256)) * 4)
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "folder":
        bad.mkdir()
    with pytest.raises(FileError) as info:
        bounded(lambda: qswap.compare_layers(q, bad, X[:2]))
    message = str(info.value)
    assert message.startswith(f"ONNX file {str(bad)!r}")
    fix = {"missing": "qswap.export_onnx", "folder": "pass the .onnx file in it"}
    assert fix.get(damage, "Export it again with qswap.export_onnx") in message
    assert isinstance(info.value, QSwapError)


def test_every_refusal_in_this_file_is_a_qswap_error() -> None:
    """FileError sits in qswap's one hierarchy and is also an OSError, as callers catch writes."""
    assert issubclass(FileError, QSwapError) and issubclass(FileError, OSError)
    assert str(FileError("cannot write 'x': it is a folder")) == "cannot write 'x': it is a folder"
