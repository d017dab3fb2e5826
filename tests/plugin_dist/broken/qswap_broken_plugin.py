"""A qswap plugin that registers one backend, then fails: the registry must roll it back."""

from __future__ import annotations

from typing import Any

__all__ = ["register"]


def register(reg: Any) -> None:
    """Entry point `qswap.registry: broken`."""
    reg.register_backend("half_registered")
    raise RuntimeError("the plugin's own bug")
