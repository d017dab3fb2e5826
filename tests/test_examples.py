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


def test_a_backend_of_ones_own_plans_lowers_and_runs() -> None:
    """examples/custom_backend.py: the int8pack backend is chosen from YAML and runs its kernel."""
    import torch
    from custom_backend import CONFIG, Int8PackLinear, registry
    from torch import nn

    import qswap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4), nn.Conv1d(1, 1, 1))
    reg = registry()
    cfg = qswap.load_config(CONFIG, registry=reg)
    p = qswap.plan(model, cfg, registry=reg)
    assert p["0"].backend == "int8pack" and p["3"].backend == "fake"  # no mapping: falls back
    with pytest.warns(
        qswap.FallbackWarning, match="1 of 3 layers cannot run on backend 'int8pack'"
    ):
        q = qswap.quantize(model, cfg, registry=reg)
    assert isinstance(q[0], Int8PackLinear) and q[0].qweight.dtype == torch.int8
    x = torch.randn(8, 1, 16)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    with pytest.raises(
        qswap.ConfigError, match="unknown backend 'int8pak'; did you mean 'int8pack'"
    ):
        qswap.load_config(CONFIG.replace("int8pack ", "int8pak "), registry=reg)
