"""Progress bars on stderr (tqdm), shown by default only when stderr is a terminal.

>>> with bar(range(3), total=3, desc="demo", unit="step", show=False) as b:
...     sum(b)
3
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

__all__ = ["bar", "stderr_is_tty"]


def stderr_is_tty() -> bool:
    """Whether stderr is a terminal (progress bars show there by default)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def bar(
    iterable: Iterable[Any] | None, *, total: int | None, desc: str, unit: str, show: bool
) -> tqdm[Any]:
    """A tqdm bar on stderr named ``desc`` (hidden unless ``show``); close it when done."""
    return tqdm(
        iterable,
        total=total,
        disable=not show,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
    )
