"""The scoped mapping registry: float class -> counterpart, fusion patterns, components, backends.

Keys are classes, not strings. A child registry overlays its parent: reads fall
through, writes stay local, so two frameworks embedding qswap never see each
other's entries. The default registry is built on first use and frozen.

>>> import torch, qswap
>>> reg = qswap.Registry("mine", parent=qswap.default_registry())
>>> reg.find_mapping(torch.nn.Conv2d, "fake").slots
{'weight': 0}
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import fnmatch
import functools
import importlib
import importlib.metadata
import inspect
import os
import re
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Literal,
    Protocol,
    TypeGuard,
    TypeVar,
    cast,
    overload,
)

import torch
from pydantic import BaseModel, ValidationError

from qswap.exceptions import (
    ConfigError,
    FrozenRegistryError,
    NotRegisteredError,
    PlanError,
    PluginError,
    RegistrationError,
)
from qswap.pack import PackDocument, display_path, read_pack

__all__ = [
    "Backend",
    "ComponentEntry",
    "FusionPattern",
    "Lowering",
    "MappingEntry",
    "Registry",
    "accepts_positional",
    "default_registry",
    "qualified_name",
    "registration_template",
    "registry_data_dir",
]

_T = TypeVar("_T")
_C = TypeVar("_C", bound=type)

ComponentKind = Literal["quantizer", "observer", "method"]
_FUNCTION_QUANTIZER = "qswap.quantizers.function_quantizer"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_SLOT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_HERE = os.path.normcase(os.path.abspath(__file__))
_DEFAULT_SLOTS: dict[str, int] = {"weight": 0}


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class MappingEntry:
    """A float module class and the counterpart that replaces it on one backend."""

    float_cls: type
    counterpart: type
    backend: str
    subclasses: bool
    slots: Mapping[str, int] = field(hash=False)
    origin: str


@dataclass(frozen=True)
class FusionPattern:
    """Consecutive module types and the function that fuses them into one module."""

    types: tuple[type, ...]
    fuser: Callable[..., torch.nn.Module]
    origin: str

    def fuse(self, *modules: torch.nn.Module) -> torch.nn.Module:
        """Call the fuser on ``modules`` (in pattern order) and check it returned a module.

        >>> import torch
        >>> p = FusionPattern((torch.nn.Linear, torch.nn.ReLU), torch.nn.Sequential, "here.py:1")
        >>> type(p.fuse(torch.nn.Linear(2, 2), torch.nn.ReLU())).__name__
        'Sequential'
        """
        if len(modules) != len(self.types):
            raise PlanError(
                f"fusion pattern {self.describe()} takes {len(self.types)} modules, "
                f"got {len(modules)}"
            )
        result = self.fuser(*modules)
        if not isinstance(result, torch.nn.Module):
            raise RegistrationError(
                f"fusion pattern {self.describe()} registered at {self.origin}: its fuser "
                f"{qualified_name(self.fuser)} returned {type(result).__name__}, not a "
                "torch.nn.Module; make the fuser return the fused module"
            )
        return result

    def describe(self) -> str:
        """Return ``(Conv2d, BatchNorm2d, ReLU)``-style text for messages."""
        return "(" + ", ".join(t.__name__ for t in self.types) + ")"


@dataclass(frozen=True)
class ComponentEntry:
    """A registered quantizer, observer or weight method class with its options model."""

    kind: ComponentKind
    name: str
    cls: type
    options_model: type[BaseModel]
    origin: str
    wraps: Callable[..., Any] | None = None

    def create(
        self, spec: Any, options: Mapping[str, Any] | BaseModel | None = None
    ) -> torch.nn.Module:
        """Instantiate the component for ``spec`` with validated ``options``.

        >>> from qswap.config import QuantSpec
        >>> entry = default_registry().observer("minmax")
        >>> entry.create(QuantSpec()).seen
        False
        """
        opts = self.validate_options(options)
        module = self.cls(spec, opts)
        if not isinstance(module, torch.nn.Module):
            raise RegistrationError(
                f"{self.kind} {self.name!r} registered at {self.origin}: {qualified_name(self.cls)}"
                f"(spec, options) returned {type(module).__name__}, not a torch.nn.Module"
            )
        return module

    def validate_options(self, options: Mapping[str, Any] | BaseModel | None) -> BaseModel:
        """Return ``options`` validated by this component's own ``options_model``."""
        if isinstance(options, self.options_model):
            return options
        if isinstance(options, BaseModel):
            options = options.model_dump()
        try:
            return self.options_model.model_validate(dict(options or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<options>'}: {err['msg']}"
                for err in exc.errors()
            )
            fields = ", ".join(self.options_model.model_fields) or "none"
            raise ConfigError(
                f"invalid options for {self.kind} {self.name!r}: {problems} "
                f"(its options are: {fields})",
                path=f"{self.kind}.options",
            ) from None


class Lowering(Protocol):
    """How a backend turns its layers of a calibrated model into what it runs.

    ``convert`` calls ``lower(model, layers, example_args, example_kwargs)`` once per backend
    that runs some layer of the plan (the fallback backend first, then the config's):
    ``model`` is the calibrated model, fused, with the observers of these layers already
    removed unless the backend says ``keeps_observers``; ``layers`` maps module paths to
    their ``qswap.LayerSpec`` (specs, calibrated ``qparams``, counterpart); the example
    inputs are what ``prepare``/``calibrate`` ran (for tracing the dataflow). It returns the
    model, changed in place, or a new root module. ``examples/custom_backend.py`` writes one.
    """

    def __call__(
        self,
        model: torch.nn.Module,
        layers: Mapping[str, Any],
        example_args: tuple[Any, ...],
        example_kwargs: Mapping[str, Any],
    ) -> torch.nn.Module: ...


@dataclass(frozen=True)
class Backend:
    """A named target for ``convert``: what it supports and how it lowers.

    Registered with ``Registry.register_backend`` or a pack's ``backends:``, and chosen by a
    config's ``backend:``. ``weight_bits``/``activation_bits`` bound the specs it runs;
    ``check(layer)`` says what else it cannot run (the plan then falls back for that layer);
    ``lower`` is its :class:`Lowering`.
    """

    name: str
    description: str = ""
    integer: bool = False
    weight_bits: tuple[int, int] = (2, 16)
    activation_bits: tuple[int, int] = (2, 16)
    lower: Lowering | None = None
    origin: str = ""
    #: ``lower`` gets its layers with their observers attached and replaces them in place
    #: (the fake backend); otherwise ``convert`` removes them first
    keeps_observers: bool = False
    #: for integer backends whose u8 x s8 kernels may add pairs of products in 16 bits (x86
    #: CPUs without VNNI): tells whether they do on this machine. The plan then keeps weights
    #: to 7 bits where activations use 8 (``vnni`` in the config overrides it; ``qswap.cpu``)
    saturates: Callable[[], bool] | None = None
    #: what the backend cannot run of a planned layer (a reason, shown in the plan) or
    #: ``None``: a weight granularity, an axis or a mode its kernels lack. The plan then
    #: falls back for that layer (``fallback`` in the config) instead of lowering failing
    check: Callable[[Any], str | None] | None = None
    #: a layer whose output is only the model's output keeps that output float: the
    #: backend's kernels dequantize inside (ONNX Runtime's QGemm, MatMulIntegerToFloat), so
    #: rounding the model's result to 8 bits would only add error
    float_outputs: bool = False
    #: its lowering keeps a parameter that several layers share as one stored tensor (the
    #: packed backend: a tied embedding and lm_head share their packed bytes), so the plan
    #: does not move tied layers off it
    shares_ties: bool = False


@dataclass
class _Deferred:
    """A pack with ``requires:``, and the entries still waiting for their classes' modules."""

    doc: PackDocument
    package: str | None
    replace: bool
    pending: set[tuple[str, int]] = field(init=False)

    def __post_init__(self) -> None:
        pack = self.doc.pack
        self.pending = (
            {("mappings", i) for i in range(len(pack.mappings))}
            | {("fusions", i) for i in range(len(pack.fusions))}
            | {("decompositions", i) for i in range(len(pack.decompositions))}
        )

    def imported(self, key: tuple[str, int]) -> bool:
        """Whether every class the entry names from a required library is imported already."""
        section, i = key
        pack = self.doc.pack
        if section == "mappings":
            paths = [pack.mappings[i].module, pack.mappings[i].counterpart]
        elif section == "fusions":
            paths = [*pack.fusions[i].types, pack.fusions[i].fuser]
        else:
            paths = [pack.decompositions[i].module, pack.decompositions[i].decompose]
        roots = set(pack.requires)
        return all(
            p.partition(".")[0] not in roots or p.rpartition(".")[0] in sys.modules for p in paths
        )


# --------------------------------------------------------------------------- helpers


def qualified_name(obj: object) -> str:
    """Return the shortest public dotted path of a class or function.

    >>> import torch
    >>> qualified_name(torch.nn.Conv2d)
    'torch.nn.Conv2d'
    """
    module = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if qual is None:
        return repr(obj)
    if not module or module == "builtins":
        return str(qual)
    if "<locals>" not in qual:
        parts = module.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            mod = sys.modules.get(prefix)
            if mod is not None and _getattr_path(mod, qual) is obj:
                return f"{prefix}.{qual}"
    return f"{module}.{qual}"


def _getattr_path(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        try:
            obj = getattr(obj, part, None)
        except Exception:
            return None
        if obj is None:
            return None
    return obj


def _caller_origin() -> str:
    """``file.py:line`` of the first frame outside this module (the user's register call)."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and os.path.normcase(frame.f_code.co_filename) == _HERE:
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{display_path(frame.f_code.co_filename)}:{frame.f_lineno}"


def _definition_site(obj: object) -> str:
    try:
        file = inspect.getsourcefile(obj)  # type: ignore[arg-type]
        _, line = inspect.getsourcelines(obj)  # type: ignore[arg-type]
    except (TypeError, OSError):
        return "unknown location"
    return f"{display_path(file)}:{line}" if file else "unknown location"


def _forward_owner(cls: type) -> type | None:
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return klass
    return None


def _overrides_forward(cls: type, base: type) -> bool:
    return getattr(cls, "forward", None) is not getattr(base, "forward", None)


def _is_module_class(obj: object) -> TypeGuard[type[torch.nn.Module]]:
    return isinstance(obj, type) and issubclass(obj, torch.nn.Module)


def accepts_positional(fn: Callable[..., Any], count: int) -> bool:
    """Whether ``fn`` can be called with ``count`` positional arguments (unknown: True).

    >>> accepts_positional(lambda x: x, 1), accepts_positional(lambda: 0, 1)
    (True, False)
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True  # builtins without a signature: give them the benefit of the doubt
    try:
        sig.bind(*([None] * count))
    except TypeError:
        return False
    return True


def registration_template(cls: type, backend: str = "fake") -> str:
    """Return a ready-to-paste registration of a counterpart for ``cls`` on ``backend``.

    >>> import torch
    >>> print(registration_template(torch.nn.Bilinear).splitlines()[0])
    from torch.nn import Bilinear
    """
    name = cls.__name__
    full = qualified_name(cls)
    module, _, qual = full.rpartition(".")
    lines = []
    if module and module != "__main__" and "<locals>" not in full and qual == name:
        lines += [f"from {module} import {name}", ""]
    lines += [
        f'@reg.register_mapping({name}, backend="{backend}")',
        f"class Quantized{name}(torch.nn.Module):",
        "    @classmethod",
        "    def from_float(cls, module, spec):  # spec: qswap.plan.LayerSpec",
        "        ...  # build and return the quantized module",
        "# or, in a YAML registry pack loaded with reg.load_pack(path):",
        "#   mappings:",
        (
            f"#     - {{module: {full}, counterpart: my_pkg.Quantized{name}, backend: {backend}, "
            "slots: {weight: 0}}"
        ),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- contracts


def _check_float_cls(float_cls: object, origin: str) -> type:
    if not _is_module_class(float_cls):
        raise RegistrationError(
            f"register_mapping at {origin}: the key must be a torch.nn.Module subclass "
            f"(a class, not an instance or a name), got {float_cls!r}"
        )
    return float_cls


def _check_counterpart(float_cls: type, counterpart: object, origin: str) -> type:
    fix = (
        "add\n    @classmethod\n    def from_float(cls, module, spec) -> torch.nn.Module: ...\n"
        f"to {getattr(counterpart, '__name__', counterpart)!s}"
    )
    where = f"as the counterpart of {qualified_name(float_cls)} (at {origin})"
    if not isinstance(counterpart, type):
        raise RegistrationError(
            f"{counterpart!r} cannot be registered {where}: a counterpart must be a class with "
            f"classmethod from_float(module, spec); {fix}"
        )
    name = qualified_name(counterpart)
    raw = inspect.getattr_static(counterpart, "from_float", None)
    if raw is None:
        raise RegistrationError(
            f"{name} cannot be registered {where}: it has no from_float(module, spec); {fix}"
        )
    if not isinstance(raw, (classmethod, staticmethod)):
        raise RegistrationError(
            f"{name} cannot be registered {where}: from_float must be a classmethod (or "
            f"staticmethod) called as {counterpart.__name__}.from_float(module, spec), but it is "
            f"{'an instance method' if inspect.isfunction(raw) else type(raw).__name__}; {fix}"
        )
    method = raw.__get__(None, counterpart)
    if not callable(method) or not accepts_positional(method, 2):
        raise RegistrationError(
            f"{name} cannot be registered {where}: from_float must accept two arguments "
            f"(module, spec), its signature is {inspect.signature(method)}; {fix}"
        )
    return counterpart


def _check_slots(slots: Mapping[str, int] | None, origin: str) -> dict[str, int]:
    if slots is None:
        return dict(_DEFAULT_SLOTS)
    if not isinstance(slots, Mapping):
        raise RegistrationError(
            f"register_mapping at {origin}: slots must map slot names to channel axes, "
            f'e.g. {{"weight": 0}}; got {slots!r}'
        )
    out: dict[str, int] = {}
    for key, axis in slots.items():
        if not isinstance(key, str) or not _SLOT_RE.match(key):
            raise RegistrationError(
                f"register_mapping at {origin}: slot name {key!r} is not a parameter-like name "
                "(letters, digits, '_' and '.')"
            )
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise RegistrationError(
                f"register_mapping at {origin}: slot {key!r} needs an integer channel axis, "
                f"got {axis!r}"
            )
        out[key] = axis
    return out


_PROTOCOL: dict[str, tuple[str, ...]] = {
    "quantizer": ("set_qparams",),
    "observer": ("calculate_qparams", "merge"),
    "method": ("merge", "solve"),
}
_PROTOCOL_TEXT = {
    "quantizer": "forward(x), set_qparams(qparams), __init__(spec, options) and options_model",
    "observer": (
        "forward(x), calculate_qparams(), merge(other), __init__(spec, options) and options_model"
    ),
    "method": (
        "forward(x) (records the layer's inputs), merge(other), solve(weight, qparams, "
        "quantize), __init__(spec, options) and options_model"
    ),
}
_BASES = {
    "quantizer": "qswap.quantizers.Quantizer",
    "observer": "qswap.observers.Observer",
    "method": "qswap.rounding.WeightMethod",
}


def _check_component(
    kind: ComponentKind, name: str, cls: object, origin: str
) -> tuple[type, type[BaseModel]]:
    base = _BASES[kind]
    label = getattr(cls, "__name__", repr(cls))
    head = f"{label} cannot be registered as {kind} {name!r} (at {origin})"
    fix = f"subclass {base} or implement {_PROTOCOL_TEXT[kind]}"
    if not isinstance(cls, type):
        extra = (
            "; a plain function fn(x) -> x can be registered as a quantizer, not an observer"
            if kind == "observer" and callable(cls)
            else ""
        )
        raise RegistrationError(f"{head}: a {kind} must be a class{extra}; {fix}")
    if not issubclass(cls, torch.nn.Module):
        raise RegistrationError(f"{head}: a {kind} must be a torch.nn.Module subclass; {fix}")
    missing = [m for m in _PROTOCOL[kind] if not callable(getattr(cls, m, None))]
    if getattr(cls, "forward", None) is torch.nn.Module.forward:
        missing.insert(0, "forward")
    if missing:
        raise RegistrationError(f"{head}: it lacks {', '.join(missing)}; {fix}")
    abstract = _unimplemented_hooks(cls)
    if abstract:
        raise RegistrationError(
            f"{head}: it does not implement {', '.join(abstract)} (the base class versions "
            "raise NotImplementedError); implement them in the subclass"
        )
    options_model = getattr(cls, "options_model", None)
    if not (isinstance(options_model, type) and issubclass(options_model, BaseModel)):
        raise RegistrationError(
            f"{head}: options_model must be a pydantic BaseModel subclass (use "
            f"qswap.quantizers.EmptyOptions when it takes no options), got {options_model!r}"
        )
    if not accepts_positional(cls, 2):
        raise RegistrationError(
            f"{head}: it must be constructible as {cls.__name__}(spec, options), its signature "
            f"is {inspect.signature(cls)}; {fix}"
        )
    return cls, options_model


#: (module, base class) -> the hooks its subclasses must override
_HOOKS = {
    ("qswap.quantizers", "Quantizer"): ("forward",),
    ("qswap.observers", "Observer"): ("observe", "calculate_qparams", "_merge_state"),
    ("qswap.rounding", "WeightMethod"): ("observe", "solve", "_merge_state"),
}


def _unimplemented_hooks(cls: type) -> list[str]:
    """Hooks a subclass of qswap's Quantizer or Observer base class must override but did not."""
    out: list[str] = []
    for (module_name, base_name), hooks in _HOOKS.items():
        module = sys.modules.get(module_name)  # not imported: cls cannot subclass its base
        base = getattr(module, base_name, None) if module is not None else None
        if isinstance(base, type) and issubclass(cls, base):
            out += [h for h in hooks if h in vars(base) and getattr(cls, h) is getattr(base, h)]
    return out


def _check_backend(backend: Backend, origin: str) -> None:
    if not isinstance(backend.name, str) or not _NAME_RE.match(backend.name):
        raise RegistrationError(
            f"backend name {backend.name!r} (at {origin}) must start with a letter and use "
            "letters, digits, '_', '.', '-'"
        )
    for label in ("weight_bits", "activation_bits"):
        rng = getattr(backend, label)
        if (
            not isinstance(rng, tuple)
            or len(rng) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in rng)
            or not 1 <= rng[0] <= rng[1] <= 32
        ):
            raise RegistrationError(
                f"backend {backend.name!r} (at {origin}): {label} must be a (low, high) tuple "
                f"with 1 <= low <= high <= 32, got {rng!r}"
            )
    if backend.lower is not None and not callable(backend.lower):
        raise RegistrationError(
            f"backend {backend.name!r} (at {origin}): lower must be callable or None, "
            f"got {backend.lower!r}"
        )


def _resolve_dotted(dotted: str, where: str, package: str | None) -> object:
    """Import the object a pack names; errors name the pack position."""
    if dotted.startswith("."):
        if not package:
            raise RegistrationError(
                f"{where}: {dotted!r} is relative; pass package=... to Registry.load_pack or "
                "write the full dotted path"
            )
        dotted = package + dotted
    parts = dotted.split(".")
    missing: set[str] = set()
    for i in range(len(parts), 0, -1):
        modname = ".".join(parts[:i])
        try:
            obj: object = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name and (modname == exc.name or modname.startswith(exc.name + ".")):
                missing.add(exc.name)
                if i == 1:
                    raise RegistrationError(
                        f"{where}: cannot import {dotted!r}: no module named {parts[0]!r}; fix the "
                        "dotted path (package.module.Name) or install the package"
                    ) from None
                continue
            raise RegistrationError(
                f"{where}: cannot import {dotted!r}: importing {modname!r} failed: {exc}"
            ) from exc
        except Exception as exc:
            raise RegistrationError(
                f"{where}: cannot import {dotted!r}: importing {modname!r} raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        for j in range(i, len(parts)):
            attr = parts[j]
            if not hasattr(obj, attr):
                owner = ".".join(parts[:j])
                candidates = [n for n in dir(obj) if not n.startswith("_")]
                close = difflib.get_close_matches(attr, candidates, n=1)
                hint = f" (did you mean {owner}.{close[0]}?)" if close else ""
                if j < len(parts) - 1 and f"{owner}.{attr}" in missing:
                    raise RegistrationError(
                        f"{where}: cannot import {dotted!r}: {owner!r} has no submodule or "
                        f"attribute {attr!r}{hint}; fix the dotted path or install the package"
                    )
                raise RegistrationError(
                    f"{where}: cannot import {dotted!r}: {owner!r} has no attribute "
                    f"{attr!r}{hint}; fix the dotted path"
                )
            obj = getattr(obj, attr)
        return obj
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- registry


class Registry:
    """A scoped registry of mappings, fusion patterns, quantizers, observers and backends.

    >>> import qswap
    >>> reg = qswap.Registry("mine", parent=qswap.default_registry())
    >>> reg.parent.name, reg.frozen
    ('default', False)
    """

    def __init__(self, name: str, parent: Registry | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise RegistrationError(f"a registry needs a non-empty name, got {name!r}")
        if parent is not None and not isinstance(parent, Registry):
            raise RegistrationError(
                f"parent of registry {name!r} must be a Registry or None, got {parent!r}"
            )
        self._name = name
        self._parent = parent
        self._lock = threading.RLock()
        self._frozen = False
        self._mappings: dict[tuple[type, str], MappingEntry] = {}
        self._fusions: dict[tuple[type, ...], FusionPattern] = {}
        self._decompositions: dict[type, tuple[Callable[[torch.nn.Module], torch.nn.Module], str]]
        self._decompositions = {}
        self._components: dict[ComponentKind, dict[str, ComponentEntry]] = {
            "quantizer": {},
            "method": {},
            "observer": {},
        }
        self._backends: dict[str, Backend] = {}
        self._plugins: dict[str, str] = {}
        # packs naming `requires:` libraries, with the entries still waiting for their module
        self._deferred: list[_Deferred] = []
        self._modules_seen = 0  # len(sys.modules) when the deferred entries were last checked

    # -- properties -------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The registry's name, used in messages."""
        return self._name

    @property
    def parent(self) -> Registry | None:
        """The registry reads fall through to, or ``None``."""
        return self._parent

    @property
    def frozen(self) -> bool:
        """Whether writes are refused."""
        return self._frozen

    def freeze(self) -> None:
        """Refuse every later write to this registry (its children stay writable)."""
        with self._lock:
            self._frozen = True

    def __reduce__(self) -> Any:
        # a pickled model (torch.save(qmodel)) refers to its registry: the default one stays
        # the process's own on load; others travel with their tables, less their lock
        if self is _DEFAULT:
            return (default_registry, ())
        return super().__reduce__()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        parent = f", parent={self._parent.name!r}" if self._parent else ""
        frozen = ", frozen" if self._frozen else ""
        return f"Registry({self._name!r}{parent}{frozen})"

    def _chain(self) -> Iterator[Registry]:
        reg: Registry | None = self
        while reg is not None:
            if reg._deferred:
                reg._register_imported()
            yield reg
            reg = reg._parent

    def _register_imported(self) -> None:
        """Register the deferred pack entries whose classes the program has imported by now.

        An entry waits until the module of each class it names from a ``requires:`` library
        is in ``sys.modules`` (a model built with that library has imported it), so qswap
        never imports a library itself. An entry that no longer fits the installed library
        (a class moved) is dropped with a warning; the layers it covers are planned as if
        it were absent.
        """
        if len(sys.modules) == self._modules_seen:
            return  # nothing imported since the last check
        with self._lock:
            self._modules_seen = len(sys.modules)
            frozen, self._frozen = self._frozen, False  # part of its definition, not a write
            try:
                for deferred in self._deferred:
                    ready = {key for key in deferred.pending if deferred.imported(key)}
                    if ready:
                        deferred.pending -= ready
                        self._register_deferred(deferred, ready)
                self._deferred = [d for d in self._deferred if d.pending]
            finally:
                self._frozen = frozen

    def _register_deferred(self, deferred: _Deferred, keys: set[tuple[str, int]]) -> None:
        doc = deferred.doc
        try:
            actions = self._pack_actions(doc, deferred.package, deferred.replace, only=keys)
            with self._rollback_on_error():
                for action in actions:
                    action()
        except (RegistrationError, ImportError, AttributeError) as exc:
            warnings.warn(
                f"registry pack {doc.source} (requires {', '.join(doc.pack.requires)}): entries "
                f"that do not fit the installed library were not registered: {exc}",
                UserWarning,
                stacklevel=5,
            )

    def _check_writable(self, what: str) -> None:
        if self._frozen:
            parent = (
                "qswap.default_registry()" if self is _DEFAULT else f"<the {self._name!r} registry>"
            )
            raise FrozenRegistryError(
                f"registry {self._name!r} is frozen, so {what} was refused. Register into a "
                f'child registry instead: reg = qswap.Registry("mine", parent={parent}), then '
                "pass registry=reg to qswap's functions"
            )

    # -- mappings ---------------------------------------------------------------------

    @overload
    def register_mapping(
        self,
        float_cls: type[torch.nn.Module],
        counterpart: None = None,
        *,
        backend: str = "fake",
        subclasses: bool = False,
        slots: Mapping[str, int] | None = None,
        replace: bool = False,
    ) -> Callable[[_C], _C]: ...

    @overload
    def register_mapping(
        self,
        float_cls: type[torch.nn.Module],
        counterpart: _C,
        *,
        backend: str = "fake",
        subclasses: bool = False,
        slots: Mapping[str, int] | None = None,
        replace: bool = False,
    ) -> _C: ...

    def register_mapping(
        self,
        float_cls: type[torch.nn.Module],
        counterpart: _C | None = None,
        *,
        backend: str = "fake",
        subclasses: bool = False,
        slots: Mapping[str, int] | None = None,
        replace: bool = False,
    ) -> _C | Callable[[_C], _C]:
        """Map ``float_cls`` to ``counterpart`` on ``backend``; a class decorator without it.

        ``slots`` names the quantized parameters and their default channel axis
        (``{"weight": 0}`` when omitted). Returns the counterpart unchanged.

        >>> import torch
        >>> reg = Registry("doc")
        >>> @reg.register_mapping(torch.nn.Linear, backend="fake")
        ... class QLinear(torch.nn.Module):
        ...     @classmethod
        ...     def from_float(cls, module, spec): return cls()
        >>> reg.find_mapping(torch.nn.Linear, "fake").counterpart is QLinear
        True
        """
        if counterpart is None:
            self._check_writable(f"register_mapping({getattr(float_cls, '__name__', float_cls)})")

            def decorator(cls: _C) -> _C:
                self._add_mapping(
                    float_cls, cls, backend, subclasses, slots, replace, _caller_origin()
                )
                return cls

            return decorator
        self._add_mapping(
            float_cls, counterpart, backend, subclasses, slots, replace, _caller_origin()
        )
        return counterpart

    def _add_mapping(
        self,
        float_cls: object,
        counterpart: object,
        backend: str,
        subclasses: bool,
        slots: Mapping[str, int] | None,
        replace: bool,
        origin: str,
    ) -> None:
        self._check_writable(f"register_mapping({getattr(float_cls, '__name__', float_cls)})")
        key_cls = _check_float_cls(float_cls, origin)
        cp = _check_counterpart(key_cls, counterpart, origin)
        if not isinstance(backend, str) or not _NAME_RE.match(backend):
            raise RegistrationError(
                f"register_mapping at {origin}: backend must be a backend name such as 'fake', "
                f"got {backend!r}"
            )
        entry = MappingEntry(
            float_cls=key_cls,
            counterpart=cp,
            backend=backend,
            subclasses=bool(subclasses),
            slots=_check_slots(slots, origin),
            origin=origin,
        )
        with self._lock:
            self._check_writable(f"register_mapping({key_cls.__name__})")
            old = self._mappings.get((key_cls, backend))
            if old is not None and not replace:
                raise RegistrationError(
                    f"{qualified_name(key_cls)} already has a {backend!r} mapping in registry "
                    f"{self._name!r}: {qualified_name(old.counterpart)}, defined at {old.origin}; "
                    f"the new one ({qualified_name(cp)}) at {origin} clashes. Pass replace=True "
                    "to override it, or register into a child registry"
                )
            self._mappings[(key_cls, backend)] = entry

    def _entry(self, cls: type, backend: str) -> tuple[MappingEntry, Registry] | None:
        for reg in self._chain():
            entry = reg._mappings.get((cls, backend))
            if entry is not None:
                return entry, reg
        return None

    def _resolve(self, cls: type, backend: str) -> tuple[MappingEntry | None, list[str]]:
        """Look ``cls`` up on ``backend``; the lines say why it matched or did not."""
        found = self._entry(cls, backend)
        if found is not None:
            entry, reg = found
            line = (
                f"matched exactly -> {qualified_name(entry.counterpart)} "
                f"(registry {reg.name!r}, {entry.origin})"
            )
            return entry, [line]
        notes = [f"no entry for {qualified_name(cls)} itself"]
        for base in cls.__mro__[1:]:
            found = self._entry(base, backend)
            if found is None:
                continue
            entry, reg = found
            at = f"registry {reg.name!r}, {entry.origin}"
            if not entry.subclasses:
                notes.append(
                    f"almost: base {qualified_name(base)} has an entry ({at}) but it was "
                    "registered without subclasses=True, so subclasses do not match it"
                )
                continue
            if _overrides_forward(cls, base):
                owner = _forward_owner(cls)
                site = _definition_site(owner) if owner is not None else "unknown location"
                notes.append(
                    f"refused: base {qualified_name(base)} is registered with subclasses=True "
                    f"({at}), but {cls.__name__} overrides forward (in "
                    f"{owner.__name__ if owner else '?'}, {site}), so it is not treated as "
                    f"{base.__name__}; register a mapping for {cls.__name__} itself"
                )
                return None, notes
            line = (
                f"matched via base {qualified_name(base)} (registered with subclasses=True, "
                f"{at}; {cls.__name__} keeps its forward) -> {qualified_name(entry.counterpart)}"
            )
            return entry, [line]
        return None, notes

    def find_mapping(self, cls: type, backend: str) -> MappingEntry | None:
        """Return the entry for ``cls`` on ``backend``, or ``None`` (``explain`` says why).

        Exact type first (this registry, then its parents); then the nearest base
        registered with ``subclasses=True`` -- unless ``cls`` overrides ``forward``.

        >>> import torch
        >>> default_registry().find_mapping(torch.nn.Linear, "fake").slots
        {'weight': 0}
        """
        if not isinstance(cls, type):
            raise TypeError(f"find_mapping needs a class, got {cls!r}; pass type(module)")
        entry, _ = self._resolve(cls, backend)
        return entry

    def mappings(self, backend: str | None = None) -> list[MappingEntry]:
        """Return the visible mapping entries (a child's shadow its parent's), sorted by name."""
        seen: dict[tuple[type, str], MappingEntry] = {}
        for reg in self._chain():
            with reg._lock:
                items = list(reg._mappings.items())
            for key, entry in items:
                if backend is None or key[1] == backend:
                    seen.setdefault(key, entry)
        return sorted(seen.values(), key=lambda e: (qualified_name(e.float_cls), e.backend))

    # -- fusion -----------------------------------------------------------------------

    @overload
    def register_fusion(
        self, types: Sequence[type], fuser: None = None, *, replace: bool = False
    ) -> Callable[[_T], _T]: ...

    @overload
    def register_fusion(self, types: Sequence[type], fuser: _T, *, replace: bool = False) -> _T: ...

    def register_fusion(
        self, types: Sequence[type], fuser: _T | None = None, *, replace: bool = False
    ) -> _T | Callable[[_T], _T]:
        """Register ``fuser(*modules) -> nn.Module`` for consecutive ``types``; a decorator too.

        >>> import torch
        >>> reg = Registry("doc")
        >>> @reg.register_fusion((torch.nn.Linear, torch.nn.ReLU))
        ... def fuse_linear_relu(linear, relu): return torch.nn.Sequential(linear, relu)
        >>> reg.fusion_patterns()[0].fuser is fuse_linear_relu
        True
        """
        if fuser is None:
            self._check_writable("register_fusion")

            def decorator(fn: _T) -> _T:
                self._add_fusion(types, fn, replace, _caller_origin())
                return fn

            return decorator
        self._add_fusion(types, fuser, replace, _caller_origin())
        return fuser

    def _add_fusion(self, types: object, fuser: object, replace: bool, origin: str) -> None:
        self._check_writable("register_fusion")
        if (
            not isinstance(types, (tuple, list))
            or len(types) < 2
            or not all(_is_module_class(t) for t in types)
        ):
            raise RegistrationError(
                f"register_fusion at {origin}: types must be a tuple of two or more "
                "torch.nn.Module classes in forward order, e.g. (nn.Conv2d, nn.ReLU); "
                f"got {types!r}"
            )
        key: tuple[type, ...] = tuple(types)
        if not callable(fuser):
            raise RegistrationError(
                f"register_fusion at {origin}: the fuser for "
                f"({', '.join(t.__name__ for t in key)}) must be callable as "
                f"fuser(*modules) -> torch.nn.Module, got {fuser!r}"
            )
        if not accepts_positional(fuser, len(key)):
            raise RegistrationError(
                f"register_fusion at {origin}: the fuser {qualified_name(fuser)} must accept "
                f"{len(key)} modules (one per type), its signature is {inspect.signature(fuser)}"
            )
        pattern = FusionPattern(types=key, fuser=fuser, origin=origin)
        with self._lock:
            self._check_writable("register_fusion")
            old = self._fusions.get(key)
            if old is not None and not replace:
                raise RegistrationError(
                    f"fusion pattern {pattern.describe()} is already registered in registry "
                    f"{self._name!r} ({qualified_name(old.fuser)}, defined at {old.origin}); the "
                    f"new one at {origin} clashes. Pass replace=True to override it"
                )
            self._fusions[key] = pattern

    def fusion_patterns(self) -> list[FusionPattern]:
        """Return the visible fusion patterns, a child's over its parent's, longest first."""
        seen: dict[tuple[type, ...], FusionPattern] = {}
        for reg in self._chain():
            with reg._lock:
                items = list(reg._fusions.items())
            for key, pattern in items:
                seen.setdefault(key, pattern)
        return sorted(seen.values(), key=lambda p: -len(p.types))

    # -- decompositions ---------------------------------------------------------------

    def register_decomposition(
        self,
        cls: type[torch.nn.Module],
        decompose: Callable[[torch.nn.Module], torch.nn.Module],
        *,
        replace: bool = False,
    ) -> None:
        """Let ``plan`` and ``prepare`` see a ``cls`` module as the modules it is made of.

        ``decompose(module)`` returns an equivalent module built from the module's own tensors
        (timm's ``BatchNormAct2d``, a BatchNorm and an activation in one class, becomes a
        ``Sequential`` of a ``BatchNorm2d`` and the activation, so the BatchNorm folds into the
        convolution before it). It applies to exact instances of ``cls``, in qswap's copy of
        the model: the user's model is never changed.

        >>> import torch
        >>> reg = Registry("doc")
        >>> reg.register_decomposition(torch.nn.Identity, lambda m: torch.nn.Sequential())
        >>> reg.decomposition(torch.nn.Identity) is not None
        True
        """
        self._add_decomposition(cls, decompose, replace, _caller_origin())

    def _add_decomposition(
        self, cls: object, decompose: object, replace: bool, origin: str
    ) -> None:
        self._check_writable("register_decomposition")
        key = _check_float_cls(cls, origin)
        if not callable(decompose):
            raise RegistrationError(
                f"decomposition of {qualified_name(key)} at {origin}: {decompose!r} is not "
                "callable; pass a function module -> nn.Module"
            )
        with self._lock:
            found = self._decompositions.get(key)
            if found is not None and not replace:
                raise RegistrationError(
                    f"{qualified_name(key)} already has a decomposition, registered at "
                    f"{found[1]}; a second one at {origin} was refused. Pass replace=True to "
                    "override it"
                )
            self._decompositions[key] = (
                cast(Callable[[torch.nn.Module], torch.nn.Module], decompose),
                origin,
            )

    def decomposition(self, cls: type) -> Callable[[torch.nn.Module], torch.nn.Module] | None:
        """The decomposition registered for exactly ``cls`` (a child's over its parent's), or None."""
        for reg in self._chain():
            found = reg._decompositions.get(cls)
            if found is not None:
                return found[0]
        return None

    def has_decompositions(self) -> bool:
        """Whether any decomposition is registered here or in a parent (a quick check for plans)."""
        return any(reg._decompositions for reg in self._chain())

    # -- components -------------------------------------------------------------------

    @overload
    def register_quantizer(
        self, name: str, cls: None = None, *, replace: bool = False
    ) -> Callable[[_T], _T]: ...

    @overload
    def register_quantizer(self, name: str, cls: _T, *, replace: bool = False) -> _T: ...

    def register_quantizer(
        self, name: str, cls: _T | None = None, *, replace: bool = False
    ) -> _T | Callable[[_T], _T]:
        """Register a quantizer class, or a plain function ``fn(x) -> x``; a decorator too.

        A function is wrapped in an adapter quantizer (uniform qparams ignored, gradients
        straight through). Returns what it was given, unchanged.

        >>> import torch
        >>> reg = Registry("doc")
        >>> @reg.register_quantizer("sign")
        ... def sign(x): return torch.sign(x)
        >>> reg.quantizer("sign").wraps is sign
        True
        """
        return self._registrar("quantizer", name, cls, replace)

    @overload
    def register_observer(
        self, name: str, cls: None = None, *, replace: bool = False
    ) -> Callable[[_C], _C]: ...

    @overload
    def register_observer(self, name: str, cls: _C, *, replace: bool = False) -> _C: ...

    def register_observer(
        self, name: str, cls: _C | None = None, *, replace: bool = False
    ) -> _C | Callable[[_C], _C]:
        """Register an observer class under ``name``; a class decorator without ``cls``.

        >>> from qswap.observers import MinMaxObserver
        >>> reg = Registry("doc")
        >>> reg.register_observer("mm", MinMaxObserver) is MinMaxObserver
        True
        """
        return self._registrar("observer", name, cls, replace)

    @overload
    def register_method(
        self, name: str, cls: None = None, *, replace: bool = False
    ) -> Callable[[_C], _C]: ...

    @overload
    def register_method(self, name: str, cls: _C, *, replace: bool = False) -> _C: ...

    def register_method(
        self, name: str, cls: _C | None = None, *, replace: bool = False
    ) -> _C | Callable[[_C], _C]:
        """Register a weight method (how weights are rounded: GPTQ, AWQ...) under ``name``.

        A config picks it with ``weight: {method: name}``; see ``qswap.rounding.WeightMethod``.

        >>> from qswap.rounding import GPTQ
        >>> reg = Registry("doc")
        >>> reg.register_method("mine", GPTQ) is GPTQ
        True
        """
        return self._registrar("method", name, cls, replace)

    def _registrar(
        self, kind: ComponentKind, name: str, cls: _T | None, replace: bool
    ) -> _T | Callable[[_T], _T]:
        """``register_<kind>``'s body: register ``cls``, or return a decorator that will."""
        if cls is None:
            self._check_writable(f"register_{kind}({name!r})")

            def decorator(obj: _T) -> _T:
                self._add_component(kind, name, obj, replace, _caller_origin())
                return obj

            return decorator
        self._add_component(kind, name, cls, replace, _caller_origin())
        return cls

    def _add_component(
        self, kind: ComponentKind, name: str, obj: object, replace: bool, origin: str
    ) -> None:
        self._check_writable(f"register_{kind}({name!r})")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise RegistrationError(
                f"register_{kind} at {origin}: the name must start with a letter and use "
                f"letters, digits, '_', '.', '-'; got {name!r}"
            )
        wraps: Callable[..., Any] | None = None
        if kind == "quantizer" and not isinstance(obj, type) and callable(obj):
            wraps = obj
            # a plain function fn(x) -> x: the quantizers module adapts it (resolved by name,
            # as pack entries are: the registry sits below the components it holds)
            adapt = cast(Any, _resolve_dotted(_FUNCTION_QUANTIZER, origin, None))
            obj = adapt(name, obj, origin)
        cls, options_model = _check_component(kind, name, obj, origin)
        entry = ComponentEntry(
            kind=kind, name=name, cls=cls, options_model=options_model, origin=origin, wraps=wraps
        )
        with self._lock:
            self._check_writable(f"register_{kind}({name!r})")
            table = self._components[kind]
            old = table.get(name)
            if old is not None and not replace:
                raise RegistrationError(
                    f"{kind} {name!r} is already registered in registry {self._name!r} "
                    f"({qualified_name(old.wraps or old.cls)}, defined at {old.origin}); the new "
                    f"one at {origin} clashes. Pass replace=True to override it, or pick another "
                    "name"
                )
            table[name] = entry

    def _component(self, kind: ComponentKind, name: str) -> ComponentEntry:
        for reg in self._chain():
            entry = reg._components[kind].get(name)
            if entry is not None:
                return entry
        known = self.names(kind)
        close = difflib.get_close_matches(name, known, n=1) if isinstance(name, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise NotRegisteredError(
            f"no {kind} named {name!r} in registry {self._name!r}{hint} Registered: "
            f"{', '.join(known) or 'none'}. Add one with @reg.register_{kind}({name!r})"
        )

    def quantizer(self, name: str) -> ComponentEntry:
        """Return the quantizer entry ``name``; ``NotRegisteredError`` with a suggestion otherwise.

        >>> default_registry().quantizer("affine").kind
        'quantizer'
        """
        return self._component("quantizer", name)

    def observer(self, name: str) -> ComponentEntry:
        """Return the observer entry ``name``; ``NotRegisteredError`` with a suggestion otherwise.

        >>> default_registry().observer("minmax").name
        'minmax'
        """
        return self._component("observer", name)

    def method(self, name: str) -> ComponentEntry:
        """Return the weight method entry ``name``; ``NotRegisteredError`` otherwise.

        >>> default_registry().method("gptq").kind
        'method'
        """
        return self._component("method", name)

    # -- backends ---------------------------------------------------------------------

    def register_backend(self, backend: Backend | str, *, replace: bool = False) -> Backend:
        """Register a backend (a ``Backend`` or just its name); returns the stored ``Backend``.

        >>> reg = Registry("doc")
        >>> reg.register_backend("sim").integer
        False
        """
        origin = _caller_origin()
        self._check_writable("register_backend")
        if isinstance(backend, str):
            backend = Backend(backend)
        if not isinstance(backend, Backend):
            raise RegistrationError(
                f"register_backend at {origin}: expected a qswap.Backend or a name, got {backend!r}"
            )
        if not backend.origin:
            backend = dataclasses.replace(backend, origin=origin)
        self._add_backend(backend, replace)
        return backend

    def _add_backend(self, backend: Backend, replace: bool) -> None:
        _check_backend(backend, backend.origin)
        with self._lock:
            self._check_writable("register_backend")
            old = self._backends.get(backend.name)
            if old is not None and not replace:
                raise RegistrationError(
                    f"backend {backend.name!r} is already registered in registry {self._name!r} "
                    f"(defined at {old.origin}); the new one at {backend.origin} clashes. Pass "
                    "replace=True to override it"
                )
            self._backends[backend.name] = backend

    def backend(self, name: str) -> Backend:
        """Return the backend ``name``; ``NotRegisteredError`` with a suggestion otherwise.

        >>> default_registry().backend("fake").integer
        False
        """
        for reg in self._chain():
            found = reg._backends.get(name)
            if found is not None:
                return found
        known = self.names("backend")
        close = difflib.get_close_matches(name, known, n=1) if isinstance(name, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise NotRegisteredError(
            f"no backend named {name!r} in registry {self._name!r}{hint} Registered: "
            f"{', '.join(known) or 'none'}"
        )

    # -- discovery --------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        """Sorted names of the visible ``"quantizer"``, ``"observer"``, ``"method"`` or ``"backend"`` entries.

        >>> "fake" in default_registry().names("backend")
        True
        """
        out: set[str] = set()
        for reg in self._chain():
            with reg._lock:
                if kind == "backend":
                    out.update(reg._backends)
                elif kind in ("quantizer", "observer", "method"):
                    out.update(reg._components[kind])  # type: ignore[index]
                else:
                    raise ValueError(
                        f"unknown kind {kind!r}; use 'quantizer', 'observer', 'method' or 'backend'"
                    )
        return sorted(out)

    def _display_names(self) -> list[str]:
        names = [f"mapping:{e.backend}:{qualified_name(e.float_cls)}" for e in self.mappings()]
        names += [
            "fusion:" + "+".join(qualified_name(t) for t in p.types) for p in self.fusion_patterns()
        ]
        for kind in ("quantizer", "observer", "method", "backend"):
            names += [f"{kind}:{n}" for n in self.names(kind)]
        return names

    def explain(self, cls: type, backend: str | None = None) -> str:
        """Say, in lines of text, what ``cls`` matches on each backend and why (or what almost did).

        >>> import torch
        >>> text = default_registry().explain(torch.nn.Linear, "fake")
        >>> print(text.splitlines()[1].split(" (")[0])
          backend 'fake': matched exactly -> qswap.backends.fake.FakeQuantized
        """
        if not isinstance(cls, type):
            raise TypeError(f"explain needs a class, got {cls!r}; pass type(module)")
        chain = " -> ".join(repr(r.name) for r in self._chain())
        lines = [f"{qualified_name(cls)} in registry {chain}:"]
        if backend is None:
            backends = set(self.names("backend"))
            backends.update(e.backend for e in self.mappings())
            todo = sorted(backends)
        else:
            todo = [backend]
        matched_any = False
        for name in todo:
            entry, notes = self._resolve(cls, name)
            if entry is not None:
                matched_any = True
                slots = ", ".join(f"{k} (axis {v})" for k, v in entry.slots.items()) or "none"
                lines.append(f"  backend {name!r}: {notes[0]}")
                lines.append(f"    slots: {slots}")
            else:
                lines.append(f"  backend {name!r}: no mapping")
                lines.extend(f"    - {note}" for note in notes)
        same_name = sorted(
            {
                qualified_name(e.float_cls)
                for e in self.mappings()
                if e.float_cls.__name__ == cls.__name__ and e.float_cls is not cls
            }
        )
        if same_name:
            lines.append(
                f"  note: a different class with the same name is registered: "
                f"{', '.join(same_name)} (entries are keyed by the class object, not its name)"
            )
        fusions = [p for p in self.fusion_patterns() if cls in p.types]
        if fusions:
            lines.append("  fusion patterns containing it:")
            lines.extend(
                f"    {p.describe()} -> {qualified_name(p.fuser)} ({p.origin})" for p in fusions
            )
        if not matched_any:
            lines.append("  to register a counterpart:")
            template = registration_template(cls, backend or "fake")
            lines.extend(f"    {line}" for line in template.splitlines())
        return "\n".join(lines)

    # -- packs and plugins --------------------------------------------------------------

    def load_pack(
        self,
        path: str | os.PathLike[str],
        *,
        package: str | None = None,
        replace: bool = False,
    ) -> None:
        """Register everything a YAML pack declares, all or nothing.

        Dotted paths are imported now; a leading ``.`` is relative to ``package``. A pack
        with ``requires: [lib]`` waits until the program has imported ``lib`` (a model built
        with it has) and registers then, so qswap never imports a library itself. Entry
        origins are ``pack.yaml:line``.

        >>> reg = Registry("doc")
        >>> reg.load_pack(registry_data_dir() / "torch_nn.yaml")
        >>> len(reg.fusion_patterns()) > 0
        True
        """
        self._check_writable(f"load_pack({os.fspath(path)!r})")
        doc = read_pack(path)
        if doc.pack.requires:
            with self._lock:
                self._deferred.append(_Deferred(doc, package, replace))
                self._modules_seen = 0
            return  # each entry registers once the program imports the classes it names
        actions = self._pack_actions(doc, package, replace)
        with self._lock, self._rollback_on_error():
            for action in actions:
                action()

    def _pack_actions(
        self,
        doc: PackDocument,
        package: str | None,
        replace: bool,
        only: set[tuple[str, int]] | None = None,
    ) -> list[Callable[[], None]]:
        pack = doc.pack
        actions: list[Callable[[], None]] = []

        def resolve(value: str, loc: tuple[str | int, ...]) -> object:
            return _resolve_dotted(value, doc.where(loc), package)

        for i, b in enumerate(pack.backends):
            hooks = {
                key: resolve(value, ("backends", i, key)) if value else None
                for key, value in (
                    ("lower", b.lower),
                    ("saturates", b.saturates),
                    ("check", b.check),
                )
            }
            backend = Backend(
                name=b.name,
                description=b.description,
                integer=b.integer,
                weight_bits=b.weight_bits,
                activation_bits=b.activation_bits,
                lower=hooks["lower"],  # type: ignore[arg-type]
                origin=doc.origin(("backends", i)),
                keeps_observers=b.keeps_observers,
                saturates=hooks["saturates"],  # type: ignore[arg-type]
                check=hooks["check"],  # type: ignore[arg-type]
                float_outputs=b.float_outputs,
                shares_ties=b.shares_ties,
            )
            _check_backend(backend, backend.origin)
            actions.append(functools.partial(self._add_backend, backend, replace))
        for i, m in enumerate(pack.mappings):
            if only is not None and ("mappings", i) not in only:
                continue
            origin = doc.origin(("mappings", i))
            float_cls = resolve(m.module, ("mappings", i, "module"))
            counterpart = resolve(m.counterpart, ("mappings", i, "counterpart"))
            key = _check_float_cls(float_cls, origin)
            _check_counterpart(key, counterpart, origin)
            actions.append(
                functools.partial(
                    self._add_mapping,
                    float_cls,
                    counterpart,
                    m.backend or pack.backend,
                    m.subclasses,
                    m.slots,
                    replace,
                    origin,
                )
            )
        for i, f in enumerate(pack.fusions):
            if only is not None and ("fusions", i) not in only:
                continue
            origin = doc.origin(("fusions", i))
            types_ = tuple(resolve(t, ("fusions", i, "types", j)) for j, t in enumerate(f.types))
            fuser = resolve(f.fuser, ("fusions", i, "fuser"))
            actions.append(functools.partial(self._add_fusion, types_, fuser, replace, origin))
        for i, d in enumerate(pack.decompositions):
            if only is not None and ("decompositions", i) not in only:
                continue
            origin = doc.origin(("decompositions", i))
            cls = resolve(d.module, ("decompositions", i, "module"))
            fn = resolve(d.decompose, ("decompositions", i, "decompose"))
            actions.append(functools.partial(self._add_decomposition, cls, fn, replace, origin))
        sections: tuple[tuple[ComponentKind, dict[str, str]], ...] = (
            ("quantizer", pack.quantizers),
            ("observer", pack.observers),
            ("method", pack.methods),
        )
        for kind, table in sections:
            section = kind + "s"
            for name, dotted in table.items():
                origin = doc.origin((section, name))
                obj = resolve(dotted, (section, name))
                actions.append(
                    functools.partial(self._add_component, kind, name, obj, replace, origin)
                )
        return actions

    def _rollback_on_error(self) -> _Rollback:
        return _Rollback(self)

    def load_plugins(self, group: str = "qswap.registry") -> list[str]:
        """Call every ``register(reg)`` entry point in ``group`` with this registry.

        Never happens at import. Returns ``"distribution:entry-point"`` names loaded by
        this call (plugins already loaded into this registry are skipped). A failing
        plugin raises ``PluginError`` naming its distribution; its partial entries are
        rolled back.

        >>> Registry("doc").load_plugins(group="qswap.no-such-group")
        []
        """
        self._check_writable(f"load_plugins({group!r})")
        eps = importlib.metadata.entry_points(group=group)
        found: dict[str, importlib.metadata.EntryPoint] = {}
        for ep in eps:
            dist = getattr(ep, "dist", None)
            dist_name = dist.name if dist is not None else "<unknown distribution>"
            found.setdefault(f"{dist_name}:{ep.name}", ep)
        loaded: list[str] = []
        for plugin_id in sorted(found):
            ep = found[plugin_id]
            dist = getattr(ep, "dist", None)
            dist_text = (
                f"distribution {dist.name!r} {dist.version}"
                if dist is not None
                else "an unknown distribution"
            )
            where = f"plugin {ep.name!r} from {dist_text} (entry point {group}: {ep.value})"
            with self._lock:
                if plugin_id in self._plugins:
                    continue
                try:
                    target = ep.load()
                except Exception as exc:
                    raise PluginError(
                        f"{where} failed to import: {type(exc).__name__}: {exc}. Fix or "
                        "uninstall that distribution"
                    ) from exc
                if isinstance(target, types.ModuleType):
                    target = getattr(target, "register", None)
                if not callable(target):
                    raise PluginError(
                        f"{where} does not name a callable register(reg); point the entry point "
                        "at one, e.g. my_pkg.qswap_plugin:register"
                    )
                with self._rollback_on_error():
                    try:
                        target(self)
                    except Exception as exc:
                        raise PluginError(
                            f"{where} failed in register(reg): {type(exc).__name__}: {exc}"
                        ) from exc
                self._plugins[plugin_id] = ep.value
            loaded.append(plugin_id)
        return loaded

    def list(self, pattern: str = "*") -> builtins.list[str]:
        """Sorted display names of visible entries matching a case-insensitive glob.

        Names look like ``mapping:fake:torch.nn.Conv2d``, ``fusion:torch.nn.Conv2d+torch.nn.ReLU``,
        ``quantizer:affine``, ``observer:minmax``, ``backend:fake``.

        >>> default_registry().list("mapping:fake:*.conv2d")
        ['mapping:fake:torch.nn.Conv2d']
        """
        pat = pattern.lower()
        return sorted(n for n in set(self._display_names()) if fnmatch.fnmatchcase(n.lower(), pat))


class _Rollback:
    """Hold the lock and restore a registry's tables if the block raises (all-or-nothing)."""

    def __init__(self, reg: Registry) -> None:
        self._reg = reg
        self._mappings: dict[tuple[type, str], MappingEntry] = {}
        self._fusions: dict[tuple[type, ...], FusionPattern] = {}
        self._decompositions: dict[type, Any] = {}
        self._components: dict[str, dict[str, ComponentEntry]] = {}
        self._backends: dict[str, Backend] = {}

    def __enter__(self) -> None:
        reg = self._reg
        reg._lock.acquire()
        self._mappings = dict(reg._mappings)
        self._fusions = dict(reg._fusions)
        self._decompositions = dict(reg._decompositions)
        self._components = {k: dict(v) for k, v in reg._components.items()}
        self._backends = dict(reg._backends)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        reg = self._reg
        try:
            if exc_type is not None:
                reg._mappings.clear()
                reg._mappings.update(self._mappings)
                reg._fusions.clear()
                reg._fusions.update(self._fusions)
                reg._decompositions.clear()
                reg._decompositions.update(self._decompositions)
                reg._backends.clear()
                reg._backends.update(self._backends)
                for kind, table in reg._components.items():
                    table.clear()
                    table.update(self._components[kind])
        finally:
            reg._lock.release()


# --------------------------------------------------------------------------- defaults

_DEFAULT: Registry | None = None
_DEFAULT_LOCK = threading.Lock()


def registry_data_dir() -> Path:
    """The built-in packs' folder: ``qswap/_data/registry`` in a wheel, ``<repo>/registry`` else.

    >>> (registry_data_dir() / "torch_nn.yaml").is_file()
    True
    """
    package_dir = Path(__file__).resolve().parent
    wheel = package_dir / "_data" / "registry"
    if wheel.is_dir():
        return wheel
    return package_dir.parent / "registry"


def _build_default_registry() -> Registry:
    """The built-ins, declared as a third party declares its own: one pack per concern."""
    reg = Registry("default")
    for pack in sorted(registry_data_dir().glob("*.yaml")):
        reg.load_pack(pack)
    reg.freeze()
    return reg


def default_registry() -> Registry:
    """Return the frozen built-in registry (built on first call, then cached).

    >>> import qswap
    >>> qswap.default_registry().frozen
    True
    """
    global _DEFAULT
    if _DEFAULT is not None:
        return _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = _build_default_registry()
        return _DEFAULT
