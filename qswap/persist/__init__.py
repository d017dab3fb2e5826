"""Keeping results: calibration artifacts and quantized model files, written atomically.

``artifact``: per-layer qparams with the config and a model hash (``save_calibration``,
``load_calibration``); ``model_file``: a converted model that loads with
``torch.load(weights_only=True)`` (``save``, ``load``).
"""

from __future__ import annotations

__all__: list[str] = []
