"""Each layer's qparams, read from its observers (or learned quantizers) when calibration is done.

``convert`` and ``save_calibration`` both turn a calibrated model into per-layer qparams:
this is that one step. A layer fed another layer's quantized output takes that output's
qparams as its input ones (:func:`chain_inputs`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qswap.bias_correction import correctable, shift_of
from qswap.dataflow import input_sources, keeps_input_grid
from qswap.exceptions import CalibrationError, PlanError
from qswap.methods import learns_qparams
from qswap.progress import bar as progress_bar
from qswap.progress import stderr_is_tty
from qswap.quantizers import AffineQuantizer, QParams
from qswap.rounding import Rounded, Solved
from qswap.slots import (
    Components,
    WeightObserver,
    activation_slot,
    input_method,
    original_of,
    param_location,
    parametrization_list,
    parametrizations_of,
    unquantized,
)

if TYPE_CHECKING:
    from qswap.config import QuantSpec
    from qswap.plan import LayerSpec, Plan
    from qswap.state import QSwapState

__all__ = ["chain_inputs", "collect_qparams", "solve_methods"]


def collect_qparams(
    model: nn.Module,
    the_plan: Plan,
    layers: Mapping[str, LayerSpec],
    *,
    round_weights: bool = False,
    progress: bool | None = None,
) -> dict[str, LayerSpec]:
    """Each layer's spec with the qparams its observers computed (unseen activations dropped).

    A layer never called whose parameters calibration read (another module's code uses
    them) keeps its parameter qparams only; one never reached at all is an error.

    In QAT the weights are observed once more as they are now, and quantizers that learn
    their qparams (LSQ) give their learned ones. Every qparams is what the slot's quantizer
    actually uses (``pow2`` rounds scales to powers of two). An input observed at its
    producer (``LayerSpec.input_from``) is left to ``chain_inputs``.

    With ``round_weights`` (convert, on its own copy of the model) a layer whose weight
    spec names a method (``qswap.rounding``) gets its weight rounded by it, in place,
    with a progress bar over those layers (``progress``; default: when stderr is a terminal).
    """
    parts = Components(the_plan.registry)
    out: dict[str, LayerSpec] = {}
    rounding = {name for name in layers if input_method(model.get_submodule(name)) is not None}
    show = (progress if progress is not None else stderr_is_tty()) and round_weights
    bar = progress_bar(
        None,
        total=len(rounding),
        desc="qswap weight methods",
        unit="layer",
        show=bool(show and rounding),
    )
    try:
        for name, layer in layers.items():
            out[name] = _collect_layer(model, the_plan, name, layer, parts, round_weights)
            if name in rounding:
                bar.update()
    finally:
        bar.close()
    return out


def _collect_layer(
    model: nn.Module,
    the_plan: Plan,
    name: str,
    layer: LayerSpec,
    parts: Components,
    round_weights: bool,
) -> LayerSpec:
    """One layer's spec with its qparams (see :func:`collect_qparams`)."""
    mode = the_plan.config.mode
    module = model.get_submodule(name)
    qparams: dict[str, QParams] = {}
    read = False  # whether calibration read one of its parameters
    for slot, spec in layer.param_specs().items():
        owner, pname = param_location(module, slot)
        found = parametrizations_of(owner, pname)
        if not found:
            raise PlanError(
                f"layer {name!r}: its {slot} observer is missing; was the prepared model "
                "modified after qswap.prepare()?"
            )
        observer: Any = found[-1]
        read = read or bool(getattr(observer, "observer", observer).seen)
        if mode == "qat":
            with torch.no_grad():
                getattr(owner, pname)  # the parametrization observes the final weight
        learned = _learned(getattr(observer, "quantizer", None))
        if learned is not None:
            qparams[slot] = learned
            continue
        if isinstance(observer, WeightObserver):
            observer = observer.observer
        if not observer.seen:
            # a layer calibration never reached: its weight is known all the same
            observer = copy.deepcopy(observer)  # may be shared with the prepared model
            observer(original_of(owner, pname).detach())
        qparams[slot] = _effective(_qparams(observer, name, slot), spec, parts)
    changes = _apply_method(model, name, module, layer, qparams, parts, round_weights)
    shift = _bias_shift(module, layer, qparams.get("weight"), parts)
    if shift is not None:
        changes["bias_shift"] = shift
    if mode in ("static", "qat"):
        _activation_qparams(module, name, layer, parts, qparams, changes, read)
    return dataclasses.replace(layer, qparams=qparams, **changes)


def _activation_qparams(
    module: nn.Module,
    name: str,
    layer: LayerSpec,
    parts: Components,
    qparams: dict[str, QParams],
    changes: dict[str, Any],
    read: bool,
) -> None:
    """Static and QAT modes: the layer's activation qparams (into ``qparams``/``changes``)."""
    for which, spec in layer.activation_specs().items():
        if (which == "input" and layer.input_from is not None) or keeps_input_grid(layer):
            continue  # observed once, as its producer's output: chain_inputs fills it
        slot_module = activation_slot(module, which)
        if slot_module is not None and slot_module.follows is not None:
            continue  # QAT input tied to its producer's output: chain_inputs fills it
        if slot_module is None or slot_module.observer is None:
            raise PlanError(
                f"layer {name!r}: its {which} observer is missing; was the prepared model "
                "modified after qswap.prepare()?"
            )
        if slot_module.calls == 0 and (read or not layer.param_specs()):
            # never called, yet its parameters were read: another module's code uses
            # them (nn.MultiheadAttention reads out_proj.weight), so they are quantized
            # and there are no activations of its own to quantize. A layer with
            # nothing else to quantize (a Dropout SDPA attention never calls) is a
            # no-op: it stays as it is
            changes[which] = None
            continue
        if slot_module.calls == 0:
            raise CalibrationError(
                f"layer {name!r} ({layer.module_type.__name__}) never ran during "
                f"calibration, so its {which} has no range. Make the calibration batches "
                f"reach it, or keep it float with a rule: "
                f"{{match: {{name: '{name}'}}, skip: true}}"
            )
        if not slot_module.seen_float:
            changes[which] = None  # it never received a floating-point tensor there
            continue
        learned = _learned(slot_module.quantizer)
        if learned is None:
            learned = _effective(_qparams(slot_module.observer, name, which), spec, parts)
        qparams[which] = learned


def solve_methods(
    model: nn.Module, the_plan: Plan, layers: Mapping[str, LayerSpec], names: Iterable[str]
) -> None:
    """Solve the weight methods of the layers ``names`` now, in ``model``, freeing their statistics.

    Each rounded weight is written into ``model``; a :class:`qswap.rounding.Solved` takes the
    method's place and gives ``convert`` its qparams and input scale. A method that saw no
    float input is left to ``convert`` (which rounds that layer to nearest, with a note).
    """
    parts = Components(the_plan.registry)
    for name in names:
        layer = layers.get(name)
        module = model.get_submodule(name)
        method: Any = input_method(module)
        if layer is None or method is None or isinstance(method, Solved) or not method.seen:
            continue
        done = _collect_layer(model, the_plan, name, layer, parts, round_weights=True)
        slot = activation_slot(module, "input")
        assert slot is not None  # the method lives in it
        rounded = Rounded(torch.empty(0), done.qparams["weight"], done.input_scale)
        added = done.notes[len(layer.notes) :]
        slot._modules["stats"] = Solved(method, rounded, notes=added)


@contextlib.contextmanager
def solved_weights(
    model: nn.Module, the_plan: Plan, layers: Mapping[str, LayerSpec], names: Iterable[str]
) -> Iterator[None]:
    """While inside, the layers ``names`` whose methods are solved compute with their rounded
    weights: each weight is fake-quantized with its solved qparams (an input scale folded
    in along the input features), and restored on exit. Activations stay float.

    ``calibrate(..., sequential="quantized")`` runs a solved block this way, so the next
    block calibrates on the inputs the quantized model will give it (as GPTQ's reference
    implementation does).
    """
    parts = Components(the_plan.registry)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name in names:
                layer = layers.get(name)
                module = model.get_submodule(name)
                solved = input_method(module)
                if layer is None or layer.weight is None or not isinstance(solved, Solved):
                    continue
                weight = unquantized(*param_location(module, "weight"))
                qp = solved.qparams
                effective = parts.quantizer(layer.weight, qp)(weight.detach().float())
                if solved.input_scale.numel():
                    axis = 1 - (qp.axis or 0)  # the input features: 1 for Linear, 0 for Conv1D
                    shape = [1, 1]
                    shape[axis] = -1
                    effective = effective * solved.input_scale.view(shape).to(effective)
                saved.append((weight, weight.detach().clone()))
                weight.copy_(effective.to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def _apply_method(
    model: nn.Module,
    name: str,
    module: nn.Module,
    layer: LayerSpec,
    qparams: dict[str, QParams],
    parts: Components,
    round_weights: bool,
) -> dict[str, Any]:
    """Round the weight with the layer's weight method, if it has one: the LayerSpec changes.

    An ``input_scale`` the method asks for is one of them. A layer whose inputs are not
    float features (an embedding reads token ids) has nothing for a method to weigh errors
    with: it is rounded to nearest, and a note says so. A weight the layer shares with
    another module (a language model's ``lm_head`` tied to its embedding) is untied first:
    the method rounds this layer's own copy, the other module keeps the float weight.
    """
    stats: Any = input_method(module)
    if stats is None or "weight" not in qparams:
        return {}
    slot = activation_slot(module, "input")
    if not stats.seen and slot is not None and slot.calls and not slot.seen_float:
        note = (
            f"weight method {type(stats).__name__} not applied: the layer's input is not float "
            "features (rounded to nearest)"
        )
        return {"notes": (*layer.notes, note)}
    if not round_weights:
        raise PlanError(
            f"layer {name!r}: its weight method {type(stats).__name__} changes the weight "
            "itself, which a calibration file (qparams only) cannot hold; convert the "
            "calibrated model and save it with qswap.save instead"
        )
    changes: dict[str, Any] = {}
    other = _untie(model, name, module)
    notes = list(getattr(stats, "notes", ()))  # what a method solved earlier noted (Solved)
    if other is not None:
        notes.append(
            f"weight untied from {other!r}: weight method {type(stats).__name__} rounds this "
            "layer's own copy"
        )
    if notes:
        changes["notes"] = (*layer.notes, *notes)
    try:
        qparams["weight"], scale = _round_weight(module, layer, qparams["weight"], stats, parts)
    except (CalibrationError, PlanError, ValueError, RuntimeError) as exc:
        raise CalibrationError(
            f"layer {name!r}: weight method {type(stats).__name__} failed: {exc}"
        ) from exc
    if scale is not None:
        changes["input_scale"] = scale
    return changes


def _untie(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """Give the layer its own copy of a weight another module shares; that module's path."""
    owner, pname = param_location(module, "weight")
    plist = parametrization_list(owner, pname)
    holder: nn.Module = plist if plist is not None and hasattr(plist, "original") else owner
    attr = "original" if holder is plist else pname
    weight = holder._parameters.get(attr)
    if weight is None:
        return None
    prefix = f"{name}." if name else ""
    others = [
        path
        for path, p in model.named_parameters(remove_duplicate=False)
        if p is weight and not path.startswith(prefix)
    ]
    if not others:
        return None
    holder._parameters[attr] = nn.Parameter(weight.detach().clone(), weight.requires_grad)
    return re.sub(r"\.parametrizations\.(\w+)\.original$", r".\1", others[0])


def _round_weight(
    module: nn.Module, layer: LayerSpec, qparams: QParams, method: Any, parts: Components
) -> tuple[QParams, torch.Tensor | None]:
    """Let ``method`` round the layer's float weight; write it back, return its qparams.

    Methods see the weight as ``(output features, input features)``: a weight whose
    channel axis is 1 (transformers' ``Conv1D``) is transposed for them and back.
    """
    assert layer.weight is not None  # a layer with weight qparams has a weight spec
    spec = layer.weight
    weight = unquantized(*param_location(module, "weight"))
    flip = (qparams.axis or 0) == 1

    def layout(w: torch.Tensor) -> torch.Tensor:
        return w.t() if flip else w

    def rtn(w: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        observer: Any = parts.create("observer", spec)
        stored = layout(w).contiguous()
        observer(stored)
        found = _effective(_qparams(observer, layer.name, "weight"), spec, parts)
        return layout(parts.quantizer(spec, found)(stored)), found

    with torch.no_grad():
        rounded = method.solve(layout(weight.detach().float()), qparams, rtn)
        weight.copy_(layout(rounded.weight).to(weight.dtype))
    return rounded.qparams, rounded.input_scale


def _bias_shift(
    module: nn.Module, layer: LayerSpec, weight_qparams: QParams | None, parts: Components
) -> torch.Tensor | None:
    """``E[(Wq - W) x]`` for a layer whose input mean was recorded (``bias_correction``)."""
    slot = activation_slot(module, "input")
    mean: Any = None if slot is None else slot._modules.get("mean")
    core = correctable(module)
    if mean is None or not mean.seen or core is None or weight_qparams is None:
        return None
    assert layer.weight is not None  # a layer with weight qparams has a weight spec
    owner, pname = param_location(module, "weight")
    # the float weight as observed: reading core.weight would run the observer again
    weight = original_of(owner, pname) if parametrizations_of(owner, pname) else core.weight
    quantizer = parts.quantizer(layer.weight, weight_qparams)
    with torch.no_grad():
        error = quantizer(weight.detach()) - weight.detach()
        return shift_of(core, error, mean)


def chain_inputs(
    model: nn.Module, state: QSwapState, layers: dict[str, LayerSpec]
) -> dict[str, LayerSpec]:
    """Layers fed by another layer's quantized output take that output's qparams as input.

    On an integer backend such a layer receives the producer's int8 tensor as it is (through
    pooling, flatten, ReLU...), never re-quantized with its own input observer. ``prepare``
    observes such a tensor once, at its producer (``LayerSpec.input_from``); those layers
    always take the producer's qparams here. Without that record a layer on ``fake`` is
    chained all the same when the plan's trace tells its producer (see
    ``Plan.fused_trace``), so fake-quant and int8 models compute alike; in QAT only the
    inputs ``prepare`` tied to their producer (they trained that way) are. Applying it
    again changes nothing (outputs are never replaced).
    """
    out = dict(layers)

    def chain(name: str, producer: str) -> None:
        found = layers[producer].qparams.get("output")
        if found is not None:
            layer = layers[name]
            qparams = {**layer.qparams, "input": found}
            if keeps_input_grid(layer):
                qparams["output"] = found
            out[name] = dataclasses.replace(layer, qparams=qparams)

    for name, layer in layers.items():
        if layer.input_from is not None:
            chain(name, layer.input_from)
    backend = state.plan.backend.name
    args = state.example_args
    qat = state.plan.config.mode == "qat"
    on_fake = backend == "fake" or any(layer.backend == "fake" for layer in layers.values())
    if args is None or not (qat or on_fake):
        return out
    t = state.plan.fused_trace(model, tuple(args), dict(state.example_kwargs), training=qat)
    if t is None:
        return out
    producers = {name for name, layer in layers.items() if "output" in layer.qparams}
    for name, producer in input_sources(t, layers, producers).items():
        layer = layers[name]
        if layer.input_from is not None:
            continue
        if qat:
            slot = activation_slot(model.get_submodule(name), "input")
            if slot is None or slot.follows is None:
                continue
        elif not (layer.backend == "fake" or backend == "fake") or "input" not in layer.qparams:
            continue
        chain(name, producer)
    return out


def _learned(quantizer: nn.Module | None) -> QParams | None:
    """The qparams a QAT quantizer learned (LSQ), else ``None``."""
    if quantizer is None or not learns_qparams(quantizer):
        return None
    found: QParams | None = getattr(quantizer, "qparams", None)
    return found


def _effective(qparams: QParams, spec: QuantSpec, parts: Components) -> QParams:
    """``qparams`` as the spec's quantizer uses them (identical for the uniform ``affine``)."""
    if (
        spec.quantizer.name == "affine"
        and parts.registry.quantizer("affine").cls is AffineQuantizer
    ):
        return qparams
    quantizer: Any = parts.create("quantizer", spec)
    quantizer.set_qparams(qparams)
    used: QParams | None = quantizer.qparams
    return qparams if used is None else used


def _qparams(observer: Any, name: str, slot: str) -> QParams:
    try:
        result: QParams = observer.calculate_qparams()
    except CalibrationError as exc:
        raise CalibrationError(f"layer {name!r}, slot {slot!r}: {exc}") from exc
    return result
