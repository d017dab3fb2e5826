"""``convert`` and ``quantize``: turn a calibrated model into a quantized one for its backend.

``convert`` reads each layer's qparams from its observers, removes every observer,
hook and parametrization qswap added (the float weights and the user's hooks stay),
then fake-quantizes the layers that run on ``fake`` and hands the rest to the integer
backend's ``lower``. ``quantize`` is plan + prepare + calibrate + convert in one call.

    >>> import torch, qswap
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> qmodel = qswap.quantize(model, "w8a8_minmax", calib_data=[torch.randn(8, 4)])
    >>> type(qmodel[0]).__name__
    'LinearReLU'
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from qswap.bias_correction import apply_shift
from qswap.calibrate import calibrate
from qswap.config import QConfig
from qswap.exceptions import CalibrationError, PlanError
from qswap.plan import LayerSpec, Plan, gc_paused, set_eval
from qswap.prepare import prepare
from qswap.qat import TrainableFusion
from qswap.qparams import chain_inputs, collect_qparams
from qswap.registry import Backend, Registry
from qswap.slots import (
    activation_slot,
    input_method,
    param_location,
    parametrizations_of,
    strip_slots,
)
from qswap.state import STATE_ATTR, QSwapState, copy_model, state_of
from qswap.trace import RecursionRoom
from qswap.tree import replace_module

if TYPE_CHECKING:
    from qswap.persist.artifact import Calibration

__all__ = ["convert", "quantize"]


def convert(
    prepared: nn.Module,
    *,
    backend: str | None = None,
    inplace: bool = False,
    calibration: str | os.PathLike[str] | Calibration | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """The quantized model for the plan's backend, from a prepared and calibrated model.

    ``prepared`` is left as it is unless ``inplace=True``. ``backend`` may only repeat
    the backend the model was prepared for (observers differ per backend).
    ``calibration`` (a file from ``qswap.save_calibration``, or a loaded ``Calibration``)
    gives every layer's qparams instead of the observers, so ``prepared`` need not be
    calibrated; an artifact made for another model or config is refused. Weight methods
    (``weight: {method: gptq}``) round their layers here, with a progress bar on stderr
    (``progress``; default: when stderr is a terminal).

    >>> import torch, qswap
    >>> prepared = qswap.prepare(torch.nn.Linear(4, 2), "w8a8_minmax")
    >>> qmodel = qswap.convert(qswap.calibrate(prepared, [torch.randn(8, 4)]))
    >>> sorted(qmodel._qswap.layers[""].qparams)
    ['input', 'output', 'weight']
    """
    state = state_of(prepared)
    if state is None:
        raise PlanError(
            f"convert() needs a model returned by qswap.prepare() and calibrated, got a "
            f"{type(prepared).__name__} that qswap did not prepare; use qswap.quantize(model, "
            "config, calib_data=...) to do all steps at once"
        )
    if state.stage != "prepared":
        raise PlanError("convert() got a model that is already converted; convert it only once")
    if state.failed is not None and calibration is None:
        raise CalibrationError(
            f"the last calibrate() on this model stopped early ({state.failed}), so its "
            "observers hold statistics of part of the data. Fix the data and call calibrate() "
            "again (it adds to what they saw), or prepare the float model afresh"
        )
    the_plan = state.plan
    target = the_plan.backend
    if backend is not None and backend != target.name:
        raise PlanError(
            f"this model was prepared for backend {target.name!r}, not {backend!r}; the observers "
            f"differ per backend, so prepare the float model with backend {backend!r}"
        )
    reused: dict[str, LayerSpec] | None = None
    if calibration is not None:
        from qswap.persist.artifact import calibrated_layers

        reused = calibrated_layers(prepared, the_plan, calibration)
    with gc_paused():
        model = prepared if inplace else copy_model(prepared, share=_observers(prepared, the_plan))
        layers = (
            reused
            if reused is not None
            else collect_qparams(
                model, the_plan, state.layers, round_weights=True, progress=progress
            )
        )
        layers = chain_inputs(model, state, layers)
        registry = state.registry
        for name, layer in layers.items():
            module = model.get_submodule(name)
            apply_shift(module, layer.bias_shift)
            if isinstance(module, TrainableFusion):
                # QAT conv/linear + BN: fold with the trained statistics, then as PTQ
                strip_slots(module, layer)
                model = replace_module(model, (name, *layer.aliases), module.fold())
            elif not registry.backend(layer.backend).keeps_observers:
                strip_slots(module, layer)
        args = state.example_args
        kwargs = state.example_kwargs
        # every backend that runs a layer lowers its own: fallbacks first, the config's last
        names = {layer.backend for layer in layers.values()} - {target.name}
        for bname in [*sorted(names), target.name]:
            own = {name: layer for name, layer in layers.items() if layer.backend == bname}
            if own or (bname == target.name and target.integer):
                model = _lower(registry.backend(bname), model, own, args, kwargs, the_plan)
    room = RecursionRoom.needed(model)
    if room is not None:  # hooks add frames per level: a very deep model needs more stack
        model.register_forward_pre_hook(room.enter, prepend=True)
        model.register_forward_hook(room.exit, always_call=True)
    object.__setattr__(
        model,
        STATE_ATTR,
        QSwapState(
            plan=the_plan,
            registry=state.registry,
            stage="converted",
            example_args=args,
            example_kwargs=dict(kwargs),
            layers=layers,
        ),
    )
    return model


def _observers(model: nn.Module, the_plan: Plan) -> list[nn.Module]:
    """The observer modules of a prepared model: convert only reads them, so a copy may share them."""
    found: list[nn.Module] = []
    for name, layer in the_plan.layers.items():
        module = model.get_submodule(name)
        for slot in layer.param_specs():
            owner, pname = param_location(module, slot)
            found.extend(parametrizations_of(owner, pname))
        for which in ("input", "output"):
            slot_module = activation_slot(module, which)
            if slot_module is not None and slot_module.observer is not None:
                found.append(slot_module.observer)
        stats = input_method(module)
        if stats is not None:  # a weight method's statistics (input Hessians...)
            found.append(stats)
    return found


def _lower(
    backend: Backend,
    model: nn.Module,
    layers: Mapping[str, LayerSpec],
    args: tuple[Any, ...] | None,
    kwargs: Mapping[str, Any],
    the_plan: Plan,
) -> nn.Module:
    """Hand ``layers`` to their backend's ``lower`` (``qswap.registry.Lowering``)."""
    if backend.lower is None:
        raise PlanError(
            f"backend {backend.name!r} has no lower function, so it cannot run layers; "
            "register it with Backend(..., lower=...) or a pack's `lower:`"
        )
    if backend.integer:
        if args is None and the_plan.config.mode in ("static", "qat"):
            raise CalibrationError(
                f"convert() for backend {backend.name!r} needs example inputs to place "
                "quant/dequant boundaries; pass example_inputs= to prepare() or run "
                "calibrate() first"
            )
        set_eval(model)
    lowered: nn.Module = backend.lower(model, layers, tuple(args or ()), dict(kwargs))
    return lowered


def quantize(
    model: nn.Module,
    config: QConfig | Plan | Mapping[str, Any] | str | os.PathLike[str],
    *,
    calib_data: Iterable[Any] | None = None,
    example_inputs: Any = None,
    registry: Registry | None = None,
    max_batches: int | None = None,
    progress: bool | None = None,
    sequential: bool | Literal["quantized"] = False,
) -> nn.Module:
    """Plan, prepare, calibrate on ``calib_data`` and convert, in one call; ``model`` is untouched.

    Static and QAT modes calibrate activation ranges and need ``calib_data``; weight-only
    and dynamic modes need none (unless bias correction measures inputs). Without
    ``example_inputs`` the first calibration batch is the example the plan traces (fusion
    across the model's own ``forward``, inputs shared between layers); a one-shot iterable
    still calibrates on every batch. ``sequential=True`` calibrates block by block, solving
    weight methods in bounded memory; ``"quantized"`` also feeds each block the rounded blocks'
    outputs (``qswap.calibrate``'s option of that name).

    >>> import torch, qswap
    >>> x = torch.randn(16, 4)
    >>> qmodel = qswap.quantize(torch.nn.Linear(4, 2), "w8a8_minmax", calib_data=[x])
    >>> qmodel.weight.shape
    torch.Size([2, 4])
    >>> qswap.quantize(torch.nn.Linear(4, 2), "w4_per_group").weight.shape
    torch.Size([2, 4])
    """
    if example_inputs is None and calib_data is not None:
        # the first batch is the example: the plan traces it (fusion across the model's own
        # forward, inputs shared between layers) as it would have with example_inputs=
        example_inputs, calib_data = _peek(calib_data)
    prepared = prepare(model, config, example_inputs=example_inputs, registry=registry)
    if calib_data is None:
        cfg = state_of(prepared).plan.config  # type: ignore[union-attr]
        needs = cfg.mode in ("static", "qat") or (cfg.bias_correction and cfg.mode == "weight_only")
        if needs:
            what = (
                "bias_correction measures each layer's mean input"
                if cfg.mode == "weight_only"
                else f"mode {cfg.mode!r} calibrates activation ranges"
            )
            raise CalibrationError(
                f"quantize() got no calib_data, but {what} on data: pass calib_data=[batch, ...] "
                "(tensors, tuples of arguments or dicts of keyword arguments)"
            )
        return convert(prepared, inplace=True, progress=progress)
    calibrate(
        prepared, calib_data, max_batches=max_batches, progress=progress, sequential=sequential
    )
    return convert(prepared, inplace=True, progress=progress)


class _Resumed:
    """An iterable of batches whose first one was already taken out, and put back."""

    def __init__(self, first: Any, rest: Iterator[Any], size: int | None) -> None:
        self._items: Iterator[Any] | None = itertools.chain([first], rest)
        self._size = size

    def __iter__(self) -> Iterator[Any]:
        items, self._items = self._items, None
        if items is None:  # a one-shot iterable stays one-shot
            return iter(())
        return items

    def __len__(self) -> int:
        if self._size is None:
            raise TypeError("this iterable of batches has no length")
        return self._size


def _peek(calib_data: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
    """The first batch of ``calib_data`` (None if there is none) and batches that still hold it.

    >>> _peek([1, 2])
    (1, [1, 2])
    >>> first, rest = _peek(iter([1, 2]))
    >>> first, list(rest)
    (1, [1, 2])
    """
    if isinstance(calib_data, torch.Tensor):
        return calib_data, calib_data  # one batch (calibrate takes a tensor as one)
    if isinstance(calib_data, Sequence) and not isinstance(calib_data, (str, bytes)):
        return (calib_data[0] if len(calib_data) else None), calib_data
    size: int | None
    try:
        size = len(calib_data)  # type: ignore[arg-type]
    except TypeError:
        size = None
    it = iter(calib_data)
    try:
        first = next(it)
    except StopIteration:
        return None, []
    return first, _Resumed(first, it, size)
