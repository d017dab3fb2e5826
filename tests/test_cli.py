"""The command line: exit codes, one message per bad file, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qswap.cli import CONFIG_SCHEMA_NAME, PACK_SCHEMA_NAME, main

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m qswap`` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "qswap", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_validate_accepts_every_example_config() -> None:
    """Every shipped example config validates with exit status 0."""
    files = sorted(str(p) for p in (REPO / "examples").rglob("*.yaml") if "pack" not in p.name)
    assert files, "the repo ships example configs"
    proc = run_cli("validate", *files)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ok: ") == len(files)


def test_validate_reports_each_bad_file_once_with_location(tmp_path: Path) -> None:
    """Two bad files give two messages with file:line:col, exit 2, and no traceback."""
    bad1 = tmp_path / "bad1.yaml"
    bad1.write_text("version: 1\nbackend: fake\nweight:\n  bitz: 4\n", encoding="utf-8")
    bad2 = tmp_path / "bad2.yaml"
    bad2.write_text("version: 1\nmode: [static\n", encoding="utf-8")
    good = tmp_path / "good.yaml"
    good.write_text("version: 1\nbackend: fake\n", encoding="utf-8")
    proc = run_cli("validate", str(bad1), str(good), str(bad2))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 2
    assert f"{bad1}:4:3" in lines[0]
    assert "bits" in proc.stderr  # the did-you-mean for 'bitz'
    assert str(bad2) in lines[1]
    assert "ok: " + str(good) in proc.stdout


def test_validate_missing_file_is_a_clean_error(tmp_path: Path) -> None:
    """A path that does not exist is exit 2 with the path named, not a traceback."""
    missing = tmp_path / "nope.yaml"
    proc = run_cli("validate", str(missing))
    assert proc.returncode == 2
    assert str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_binary_garbage_is_a_clean_error(tmp_path: Path) -> None:
    """Undecodable bytes give exit 2 and a message naming the file."""
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(bytes(range(256)) * 4)
    proc = run_cli("validate", str(junk))
    assert proc.returncode == 2
    assert str(junk) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_schema_prints_valid_json_for_config_and_pack(capsys: pytest.CaptureFixture[str]) -> None:
    """`qswap schema` and `qswap schema --pack` print JSON Schemas naming their top fields."""
    assert main(["schema"]) == 0
    config_schema = json.loads(capsys.readouterr().out)
    assert "backend" in json.dumps(config_schema)
    assert main(["schema", "--pack"]) == 0
    pack_schema = json.loads(capsys.readouterr().out)
    assert "mappings" in json.dumps(pack_schema)


def test_schema_check_detects_stale_files(tmp_path: Path) -> None:
    """--check fails on a missing or edited schema file and passes after --write."""
    assert main(["schema", "--check", "--dir", str(tmp_path)]) == 2
    assert main(["schema", "--write", "--dir", str(tmp_path)]) == 0
    assert main(["schema", "--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / CONFIG_SCHEMA_NAME).write_text("{}\n", encoding="utf-8")
    assert main(["schema", "--check", "--dir", str(tmp_path)]) == 2
    assert (tmp_path / PACK_SCHEMA_NAME).is_file()


def test_presets_lists_the_builtin_presets(capsys: pytest.CaptureFixture[str]) -> None:
    """`qswap presets` names every built-in preset with its backend."""
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("x86_int8", "qnnpack_int8", "w8a8_minmax", "w4_per_group"):
        assert name in out
    assert "backend=x86" in out


def test_registry_list_filters_by_glob(capsys: pytest.CaptureFixture[str]) -> None:
    """`qswap registry list '*Conv2d*'` shows conv entries and no Linear."""
    assert main(["registry", "list", "*Conv2d*"]) == 0
    out = capsys.readouterr().out
    assert "Conv2d" in out
    assert "Linear" not in out.replace("LinearReLU", "")


def test_unknown_command_exits_2_with_usage() -> None:
    """An unknown sub-command gets argparse's usage message and exit status 2."""
    proc = run_cli("frobnicate")
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


def test_validate_turns_the_whole_bad_config_corpus_into_exit_2(tmp_path: Path) -> None:
    """Every bad config of the corpus gives one `error:` line with its file:line:col, no traceback."""
    bad = REPO / "tests" / "bad_configs"
    cases = json.loads((bad / "cases.json").read_text(encoding="utf-8"))["cases"]
    files: list[str] = []
    expected: list[str] = []
    for case in cases:
        if "generate_bytes" in case:
            path = tmp_path / case["file"]
            path.write_bytes(b"version: 1\n".ljust(case["generate_bytes"], b"#"))
        else:
            path = bad / case["file"]
        files.append(str(path))
        # an error inside an `extends` parent names that parent's file instead
        source = case.get("source") or path.name
        expected.append(f"{source}:{case['line']}:{case['col']}")
    proc = run_cli("validate", "--quiet", *files)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == len(files)
    for line, path, location in zip(errors, files, expected, strict=False):
        assert location in line, (path, line)
