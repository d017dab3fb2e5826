"""Every example runs as written, and every example config validates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
# Modules imported by the examples rather than run on their own.
LIBRARIES = {"forum_models.py"}


@pytest.mark.parametrize(
    "script", [p for p in SCRIPTS if p.name not in LIBRARIES], ids=lambda p: p.name
)
def test_example_script_runs(script: Path) -> None:
    """The example exits 0 and prints something, with warnings turned into errors."""
    env = dict(os.environ, PYTHONWARNINGS="error", QSWAP_EXAMPLE_QUICK="1")
    proc = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        cwd=EXAMPLES,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip()


@pytest.mark.parametrize(
    "config",
    sorted(p for p in EXAMPLES.rglob("*.yaml") if "pack" not in p.name),
    ids=lambda p: str(p.relative_to(EXAMPLES)),
)
def test_example_config_validates(config: Path) -> None:
    """The example config loads without error and names a backend."""
    from qswap.config import load_config

    cfg = load_config(config)
    assert cfg.backend
