"""What the benchmark scripts share: their command line, interleaved timing and JSON output."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Options", "median_ms", "parse_options", "write_json"]


@dataclass(frozen=True)
class Options:
    """A run's settings; ``--quick`` trains fewer epochs and times fewer calls."""

    quick: bool
    json: Path | None  # where to write the results too, if anywhere
    epochs: int
    reps: dict[int, int]  # timed calls per batch size
    warmup: int  # untimed calls before them


def parse_options(doc: str, argv: Sequence[str] | None = None) -> Options:
    """``--quick`` and ``--json PATH`` from ``argv``; the first paragraph of ``doc`` is the help."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repetitions")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    return Options(
        quick=args.quick,
        json=args.json,
        epochs=2 if args.quick else 3,
        reps={1: 30 if args.quick else 200, 64: 8 if args.quick else 40},
        warmup=3 if args.quick else 10,
    )


def median_ms(runners: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median ms per call of each runner, in interleaved rounds (drift hits all alike)."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def write_json(path: Path | None, results: dict[str, dict[str, object]]) -> None:
    """Write ``results`` as JSON to ``path`` (its folder made if needed); nothing when ``None``."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str))
