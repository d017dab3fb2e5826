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

import copy
import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qswap.backends.fake import FakeQuantized, install, refit
from qswap.bias_correction import apply_shift, correctable, shift_of
from qswap.config import QConfig
from qswap.exceptions import CalibrationError, PlanError
from qswap.methods import learns_qparams
from qswap.observe import (
    STATE_ATTR,
    QSwapState,
    calibrate,
    copy_model,
    prepare,
    state_of,
)
from qswap.qat import TrainableFusion
from qswap.quantizers import AffineQuantizer, QParams
from qswap.registry import Registry
from qswap.slots import (
    Components,
    WeightObserver,
    activation_slot,
    detach_activations,
    detach_parametrizations,
    original_of,
    param_location,
    parametrizations_of,
)
from qswap.trace import RecursionRoom
from qswap.walker import LayerSpec, Plan, gc_paused, set_eval

if TYPE_CHECKING:
    from qswap.artifact import Calibration
    from qswap.config import QuantSpec
    from qswap.trace import Trace

__all__ = ["convert", "quantize"]


def convert(
    prepared: nn.Module,
    *,
    backend: str | None = None,
    inplace: bool = False,
    calibration: str | os.PathLike[str] | Calibration | None = None,
) -> nn.Module:
    """The quantized model for the plan's backend, from a prepared and calibrated model.

    ``prepared`` is left as it is unless ``inplace=True``. ``backend`` may only repeat
    the backend the model was prepared for (observers differ per backend).
    ``calibration`` (a file from ``qswap.save_calibration``, or a loaded ``Calibration``)
    gives every layer's qparams instead of the observers, so ``prepared`` need not be
    calibrated; an artifact made for another model or config is refused.

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
        from qswap.artifact import calibrated_layers

        reused = calibrated_layers(prepared, the_plan, calibration)
    with gc_paused():
        model = prepared if inplace else copy_model(prepared, share=_observers(prepared, the_plan))
        layers = reused if reused is not None else _collect_qparams(model, the_plan, state.layers)
        layers = chain_inputs(model, state, layers)
        parts = Components(state.registry)
        tied: dict[int, nn.Module] = {}  # one quantizer for an observer tied layers share
        for name, layer in layers.items():
            module = model.get_submodule(name)
            apply_shift(module, layer.bias_shift)
            on_fake = layer.backend == "fake" or not target.integer
            if isinstance(module, TrainableFusion):
                # QAT conv/linear + BN: fold with the trained statistics, then as PTQ
                _strip(module, layer)
                model = _replace(model, name, layer, module.fold())
                if on_fake and layer.counterpart in (None, FakeQuantized):
                    install(model.get_submodule(name), layer, state.registry)
                elif on_fake:
                    model = _swap(model, name, layer)
                continue
            if on_fake and layer.counterpart in (None, FakeQuantized):
                refit(module, layer, parts, tied)  # as strip + install, without rebuilding
                continue
            _strip(module, layer)
            if on_fake:
                model = _swap(model, name, layer)
        args = state.example_args
        kwargs = state.example_kwargs
        if target.integer:
            lower = target.lower
            if lower is None:
                raise PlanError(
                    f"backend {target.name!r} is an integer backend without a lower function; "
                    "register it with Backend(..., lower=...)"
                )
            if args is None and the_plan.config.mode != "dynamic":
                raise CalibrationError(
                    f"convert() for backend {target.name!r} needs example inputs to place "
                    "quant/dequant boundaries; pass example_inputs= to prepare() or run "
                    "calibrate() first"
                )
            set_eval(model)
            own = {name: layer for name, layer in layers.items() if layer.backend == target.name}
            model = lower(model, own, tuple(args or ()), dict(kwargs))
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


def _collect_qparams(
    model: nn.Module, the_plan: Plan, layers: Mapping[str, LayerSpec]
) -> dict[str, LayerSpec]:
    """Each layer's spec with the qparams its observers computed (unseen activations dropped).

    A layer never called whose parameters calibration read (another module's code uses
    them) keeps its parameter qparams only; one never reached at all is an error.

    In QAT the weights are observed once more as they are now, and quantizers that learn
    their qparams (LSQ) give their learned ones. Every qparams is what the slot's quantizer
    actually uses (``pow2`` rounds scales to powers of two). An input observed at its
    producer (``LayerSpec.input_from``) is left to ``chain_inputs``.
    """
    mode = the_plan.config.mode
    parts = Components(the_plan.registry)
    out: dict[str, LayerSpec] = {}
    for name, layer in layers.items():
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
        changes: dict[str, Any] = {}
        shift = _bias_shift(module, layer, qparams.get("weight"), parts)
        if shift is not None:
            changes["bias_shift"] = shift
        if mode in ("static", "qat"):
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
        out[name] = dataclasses.replace(layer, qparams=qparams, **changes)
    return out


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


def _grid_preserving() -> tuple[frozenset[type[nn.Module]], frozenset[str]]:
    """Modules and functions that keep an integer tensor on its grid (int8 runs them as is)."""
    from qswap.backends import torch_int8

    pools: set[type[nn.Module]] = {
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AvgPool3d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
    }
    return torch_int8._EXACT_PASSTHROUGH | pools, torch_int8._NATIVE


def input_sources(t: Trace, layers: Mapping[str, LayerSpec], producers: set[str]) -> dict[str, str]:
    """Layer -> the layer (one of ``producers``) whose quantized output it receives.

    A layer's input comes from a producer when every call of the layer gets the producer's
    output through grid-preserving calls only (ReLU, pooling, flatten, view..., and layers
    that int8 runs as they are, ``IntegerPassthrough``, which keep their input's grid) and its
    input spec is the producer's output spec: an integer backend hands it the producer's
    int8 tensor as it is, and one set of qparams serves both.
    """
    from qswap.backends.torch_int8 import IntegerPassthrough as passthrough

    modules, functions = _grid_preserving()
    producer_layer: dict[str, str] = {}
    for name, layer in layers.items():
        for path in (name, *layer.aliases):
            producer_layer[path] = name

    def source(vid: int, depth: int = 0) -> str | None:
        call = t.producer(vid)
        if call is None or depth > 16 or len(call.outputs) != 1:
            return None
        if call.kind == "module":
            name = next((producer_layer[p] for p in call.paths if p in producer_layer), None)
            if name is not None and layers[name].counterpart is not passthrough:
                return name if name in producers else None
            if call.module_type not in modules:  # an int8 pass-through layer is one of them
                return None
        elif call.target not in functions:
            return None
        feeds = [v for v in call.inputs if t.values[v].producer is not None or v in t.inputs]
        return source(feeds[0], depth + 1) if len(feeds) == 1 else None

    out: dict[str, str] = {}
    for name, layer in layers.items():
        calls = [c for p in (name, *layer.aliases) for c in t.calls_of(p)]
        found = {source(c.inputs[0]) if c.inputs else None for c in calls}
        if len(found) == 1 and None not in found:
            (producer,) = found
            if producer is not None and producer != name and layers[producer].output == layer.input:
                out[name] = producer
    return out


def keeps_input_grid(layer: LayerSpec) -> bool:
    """Whether ``layer``'s output needs no observer: it is on its chained input's grid.

    An int8 pass-through layer (pooling, flatten, dropout...: ``IntegerPassthrough``) fed
    another layer's quantized output (``input_from``) hands its output on with its input's
    qparams. A ReLU keeps its own: lowering folds it into the layer before with the range
    it observed after the ReLU.
    """
    from qswap.backends.torch_int8 import IntegerPassthrough

    return (
        layer.input_from is not None
        and layer.counterpart is IntegerPassthrough
        and not issubclass(layer.module_type, nn.ReLU)
    )


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
    return found


def _qparams(observer: Any, name: str, slot: str) -> QParams:
    try:
        result: QParams = observer.calculate_qparams()
    except CalibrationError as exc:
        raise CalibrationError(f"layer {name!r}, slot {slot!r}: {exc}") from exc
    return result


def _strip(module: nn.Module, layer: LayerSpec) -> None:
    """Remove qswap's observers, hooks and parametrizations from one layer."""
    detach_activations(module)
    for slot in layer.param_specs():
        owner, pname = param_location(module, slot)
        detach_parametrizations(owner, pname)


def _swap(model: nn.Module, name: str, layer: LayerSpec) -> nn.Module:
    """Apply the layer's fake counterpart (or generic fake-quant) at every path of the module."""
    module = model.get_submodule(name)
    counterpart = layer.counterpart
    if counterpart is None:
        result = install(module, layer)
    else:
        factory: Any = counterpart
        result = factory.from_float(module, layer)
        if not isinstance(result, nn.Module):
            raise PlanError(
                f"{counterpart.__name__}.from_float returned {type(result).__name__} for layer "
                f"{name!r}; a counterpart must return a torch.nn.Module"
            )
    return _replace(model, name, layer, result)


def _replace(model: nn.Module, name: str, layer: LayerSpec, result: nn.Module) -> nn.Module:
    """Put ``result`` at ``name`` and the layer's other paths; the new root if ``name`` is ''."""
    if result is model.get_submodule(name):
        return model
    if not name:
        return result
    for path in (name, *layer.aliases):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        parent._modules[child] = result
    return model


def quantize(
    model: nn.Module,
    config: QConfig | Plan | Mapping[str, Any] | str | os.PathLike[str],
    *,
    calib_data: Iterable[Any] | None = None,
    example_inputs: Any = None,
    registry: Registry | None = None,
    max_batches: int | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Plan, prepare, calibrate on ``calib_data`` and convert, in one call; ``model`` is untouched.

    Static and QAT modes calibrate activation ranges and need ``calib_data``; weight-only
    and dynamic modes need none (unless bias correction measures inputs).

    >>> import torch, qswap
    >>> x = torch.randn(16, 4)
    >>> qmodel = qswap.quantize(torch.nn.Linear(4, 2), "w8a8_minmax", calib_data=[x])
    >>> qmodel.weight.shape
    torch.Size([2, 4])
    >>> qswap.quantize(torch.nn.Linear(4, 2), "w4_per_group").weight.shape
    torch.Size([2, 4])
    """
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
        return convert(prepared, inplace=True)
    calibrate(prepared, calib_data, max_batches=max_batches, progress=progress)
    return convert(prepared, inplace=True)
