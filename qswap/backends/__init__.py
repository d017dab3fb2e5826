"""Backends that ``qswap.convert`` lowers a calibrated model to: ``fake`` always, integer ones by pack.

Importing this package registers nothing; the default registry imports backend modules lazily.
"""

from __future__ import annotations

__all__: list[str] = []
