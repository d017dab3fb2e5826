"""Calibration and QAT across processes: observers reduced over torch.distributed (gloo, CPU).

Each spawned group runs all of its scenarios in one go (starting processes is the slow
part) and saves what every rank ended with; the tests compare those results with one
process that saw all the data. Every spawned process has a deadline, so a bug that makes a
rank hang fails the test instead of hanging the suite.
"""

from __future__ import annotations

import copy
import datetime
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import qswap
from qswap.distributed import check_reducible, reduction_of, sync_observers
from qswap.exceptions import CalibrationError
from qswap.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
    PerChannelMinMaxObserver,
)

JOIN_SECONDS = 120.0  # safety net for a whole spawned group; never reached when things work
OK_GROUP_SECONDS = 60.0  # collectives of the healthy groups (a loaded CI machine is slow)
FAIL_GROUP_SECONDS = 3.0  # how long healthy ranks wait for a stalled one
STEPS = 3  # QAT steps under DDP, each followed by sync_observers
PRELOAD = ["torch", "torch._dynamo", "torch.nn.parallel", "qswap", "qswap.convert", __name__]

WEIGHT = {"granularity": "per_channel", "axis": 0}
CONFIGS: dict[str, dict[str, Any]] = {
    "minmax": {"version": 1, "extends": ["w8a8_minmax"]},
    "minmax_symmetric": {
        "version": 1,
        "extends": ["w8a8_minmax"],
        "activation": {"signed": True, "scheme": "symmetric"},
    },
    "histogram_percentile": {
        "version": 1,
        "extends": ["w8a8_minmax"],
        "activation": {
            "observer": {
                "name": "histogram",
                "bins": 256,
                "method": "percentile",
                "percentile": 99.0,
            }
        },
    },
    "histogram_mse": {
        "version": 1,
        "extends": ["w8a8_minmax"],
        "activation": {"observer": {"name": "histogram", "bins": 256, "method": "mse"}},
    },
    "moving_average": {
        "version": 1,
        "extends": ["w8a8_minmax"],
        "activation": {"observer": {"name": "moving_average_minmax", "averaging_constant": 0.3}},
    },
    "custom_merge": {
        "version": 1,
        "extends": ["w8a8_minmax"],
        "activation": {"observer": "clipped_merge"},
    },
    "bias_correction": {"version": 1, "extends": ["w8a8_minmax"], "bias_correction": True},
}
SKIP_LINEAR = {
    "version": 1,
    "extends": ["w8a8_minmax"],
    "rules": [{"match": {"name": "3"}, "skip": True}],
}
GPTQ = {  # a weight method: the Linear's input Hessian is summed over the ranks
    "version": 1,
    "extends": ["w8a8_minmax"],
    "rules": [{"match": {"name": "3"}, "weight": {"method": "gptq"}}],
}
NO_REDUCTION = {"version": 1, "extends": ["w8a8_minmax"], "activation": {"observer": "clipped"}}
QAT = {  # LSQ (learned steps) on the conv, observer-driven fake-quant on the Linear
    "version": 1,
    "extends": ["w8a8_minmax"],
    "mode": "qat",
    "rules": [
        {"match": {"name": "0"}, "weight": {"quantizer": "lsq"}, "activation": {"quantizer": "lsq"}}
    ],
}


# --------------------------------------------------------------------------- fixtures


class ClippedObserver(MinMaxObserver):
    """A custom observer that records a clipped range and declares no reduction."""

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x.clamp(-4.0, 4.0))


class ClippedMergeObserver(ClippedObserver):
    """The same observer, reduced across ranks through its own ``merge``."""

    reduction = "merge"


def registry() -> qswap.Registry:
    reg = qswap.Registry("dist-tests", parent=qswap.default_registry())
    reg.register_observer("clipped", ClippedObserver)
    reg.register_observer("clipped_merge", ClippedMergeObserver)
    return reg


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))


def batches(count: int = 6) -> list[torch.Tensor]:
    """Batches whose ranges differ, so that every shard sees a different min and max."""
    g = torch.Generator().manual_seed(1)
    scales = [1.0, 3.5, 0.5, 2.0, 1.5, 5.0]  # ranges grow, shrink and grow again
    return [torch.randn(4, 3, 6, 6, generator=g) * scales[i] + 0.3 * i for i in range(count)]


def shard(data: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    return data[rank::world]


def prepare(config: dict[str, Any], reg: qswap.Registry | None = None) -> nn.Module:
    return qswap.prepare(make_model(), config, example_inputs=(batches(1)[0],), registry=reg)


def qparams_of(prepared: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every slot's (scale, zero point) after convert, keyed ``layer/slot``."""
    converted = qswap.convert(prepared)
    found = {
        f"{layer}/{slot}": (qp.scale, qp.zero_point)
        for layer, spec in converted._qswap.layers.items()
        for slot, qp in spec.qparams.items()
    }
    for layer, spec in converted._qswap.layers.items():  # bias correction's shifts, if any
        if spec.bias_shift is not None:
            found[f"{layer}/bias_shift"] = (spec.bias_shift, spec.bias_shift)
    return found


def clip_ranges(prepared: nn.Module) -> dict[str, tuple[float, float, float]]:
    """Each histogram observer's chosen (low, high) and its bin width."""
    out = {}
    for name, module in prepared.named_modules():
        if isinstance(module, HistogramObserver):
            lo, hi = module.hist_range.tolist()
            out[name] = (*module.clip_range(), (hi - lo) / module.bins)
    return out


def observers_of(prepared: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in prepared.named_modules() if isinstance(m, Observer)}


def calibrated(config: dict[str, Any], data: list[torch.Tensor], **kw: Any) -> nn.Module:
    prepared = prepare(config, registry())
    qswap.calibrate(prepared, data, progress=False, **kw)
    return prepared


def merged_reference(config: dict[str, Any], world: int) -> nn.Module:
    """One prepared model per shard, calibrated in this process, then merged in rank order."""
    data = batches()
    parts = [calibrated(config, shard(data, r, world)) for r in range(world)]
    total = observers_of(parts[0])
    for other in parts[1:]:
        for name, obs in observers_of(other).items():
            total[name].merge(obs)
    return parts[0]


# --------------------------------------------------------------------------- spawned ranks


class FailingShard:
    """A shard whose second batch raises, kills its process, or stalls."""

    def __init__(self, data: list[torch.Tensor], how: str) -> None:
        self.data, self.how = data, how

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.data[0]
        if self.how == "raise":
            raise ValueError("corrupt record in shard 1")
        if self.how == "die":
            os._exit(3)
        time.sleep(10 * JOIN_SECONDS)  # stall: the parent kills this process
        yield self.data[1]


def scenario_ok(rank: int, world: int, group: Any, out: Path) -> dict[str, Any]:
    data = shard(batches(), rank, world)
    result: dict[str, Any] = {}
    for name, config in CONFIGS.items():
        prepared = calibrated(config, data, process_group=group)
        result[name] = {"qparams": qparams_of(prepared), "clip": clip_ranges(prepared)}
        if name != "custom_merge":  # a second reduction, with no new data in between
            once = {k: v.clone() for k, v in prepared.state_dict().items()}
            sync_observers(prepared, group)
            result[name]["twice"] = (once, dict(prepared.state_dict()))
    # calibrate's default group is the world; sync_observers works on a model observed by hand
    result["default_group"] = qparams_of(calibrated(CONFIGS["minmax"], data))
    manual = prepare(CONFIGS["minmax"])
    with torch.no_grad():
        for x in data:
            manual(x)
    result["manual_count"] = sync_observers(manual, group)
    result["manual"] = qparams_of(manual)
    try:
        calibrated(NO_REDUCTION, data, process_group=group)
        result["no_reduction"] = "no error"
    except CalibrationError as exc:
        result["no_reduction"] = str(exc)
    config = CONFIGS["minmax"] if rank != 1 else SKIP_LINEAR
    try:
        calibrated(config, data, process_group=group)
        result["mismatch"] = "no error"
    except CalibrationError as exc:
        result["mismatch"] = str(exc)
    result["qat"] = qat_steps(rank, data, group)
    result["gptq"] = hessian_of(calibrated(GPTQ, data, process_group=group))
    return result


def hessian_of(prepared: nn.Module) -> tuple[torch.Tensor, int]:
    """The input Hessian (and row count) GPTQ recorded for the Linear ``3``."""
    from qswap.slots import activation_slot

    slot = activation_slot(prepared.get_submodule("3"), "input")
    assert slot is not None
    stats: Any = slot._modules["stats"]
    return stats.hessian.clone(), int(stats.rows)


def qat_steps(rank: int, data: list[torch.Tensor], group: Any) -> dict[str, Any]:
    """Calibrate, two DDP training steps on rank-specific data, then ``sync_observers``."""
    prepared = calibrated(QAT, data, process_group=group)
    ddp = DistributedDataParallel(prepared, process_group=group)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    ddp.train()
    g = torch.Generator().manual_seed(100 + rank)
    before: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        x = torch.randn(4, 3, 6, 6, generator=g) * (3.0 + rank + step)
        loss = ddp(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        before = {k: v.detach().clone() for k, v in prepared.state_dict().items()}
        sync_observers(ddp, group)
    after = {k: v.detach().clone() for k, v in prepared.state_dict().items()}
    return {"before": before, "after": after}


def scenario_fail(how: str, rank: int, world: int, group: Any, out: Path) -> dict[str, Any]:
    data: Any = shard(batches(), rank, world)
    if rank == 1:
        data = FailingShard(data, how)
    try:
        prepared = calibrated(CONFIGS["minmax"], data, process_group=group)
        torch.save(qparams_of(prepared), out / f"artifact{rank}.pt")  # only after success
        return {"error": None, "type": None}
    except Exception as exc:
        return {"error": str(exc), "type": type(exc).__name__}


def worker(rank: int, world: int, store: str, out: str, scenario: str) -> None:
    """Entry point of a spawned rank: one gloo group, one scenario, results saved to ``out``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=JOIN_SECONDS),
    )
    try:
        seconds = OK_GROUP_SECONDS if scenario == "ok" else FAIL_GROUP_SECONDS
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))
        if scenario == "ok":
            result = scenario_ok(rank, world, group, Path(out))
        else:
            result = scenario_fail(scenario, rank, world, group, Path(out))
    except BaseException:
        result = {"crash": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def spawn(world: int, scenario: str, out: Path, wait_for: tuple[int, ...] | None = None) -> Any:
    """Run ``scenario`` on ``world`` gloo ranks; the ranks' results and exit codes.

    Waits for the ranks in ``wait_for`` (all by default) up to a deadline, then kills
    whatever still runs.
    """
    out.mkdir(parents=True, exist_ok=True)
    # A fork server imports torch (and what DDP imports on first use) once for every group;
    # each rank is then forked from it instead of importing everything again.
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    context = mp.start_processes(
        worker,
        args=(world, str(out / "store"), str(out), scenario),
        nprocs=world,
        join=False,
        start_method="forkserver",
    )
    procs = context.processes
    deadline = time.monotonic() + JOIN_SECONDS
    watched = range(world) if wait_for is None else wait_for
    for r in watched:
        procs[r].join(max(0.0, deadline - time.monotonic()))
    hung = [r for r in watched if procs[r].is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    assert not hung, f"ranks {hung} of scenario {scenario!r} still ran after {JOIN_SECONDS} s"
    results = []
    for r in range(world):
        path = out / f"rank{r}.pt"
        results.append(torch.load(path, weights_only=True) if path.exists() else None)
        crash = (results[-1] or {}).get("crash")
        assert crash is None, f"rank {r} crashed:\n{crash}"
    return results, [p.exitcode for p in procs]


class Ranks(NamedTuple):
    """What every rank of a healthy group ended with."""

    world: int
    results: list[dict[str, Any]]


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Ranks:
    world: int = request.param
    results, codes = spawn(world, "ok", tmp_path_factory.mktemp(f"ok{world}"))
    assert codes == [0] * world
    return Ranks(world, results)


def assert_same_qparams(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key][0], b[key][0]), key
        assert torch.equal(a[key][1], b[key][1]), key


# --------------------------------------------------------------------------- tests: results


@pytest.mark.parametrize("config", ["minmax", "minmax_symmetric"])
def test_minmax_qparams_equal_one_process_bit_for_bit(ranks: Ranks, config: str) -> None:
    """Min-max qparams reduced over the ranks equal, bit for bit, one process that saw all the data."""
    results = ranks.results
    reference = qparams_of(calibrated(CONFIGS[config], batches()))
    for result in results:
        assert_same_qparams(result[config]["qparams"], reference)


def test_gptq_hessians_add_up_over_the_ranks(ranks: Ranks) -> None:
    """A weight method's statistics reduce like an observer's: each rank ends with the Hessian
    of all the data (float sums in another order: equal to rounding), and converts alike."""
    hessian, rows = hessian_of(calibrated(GPTQ, batches()))
    alone, _ = hessian_of(calibrated(GPTQ, shard(batches(), 0, ranks.world)))
    assert not torch.allclose(alone, hessian, rtol=1e-3)
    for result in ranks.results:
        got, got_rows = result["gptq"]
        assert got_rows == rows
        assert torch.allclose(got, hessian, rtol=1e-5, atol=1e-4)


def test_every_rank_ends_with_identical_qparams(ranks: Ranks) -> None:
    """After distributed calibration every rank holds exactly the same qparams, for every observer."""
    results = ranks.results
    for config in CONFIGS:
        for result in results[1:]:
            assert_same_qparams(result[config]["qparams"], results[0][config]["qparams"])


def test_shards_really_differ(ranks: Ranks) -> None:
    """Each shard alone gives other qparams than all the data, so the reduction is what makes them equal."""
    results = ranks.results
    alone = qparams_of(calibrated(CONFIGS["minmax"], shard(batches(), 0, ranks.world)))
    everything = results[0]["minmax"]["qparams"]
    assert not torch.equal(alone["3/input"][0], everything["3/input"][0])


@pytest.mark.parametrize("config", ["histogram_percentile", "histogram_mse"])
def test_histogram_clip_range_within_one_bin_of_one_process(ranks: Ranks, config: str) -> None:
    """Histogram clip ranges reduced over the ranks are within one bin of one process that saw all the data."""
    results = ranks.results
    reference = clip_ranges(calibrated(CONFIGS[config], batches()))
    distributed = results[0][config]["clip"]
    assert distributed.keys() == reference.keys() and len(reference) == 4
    for name, (low, high, width) in reference.items():
        d_low, d_high, d_width = distributed[name]
        assert d_width == pytest.approx(width, rel=1e-9)  # the same common range
        assert abs(d_low - low) <= width, name
        assert abs(d_high - high) <= width, name


def test_moving_average_is_the_batch_weighted_mean_merge_gives(ranks: Ranks) -> None:
    """Moving-average observers reduce to the batch-weighted mean, as merging the ranks' observers in one process does."""
    results = ranks.results
    reference = qparams_of(merged_reference(CONFIGS["moving_average"], ranks.world))
    distributed = results[0]["moving_average"]["qparams"]
    assert distributed.keys() == reference.keys()
    for key, (scale, zero_point) in reference.items():
        torch.testing.assert_close(distributed[key][0], scale, rtol=1e-6, atol=0)
        assert torch.equal(distributed[key][1], zero_point), key


def test_custom_observer_reduced_through_its_merge(ranks: Ranks) -> None:
    """A custom observer declaring reduction = 'merge' ends as merging every rank's observer in one process."""
    results = ranks.results
    reference = qparams_of(merged_reference(CONFIGS["custom_merge"], ranks.world))
    assert_same_qparams(results[0]["custom_merge"]["qparams"], reference)


def test_default_group_and_manual_sync(ranks: Ranks) -> None:
    """calibrate() reduces over the world group by default, and sync_observers does it for a model observed by hand."""
    results = ranks.results
    reference = qparams_of(calibrated(CONFIGS["minmax"], batches()))
    for result in results:
        assert_same_qparams(result["default_group"], reference)
        assert_same_qparams(result["manual"], reference)
        assert result["manual_count"] == 6  # 2 weights, 2 inputs, 2 outputs


def test_observer_without_reduction_fails_clearly_on_every_rank(ranks: Ranks) -> None:
    """An observer that declares no reduction makes every rank raise a CalibrationError naming it and the fix."""
    results = ranks.results
    for result in results:
        message = result["no_reduction"]
        assert message.startswith(
            "observer ClippedObserver (registered as 'clipped') at '0.0.qswap_input.observer' "
            "declares no distributed reduction"
        )
        assert "reduction = 'merge'" in message and "reduce_state(self, group)" in message


def test_ranks_with_different_models_fail_clearly(ranks: Ranks) -> None:
    """Ranks that prepared different models all raise a CalibrationError saying so instead of mixing statistics."""
    results = ranks.results
    for rank, result in enumerate(results):
        other = 1 if rank != 1 else 0
        assert result["mismatch"].startswith(
            f"ranks {rank} and {other} hold different prepared models: rank {rank} has "
            f"{6 if rank != 1 else 3} observers, rank {other} has {3 if rank != 1 else 6}"
        ), result["mismatch"]
        assert result["mismatch"].endswith(
            "Prepare the same model with the same config on every rank"
        )


def test_bias_correction_means_reduce_to_one_process(ranks: Ranks) -> None:
    """The input means bias correction records, reduced over the ranks, give one process's shifts."""
    reference = qparams_of(calibrated(CONFIGS["bias_correction"], batches()))
    assert {"0/bias_shift", "3/bias_shift"} <= reference.keys()
    for result in ranks.results:
        got = result["bias_correction"]["qparams"]
        assert got.keys() == reference.keys()
        for key, (scale, zero_point) in reference.items():
            if key.endswith("bias_shift"):  # float64 sums in another order: equal to rounding
                torch.testing.assert_close(got[key][0], scale, rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(got[key][0], scale) and torch.equal(got[key][1], zero_point)


@pytest.mark.parametrize("config", ["minmax", "moving_average", "histogram_mse", "bias_correction"])
def test_reducing_again_counts_nothing_twice(ranks: Ranks, config: str) -> None:
    """A second reduction with no new data leaves batch counts, ranges and histograms as they were."""
    for result in ranks.results:
        once, twice = result[config]["twice"]
        assert once.keys() == twice.keys()
        for key in once:
            if key.endswith("num_batches"):
                assert torch.equal(once[key], twice[key]), key
            else:
                torch.testing.assert_close(twice[key], once[key], rtol=1e-12, atol=1e-9)
    inputs = [k for k in once if k.endswith("qswap_input.observer.num_batches")]
    assert inputs and all(int(once[k]) == len(batches()) for k in inputs)


def test_qat_step_under_ddp_leaves_identical_quantization_state(ranks: Ranks) -> None:
    """After DDP QAT steps on different data and sync_observers, every rank holds the same quantization state."""
    results = ranks.results
    after = [r["qat"]["after"] for r in results]
    keys = after[0].keys()
    assert any(k.endswith(".step") for k in keys) and any(k.endswith("min_val") for k in keys)
    for state in after[1:]:
        assert state.keys() == keys
        for key in keys:
            assert torch.equal(state[key], after[0][key]), key
    # every rank's batches are counted once: calibration, then STEPS steps on every rank
    counts = [k for k in keys if k.endswith("qswap_input.observer.num_batches")]
    assert counts and all(int(after[0][k]) == len(batches()) + STEPS * ranks.world for k in counts)
    # DDP alone keeps weights and learnable steps equal, but not what the observers saw
    before = [r["qat"]["before"] for r in results]
    params = [k for k in keys if k.endswith((".step", ".original", ".bias"))]
    assert params and all(torch.equal(before[1][k], before[0][k]) for k in params)
    assert any(not torch.equal(before[1][k], before[0][k]) for k in keys if k.endswith("max_val"))


# --------------------------------------------------------------------------- tests: failures


def test_rank_that_raises_makes_the_others_fail_clearly(tmp_path: Path) -> None:
    """A rank that raises mid-calibration makes every other rank raise a CalibrationError naming it; nothing is written."""
    results, codes = spawn(3, "raise", tmp_path)
    assert codes == [0, 0, 0]
    assert results[1] == {"error": "corrupt record in shard 1", "type": "ValueError"}
    for rank in (0, 2):
        assert results[rank]["type"] == "CalibrationError"
        assert results[rank]["error"].startswith(
            f"calibration failed on rank 1 of 3, so rank {rank} stops too: rank 1 raised "
            "ValueError: corrupt record in shard 1."
        )
    assert not list(tmp_path.glob("artifact*.pt"))


def test_rank_that_dies_makes_the_others_fail_clearly(tmp_path: Path) -> None:
    """A rank whose process dies mid-calibration makes the others raise a CalibrationError; nothing is written."""
    results, codes = spawn(2, "die", tmp_path)
    assert codes[1] == 3 and results[1] is None
    assert results[0]["type"] == "CalibrationError"
    message = results[0]["error"]
    assert message.startswith("distributed calibration failed on rank 0 of 2 (gloo) while ")
    # gloo says which, depending on whether rank 0 reached the barrier before rank 1 died
    assert (
        "Ranks 1 failed to pass monitoredBarrier" in message
        or "Connection closed by peer" in message
    ), message
    assert not list(tmp_path.glob("artifact*.pt"))


def test_rank_that_stalls_makes_the_others_fail_within_the_timeout(tmp_path: Path) -> None:
    """A rank that stops responding makes the others raise a CalibrationError after the group's timeout instead of hanging."""
    results, _ = spawn(2, "stall", tmp_path, wait_for=(0,))
    assert results[0]["type"] == "CalibrationError"
    message = results[0]["error"]
    assert "Ranks 1 failed to pass monitoredBarrier in 3000 ms" in message
    assert "init_process_group(timeout=...)" in message
    assert not list(tmp_path.glob("artifact*.pt"))


# --------------------------------------------------------------------------- tests: local


def test_builtin_reductions() -> None:
    """Every built-in observer has its defined reduction; custom ones declare theirs or have none."""
    assert reduction_of(MinMaxObserver) == "minmax"
    assert reduction_of(PerChannelMinMaxObserver) == "minmax"
    assert reduction_of(MovingAverageMinMaxObserver) == "weighted_mean"
    assert reduction_of(HistogramObserver) == "histogram"
    assert reduction_of(ClippedObserver) is None  # overrides observe: min/max no longer apply
    assert reduction_of(ClippedMergeObserver) == "merge"

    class Renamed(MinMaxObserver):
        """Only computes qparams differently: its state still reduces by min/max."""

    class Collective(ClippedObserver):
        def reduce_state(self, group: Any) -> None:
            """Reduces itself."""

    assert reduction_of(Renamed) == "minmax"
    assert reduction_of(Collective) == "custom"


def test_unknown_reduction_name_is_refused() -> None:
    """A reduction class attribute that names no known reduction raises a CalibrationError listing them."""

    class Typo(ClippedObserver):
        reduction = "min_max"

    with pytest.raises(CalibrationError) as info:
        reduction_of(Typo)
    assert str(info.value) == (
        "observer test_unknown_reduction_name_is_refused.<locals>.Typo declares reduction = "
        "'min_max', which is not a distributed reduction; use one of 'minmax', "
        "'weighted_mean', 'histogram', 'merge', or define reduce_state(self, group) instead"
    )


def test_check_reducible_names_the_observer_before_any_data() -> None:
    """check_reducible counts a model's observers and names the first one without a reduction."""
    assert check_reducible(prepare(CONFIGS["histogram_mse"])) == 6
    with pytest.raises(
        CalibrationError,
        match=r"^observer ClippedObserver \(registered as 'clipped'\) at '0\.0\.qswap_input\.observer'",
    ):
        check_reducible(prepare(NO_REDUCTION, registry()))


def test_single_process_is_unchanged() -> None:
    """Without torch.distributed, sync_observers changes nothing and calibrate gives the same qparams."""
    prepared = calibrated(CONFIGS["histogram_mse"], batches())
    before = copy.deepcopy(prepared.state_dict())
    assert sync_observers(prepared) == 0
    after = prepared.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_process_group_without_distributed_is_an_error() -> None:
    """Passing a process group while torch.distributed is not initialized raises a CalibrationError saying so."""
    prepared = prepare(CONFIGS["minmax"])
    with pytest.raises(CalibrationError, match="torch.distributed is not initialized"):
        sync_observers(prepared, process_group=object())  # type: ignore[arg-type]
