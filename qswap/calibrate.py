"""``calibrate``: run data through a prepared model so that its observers see it.

Each batch runs in eval mode without gradients; with ``torch.distributed`` initialized the
observers are reduced across the ranks afterwards (``qswap.distributed``).

    >>> import torch, qswap
    >>> prepared = qswap.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a8_minmax")
    >>> qswap.calibrate(prepared, [torch.randn(2, 4)]) is prepared
    True
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from qswap.exceptions import CalibrationError
from qswap.methods import learns_qparams
from qswap.plan import restore_training, set_eval, split_inputs
from qswap.progress import bar as progress_bar
from qswap.progress import stderr_is_tty
from qswap.slots import ActivationSlot, WeightObserver
from qswap.state import state_of
from qswap.trace import nesting_depth, recursion_room

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["calibrate"]


def calibrate(
    prepared: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    progress: bool | None = None,
    process_group: ProcessGroup | None = None,
    sequential: bool | Literal["quantized"] = False,
) -> nn.Module:
    """Run ``batches`` through a prepared model (eval mode, no grad) so its observers see data.

    Each batch is a tensor (one positional argument), a tuple or list (the positional
    arguments) or a dict (keyword arguments); a tensor given alone as ``batches`` is one
    batch (as ``qswap quantize --calib`` takes it), not one per row. ``progress`` shows a tqdm bar on stderr
    (default: only when stderr is a terminal). The first batch becomes the example
    input when ``prepare`` got none. Returns ``prepared``.

    When ``torch.distributed`` is initialized, ``batches`` is this rank's shard and the call
    is collective: the observers are then reduced across ``process_group`` (default: the
    world), so every rank ends with the same observers and ``convert`` gives the same
    qparams everywhere (see ``qswap.distributed``). A rank that raises here makes the
    others raise a ``CalibrationError`` naming it. With one process nothing changes.

    ``sequential=True`` bounds the memory weight methods (``weight: {method: gptq}``) take:
    the model's repeated blocks are calibrated one at a time and each block's methods are
    solved as soon as it has seen every batch, so only one block's statistics are held (see
    ``qswap.sequential``; the prepared model's method layers then hold their rounded weights).
    It needs every batch at once (they are kept), one process, and not QAT.
    ``sequential="quantized"`` also runs each solved block again with its rounded weights and
    calibrates the next block on those outputs (GPTQ's reference recipe): later blocks make
    up for earlier blocks' rounding, and the result differs from ``sequential=False``'s.

    >>> import torch, qswap
    >>> prepared = qswap.prepare(torch.nn.Linear(4, 4), "w8a8_minmax")
    >>> _ = qswap.calibrate(prepared, [torch.randn(2, 4)] * 3, max_batches=2, progress=False)
    """
    state = state_of(prepared)
    if state is None:
        raise CalibrationError(
            f"calibrate() needs a model returned by qswap.prepare(), got a "
            f"{type(prepared).__name__} that qswap did not prepare; call "
            "prepared = qswap.prepare(model, config) first and calibrate that"
        )
    if state.stage != "prepared":
        raise CalibrationError(
            "calibrate() got a model that qswap.convert() already converted; its observers are "
            "gone. Calibrate the prepared model before converting it"
        )
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise CalibrationError(
            f"max_batches must be a positive number of batches (or None for all), got "
            f"{max_batches!r}"
        )
    if isinstance(batches, torch.Tensor):
        batches = [batches]  # one batch, not one per row
    from qswap.distributed import check_reducible, distributed_context, report_failure

    if sequential not in (False, True, "quantized"):
        raise CalibrationError(
            f"sequential must be False, True (block by block, float inputs) or 'quantized' "
            f"(block by block, each block fed the rounded blocks' outputs), got {sequential!r}"
        )
    group = distributed_context(process_group)
    if sequential and (group is not None or state.plan.config.mode == "qat"):
        where = "under torch.distributed" if group is not None else "in QAT"
        raise CalibrationError(
            f"sequential calibration solves weight methods block by block in one process; it "
            f"does not run {where}. Calibrate with sequential=False"
        )
    if group is not None:
        check_reducible(prepared)  # every rank fails alike, before any batch runs
    show = progress if progress is not None else stderr_is_tty()
    total: int | None = None
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
        batches = itertools.islice(batches, max_batches)
    flags = set_eval(prepared)  # restored as they were when calibration ends
    seen = 0
    first: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    try:
        with torch.no_grad():
            bar = progress_bar(
                batches, total=total, desc="qswap calibrate", unit="batch", show=show
            )
            try:
                depth = nesting_depth(prepared)
                if sequential:
                    first, seen = _sequential(
                        prepared, bar, depth, show, rounded=sequential == "quantized"
                    )
                for batch in () if sequential else bar:
                    args, kwargs = _batch_inputs(batch, seen)
                    with recursion_room(depth):
                        _run(prepared, batch, args, kwargs, seen)
                    if first is None:
                        first = (args, kwargs)
                    seen += 1
            finally:
                bar.close()
        if first is None:
            raise CalibrationError(
                "calibrate() saw no batch: the iterable of batches was empty. Pass an iterable "
                "with one model input per batch (a tensor, a tuple of positional arguments or "
                "a dict of keyword arguments), e.g. [x[i:i + 32] for i in range(0, len(x), 32)]"
            )
    except BaseException as exc:
        state.failed = f"batch {seen + 1} raised {type(exc).__name__}: {str(exc)[:200]}"
        if group is not None and isinstance(exc, Exception):
            report_failure(group, exc)  # the other ranks raise instead of waiting for us
        raise
    finally:
        restore_training(flags)
    state.failed = None  # a calibration that ran to its end: what the observers hold is whole
    if state.example_args is None:
        state.example_args, state.example_kwargs = first
    if group is not None:
        from qswap.distributed import sync_observers

        sync_observers(prepared, process_group)
    if state.plan.config.mode == "qat":
        _start_learned_quantizers(prepared)  # after the merge: every rank starts alike
    return prepared


def _start_learned_quantizers(prepared: nn.Module) -> None:
    """Set learning quantizers (LSQ) from everything calibration observed, not its first batch.

    In QAT such a quantizer takes its qparams from the observer once, then trains them.
    """
    for module in prepared.modules():
        quantizer: Any = getattr(module, "quantizer", None)
        observer: Any = getattr(module, "observer", None)
        if not isinstance(module, (WeightObserver, ActivationSlot)) or quantizer is None:
            continue
        if observer is not None and observer.seen and learns_qparams(quantizer):
            quantizer.set_qparams(observer.calculate_qparams())


def _batch_inputs(batch: Any, index: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    split = split_inputs(batch)
    if split is None:
        raise CalibrationError(
            f"calibration batch {index} is None; each batch must be a tensor, a tuple of "
            "positional arguments or a dict of keyword arguments"
        )
    return split


def _sequential(
    prepared: nn.Module, batches: Iterable[Any], depth: int, show: bool, *, rounded: bool
) -> tuple[tuple[tuple[Any, ...], dict[str, Any]] | None, int]:
    """Calibrate block by block (``qswap.sequential``): the first batch's inputs, the count."""
    from qswap.qparams import solve_methods, solved_weights
    from qswap.sequential import calibrate_blocks

    state = state_of(prepared)
    assert state is not None
    pairs = [_batch_inputs(batch, i) for i, batch in enumerate(batches)]
    if not pairs:
        return None, 0
    with recursion_room(depth):
        seen = calibrate_blocks(
            prepared,
            pairs,
            lambda names: solve_methods(prepared, state.plan, state.layers, names),
            show=show,
            rounded=(
                (lambda names: solved_weights(prepared, state.plan, state.layers, names))
                if rounded
                else None
            ),
        )
    return pairs[0], seen


def _run(
    model: nn.Module, batch: Any, args: tuple[Any, ...], kwargs: dict[str, Any], index: int
) -> None:
    try:
        model(*args, **kwargs)
    except TypeError as exc:
        pairs = isinstance(batch, (tuple, list)) and len(batch) > 1
        if index == 0 and pairs and "argument" in str(exc):
            raise CalibrationError(
                f"calibration batch 0 is a {type(batch).__name__} of {len(batch)} items, which "
                f"calibrate() passes as {len(batch)} positional arguments, and the model "
                f"refused them ({exc}). If the batches are (inputs, labels) pairs, pass "
                "(x for x, _ in loader) instead"
            ) from exc
        raise
