"""Distributed calibration: throughput on 1, 2 and 4 processes, and what the reduction costs.

The forum ResNet-18 (width 0.25, ``examples/forum_models.py``) is prepared for x86 int8
with min-max observers and, separately, with histogram activation observers (2048 bins,
whose reduction moves the most data). The same 512 images (16 batches of 32) are
calibrated by 1, 2 and 4 processes (gloo on CPU, ``torch.multiprocessing``), each rank
taking every world-th batch; ``qswap.calibrate`` reduces the observers at the end.

Per run it reports the calibration wall time (slowest rank, from a common barrier to the
end of ``calibrate``, reduction included; median of 5 fresh calibrations), the throughput in images/s, the time of one
reduction alone (``sync_observers`` on the calibrated model, ranks aligned by a barrier,
median of repeats) and, for scale, one forward pass of a 32-image batch through the
prepared model. Each process uses one torch thread (``--threads``), so the processes do
the same work each and, past the core count, share cores: on a 2-core machine expect no
speed-up past 2 processes.

    python bench/bench_distributed.py [--quick] [--json bench/results/distributed.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import qswap
from qswap.distributed import sync_observers

CONFIGS: dict[str, Any] = {
    "minmax": {"version": 1, "extends": ["x86_int8"], "activation": {"observer": "minmax"}},
    "histogram": {  # the x86 preset's own observers
        "version": 1,
        "extends": ["x86_int8"],
        "activation": {"observer": {"name": "histogram", "bins": 2048}},
    },
}
BATCH = 32
IMAGES = 512


def make_model() -> torch.nn.Module:
    from forum_models import resnet18

    torch.manual_seed(0)
    return resnet18(width=0.25).eval()


def make_batches(images: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return list(torch.rand(images, 3, 32, 32, generator=g).split(BATCH))


def rank_main(
    rank: int, world: int, store: str, out: str, config_name: str, args: dict[str, Any]
) -> None:
    """One rank: calibrate its shard, time it, time the reduction alone and one forward pass."""
    threads = args["threads"] or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=5),
        )
    batches = make_batches(args["images"])
    shard = batches[rank::world]
    model = make_model()
    config = CONFIGS[config_name]
    warm = qswap.prepare(model, config, example_inputs=(batches[0][:1],))
    with torch.no_grad():
        warm(batches[0])  # first-call costs (allocator, kernels) out of the timing
    calibrate_s = []
    for _ in range(args["calibrations"]):
        prepared = qswap.prepare(model, config, example_inputs=(batches[0][:1],))
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        qswap.calibrate(prepared, shard, progress=False)
        calibrate_s.append(time.perf_counter() - start)

    reduce_s: list[float] = []
    for _ in range(args["repeats"]):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        count = sync_observers(prepared)
        reduce_s.append(time.perf_counter() - start)
    forward_s = []
    with torch.no_grad():
        for _ in range(args["repeats"]):
            start = time.perf_counter()
            warm(batches[0])
            forward_s.append(time.perf_counter() - start)
    result = {
        "rank": rank,
        "threads": threads,
        "batches": len(shard),
        "calibrate_s": statistics.median(calibrate_s),
        "reduce_s": statistics.median(reduce_s),
        "forward_s": statistics.median(forward_s),
        "observers": count,
    }
    (Path(out) / f"{config_name}-{world}-{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, config_name: str, args: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    store = out / f"store-{config_name}-{world}"
    context = mp.start_processes(
        rank_main,
        args=(world, str(store), str(out), config_name, args),
        nprocs=world,
        join=False,
        start_method="forkserver",
    )
    while not context.join(timeout=600):
        pass
    return [json.loads((out / f"{config_name}-{world}-{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--worlds", default="1,2,4", help="process counts (default 1,2,4)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1; 0: cores // processes)",
    )
    options = parser.parse_args()
    args = {
        "images": IMAGES,
        "repeats": 5 if options.quick else 20,
        "calibrations": 3 if options.quick else 5,
        "threads": options.threads,
    }
    worlds = [int(w) for w in options.worlds.split(",")]
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "qswap", "qswap.convert", "qswap.distributed", "forum_models"]
    )
    print(
        f"ResNet-18 (width 0.25), x86 int8, {args['images']} images in batches of {BATCH}, "
        f"gloo on {os.cpu_count()} CPU core(s), torch {torch.__version__}"
    )
    header = (
        f"{'observers':<10} {'procs':>5} {'threads':>7} {'calibrate s':>11} {'images/s':>9} "
        f"{'speed-up':>8} {'reduce ms':>9} {'fwd ms':>7} {'reduce/fwd':>10} {'share':>6}"
    )
    print(header)
    print("-" * len(header))
    figures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for config_name in CONFIGS:
            base = None
            for world in worlds:
                ranks = run(world, config_name, args, Path(tmp))
                wall = max(r["calibrate_s"] for r in ranks)
                reduce_ms = 1e3 * max(r["reduce_s"] for r in ranks) if world > 1 else 0.0
                forward_ms = 1e3 * statistics.median(r["forward_s"] for r in ranks)
                throughput = args["images"] / wall
                base = base or throughput
                row = {
                    "observers": config_name,
                    "processes": world,
                    "threads_per_process": ranks[0]["threads"],
                    "observer_count": ranks[0]["observers"],
                    "calibrate_s": wall,
                    "images_per_s": throughput,
                    "speedup": throughput / base,
                    "reduce_ms": reduce_ms,
                    "forward_ms": forward_ms,
                    "reduce_over_forward": reduce_ms / forward_ms,
                    "reduce_share_of_calibrate": reduce_ms / 1e3 / wall,
                }
                figures.append(row)
                print(
                    f"{config_name:<10} {world:>5} {row['threads_per_process']:>7} "
                    f"{wall:>11.3f} {throughput:>9.0f} {row['speedup']:>7.2f}x "
                    f"{reduce_ms:>9.2f} {forward_ms:>7.2f} {row['reduce_over_forward']:>10.2f} "
                    f"{100 * row['reduce_share_of_calibrate']:>5.1f}%"
                )
    print(
        "reduce ms: one sync_observers (every observer of the model) with ranks aligned; "
        "fwd ms: one forward of a 32-image batch through the prepared model on one rank"
    )
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
