"""The instrumentation core: where qswap observes and quantizes a layer without rewriting it.

A parameter slot (``weight``, ``bias``, ``kernel``, ``k_proj.weight``) is observed or
quantized through ``torch.nn.utils.parametrize``; an input or output through forward
(pre-)hooks holding an :class:`ActivationSlot`. The observers and quantizers themselves come
from the registry through :class:`Components`. ``prepare`` attaches these, ``calibrate``
feeds them, ``convert`` and every backend read and replace them; nothing here knows a
backend.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> attach_activation(lin, "output", ActivationSlot())
    >>> activation_slot(lin, "output") is not None
    True
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from qswap.exceptions import PlanError
from qswap.methods import learns_qparams
from qswap.quantizers import set_attrs

if TYPE_CHECKING:
    from pydantic import BaseModel

    from qswap.config import QuantSpec
    from qswap.quantizers import QParams
    from qswap.registry import ComponentEntry, Registry

__all__ = [
    "INPUT_SLOT",
    "OUTPUT_SLOT",
    "ActivationSlot",
    "Components",
    "WeightObserver",
    "activation_owner",
    "activation_slot",
    "attach_activation",
    "attach_parametrization",
    "detach_activations",
    "detach_parametrizations",
    "has_slots",
    "input_method",
    "is_qswap_slot",
    "original_of",
    "param_location",
    "parametrization_list",
    "parametrizations_of",
    "paused",
    "strip_slots",
    "unquantized",
    "version_key",
]

#: Attribute names of the activation slots on the module that owns the hook.
INPUT_SLOT = "qswap_input"
OUTPUT_SLOT = "qswap_output"
_MARK = "_qswap_slot"  # set on parametrization modules qswap installed
#: inside :func:`paused`: slots fake-quantize as usual but record nothing
_PAUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("qswap_paused", default=False)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Run a prepared model without its observers recording (this thread only).

    >>> import torch, qswap
    >>> prepared = qswap.prepare(torch.nn.Linear(2, 2), "w8a8_minmax")
    >>> with paused():
    ...     _ = prepared(torch.ones(1, 2))
    >>> activation_slot(prepared, "input").calls
    0
    """
    token = _PAUSED.set(True)
    try:
        yield
    finally:
        _PAUSED.reset(token)


Transform = Callable[[torch.Tensor], torch.Tensor]


def is_qswap_slot(module: object) -> bool:
    """Whether ``module`` is a parametrization (observer or quantizer) qswap installed."""
    return bool(getattr(module, _MARK, False))


class Components:
    """Creates the observers and quantizers that specs name; each entry and options resolved once."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.entries: dict[tuple[str, str], ComponentEntry] = {}
        self.options: dict[tuple[str, int], tuple[QuantSpec, BaseModel]] = {}

    def create(
        self, kind: Literal["observer", "quantizer", "method"], spec: QuantSpec
    ) -> nn.Module:
        """A new observer, quantizer or weight method for ``spec`` (its name and options)."""
        ref = getattr(spec, kind)  # the spec's field and the registry's lookup share the name
        if ref is None:
            raise PlanError(f"this spec names no {kind}")
        entry = self.entries.get((kind, ref.name))
        if entry is None:
            entry = self.entries[(kind, ref.name)] = getattr(self.registry, kind)(ref.name)
        key = (kind, id(spec))
        found = self.options.get(key)
        if found is None:
            found = self.options[key] = (spec, entry.validate_options(ref.options))
        return entry.create(spec, found[1])

    def quantizer(self, spec: QuantSpec, qparams: QParams) -> nn.Module:
        """The spec's quantizer with ``qparams`` set, on their device."""
        quantizer: Any = self.create("quantizer", spec)
        device = qparams.scale.device
        if device.type != "cpu":
            quantizer.to(device)
        quantizer.set_qparams(qparams)
        setattr(quantizer, _MARK, True)
        return quantizer  # type: ignore[no-any-return]


class ActivationSlot(nn.Module):
    """Observes and/or fake-quantizes the first floating-point tensor of an input or output.

    Used as a hook target (``pre_hook``/``hook`` are bound methods, so deep copies of
    the model stay consistent). With only an ``observer`` it records; with a
    ``quantizer`` it fake-quantizes (fixed qparams); with both and ``requant`` the
    qparams follow the observer on every call (QAT); ``dynamic`` computes them per call
    from a fresh observer of the same kind.
    """

    requant: bool
    dynamic: bool
    calls: int
    seen_float: bool
    #: QAT: the layer whose output quantizer this input slot uses (tied by prepare)
    follows: str | None

    def __init__(
        self,
        *,
        observer: nn.Module | None = None,
        quantizer: nn.Module | None = None,
        requant: bool = False,
        dynamic: bool = False,
    ) -> None:
        super().__init__()
        set_attrs(self, requant=requant, dynamic=dynamic, calls=0, seen_float=False, follows=None)
        self.use(observer=observer, quantizer=quantizer)

    def use(self, *, observer: nn.Module | None, quantizer: nn.Module | None) -> None:
        """Replace the observer and quantizer (``None`` removes one).

        Removing the observer also removes what records the layer's inputs beside it: bias
        correction's mean (``mean``, see ``qswap.bias_correction``) and a weight method's
        statistics (``stats``, see ``qswap.rounding``).
        """
        for name, module in (("observer", observer), ("quantizer", quantizer)):
            if module is None:
                self._modules.pop(name, None)
            else:
                self._modules[name] = module
        if observer is None:
            self._modules.pop("mean", None)
            self._modules.pop("stats", None)

    @property
    def observer(self) -> nn.Module | None:
        """The observer recording this slot, if any."""
        return self._modules.get("observer")

    @property
    def quantizer(self) -> nn.Module | None:
        """The quantizer applied to this slot, if any."""
        return self._modules.get("quantizer")

    def process(self, x: torch.Tensor) -> torch.Tensor:
        """Observe and/or fake-quantize one tensor (only fake-quantize under :func:`paused`)."""
        observer: Any = self.observer
        quantizer: Any = self.quantizer
        if self.dynamic and observer is not None and quantizer is not None:
            fresh: Any = type(observer)(observer.spec, getattr(observer, "options", None))
            fresh.to(x.device)
            fresh(x)
            quantizer.set_qparams(fresh.calculate_qparams())
            return quantizer(x)  # type: ignore[no-any-return]
        if _PAUSED.get():
            return x if quantizer is None else quantizer(x)
        self.seen_float = True
        mean = self._modules.get("mean")  # bias correction's input mean (qswap.bias_correction)
        if mean is not None:
            mean(x)
        stats = self._modules.get("stats")  # a weight method's statistics (qswap.rounding)
        if stats is not None:
            stats(x)
        if observer is not None:
            observer(x)
            if quantizer is None:
                return x
            if self.requant and not learns_qparams(quantizer):
                quantizer.set_qparams(observer.calculate_qparams())
        if quantizer is not None:
            return quantizer(x)  # type: ignore[no-any-return]
        return x

    def pre_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Forward pre-hook (with kwargs): the first float tensor among the inputs."""
        self.calls += not _PAUSED.get()
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                y = self.process(a)
                if y is a:
                    return None
                return (*args[:i], y, *args[i + 1 :]), kwargs
        for key, a in kwargs.items():
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                y = self.process(a)
                if y is a:
                    return None
                return args, {**kwargs, key: y}
        return None

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook: the output tensor, or the first float tensor of a tuple/list/dict output."""
        self.calls += not _PAUSED.get()
        return _map_first_float(output, self.process)

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "qat" if self.requant else ""
        return kind


def _map_first_float(obj: Any, fn: Transform) -> Any:
    """Apply ``fn`` to ``obj`` if it is a float tensor, else to the first float tensor inside it."""
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point():
            return None
        y = fn(obj)
        return None if y is obj else y
    if isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                y = fn(item)
                if y is item:
                    return None
                items = [*obj[:i], y, *obj[i + 1 :]]
                if isinstance(obj, list):
                    return items
                if hasattr(obj, "_fields"):
                    return type(obj)(*items)
                return tuple(items)
        return None
    if isinstance(obj, Mapping):
        for key, item in obj.items():
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                y = fn(item)
                if y is item:
                    return None
                out = dict(obj)
                out[key] = y
                return out
    return None


def activation_owner(module: nn.Module, which: str) -> nn.Module:
    """The module whose hooks see ``module``'s input (or output).

    A fused container (``ConvReLU2d``, any ``nn.Sequential``) calls its children in
    order, so its first child sees its input and its last child makes its output;
    hooking those keeps children out of the container's own iteration.
    """
    owner = module
    while isinstance(owner, nn.Sequential) and len(owner) > 0:
        owner = owner[0] if which == "input" else owner[-1]
    return owner


def attach_activation(module: nn.Module, which: str, slot: ActivationSlot) -> None:
    """Hook ``slot`` onto the input (pre-hook, after the user's) or output (before the user's)."""
    owner = activation_owner(module, which)
    name = INPUT_SLOT if which == "input" else OUTPUT_SLOT
    if name in owner._modules:
        raise PlanError(
            f"{type(owner).__name__} already has a {name!r} submodule; it was quantized or "
            "prepared by qswap already"
        )
    owner.add_module(name, slot)
    if which == "input":
        owner.register_forward_pre_hook(slot.pre_hook, with_kwargs=True)
    else:
        owner.register_forward_hook(slot.hook, prepend=True)


def activation_slot(module: nn.Module, which: str) -> ActivationSlot | None:
    """The slot attached to ``module``'s input or output, if any."""
    owner = activation_owner(module, which)
    found = owner._modules.get(INPUT_SLOT if which == "input" else OUTPUT_SLOT)
    return found if isinstance(found, ActivationSlot) else None


def detach_activations(module: nn.Module, only: str | None = None) -> None:
    """Remove qswap's activation slots and their hooks from ``module``; user hooks stay."""
    for which in ("input", "output"):
        if only is not None and which != only:
            continue
        owner = activation_owner(module, which)
        name = INPUT_SLOT if which == "input" else OUTPUT_SLOT
        slot = owner._modules.get(name)
        if slot is None:
            continue
        for hooks in (owner._forward_pre_hooks, owner._forward_hooks):
            for key, hook in list(hooks.items()):
                if getattr(hook, "__self__", None) is slot:
                    del hooks[key]
                    owner._forward_pre_hooks_with_kwargs.pop(key, None)
                    owner._forward_hooks_with_kwargs.pop(key, None)
                    owner._forward_hooks_always_called.pop(key, None)
        del owner._modules[name]


def param_location(module: nn.Module, slot: str) -> tuple[nn.Module, str]:
    """``(owner, parameter name)`` of a parameter slot (``weight``, ``bias``, ``k_proj.weight``).

    A fused container's ``weight`` lives on its first child.
    """
    prefix, _, name = slot.rpartition(".")
    owner: nn.Module | None = module
    if prefix:
        try:
            owner = module.get_submodule(prefix)
        except AttributeError:
            owner = None
    if owner is not None:
        if owner._parameters.get(name) is not None:
            return owner, name
        plists = owner._modules.get("parametrizations")
        if plists is not None and name in plists._modules:
            return owner, name
        if not prefix and isinstance(owner, nn.Sequential) and len(owner) > 0:
            return param_location(owner[0], slot)
    names = sorted(n for n, _ in module.named_parameters())
    raise PlanError(
        f"{type(module).__name__} has no parameter slot {slot!r}; its parameters are: "
        f"{', '.join(names) or 'none'}"
    )


def _privatize_class(module: nn.Module) -> None:
    """Give a parametrized module its own class before changing its parametrizations.

    ``torch.nn.utils.parametrize`` keeps its properties on a per-module class that a deep
    copy shares; adding or removing a parametrization on the copy would change the
    original too.
    """
    cls = type(module)
    if getattr(cls, "_qswap_owner", None) == id(module):
        return
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    namespace["_qswap_owner"] = id(module)
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def attach_parametrization(owner: nn.Module, name: str, pmod: nn.Module) -> None:
    """Append ``pmod`` to the parametrizations of ``owner.<name>`` (the float tensor stays)."""
    if parametrize.is_parametrized(owner):
        _privatize_class(owner)
    setattr(pmod, _MARK, True)
    parametrize.register_parametrization(owner, name, pmod, unsafe=True)
    cls = type(owner)
    if getattr(cls, "_qswap_owner", None) is None:
        cls._qswap_owner = id(owner)  # type: ignore[attr-defined]


def parametrization_list(owner: nn.Module, name: str) -> nn.ModuleList | None:
    """The ``ParametrizationList`` of ``owner.<name>``, if it is parametrized."""
    plists = owner._modules.get("parametrizations")
    if plists is None:
        return None
    found = plists._modules.get(name)
    return found if isinstance(found, nn.ModuleList) else None


def detach_parametrizations(owner: nn.Module, name: str) -> None:
    """Remove qswap's parametrizations of ``owner.<name>``, keeping the float tensor and the user's."""
    plist = parametrization_list(owner, name)
    if plist is None:
        return
    mine = [i for i, p in enumerate(plist) if getattr(p, _MARK, False)]
    if not mine:
        return
    if len(mine) == len(plist):
        _privatize_class(owner)
        parametrize.remove_parametrizations(owner, name, leave_parametrized=False)
        return
    for i in reversed(mine):
        del plist[i]


def parametrizations_of(owner: nn.Module, name: str) -> list[nn.Module]:
    """qswap's parametrization modules on ``owner.<name>``, in order."""
    plist = parametrization_list(owner, name)
    if plist is None:
        return []
    return [p for p in plist if getattr(p, _MARK, False)]


def original_of(owner: nn.Module, name: str) -> torch.Tensor:
    """The value of ``owner.<name>`` just before qswap's parametrizations (the user's applied)."""
    plist = parametrization_list(owner, name)
    if plist is None:
        raise PlanError(f"{type(owner).__name__}.{name} is not parametrized")
    entries = list(plist)
    value: Any
    if hasattr(plist, "original"):
        value = plist.original
        if not entries or getattr(entries[0], _MARK, False):
            return value  # type: ignore[no-any-return]
        value = entries[0](value)
    else:
        count = int(getattr(plist, "ntensors", 1))
        value = entries[0](*(getattr(plist, f"original{i}") for i in range(count)))
    for entry in entries[1:]:
        if getattr(entry, _MARK, False):
            break
        value = entry(value)
    return value  # type: ignore[no-any-return]


def unquantized(owner: nn.Module, name: str) -> torch.Tensor:
    """``owner.<name>`` as qswap's parametrizations receive it (without running them)."""
    if parametrizations_of(owner, name):
        return original_of(owner, name)
    value: torch.Tensor = getattr(owner, name)
    return value


def input_method(module: nn.Module) -> nn.Module | None:
    """The weight method recording ``module``'s inputs (``stats`` in its input slot), if any."""
    slot = activation_slot(module, "input")
    return None if slot is None else slot._modules.get("stats")


class WeightObserver(nn.Module):
    """Parametrization that observes a weight (and, in QAT, fake-quantizes it with fresh qparams).

    A weight changes only when it is written to, so a parameter seen unchanged (same
    storage, same version counter) is not observed again on every calibration batch.
    """

    def __init__(self, observer: nn.Module, quantizer: nn.Module | None = None) -> None:
        super().__init__()
        self.observer = observer
        self.quantizer = quantizer
        self._seen: tuple[int, ...] | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Record the weight's statistics; in QAT return it fake-quantized (straight-through)."""
        if self.quantizer is None and _PAUSED.get():
            return weight
        changed = self._observe(weight, version_key(weight))
        if self.quantizer is None:
            return weight
        return self._fake_quantize(weight, changed)

    def _observe(self, value: torch.Tensor, key: tuple[int, ...] | None) -> bool:
        """Observe ``value`` unless ``key`` (None: unknown) was the last seen; True if observed."""
        changed = key is None or key != self._seen
        if changed:
            self.observer(value)
            self._seen = key
        return changed

    def _fake_quantize(self, value: torch.Tensor, changed: bool) -> torch.Tensor:
        """``value`` fake-quantized, with fresh qparams if it ``changed`` (learned ones kept)."""
        quantizer: Any = self.quantizer
        if (changed or quantizer.qparams is None) and not learns_qparams(quantizer):
            observer: Any = self.observer
            quantizer.set_qparams(observer.calculate_qparams())
        return quantizer(value)  # type: ignore[no-any-return]


def version_key(weight: torch.Tensor) -> tuple[int, int] | None:
    """Identity of a parameter's current value, or ``None`` when it cannot be told."""
    if not isinstance(weight, nn.Parameter):
        return None  # computed by an earlier parametrization: a new tensor every call
    try:
        return weight.data_ptr(), weight._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def strip_slots(module: nn.Module, layer: Any) -> None:
    """Remove qswap's observers, quantizers and hooks from one layer (``layer``: its LayerSpec).

    The float tensors and the user's own hooks and parametrizations stay.
    """
    detach_activations(module)
    for slot in layer.param_specs():
        owner, pname = param_location(module, slot)
        detach_parametrizations(owner, pname)


def has_slots(module: nn.Module, layer: Any) -> bool:
    """Whether qswap's observers or quantizers are attached to this layer (``layer``: its LayerSpec)."""
    if (
        activation_slot(module, "input") is not None
        or activation_slot(module, "output") is not None
    ):
        return True
    for slot in layer.param_specs():
        owner, pname = param_location(module, slot)
        if parametrizations_of(owner, pname):
            return True
    return False
