"""qswap: quantize any PyTorch model from a declarative config and a scoped registry."""

from __future__ import annotations

from qswap.exceptions import (
    CalibrationError,
    ConfigError,
    FrozenRegistryError,
    NotRegisteredError,
    PlanError,
    PluginError,
    QSwapError,
    RegistrationError,
    UnsupportedModuleError,
)

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "ConfigError",
    "FrozenRegistryError",
    "NotRegisteredError",
    "PlanError",
    "PluginError",
    "QSwapError",
    "RegistrationError",
    "UnsupportedModuleError",
]
