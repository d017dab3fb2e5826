"""Sequential calibration: weight methods solved block by block, in bounded memory.

A weight method keeps statistics per layer until ``convert`` solves it: GPTQ holds an
``in x in`` Hessian for every layer, which for a 7B language model is tens of GB at once.
``qswap.calibrate(prepared, batches, sequential=True)`` instead runs the model's repeated
blocks (the ``nn.ModuleList`` holding most of its method layers: a decoder's layers) one at
a time:

1. every batch runs up to the first block, whose inputs are kept (observers paused);
2. for each block in turn: it runs on the kept inputs (its observers and methods record),
   its outputs replace the kept inputs, and its methods are solved at once: the rounded
   weight is written into the prepared model, the statistics are freed
   (:class:`qswap.rounding.Solved` takes the method's place);
3. every batch runs once more with each block replaced by the outputs it computed, so the
   layers before and after the blocks (embeddings, the final norm, ``lm_head``) record.

At most one block's method statistics and one block's activations for all batches are held
at once. Each block sees the float outputs of the block before it, as in a whole-model
calibration, so the result is the same as ``sequential=False``'s, in less memory.
``sequential="quantized"`` instead runs each solved block once more with its rounded weights
(:func:`qswap.qparams.solved_weights`) and hands those outputs on: every block then fits
its weights to the inputs the quantized model will really give it, and can make up for the
rounding of the blocks before it, as GPTQ's reference implementation calibrates.
The blocks must be called once each, in order, each taking the previous block's output as
its first floating-point input and the same other inputs (as a transformer's decoder layers
are): the first batch checks this before anything is solved. ``sequential=True`` runs in
one process (not with ``torch.distributed``) and not in QAT.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qswap.exceptions import CalibrationError
from qswap.progress import bar as progress_bar
from qswap.slots import activation_owner, input_method, paused

__all__ = ["calibrate_blocks", "find_blocks"]


class _Stop(Exception):
    """Raised by the hook on the first block once its inputs are kept: the rest need not run."""


@dataclass
class _Inputs:
    """What one batch passes to a block: the carried hidden state at ``where``, the rest as is."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    where: int | str  # index into args, or key of kwargs

    def hidden(self) -> torch.Tensor:
        found = self.args[self.where] if isinstance(self.where, int) else self.kwargs[self.where]
        return found  # type: ignore[no-any-return]

    def snapshot(self) -> _Inputs:
        """A copy whose objects are its own and whose tensors are shared: a block run on it
        leaves this one as it was (a transformers KV cache passed in grows on every call)."""
        memo: dict[int, Any] = {}
        _share_tensors((self.args, self.kwargs), memo, depth=6)
        return _Inputs(copy.deepcopy(self.args, memo), copy.deepcopy(self.kwargs, memo), self.where)

    def carrying(self, hidden: torch.Tensor) -> _Inputs:
        if isinstance(self.where, int):
            args = (*self.args[: self.where], hidden, *self.args[self.where + 1 :])
            return _Inputs(args, self.kwargs, self.where)
        return _Inputs(self.args, {**self.kwargs, self.where: hidden}, self.where)


def _share_tensors(value: Any, memo: dict[int, Any], depth: int) -> None:
    """Enter every tensor reachable from ``value`` in ``memo``: ``copy.deepcopy`` keeps them."""
    if isinstance(value, torch.Tensor):
        memo[id(value)] = value
        return
    if depth == 0 or id(value) in memo:
        return
    if isinstance(value, dict):
        items: Iterable[Any] = value.values()
    elif isinstance(value, (list, tuple, set)):
        items = value
    else:
        items = getattr(value, "__dict__", {}).values()
    for item in items:
        _share_tensors(item, memo, depth - 1)


def _first_float(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | str | None:
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return i
    for key, a in kwargs.items():
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return key
    return None


def _first_float_out(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_float_out(item)
            if found is not None:
                return found
    return None


def find_blocks(model: nn.Module, method_layers: Iterable[str]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of two or more blocks that holds the most method layers.

    >>> layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    >>> find_blocks(nn.Sequential(layers), ["0.0", "0.1"])[0]
    '0'
    """
    names = list(method_layers)
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        prefix = f"{path}." if path else ""
        count = sum(1 for n in names if n.startswith(prefix))
        if count and (best is None or count > best[0]):  # the outer list wins a tie
            best = (count, path, module)
    if best is None:
        raise CalibrationError(
            "sequential calibration solves weight methods block by block, but no nn.ModuleList "
            "of two or more blocks holds this model's method layers "
            f"({', '.join(repr(n) for n in names[:3]) or 'none'}); calibrate with "
            "sequential=False"
        )
    return best[1], best[2]


@dataclass
class _Probe:
    """What the first batch's full run showed of the blocks: their order and what they carry."""

    count: int
    order: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    last_out: torch.Tensor | None = None
    rest: tuple[Any, ...] | None = None

    def before(self, i: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.order.append(i)
        where = _first_float(args, kwargs)
        if where is None:
            self.problems.append(f"block {i} got no floating-point input")
            return
        hidden = args[where] if isinstance(where, int) else kwargs[where]
        if i and (self.last_out is None or not torch.equal(hidden, self.last_out)):
            self.problems.append(f"block {i}'s input is not block {i - 1}'s output")
        rest = tuple(
            id(v)
            for k, v in [*enumerate(args), *kwargs.items()]
            if k != where and isinstance(v, torch.Tensor)
        )
        if self.rest is not None and rest != self.rest:
            self.problems.append(f"block {i} gets other tensors than block 0 besides its input")
        self.rest = rest

    def after(self, output: Any) -> None:
        self.last_out = _first_float_out(output)

    def check(self, path: str) -> None:
        if self.order != list(range(self.count)):
            self.problems.insert(0, f"the blocks ran in the order {self.order[:8]}")
        if self.problems:
            raise CalibrationError(
                f"sequential calibration runs the blocks of {path!r} one at a time, feeding each "
                f"the previous one's output, but on the first batch {self.problems[0]}; "
                "calibrate with sequential=False"
            )


class _Replay(nn.Module):
    """Stands in for a block in the last pass: returns what the last block computed."""

    def __init__(self, outputs: list[Any]) -> None:
        super().__init__()
        self.outputs = outputs
        self.batch = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs[self.batch]


def _keep_inputs(
    model: nn.Module, block: nn.Module, batches: Iterator[tuple[tuple[Any, ...], dict[str, Any]]]
) -> Iterator[_Inputs]:
    """Each batch run up to ``block``: the inputs it would get (observers paused)."""
    kept: list[_Inputs] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        where = _first_float(args, kwargs)
        assert where is not None  # the probe checked
        kept.append(_Inputs(args, dict(kwargs), where))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for args, kwargs in batches:
            with paused(), contextlib.suppress(_Stop):
                model(*args, **kwargs)
            if not kept:
                raise CalibrationError(
                    "sequential calibration: a batch ran through the model without calling its "
                    "first block; calibrate with sequential=False"
                )
            yield kept.pop()
    finally:
        handle.remove()


def calibrate_blocks(
    prepared: nn.Module,
    batches: Iterable[tuple[tuple[Any, ...], dict[str, Any]]],
    solve: Any,
    *,
    show: bool,
    rounded: Callable[[list[str]], AbstractContextManager[Any]] | None = None,
) -> int:
    """Calibrate ``prepared`` block by block (the module docstring); returns the batch count.

    ``batches`` yields ``(args, kwargs)``; ``solve(names)`` solves the weight methods of the
    named layers (``qswap.qparams.solve_methods`` bound to the model's plan). With
    ``rounded(names)`` (``qswap.qparams.solved_weights``), a solved block runs again with its
    rounded weights and the next block calibrates on those outputs instead of the float ones.
    """
    methods = [  # a container's input slot is its first child's: the child is named
        n
        for n, m in prepared.named_modules()
        if input_method(m) is not None and activation_owner(m, "input") is m
    ]
    path, blocks = find_blocks(prepared, methods)
    items = iter(batches)
    first = next(items, None)
    if first is None:
        return 0
    probe = _Probe(len(blocks))
    handles = [
        block.register_forward_pre_hook(
            lambda m, a, k, i=i: probe.before(i, a, k), with_kwargs=True
        )
        for i, block in enumerate(blocks)
    ] + [block.register_forward_hook(lambda m, a, o: probe.after(o)) for block in blocks]
    try:
        with paused():
            prepared(*first[0], **first[1])
    finally:
        for handle in handles:
            handle.remove()
    probe.check(path)
    everything = [first, *items]
    kept = list(_keep_inputs(prepared, blocks[0], iter(everything)))
    prefix = f"{path}." if path else ""
    bar = progress_bar(
        None, total=len(blocks), desc="qswap sequential calibration", unit="block", show=show
    )
    outputs: list[Any] = []
    try:
        for i, block in enumerate(blocks):
            # the rounded run below takes the inputs as they were before this one
            again = [inputs.snapshot() for inputs in kept] if rounded is not None else []
            outputs = []
            for inputs in kept:
                outputs.append(block(*inputs.args, **inputs.kwargs))
            own = f"{prefix}{i}."
            names = [n for n in methods if n.startswith(own)]
            solve(names)
            if rounded is not None:  # what the quantized block hands the next one
                with rounded(names), paused():
                    outputs = [block(*inputs.args, **inputs.kwargs) for inputs in again]
                kept = again  # the rounded run's objects carry on (the float run's are dropped)
            carried = [_first_float_out(out) for out in outputs]
            kept = [inp.carrying(h) for inp, h in zip(kept, carried, strict=True)]  # type: ignore[arg-type]
            bar.update()
    finally:
        bar.close()
    del kept
    replays = [_Replay(outputs) for _ in blocks]
    originals = list(blocks)
    for i, replay in enumerate(replays):
        blocks[i] = replay
    try:
        for b, (args, kwargs) in enumerate(everything):
            for replay in replays:
                replay.batch = b
            prepared(*args, **kwargs)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return len(everything)
