"""A qswap plugin: registers a layer mapping and a quantizer into the registry it is given."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DemoLayer", "QuantizedDemoLayer", "register"]


class DemoLayer(torch.nn.Module):
    """A layer only this plugin knows."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class QuantizedDemoLayer(torch.nn.Module):
    """Its counterpart."""

    @classmethod
    def from_float(cls, module: torch.nn.Module, spec: Any) -> QuantizedDemoLayer:
        return cls()


def register(reg: Any) -> None:
    """Entry point `qswap.registry: demo`."""
    reg.register_mapping(DemoLayer, QuantizedDemoLayer, backend="fake")
    reg.register_backend("demo_backend")
