"""Why qswap copies the user's model with ``qswap.state.copy_model`` and not ``copy.deepcopy``.

qswap never changes the user's model, so ``prepare`` starts from a copy. ``copy_model``
gives what ``copy.deepcopy`` gives (same tensors, same sharing, same attributes; the test
suite checks this) and copies plain modules structurally. This bench times both, in
rounds (each round runs both), on deep models of many small modules and on one of few
large tensors, and prints the ratio with the run's own noise floor (the spread of each
side's runs, relative to its fastest).

    python bench/bench_copy.py
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

from torch import nn

from qswap.state import copy_model


def _models() -> list[tuple[str, nn.Module]]:
    return [
        (
            "Linear+ReLU, 4000 modules",
            nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(2000)]),
        ),
        (
            "Conv+BN+ReLU, 3999 modules",
            nn.Sequential(
                *[
                    nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
                    for _ in range(1333)
                ]
            ),
        ),
        (
            "4 x Linear(4096, 4096), 256 MB",
            nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(4)]),
        ),
    ]


def _rounds(flows: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in flows}
    for _ in range(repeat):
        for k, f in flows.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return times


def main(repeat: int = 7) -> None:
    print("| model | copy.deepcopy ms | copy_model ms | copy_model/deepcopy | noise floor |")
    print("|---|---|---|---|---|")
    for name, model in _models():
        t = _rounds(
            {"deepcopy": lambda m=model: copy.deepcopy(m), "qswap": lambda m=model: copy_model(m)},
            repeat,
        )
        deep, ours = min(t["deepcopy"]), min(t["qswap"])
        noise = max(sorted(v)[len(v) // 2] / min(v) - 1 for v in t.values())
        print(
            f"| {name} | {deep * 1e3:.1f} | {ours * 1e3:.1f} | {ours / deep:.2f} | ±{noise * 100:.0f}% (median/min) |"
        )


if __name__ == "__main__":
    main()
