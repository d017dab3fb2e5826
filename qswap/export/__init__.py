"""Exporting quantized models to other runtimes: QDQ ONNX for ONNX Runtime (``export.onnx``)."""

from __future__ import annotations

__all__: list[str] = []
