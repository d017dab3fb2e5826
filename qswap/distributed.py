"""Calibration and QAT across processes: observers reduced over ``torch.distributed``.

Each rank observes its own shard of the calibration data; :func:`sync_observers` then
reduces every observer of the model across the ranks of a process group, so that every
rank computes the same quantization parameters, equal to those of one process that saw
all the data. The reduction of each built-in observer is defined:

* ``minmax`` and ``per_channel_minmax`` (reduction ``"minmax"``): elementwise MIN of
  ``min_val`` and MAX of ``max_val``, exactly what one process seeing all data holds;
* ``moving_average_minmax`` (``"weighted_mean"``): the ranks' averages weighted by their
  batch counts, as ``merge`` computes (a moving average depends on batch order, so no
  split reproduces one long stream);
* ``histogram`` (``"histogram"``): MIN/MAX of the ranges, each rank re-binning its
  histogram to that common range, then SUM: within one bin of one process.

Reducing again later (QAT syncs every step, a second ``calibrate``) counts what an
earlier reduction already shared once, not once per rank: batch counts and histograms
add only what each rank observed since.

A custom observer declares its reduction in one of two ways, checked in this order:

* a method ``reduce_state(self, group)`` that makes the observer's state the reduction
  over every rank of ``group`` (a ``torch.distributed`` process group; collective: it is
  called on every rank, in the same order);
* a class attribute ``reduction`` naming a built-in reduction: ``"minmax"`` or
  ``"weighted_mean"`` (for state in ``min_val``/``max_val`` buffers and ``num_batches``),
  ``"histogram"`` (the ``HistogramObserver`` layout) or ``"merge"`` (gather every rank's
  ``state_dict`` and fold them with the observer's own ``merge`` in rank order: any
  observer that merges in process can use it; reducing it again counts the shared state
  once per rank, harmless for min/max-like state, not for counts).

A subclass of a built-in observer inherits its reduction unless it overrides how state is
recorded or merged (``observe``, ``_incoming``, ``_merge_state``). An observer without a
reduction makes the first distributed calibration fail with a ``CalibrationError`` that
names it, before any batch runs.

A rank that raises inside ``qswap.calibrate`` tells the others, which raise a
``CalibrationError`` naming it; a rank that dies or stalls makes the others fail when
the process group's timeout runs out (``init_process_group(timeout=...)``; with gloo,
``torch.distributed.monitored_barrier`` names the missing ranks). No rank computes
parameters from a partial reduction.

QAT under ``DistributedDataParallel`` (calibrate first, then wrap, so that DDP sees the
learnable quantizer parameters calibration creates):

* weights and learnable quantizer parameters (LSQ steps) are DDP parameters: broadcast
  from rank 0 when DDP is built, gradients averaged in every backward, so they stay equal;
  weight observers and weight qparams follow the weights;
* buffers (observer statistics, quantizer scales and zero points) are copied from rank 0
  at the start of every forward (DDP's default ``broadcast_buffers=True``); inside the
  forward each rank's activation observers record its own batch, so the ranks differ
  until the next sync;
* ``sync_observers(ddp_model)`` after ``optimizer.step()`` (every step or every few)
  reduces every observer over all ranks, recomputes the qparams of quantizers that follow
  an observer and broadcasts rank 0's state of the others: afterwards the quantization
  state is identical on every rank.

    >>> import torch, qswap
    >>> from qswap.distributed import sync_observers
    >>> prepared = qswap.prepare(torch.nn.Linear(4, 2), "w8a8_minmax")
    >>> _ = qswap.calibrate(prepared, [torch.randn(8, 4)], progress=False)
    >>> sync_observers(prepared)  # one process: nothing to reduce
    0
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, runtime_checkable

import torch
from torch import Tensor, nn

from qswap.exceptions import CalibrationError
from qswap.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
    PerChannelMinMaxObserver,
    rebin,
)
from qswap.quantizers import Quantizer

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "REDUCTIONS",
    "DistributedContext",
    "ReducibleObserver",
    "Reduction",
    "check_reducible",
    "distributed_context",
    "reduction_of",
    "report_failure",
    "sync_observers",
]

Reduction = Literal["minmax", "weighted_mean", "histogram", "merge"]
#: The names a custom observer's ``reduction`` class attribute may take.
REDUCTIONS: tuple[str, ...] = get_args(Reduction)

_BUILTIN: dict[type, Reduction] = {
    MinMaxObserver: "minmax",
    PerChannelMinMaxObserver: "minmax",
    MovingAverageMinMaxObserver: "weighted_mean",
    HistogramObserver: "histogram",
}
# Methods that define what an observer's state means; a subclass of a built-in that
# overrides one of them no longer inherits the built-in's reduction.
_STATE_METHODS = ("observe", "_incoming", "_merge_state")
_ERROR_CHARS = 2000


@runtime_checkable
class ReducibleObserver(Protocol):
    """An observer that reduces its own state across the ranks of a process group.

    ``reduce_state`` is collective: every rank calls it, in the same order, and afterwards
    every rank holds the same state (the union of what all ranks observed).
    """

    def reduce_state(self, group: ProcessGroup | None) -> None:
        """Replace this observer's state by its reduction over every rank of ``group``."""


# --------------------------------------------------------------------------- reductions


def reduction_of(observer: type | nn.Module) -> Reduction | Literal["custom"] | None:
    """How ``observer`` (a class or an instance) is reduced across ranks, ``None`` if undeclared.

    ``"custom"`` means the class defines ``reduce_state(group)``.

    >>> from qswap.observers import HistogramObserver
    >>> reduction_of(HistogramObserver)
    'histogram'
    """
    cls = observer if isinstance(observer, type) else type(observer)
    if callable(getattr(cls, "reduce_state", None)):
        return "custom"
    declared = getattr(cls, "reduction", None)
    if declared is not None:
        if declared not in REDUCTIONS:
            raise CalibrationError(
                f"observer {cls.__qualname__} declares reduction = {declared!r}, which is not a "
                f"distributed reduction; use one of {', '.join(map(repr, REDUCTIONS))}, or "
                "define reduce_state(self, group) instead"
            )
        return declared  # type: ignore[no-any-return]
    for base in cls.__mro__:
        found = _BUILTIN.get(base)
        if found is not None:
            same = all(getattr(cls, m, None) is getattr(base, m, None) for m in _STATE_METHODS)
            return found if same else None
    return None


def _missing_reduction(path: str, observer: nn.Module) -> CalibrationError:
    cls = type(observer)
    spec = getattr(observer, "spec", None)
    name = getattr(getattr(spec, "observer", None), "name", None)
    registered = f" (registered as {name!r})" if name else ""
    where = f"at {path!r}" if path else "at the model's root"
    return CalibrationError(
        f"observer {cls.__qualname__}{registered} {where} declares no distributed reduction, so "
        "its state cannot be combined across ranks. Fix: give the class an attribute "
        f"reduction = 'merge' (gathers every rank's state and folds it with "
        f"{cls.__name__}.merge), or one of {', '.join(map(repr, REDUCTIONS))}, or define "
        "reduce_state(self, group) doing the reduction with torch.distributed collectives"
    )


def check_reducible(model: nn.Module) -> int:
    """Raise ``CalibrationError`` naming the first observer of ``model`` without a reduction.

    Returns the number of observers found. Local: no collective is run.

    >>> import torch, qswap
    >>> check_reducible(qswap.prepare(torch.nn.Linear(4, 2), "w8a8_minmax"))
    3
    """
    found = _find_observers(_unwrap(model))
    for path, observer in found:
        if reduction_of(observer) is None:
            raise _missing_reduction(path, observer)
    return len(found)


# --------------------------------------------------------------------------- process groups


@dataclass(frozen=True)
class DistributedContext:
    """The process group a calibration reduces over, with this rank's place in it."""

    group: ProcessGroup | None  # None: the default (world) group
    rank: int  # rank within ``group``
    world_size: int
    backend: str
    device: torch.device  # where collective buffers live (CUDA for nccl)
    timeout: datetime.timedelta | None

    def global_rank(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` (what ``torch.distributed.broadcast`` takes)."""
        import torch.distributed as dist

        if self.group is None:
            return group_rank
        return int(dist.get_global_rank(self.group, group_rank))


def distributed_context(
    process_group: ProcessGroup | None = None,
    timeout: datetime.timedelta | float | None = None,
) -> DistributedContext | None:
    """The group to reduce over, or ``None`` when there is nothing to reduce (one process).

    ``None`` when ``torch.distributed`` is unavailable or not initialized, or when the
    group has a single rank.

    >>> distributed_context() is None  # not initialized in a plain interpreter
    True
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise CalibrationError(
                "a process_group was given but torch.distributed is not initialized in this "
                "process; call torch.distributed.init_process_group(...) first (torchrun sets "
                "the environment it reads), or leave process_group=None to calibrate in one "
                "process"
            )
        return None
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise CalibrationError(
            f"this process (global rank {dist.get_rank()}) is not a member of the "
            "process_group it was asked to reduce over; call calibrate/sync_observers on the "
            "ranks of that group only, or pass a group that contains this rank"
        )
    world = dist.get_world_size(process_group)
    if world == 1:
        return None
    backend = str(dist.get_backend(process_group))
    device = torch.device("cpu")
    if backend == "nccl" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if timeout is None:
        timeout = _group_timeout(process_group)
    elif not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    return DistributedContext(process_group, rank, world, backend, device, timeout)


def _group_timeout(process_group: ProcessGroup | None) -> datetime.timedelta | None:
    """The timeout the group was created with (``monitored_barrier`` would use 30 min)."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    try:
        found = group._get_backend(torch.device("cpu")).options._timeout  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        return None
    return found if isinstance(found, datetime.timedelta) else None


@contextmanager
def _collective(ctx: DistributedContext, what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into a ``CalibrationError`` that says why."""
    try:
        yield
    except CalibrationError:
        raise
    except RuntimeError as exc:  # DistBackendError, DistNetworkError, gloo timeouts
        lines = str(exc).strip().splitlines()
        # drop gloo's "[/path/to/pair.cc:534] " source location
        reason = re.sub(r"^\[[^\]]*:\d+\]\s*", "", lines[0]) if lines else type(exc).__name__
        raise CalibrationError(
            f"distributed calibration failed on rank {ctx.rank} of {ctx.world_size} "
            f"({ctx.backend}) while {what}: {reason}. Another rank died, raised outside "
            "qswap.calibrate, or did not arrive within the process group's timeout; no "
            "quantization parameters were computed from a partial reduction. Check the other "
            "ranks' logs; the timeout is init_process_group(timeout=...) (and "
            "sync_observers(timeout=...) for the first barrier)"
        ) from exc


# --------------------------------------------------------------------------- discovery


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and type(model).__name__ in (
        "DistributedDataParallel",
        "DataParallel",
    ):
        return inner
    return model


def _find_observers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every observer recording data in ``model``, in module order, with its path.

    Observers are qswap ``Observer`` modules plus whatever sits in the ``observer`` place
    of qswap's weight parametrizations and activation slots (custom observers need not
    subclass ``Observer``). Templates of dynamic slots never record and are left out.
    """
    from qswap.slots import ActivationSlot, WeightObserver

    skip: set[int] = set()
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, ActivationSlot) and module.dynamic and module.observer is not None:
            skip.add(id(module.observer))
        holder = isinstance(module, (ActivationSlot, WeightObserver))
        candidate = module.observer if holder else module
        path = f"{name}.observer" if holder else name
        if candidate is None or id(candidate) in seen or id(candidate) in skip:
            continue
        if (holder or isinstance(candidate, Observer)) and isinstance(candidate, nn.Module):
            seen.add(id(candidate))
            found.append((path, candidate))
    return found


def _find_quantizers(
    model: nn.Module,
) -> tuple[list[tuple[nn.Module, nn.Module]], list[tuple[str, nn.Module]]]:
    """``(fed, shared)``: quantizers whose qparams follow an observer, and all the others.

    A parameter-free quantizer that a QAT slot refreshes from its observer is *fed*: it is
    recomputed from the reduced observer. Every other quantizer (learnable ones, fixed
    ones) is *shared*: its state is broadcast from the group's rank 0.
    """
    from qswap.slots import ActivationSlot, WeightObserver

    fed: list[tuple[nn.Module, nn.Module]] = []
    shared: list[tuple[str, nn.Module]] = []
    done: set[int] = set()
    for name, module in model.named_modules():
        quantizer: Any = None
        observer: Any = None
        if isinstance(module, WeightObserver):
            quantizer, observer = module.quantizer, module.observer
        elif isinstance(module, ActivationSlot) and not module.dynamic:
            if module.follows is not None:
                continue  # its quantizer is its producer's output quantizer, handled there
            quantizer = module.quantizer
            observer = module.observer if module.requant else None
        elif isinstance(module, Quantizer):
            quantizer = module
        if quantizer is None or id(quantizer) in done:
            continue
        done.add(id(quantizer))
        learnable = any(p.requires_grad for p in quantizer.parameters())
        if (
            observer is not None
            and not learnable
            and callable(getattr(quantizer, "set_qparams", None))
        ):
            fed.append((quantizer, observer))
        else:
            path = f"{name}.quantizer" if module is not quantizer else name
            shared.append((path, quantizer))
    return fed, shared


# --------------------------------------------------------------------------- the handshake


@dataclass(frozen=True)
class _ObserverInfo:
    path: str
    kind: str  # qualified class name
    reduction: str
    batches: int  # -1 when the observer has no num_batches
    shape: tuple[int, ...] | None  # shape of min_val (None: unseen or not applicable)
    bins: int | None
    synced: int  # batch count at the end of the last reduction (0: never reduced)


@dataclass(frozen=True)
class _Report:
    """What one rank tells the others before any reduction."""

    error: str | None
    observers: tuple[_ObserverInfo, ...] = ()
    shared: tuple[tuple[str, tuple[tuple[str, tuple[int, ...], str], ...]], ...] = ()


def _batches(observer: nn.Module) -> int:
    count = getattr(observer, "num_batches", None)
    return int(count) if isinstance(count, Tensor) else -1


def _info(path: str, observer: nn.Module, reduction: str) -> _ObserverInfo:
    batches = _batches(observer)
    shape: tuple[int, ...] | None = None
    min_val = getattr(observer, "min_val", None)
    if batches > 0 and isinstance(min_val, Tensor):
        shape = tuple(min_val.shape)
    bins = getattr(observer, "bins", None) if reduction == "histogram" else None
    base = _baseline(observer)
    synced = base.batches if base is not None else 0
    return _ObserverInfo(path, type(observer).__qualname__, reduction, batches, shape, bins, synced)


@dataclass(frozen=True)
class _Synced:
    """What an observer held right after its last reduction (the same on every rank).

    A later reduction counts it once, not once per rank: batch counts and histograms add
    only what each rank observed since.
    """

    batches: int
    histogram: Tensor | None = None
    hist_range: tuple[float, float] | None = None


_SYNCED_ATTR = "_qswap_synced"


def _baseline(observer: nn.Module) -> _Synced | None:
    """The observer's state at its last reduction, if it still holds it (else ``None``)."""
    found = observer.__dict__.get(_SYNCED_ATTR)
    if not isinstance(found, _Synced) or _batches(observer) < found.batches:
        return None  # never reduced, or reset / reloaded since
    return found


def _tensors_of(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _handshake(ctx: DistributedContext, report: _Report) -> list[_Report]:
    """Every rank's report; first a monitored barrier (gloo) that names missing ranks."""
    import torch.distributed as dist

    with _collective(ctx, "waiting for every rank to finish observing"):
        if ctx.backend == "gloo":
            dist.monitored_barrier(ctx.group, timeout=ctx.timeout, wait_all_ranks=True)
        reports: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(reports, report, group=ctx.group)
    return reports


def report_failure(ctx: DistributedContext, exc: BaseException) -> None:
    """Tell the other ranks, waiting in ``sync_observers``, that this rank failed with ``exc``.

    Best effort: if the others are gone too, nothing more is raised here (the caller
    re-raises ``exc``).
    """
    message = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
    with suppress(CalibrationError):
        _handshake(ctx, _Report(error=message))


def _check_reports(ctx: DistributedContext, reports: list[_Report]) -> None:
    failed = [(r, rep.error) for r, rep in enumerate(reports) if rep.error is not None]
    if failed:
        which = ", ".join(str(r) for r, _ in failed)
        first_rank, first_error = failed[0]
        raise CalibrationError(
            f"calibration failed on rank {which} of {ctx.world_size}, so rank {ctx.rank} "
            f"stops too: rank {first_rank} raised {first_error}. The observers were not "
            f"reduced and no rank computed quantization parameters; fix the error on rank "
            f"{first_rank} and run every rank again"
        )
    mine = reports[ctx.rank]
    layout = [(o.path, o.kind, o.reduction) for o in mine.observers]
    for r, rep in enumerate(reports):
        theirs = [(o.path, o.kind, o.reduction) for o in rep.observers]
        if theirs != layout:
            diff = next(
                (i for i, (a, b) in enumerate(zip(layout, theirs, strict=False)) if a != b),
                min(len(layout), len(theirs)),
            )
            a = layout[diff] if diff < len(layout) else "nothing"
            b = theirs[diff] if diff < len(theirs) else "nothing"
            raise CalibrationError(
                f"ranks {ctx.rank} and {r} hold different prepared models: rank {ctx.rank} "
                f"has {len(layout)} observers, rank {r} has {len(theirs)}; observer #{diff} is "
                f"{a} on rank {ctx.rank} and {b} on rank {r}. Prepare the same model with "
                "the same config on every rank"
            )
        if [p for p, _ in rep.shared] != [p for p, _ in mine.shared]:
            raise CalibrationError(
                f"ranks {ctx.rank} and {r} hold different quantizers; prepare the same model "
                "with the same config on every rank"
            )
    for i, info in enumerate(mine.observers):
        shapes = {rep.observers[i].shape for rep in reports} - {None}
        bins = {rep.observers[i].bins for rep in reports}
        if len(shapes) > 1 or len(bins) > 1:
            what = "statistics of shapes" if len(shapes) > 1 else "histograms with bin counts"
            values = sorted(map(str, shapes if len(shapes) > 1 else bins))
            raise CalibrationError(
                f"observer {info.path!r} ({info.kind}) holds {what} {', '.join(values)} on "
                "different ranks; every rank must observe tensors with the same channel count "
                "and use the same config"
            )


# --------------------------------------------------------------------------- collectives


class _Bucket:
    """Tensors flattened into one float64 buffer, reduced by one collective."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.parts: list[Tensor] = []

    def add(self, tensor: Tensor | float, numel: int = 1) -> int:
        if isinstance(tensor, Tensor):
            part = tensor.detach().reshape(-1).to(self.device, torch.float64)
        else:
            part = torch.full((numel,), tensor, dtype=torch.float64, device=self.device)
        self.parts.append(part)
        return len(self.parts) - 1

    def reduce(self, ctx: DistributedContext, op: Any, what: str) -> list[Tensor]:
        import torch.distributed as dist

        if not self.parts:
            return []
        flat = torch.cat(self.parts)
        with _collective(ctx, what):
            dist.all_reduce(flat, op=op, group=ctx.group)
        return list(torch.split(flat, [p.numel() for p in self.parts]))


def _seen_shape(reports: list[_Report], i: int) -> tuple[int, ...]:
    for rep in reports:
        shape = rep.observers[i].shape
        if shape is not None:
            return shape
    return ()


def _reduce_builtin(
    ctx: DistributedContext,
    observers: list[tuple[int, nn.Module, str]],
    reports: list[_Report],
) -> None:
    """Every built-in-reduced observer of the model in at most two collectives.

    One MIN all-reduce carries every minimum and every negated maximum (MIN of -x is
    -MAX of x), histogram ranges included; one SUM all-reduce then carries the histograms,
    re-binned to their common range, and the batch-weighted moving averages. Batch counts
    are known from the handshake. State shared by an earlier reduction counts once: each
    rank adds what it observed since, plus ``1/world`` of the shared part.
    """
    import torch.distributed as dist

    inf = float("inf")
    world = ctx.world_size
    # (observer, reduction, shape, batches here, weight here, total, baseline); an observer
    # unseen on every rank stays empty everywhere
    active: list[tuple[Any, str, tuple[int, ...], int, float, int, _Synced | None]] = []
    for i, observer, reduction in observers:
        counts = [max(rep.observers[i].batches, 0) for rep in reports]
        synced = {rep.observers[i].synced for rep in reports}
        shared = synced.pop() if len(synced) == 1 else 0
        if any(c < shared for c in counts):
            shared = 0  # some rank was reset since: count everything afresh
        total = shared + sum(c - shared for c in counts)
        if total > 0:
            here = counts[ctx.rank]
            weight = here - shared + shared / world
            base = _baseline(observer) if shared else None
            shape = _seen_shape(reports, i)
            active.append((observer, reduction, shape, here, weight, total, base))

    low = _Bucket(ctx.device)
    low_at: list[int] = []
    for obs, reduction, shape, here, _, _, _ in active:
        if reduction == "minmax":
            n = max(1, _numel(shape))
            low_at.append(low.add(obs.min_val if here else inf, n))
            low.add(-obs.max_val if here else inf, n)
        elif reduction == "histogram":
            state: Tensor | float = inf
            if here:
                lo, hi = obs.hist_range.tolist()
                state = torch.tensor([lo, -hi, float(obs.min_val), -float(obs.max_val)])
            low_at.append(low.add(state, 4))
        else:
            low_at.append(-1)
    lows = low.reduce(ctx, dist.ReduceOp.MIN, "reducing observer ranges (MIN/MAX)")

    sums = _Bucket(ctx.device)
    sum_at: list[int] = []
    for (obs, reduction, shape, here, weight, _, base), at in zip(active, low_at, strict=False):
        if reduction == "histogram":
            lo, hi = float(lows[at][0]), -float(lows[at][1])
            bins = int(obs.bins)
            if here:
                hist = _rebinned(obs.histogram, tuple(obs.hist_range.tolist()), lo, hi, bins)
                if base is not None and base.histogram is not None and base.hist_range:
                    before = _rebinned(base.histogram, base.hist_range, lo, hi, bins)
                    hist = hist - before.to(hist.device) * ((world - 1) / world)
                sum_at.append(sums.add(hist))
            else:
                sum_at.append(sums.add(0.0, bins))
        elif reduction == "weighted_mean":
            numel = max(1, _numel(shape))
            sum_at.append(sums.add(obs.min_val.double() * weight if here else 0.0, numel))
            sums.add(obs.max_val.double() * weight if here else 0.0, numel)
        else:
            sum_at.append(-1)
    summed = sums.reduce(ctx, dist.ReduceOp.SUM, "summing histograms and moving averages")

    for (obs, reduction, shape, _, _, total, _), at, sat in zip(
        active, low_at, sum_at, strict=False
    ):
        snapshot = _Synced(total)
        if reduction == "minmax":
            _store(obs, "min_val", lows[at], shape)
            _store(obs, "max_val", -lows[at + 1], shape)
        elif reduction == "weighted_mean":
            _store(obs, "min_val", summed[sat] / total, shape)
            _store(obs, "max_val", summed[sat + 1] / total, shape)
        elif reduction == "histogram":
            lo, neg_hi, x_min, neg_x_max = lows[at].unbind()
            _store(obs, "histogram", summed[sat].clamp_min(0), (int(obs.bins),))
            _store(obs, "hist_range", torch.stack([lo, -neg_hi]), (2,))
            _store(obs, "min_val", x_min, ())
            _store(obs, "max_val", -neg_x_max, ())
            snapshot = _Synced(total, obs.histogram.detach().clone(), (float(lo), float(-neg_hi)))
        count = obs.num_batches
        if count.dim() == 0:
            count.fill_(total)
        else:
            obs.num_batches = torch.tensor(total, dtype=torch.int64, device=count.device)
        obs.__dict__[_SYNCED_ATTR] = snapshot


def _rebinned(hist: Tensor, span: tuple[float, ...], lo: float, hi: float, bins: int) -> Tensor:
    """``hist`` over ``span`` as ``bins`` float64 bins over ``[lo, hi]`` (a copy if unchanged)."""
    hist = hist.to(torch.float64)
    if (span[0], span[1]) == (lo, hi) and hist.numel() == bins:
        return hist
    return rebin(hist, span[0], span[1], lo, hi, bins)


def _store(module: nn.Module, name: str, value: Tensor, shape: tuple[int, ...]) -> None:
    """Write ``value`` into buffer ``name`` (its dtype and device), in place when shapes agree."""
    current: Tensor = getattr(module, name)
    value = value.reshape(shape)
    if tuple(current.shape) == shape:
        current.copy_(value)
    else:
        setattr(module, name, value.to(device=current.device, dtype=current.dtype))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _reduce_by_merge(ctx: DistributedContext, observers: list[tuple[str, nn.Module]]) -> None:
    """Gather every rank's state of each observer and fold them with ``merge``, in rank order."""
    import torch.distributed as dist

    if not observers:
        return
    mine = [{k: v.detach().cpu() for k, v in obs.state_dict().items()} for _, obs in observers]
    gathered: list[Any] = [None] * ctx.world_size
    with _collective(ctx, "gathering observer states to merge"):
        dist.all_gather_object(gathered, mine, group=ctx.group)
    for i, (path, obs) in enumerate(observers):
        merge: Callable[[nn.Module], None] | None = getattr(obs, "merge", None)
        if not callable(merge):
            raise CalibrationError(
                f"observer {type(obs).__qualname__} at {path!r} declares reduction = 'merge' "
                "but has no merge(other) method; implement merge, or declare another reduction"
            )
        total = copy.deepcopy(obs)
        total.load_state_dict(gathered[0][i])
        for states in gathered[1:]:
            other = copy.deepcopy(obs)
            other.load_state_dict(states[i])
            total.merge(other)  # type: ignore[operator]
        device = next((t.device for t in obs.buffers()), torch.device("cpu"))
        obs.load_state_dict({k: v.to(device) for k, v in total.state_dict().items()})


def _broadcast_shared(
    ctx: DistributedContext, shared: list[tuple[str, nn.Module]], reports: list[_Report]
) -> None:
    """Give every rank group-rank 0's state of each quantizer that no observer feeds."""
    import torch.distributed as dist

    if not shared:
        return
    layout = dict(reports[0].shared)
    targets: list[tuple[nn.Module, str, Tensor, bool]] = []
    for path, quantizer in shared:
        wanted = {name: (shape, dtype) for name, shape, dtype in layout[path]}
        for name, tensor in _tensors_of(quantizer):
            shape, _ = wanted[name]
            is_param = isinstance(tensor, nn.Parameter)
            if tuple(tensor.shape) != shape:
                if is_param:
                    raise CalibrationError(
                        f"quantizer parameter {path}.{name} has shape {tuple(tensor.shape)} on "
                        f"rank {ctx.rank} but {shape} on rank 0; every rank must build the same "
                        "quantizers"
                    )
                owner_path, _, leaf = name.rpartition(".")
                owner = quantizer.get_submodule(owner_path) if owner_path else quantizer
                owner._buffers[leaf] = tensor = torch.empty(
                    shape, dtype=tensor.dtype, device=tensor.device
                )
            targets.append((quantizer, name, tensor, is_param))
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for _, _, tensor, _ in targets:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    src = ctx.global_rank(0)
    with torch.no_grad(), _collective(ctx, "broadcasting quantizer state from rank 0"):
        for tensors in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1).to(ctx.device) for t in tensors])
            dist.broadcast(flat, src=src, group=ctx.group)
            for tensor, part in zip(
                tensors, torch.split(flat, [t.numel() for t in tensors]), strict=False
            ):
                tensor.copy_(part.reshape(tensor.shape))
    for _, quantizer in shared:
        refresh = getattr(quantizer, "_after_load", None)
        if callable(refresh):
            refresh()


# --------------------------------------------------------------------------- the entry point


def sync_observers(
    model: nn.Module,
    process_group: ProcessGroup | None = None,
    *,
    timeout: datetime.timedelta | float | None = None,
) -> int:
    """Reduce every observer of ``model`` across the ranks of ``process_group``; collective.

    Afterwards every rank holds the same observer state (what one process that saw every
    rank's data would hold, see the module docstring for each observer's reduction), and
    QAT quantizers agree too: those whose qparams follow an observer are recomputed from
    the reduced observer, all others (learnable LSQ steps, fixed quantizers) get rank 0's
    state. ``model`` may be wrapped in ``DistributedDataParallel``. Returns how many
    observers were reduced: 0 when ``torch.distributed`` is not initialized or the group
    has one rank (nothing changes). ``timeout`` bounds the first barrier (gloo); every
    other collective uses the process group's timeout. ``qswap.calibrate`` calls this
    itself; call it directly for models you observe yourself, or after
    ``optimizer.step()`` in QAT under DDP.

    >>> import torch, qswap
    >>> prepared = qswap.prepare(torch.nn.Linear(4, 2), "w8a8_minmax")
    >>> sync_observers(prepared)
    0
    """
    ctx = distributed_context(process_group, timeout)
    if ctx is None:
        return 0
    root = _unwrap(model)
    observers = _find_observers(root)
    kinds: list[str] = []
    for path, observer in observers:
        found = reduction_of(observer)
        if found is None:
            raise _missing_reduction(path, observer)
        kinds.append(found)
    fed, shared = _find_quantizers(root)
    report = _Report(
        error=None,
        observers=tuple(_info(p, o, k) for (p, o), k in zip(observers, kinds, strict=False)),
        shared=tuple(
            (path, tuple((n, tuple(t.shape), str(t.dtype)) for n, t in _tensors_of(q)))
            for path, q in shared
        ),
    )
    reports = _handshake(ctx, report)
    _check_reports(ctx, reports)
    with torch.no_grad():
        builtin = [
            (i, obs, kind)
            for i, ((_, obs), kind) in enumerate(zip(observers, kinds, strict=False))
            if kind in ("minmax", "weighted_mean", "histogram")
        ]
        _reduce_builtin(ctx, builtin, reports)
        _reduce_by_merge(ctx, [po for po, k in zip(observers, kinds, strict=False) if k == "merge"])
        for (path, obs), kind in zip(observers, kinds, strict=False):
            if kind == "custom":
                with _collective(ctx, f"running {type(obs).__qualname__}.reduce_state at {path!r}"):
                    obs.reduce_state(ctx.group)  # type: ignore[operator]
        for quantizer, observer in fed:
            if _batches(observer) != 0 and getattr(observer, "seen", True) is not False:
                quantizer.set_qparams(observer.calculate_qparams())  # type: ignore[operator]
        _broadcast_shared(ctx, shared, reports)
    return len(observers)
