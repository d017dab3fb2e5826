"""qswap's version, kept where every module can read it without importing the package's facade.

>>> isinstance(__version__, str)
True
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
