"""qswap: quantize any PyTorch model from a declarative config and a scoped registry.

>>> import torch, qswap
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
>>> qmodel = qswap.quantize(model, "w8a8_minmax", calib_data=[torch.randn(8, 4)], progress=False)
>>> qmodel(torch.randn(2, 4)).shape
torch.Size([2, 4])

Importing qswap registers nothing and reads no file: the default registry is built on the
first call of :func:`default_registry`.
"""

from __future__ import annotations

from qswap.backends.ort import OrtModel
from qswap.calibrate import calibrate
from qswap.config import (
    ComponentRef,
    Match,
    QConfig,
    QuantSpec,
    QuantSpecPatch,
    Rule,
    dump_config,
    list_presets,
    load_config,
)
from qswap.convert import convert, quantize
from qswap.distributed import sync_observers
from qswap.exceptions import (
    CalibrationError,
    ConfigError,
    FallbackWarning,
    FileError,
    FrozenRegistryError,
    NotRegisteredError,
    PlanError,
    PluginError,
    QSwapError,
    RegistrationError,
    UnsupportedModuleError,
)
from qswap.export.onnx import LayerAgreement, compare_layers, export_onnx
from qswap.observers import Observer
from qswap.persist.artifact import Calibration, load_calibration, save_calibration
from qswap.persist.model_file import load, save
from qswap.plan import Decision, LayerSpec, Plan, plan
from qswap.prepare import prepare
from qswap.qat import freeze_bn_stats
from qswap.quantizers import QParams, Quantizer
from qswap.registry import (
    Backend,
    ComponentEntry,
    FusionPattern,
    MappingEntry,
    Registry,
    default_registry,
)
from qswap.report import LayerReport, Report, report
from qswap.trace import Trace, trace
from qswap.version import __version__ as __version__

__all__ = [
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
