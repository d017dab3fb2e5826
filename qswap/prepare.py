"""``prepare``: fuse a copy of the model and attach observers, as the plan says.

Nothing is rewritten: weights are observed through ``torch.nn.utils.parametrize``,
inputs and outputs through forward hooks (``qswap.slots``), with the observers the registry
names in the config. The prepared model carries its plan on a private attribute
(``qswap.state``), not as a submodule, so its ``state_dict`` holds only tensors.

    >>> import torch, qswap
    >>> prepared = qswap.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a8_minmax")
    >>> qswap.calibrate(prepared, [torch.randn(2, 4)]) is prepared
    True
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from qswap.bias_correction import InputMeanObserver, correctable
from qswap.config import QConfig, QuantSpec
from qswap.dataflow import input_sources, keeps_input_grid
from qswap.decompose import decompose_in_place
from qswap.exceptions import FallbackWarning, PlanError
from qswap.plan import LayerSpec, Plan, gc_paused, plan, split_inputs
from qswap.registry import Registry, default_registry
from qswap.slots import (
    ActivationSlot,
    Components,
    WeightObserver,
    activation_slot,
    attach_activation,
    attach_parametrization,
    param_location,
    unquantized,
)
from qswap.state import STATE_ATTR, QSwapState, copy_model, state_of

__all__ = ["prepare"]


# --------------------------------------------------------------------------- prepare


def _device_of(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


def prepare(
    model: nn.Module,
    config: QConfig | Plan | Mapping[str, Any] | str | os.PathLike[str],
    *,
    example_inputs: Any = None,
    registry: Registry | None = None,
    inplace: bool = False,
) -> nn.Module:
    """A fused copy of ``model`` with observers attached, ready for ``calibrate``.

    ``config`` is a QConfig, dict, YAML path or text, preset name, or a ``Plan`` made
    for this model. The user's model is untouched unless ``inplace=True``; devices,
    dtypes and existing hooks are kept.

    >>> import torch, qswap
    >>> prepared = qswap.prepare(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), "w8a8_minmax")
    >>> type(prepared[0]).__name__
    'ConvReLU2d'
    """
    if state_of(model) is not None:
        raise PlanError(
            f"this {type(model).__name__} was already prepared or converted by qswap; "
            "prepare the float model instead"
        )
    reg = registry if registry is not None else default_registry()
    if isinstance(config, Plan):
        the_plan = config
        if the_plan.model_type is not type(model):
            raise PlanError(
                f"the plan was made for a {the_plan.model_type.__name__}, not for this "
                f"{type(model).__name__}; call qswap.plan on this model"
            )
        reg = the_plan.registry if registry is None else reg
    else:
        the_plan = plan(model, config, example_inputs=example_inputs, registry=reg)
        summary = the_plan.fallback_summary()
        if summary is not None:  # said once, briefly: the plan has every reason
            warnings.warn(summary, FallbackWarning, stacklevel=_caller_level())
    inputs = split_inputs(example_inputs)
    with gc_paused():
        target = model if inplace else copy_model(model)
        decompose_in_place(target, reg)  # as the plan saw it (qswap.decompose)
        groups = the_plan.fusion_groups
        if groups:
            if the_plan.config.mode == "qat":
                from qswap.qat import fuse_for_qat

                # conv/linear + BN stay trainable; BN is folded at convert (qswap.qat)
                fuse_for_qat(target, groups, reg)
            else:
                from qswap.fuse import fuse_model

                fuse_model(target, groups, reg)  # eval-mode BN folding
        layers = dict(the_plan.layers)
        if the_plan.config.mode == "static" and inputs is not None:
            for name, producer in _shared_inputs(target, the_plan, inputs[0], inputs[1]).items():
                layers[name] = replace(layers[name], input_from=producer)
        _attach_observers(target, the_plan, layers, Components(reg))
        if the_plan.config.mode == "qat" and inputs is not None:
            _tie_inputs(target, the_plan, inputs[0], inputs[1])
    state = QSwapState(
        plan=the_plan,
        registry=reg,
        stage="prepared",
        example_args=inputs[0] if inputs is not None else None,
        example_kwargs=inputs[1] if inputs is not None else {},
        layers=layers,
    )
    object.__setattr__(target, STATE_ATTR, state)
    return target


def _caller_level() -> int:
    """The stacklevel of the first frame outside qswap (prepare, or quantize calling it)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("qswap."):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def _shared_inputs(
    model: nn.Module,
    the_plan: Plan,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    training: bool = False,
) -> dict[str, str]:
    """Layer -> the layer whose quantized output it takes as input (from the plan's trace).

    That tensor reaches the layer on the producer's grid (through ReLU, pooling, flatten...),
    so one observer (static PTQ) or quantizer (QAT, ``training``), the producer's output
    one, serves both: as PyTorch's FX flow observes each tensor once. Empty when the plan's
    trace does not tell the fused dataflow.
    """

    t = the_plan.fused_trace(model, args, kwargs, training=training)
    if t is None:
        return {}
    layers = the_plan.layers
    producers = {name for name, layer in layers.items() if layer.output is not None}
    return input_sources(t, layers, producers)


def _tie_inputs(
    model: nn.Module, the_plan: Plan, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """QAT: a layer fed another layer's quantized output uses that output's quantizer.

    An int8 model hands the producer's tensor on as it is (through pooling, ReLU,
    flatten...); tying the input slot to the producer's output quantizer makes QAT train
    that very graph: one quantizer per tensor, its qparams (or learned step) shared.
    """

    # QAT models train: a trace in training mode will do
    for name, producer in _shared_inputs(model, the_plan, args, kwargs, training=True).items():
        mine = activation_slot(model.get_submodule(name), "input")
        theirs = activation_slot(model.get_submodule(producer), "output")
        if mine is None or theirs is None or theirs.quantizer is None:
            continue
        mine.use(observer=None, quantizer=theirs.quantizer)
        mine.requant = False
        mine.follows = producer


def _weight_observer(
    module: nn.Module, slot: str, observer: nn.Module, quantizer: nn.Module | None
) -> WeightObserver:
    """The parametrization for a weight slot: folds BatchNorm in for a QAT conv+BN group."""
    if quantizer is not None and slot == "weight":
        from qswap.qat import FoldedWeightObserver, TrainableFusion

        if isinstance(module, TrainableFusion):
            return FoldedWeightObserver(observer, quantizer, module.bn)
    return WeightObserver(observer, quantizer)


def _input_mean(module: nn.Module, layer: LayerSpec, spec: QuantSpec) -> InputMeanObserver | None:
    """The input-mean recorder bias correction needs for this layer, if it can be corrected."""
    core = correctable(module)
    if core is None or layer.weight is None:
        return None
    return InputMeanObserver(spec, kind="linear" if isinstance(core, nn.Linear) else "conv")


def _weight_method(
    name: str, module: nn.Module, layer: LayerSpec, components: Components
) -> nn.Module | None:
    """The weight method (``weight: {method: ...}``) recording this layer's inputs, if any."""
    spec = layer.weight
    if spec is None or spec.method is None:
        return None
    method: Any = components.create("method", spec)
    if not getattr(method, "records_inputs", True):
        return None  # round to nearest: nothing to record
    # as stored: reading the attribute would run the weight observer attached just before
    weight = unquantized(*param_location(module, "weight"))
    if weight.dim() != 2:
        shape = tuple(weight.shape)
        raise PlanError(
            f"layer {name!r} ({layer.module_type.__name__}): weight method "
            f"{spec.method.name!r} rounds 2-D weights (Linear, Conv1D), this weight has shape "
            f"{shape}. Round this layer to nearest with a rule: {{match: {{name: '{name}'}}, "
            "weight: {method: rtn}}"
        )
    modes: frozenset[str] = getattr(layer.counterpart, "input_scale_modes", frozenset())
    if getattr(method, "scales_inputs", False) and layer.mode not in modes:
        counterpart = getattr(layer.counterpart, "__name__", "the generic counterpart")
        raise PlanError(
            f"layer {name!r}: weight method {spec.method.name!r} scales the layer's inputs, "
            f"which its counterpart on backend {layer.backend!r} ({counterpart}) cannot apply "
            f"in mode {layer.mode!r}. Use a backend and mode whose layers take an input scale "
            "(backend: packed, mode: weight_only, preset w4_packed; backend: x86, mode: "
            "dynamic, preset x86_dynamic_int8), or method: gptq"
        )
    return method  # type: ignore[no-any-return]


def _attach_observers(
    model: nn.Module, the_plan: Plan, layers: Mapping[str, LayerSpec], components: Components
) -> None:

    mode = the_plan.config.mode
    qat = mode == "qat"
    correct_bias = the_plan.config.bias_correction and mode in ("static", "weight_only")
    # a tensor several layers share with one spec (the plan's ties): one observer. A layer
    # the plan untied (a weight method fits its own copy) has its own spec and observer
    tied: dict[tuple[int, QuantSpec], WeightObserver] = {}
    for name, layer in layers.items():
        module = model.get_submodule(name)
        for slot, spec in layer.param_specs().items():
            owner, pname = param_location(module, slot)
            tensor = owner._parameters.get(pname)  # else parametrized by the user already
            observer = tied.get((id(tensor), spec)) if tensor is not None else None
            if observer is None:
                quantizer = components.create("quantizer", spec) if qat else None
                observer = _weight_observer(
                    module, slot, components.create("observer", spec), quantizer
                )
                device = tensor.device if tensor is not None else _device_of(owner)
                if device is not None and device.type != "cpu":
                    observer.to(device)
                if tensor is not None and type(observer) is WeightObserver:
                    tied[(id(tensor), spec)] = observer
            attach_parametrization(owner, pname, observer)
        stats = _weight_method(name, module, layer, components)
        if mode not in ("static", "qat"):
            # weight_only: no activations; dynamic: quantized per batch at run time
            mean = _input_mean(module, layer, the_plan.config.activation) if correct_bias else None
            if mean is not None or stats is not None:  # record the layer's inputs only
                _attach_slot(module, "input", ActivationSlot(), mean, _device_of(module), stats)
            continue
        acts = layer.activation_specs()
        if not acts or keeps_input_grid(layer):
            # nothing to observe (a pooling layer on its chained input's grid): a weight
            # method still records the inputs
            if stats is not None:
                _attach_slot(module, "input", ActivationSlot(), None, _device_of(module), stats)
            continue
        device = _device_of(module)
        for which, spec in acts.items():
            if which == "input" and layer.input_from is not None:
                # observed as the producer's output; bias correction still needs the mean here
                mean = _input_mean(module, layer, spec) if correct_bias else None
                if mean is not None or stats is not None:
                    _attach_slot(module, "input", ActivationSlot(), mean, device, stats)
                continue
            slot_module = ActivationSlot(
                observer=components.create("observer", spec),
                quantizer=components.create("quantizer", spec) if qat else None,
                requant=qat,
            )
            mean = _input_mean(module, layer, spec) if which == "input" and correct_bias else None
            _attach_slot(
                module, which, slot_module, mean, device, stats if which == "input" else None
            )
        if "input" not in acts and stats is not None:
            _attach_slot(module, "input", ActivationSlot(), None, device, stats)


def _attach_slot(
    module: nn.Module,
    which: str,
    slot_module: ActivationSlot,
    mean: InputMeanObserver | None,
    device: torch.device | None,
    stats: nn.Module | None = None,
) -> None:
    """Hook ``slot_module`` on the module's device, with what records the layer's inputs.

    ``mean``: bias correction's input mean; ``stats``: the weight method's statistics.
    """
    if mean is not None:
        slot_module.add_module("mean", mean)
    if stats is not None:
        slot_module.add_module("stats", stats)
    if device is not None and device.type != "cpu":
        slot_module.to(device)
    attach_activation(module, which, slot_module)


# --------------------------------------------------------------------------- calibrate
