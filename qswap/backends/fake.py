"""The ``fake`` backend: simulated quantization in float, installed on the module itself.

No layer is rewritten or replaced: weights (and any other parameter slot) are
fake-quantized through ``torch.nn.utils.parametrize``, inputs and outputs through
forward hooks. The quantizers are registered submodules, so ``.to()``, ``.half()``,
``state_dict()`` and ``parameters()`` see them, and they pass straight-through
gradients, so the result can be trained (QAT).

    >>> import torch, qswap
    >>> x = torch.randn(8, 4)
    >>> q = qswap.quantize(torch.nn.Linear(4, 3), "w8a8_minmax", calib_data=[x])
    >>> bool((q(x) - torch.nn.functional.linear(x, q.weight, q.bias)).abs().max() < 0.1)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from qswap.exceptions import PlanError
from qswap.slots import (
    ActivationSlot,
    Components,
    activation_slot,
    attach_activation,
    attach_parametrization,
    detach_activations,
    has_slots,
    is_qswap_slot,
    param_location,
    parametrization_list,
    strip_slots,
)
from qswap.tree import replace_module

if TYPE_CHECKING:
    from qswap.config import QuantSpec
    from qswap.plan import LayerSpec
    from qswap.registry import Registry

__all__ = ["FakeQuantized", "fixed_activation", "install", "lower", "refit"]


# --------------------------------------------------------------------------- the counterpart


class FakeQuantized:
    """Counterpart of every float layer on the ``fake`` backend (see ``registry/torch_nn.yaml``).

    ``from_float`` fake-quantizes the module in place and returns the same object, so
    its type, attributes, hooks and ``state_dict`` keys of the float parameters stay.
    """

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerSpec) -> nn.Module:
        """Install fixed fake-quantizers for ``spec`` (with its ``qparams``) on ``module``."""
        return install(module, spec)


def install(module: nn.Module, spec: LayerSpec, registry: Registry | None = None) -> nn.Module:
    """Fake-quantize ``module`` in place with the specs and qparams of ``spec``; returns it.

    Parameter slots get the spec's registered quantizer through ``parametrize``;
    ``input``/``output`` get it through hooks (in ``dynamic`` mode the input is
    quantized with parameters computed per batch). Gradients pass straight through.

    >>> import torch
    >>> from qswap.config import QuantSpec
    >>> from qswap.quantizers import qparams_from_range
    >>> from qswap.plan import LayerSpec
    >>> spec = QuantSpec(bits=4)
    >>> qp = qparams_from_range(-0.7, 0.7, spec)
    >>> m = install(torch.nn.Linear(3, 3), LayerSpec("", torch.nn.Linear, None, spec, None, None, qparams={"weight": qp}))
    >>> steps = m.weight / qp.scale
    >>> bool(torch.equal(steps, steps.round()))
    True
    """
    from qswap.registry import default_registry

    parts = Components(registry or spec.registry or default_registry())
    for slot, qspec in spec.param_specs().items():
        qp = spec.qparams.get(slot)
        if qp is None:
            raise PlanError(
                f"layer {spec.name!r}: no qparams for slot {slot!r}; a LayerSpec gets its "
                "qparams from calibration (use qswap.convert on a calibrated model)"
            )
        owner, pname = param_location(module, slot)
        attach_parametrization(owner, pname, parts.quantizer(qspec, qp))
    for which in spec.activation_specs():
        slot_module = fixed_activation(parts, spec, which)
        if slot_module is not None:
            attach_activation(module, which, slot_module)
    return module


def fixed_activation(parts: Components, spec: LayerSpec, which: str) -> ActivationSlot | None:
    """The converted slot for ``spec``'s input or output: fixed qparams, or per batch (dynamic).

    ``None`` when that slot is not quantized or never saw a floating-point tensor.
    """
    qspec: QuantSpec | None = getattr(spec, which)
    if qspec is None:
        return None
    if spec.mode == "dynamic" and which == "input":
        template = parts.create("observer", qspec)
        return ActivationSlot(
            observer=template, quantizer=parts.create("quantizer", qspec), dynamic=True
        )
    qp = spec.qparams.get(which)
    if qp is None:
        return None
    return ActivationSlot(quantizer=parts.quantizer(qspec, qp))


def refit(
    module: nn.Module,
    spec: LayerSpec,
    parts: Components | None = None,
    shared: dict[int, nn.Module] | None = None,
) -> nn.Module:
    """Turn a layer that ``qswap.prepare`` observed into its fake-quantized form, in place.

    The result equals stripping the observers and calling :func:`install`, but each
    observer is replaced where it sits (parametrization list entry, hooked slot), so no
    hook, parametrization list or class is rebuilt. An observer several layers share (a
    tied weight) becomes one quantizer they share, through ``shared`` (observer id ->
    quantizer) kept across the calls for one model.
    """
    if parts is None:
        from qswap.registry import default_registry

        parts = Components(spec.registry or default_registry())
    for slot, qspec in spec.param_specs().items():
        owner, pname = param_location(module, slot)
        plist = parametrization_list(owner, pname)
        if plist is None:
            raise PlanError(f"layer {spec.name!r}: {slot} has no observer to replace")
        index = max(i for i, p in enumerate(plist) if is_qswap_slot(p))
        key = id(plist[index])
        quantizer = shared.get(key) if shared is not None else None
        if quantizer is None:
            quantizer = parts.quantizer(qspec, spec.qparams[slot])
            if shared is not None:
                shared[key] = quantizer
        plist[index] = quantizer
    for which in ("input", "output"):
        current = activation_slot(module, which)
        if current is None:
            fresh = fixed_activation(parts, spec, which)
            if fresh is not None:
                attach_activation(module, which, fresh)
            continue
        qspec = getattr(spec, which)
        qp = spec.qparams.get(which)
        if qspec is None or qp is None:
            detach_activations(module, which)
            continue
        current.use(observer=None, quantizer=parts.quantizer(qspec, qp))
        current.requant = False
        current.dynamic = False
    return module


# --------------------------------------------------------------------------- activation slots


# --------------------------------------------------------------------------- parameter slots


def lower(
    model: nn.Module,
    layers: Mapping[str, LayerSpec],
    example_args: tuple[Any, ...],
    example_kwargs: Mapping[str, Any],
) -> nn.Module:
    """The fake backend's lowering (``qswap.registry.Lowering``): each layer simulated in float.

    A layer with the generic counterpart keeps its module: its observers become fixed
    quantizers where they sit (:func:`refit`), or quantizers are installed on a module that
    lost them (a QAT conv+BN folded by ``convert``). A layer with a counterpart of its own
    is replaced by ``counterpart.from_float(module, spec)`` at every path. Observers several
    layers share (a tied weight) become one shared quantizer.
    """
    from qswap.registry import default_registry

    tied: dict[int, nn.Module] = {}
    parts: dict[int, Components] = {}
    for name, layer in layers.items():
        module = model.get_submodule(name)
        registry = layer.registry or default_registry()
        components = parts.setdefault(id(registry), Components(registry))
        counterpart = layer.counterpart
        if counterpart in (None, FakeQuantized):
            if has_slots(module, layer):
                refit(module, layer, components, tied)  # as strip + install, without rebuilding
            else:
                install(module, layer, registry)
            continue
        strip_slots(module, layer)
        factory: Any = counterpart
        result = factory.from_float(module, layer)
        if not isinstance(result, nn.Module):
            raise PlanError(
                f"{counterpart.__name__}.from_float returned {type(result).__name__} for layer "
                f"{name!r}; a counterpart must return a torch.nn.Module"
            )
        model = replace_module(model, (name, *layer.aliases), result)
    return model
