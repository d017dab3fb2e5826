"""The public surface: the names in qswap.__all__ and the one-call flow of DESIGN.md."""

from __future__ import annotations

import subprocess
import sys

import torch

import qswap


def test_all_is_sorted_and_every_name_resolves() -> None:
    """qswap.__all__ is sorted, has no duplicates, and each name is an attribute of qswap."""
    assert qswap.__all__ == sorted(set(qswap.__all__))
    for name in qswap.__all__:
        assert getattr(qswap, name) is not None, name


def test_all_is_pinned() -> None:
    """Adding, removing or renaming a public name is a deliberate act: this list changes with it."""
    assert qswap.__all__ == [
        "Backend",
        "Calibration",
        "CalibrationError",
        "ComponentEntry",
        "ComponentRef",
        "ConfigError",
        "Decision",
        "FallbackWarning",
        "FileError",
        "FrozenRegistryError",
        "FusionPattern",
        "LayerAgreement",
        "LayerReport",
        "LayerSpec",
        "MappingEntry",
        "Match",
        "NotRegisteredError",
        "Observer",
        "OrtModel",
        "Plan",
        "PlanError",
        "PluginError",
        "QConfig",
        "QParams",
        "QSwapError",
        "QuantSpec",
        "QuantSpecPatch",
        "Quantizer",
        "RegistrationError",
        "Registry",
        "Report",
        "Rule",
        "Trace",
        "UnsupportedModuleError",
        "calibrate",
        "compare_layers",
        "convert",
        "default_registry",
        "dump_config",
        "export_onnx",
        "freeze_bn_stats",
        "list_presets",
        "load",
        "load_calibration",
        "load_config",
        "plan",
        "prepare",
        "quantize",
        "report",
        "save",
        "save_calibration",
        "sync_observers",
        "trace",
    ]


def test_import_has_no_side_effects() -> None:
    """Importing qswap builds no registry and does not import the deprecated int8 backend."""
    code = (
        "import sys, qswap, qswap.registry as r\n"
        "assert r._DEFAULT is None, 'default registry built at import'\n"
        "assert 'qswap.backends.torch_int8' not in sys.modules, 'int8 backend imported'\n"
        "print('clean')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"


def test_design_flow_runs_step_by_step() -> None:
    """plan -> prepare -> calibrate -> convert gives the same model as one quantize() call."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    batches = [torch.randn(16, 8) for _ in range(4)]
    x = torch.randn(5, 8)
    the_plan = qswap.plan(model, "w8a8_minmax", example_inputs=(x,))
    assert len(the_plan.layers) == 2
    prepared = qswap.prepare(model, "w8a8_minmax", example_inputs=(x,))
    qswap.calibrate(prepared, batches, progress=False)
    stepwise = qswap.convert(prepared)
    one_call = qswap.quantize(
        model, "w8a8_minmax", calib_data=batches, example_inputs=(x,), progress=False
    )
    with torch.no_grad():
        assert torch.equal(stepwise(x), one_call(x))
        assert not torch.equal(stepwise(x), model(x))
