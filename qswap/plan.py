"""The plan: one pure walk over a model deciding, per module, what quantization will do to it.

``plan(model, config)`` never touches the model. It resolves the config's rule
cascade for every module, looks the module's class up in the registry, finds the
fusion groups, and records one :class:`Decision` per module path -- fuse, quantize,
wrap (generic fake-quant of a layer no entry covers), passthrough or skip -- each with
its reason. ``prepare``/``convert`` execute the plan and decide nothing themselves.

    >>> import torch, qswap
    >>> p = qswap.plan(torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a8_minmax")
    >>> p["0"].kind
    'quantize'
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import ValidationError
from torch import nn
from torch.nn.utils import parametrize

from qswap.config import QConfig, QuantSpec, QuantSpecPatch, Rule, load_config
from qswap.cpu import pair_saturates, saturation_reason
from qswap.decompose import decomposed
from qswap.exceptions import ConfigError, PlanError
from qswap.registry import Backend, MappingEntry, Registry, default_registry, qualified_name

if TYPE_CHECKING:
    import os

    from qswap.fuse import FusionGroup
    from qswap.quantizers import QParams
    from qswap.trace import Trace

__all__ = [
    "Decision",
    "DecisionKind",
    "LayerSpec",
    "Plan",
    "describe_spec",
    "gc_paused",
    "plan",
    "split_inputs",
]

DecisionKind = Literal["fuse", "quantize", "wrap", "passthrough", "skip"]
_KINDS: tuple[DecisionKind, ...] = ("quantize", "wrap", "fuse", "skip", "passthrough")
_SPEC_FIELDS = tuple(QuantSpec.model_fields)
#: layers that read weight rows by index: a weight method fitting inputs has none to fit
_LOOKUPS = (nn.Embedding, nn.EmbeddingBag)


# --------------------------------------------------------------------------- data


@dataclass
class LayerSpec:
    """What one quantized module gets: its specs per slot, and (after convert) its qparams.

    ``weight``/``input``/``output`` are ``None`` when that slot is not quantized;
    ``slots`` holds other parameter slots (``bias``, ``kernel``, ...). ``backend`` is the
    backend that runs the layer (``"fake"`` for a layer that falls back), ``aliases`` the
    other paths of a module object reachable at several paths.
    """

    name: str
    module_type: type
    counterpart: type | None
    weight: QuantSpec | None
    input: QuantSpec | None
    output: QuantSpec | None
    slots: dict[str, QuantSpec] = field(default_factory=dict)
    qparams: dict[str, QParams] = field(default_factory=dict)
    backend: str = "fake"
    mode: str = "static"
    aliases: tuple[str, ...] = ()
    registry: Registry | None = field(default=None, repr=False, compare=False)
    #: after convert with ``bias_correction``: what was subtracted from the layer's bias
    bias_shift: torch.Tensor | None = field(default=None, repr=False, compare=False)
    #: after convert with a weight method that scales inputs (AWQ): what the layer's input
    #: is multiplied by before its (rescaled, quantized) weight applies
    input_scale: torch.Tensor | None = field(default=None, repr=False, compare=False)
    #: the layer whose quantized output is this layer's input (set by ``prepare`` from the
    #: trace): that tensor is observed once, there, and its qparams serve both layers
    input_from: str | None = None
    #: what the plan changed from the config for this layer's tensors, and why
    notes: tuple[str, ...] = ()

    def param_specs(self) -> dict[str, QuantSpec]:
        """Parameter slots to quantize (``weight`` first), by slot name."""
        out: dict[str, QuantSpec] = {}
        if self.weight is not None:
            out["weight"] = self.weight
        out.update(self.slots)
        return out

    def activation_specs(self) -> dict[str, QuantSpec]:
        """Activation slots to quantize (``input``, ``output``), by slot name."""
        out: dict[str, QuantSpec] = {}
        if self.input is not None:
            out["input"] = self.input
        if self.output is not None:
            out["output"] = self.output
        return out


@dataclass(frozen=True)
class Decision:
    """What quantization does to the module at ``name``, and why.

    ``backend`` is the backend that runs it (``None``: stays float); ``group`` the index
    of its fusion group in ``Plan.groups``; ``rules`` the indices of the config rules
    that matched; ``shared_with`` the first path of the same module object when the
    module is reachable at several paths (it is decided once, there).
    """

    name: str
    module_type: type
    kind: DecisionKind
    reason: str
    backend: str | None = None
    counterpart: type | None = None
    group: int | None = None
    rules: tuple[int, ...] = ()
    shared_with: str | None = None
    fallback: bool = False
    layer: LayerSpec | None = None


@dataclass(frozen=True)
class _Group:
    """A fusion group as the plan sees it: member paths (forward order) and the fused type."""

    paths: tuple[str, ...]
    types: tuple[type, ...]
    fused_type: type
    source: FusionGroup  # handed back to qswap.fuse.fuse_model by prepare
    kept: tuple[str, ...] = ()  # members folded in *and* left in place (run elsewhere too)


@dataclass(frozen=True)
class _Traced:
    """The trace the plan fused from, and the example inputs it ran on."""

    trace: Trace
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    training: bool = False  # some module was in training mode when it ran

    def same_inputs(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
        """Whether ``args``/``kwargs`` are the very objects the trace ran on."""
        return (
            len(args) == len(self.args)
            and all(a is b for a, b in zip(args, self.args, strict=True))
            and kwargs.keys() == self.kwargs.keys()
            and all(kwargs[k] is v for k, v in self.kwargs.items())
        )


class Plan:
    """Every decision for one model and config; ``print(plan)`` shows them as a table.

    ``plan[path]`` is the :class:`Decision` for a module path, ``plan.layers`` the
    :class:`LayerSpec` of every module to quantize (one per module object),
    ``plan.uncovered`` the paths of modules with float parameters that no registry entry
    covers, ``plan.groups`` the fusion groups (member paths in forward order).
    """

    def __init__(
        self,
        *,
        config: QConfig,
        registry: Registry,
        backend: Backend,
        model_type: type,
        decisions: dict[str, Decision],
        groups: list[_Group],
        layers: dict[str, LayerSpec],
        uncovered: list[str],
        uncovered_reasons: dict[type, str],
        uncovered_params: dict[type, list[str]] | None = None,
        traced: _Traced | None = None,
        narrowed: Sequence[str] = (),
        narrowing: str | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        self.config = config
        self._traced = traced
        self.registry = registry
        self.backend = backend
        self.model_type = model_type
        self.decisions = decisions
        self._groups = groups
        self.layers = layers
        self.uncovered = uncovered
        self._uncovered_reasons = uncovered_reasons
        self._uncovered_params = uncovered_params or {}
        #: layers whose weights the plan keeps to 7 bits so that int8 sums cannot saturate
        self.narrowed = tuple(narrowed)
        self.narrowing = narrowing
        #: what the plan says about the config as a whole (a default it did not use...)
        self.notes = tuple(notes)

    # -- access -------------------------------------------------------------------------

    def fused_trace(
        self,
        model: nn.Module,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        training: bool = False,
    ) -> Trace | None:
        """The dataflow of ``model`` (this plan's model, fused) on these inputs, without running it.

        Derived from the trace the plan fused from (``qswap.trace.fused_view``) when that trace
        ran on the same input objects, in eval mode (a training-mode forward may take other
        branches) unless ``training`` accepts one recorded in training mode; ``None`` when
        it cannot be told, and the caller traces ``model`` itself.
        """
        found = self._traced
        if found is None or not found.same_inputs(args, kwargs):
            return None
        if found.training and not training:
            return None
        from qswap.trace import fused_view

        paths = {p for name, layer in self.layers.items() for p in (name, *layer.aliases)}
        return fused_view(
            found.trace,
            model,
            [(g.paths, g.kept) for g in self._groups],
            leaf=lambda path, module: path in paths,  # a layer runs as one call (QAT fusions)
        )

    @property
    def groups(self) -> list[tuple[str, ...]]:
        """Fusion groups as tuples of module paths in forward order."""
        return [g.paths for g in self._groups]

    @property
    def fusion_groups(self) -> list[FusionGroup]:
        """The ``qswap.fuse.FusionGroup`` objects that ``prepare`` fuses, in forward order."""
        return [g.source for g in self._groups]

    def __getitem__(self, name: str) -> Decision:
        try:
            return self.decisions[name]
        except KeyError:
            raise PlanError(self._unknown(name)) from None

    def __contains__(self, name: object) -> bool:
        return name in self.decisions

    def __iter__(self) -> Iterator[Decision]:
        return iter(self.decisions.values())

    def __len__(self) -> int:
        return len(self.decisions)

    def counts(self) -> dict[str, int]:
        """How many module paths got each decision kind."""
        out: dict[str, int] = dict.fromkeys(_KINDS, 0)
        for d in self.decisions.values():
            out[d.kind] += 1
        return out

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self.decisions), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"no module named {name!r} in the plan of {self.model_type.__name__}{hint}"

    # -- text ---------------------------------------------------------------------------

    def __repr__(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in self.counts().items() if v)
        return (
            f"<Plan {self.model_type.__name__} backend={self.backend.name!r} "
            f"mode={self.config.mode!r}: {counts}>"
        )

    def __str__(self) -> str:
        rows = [("path", "type", "decision", "detail")]
        for d in self.decisions.values():
            rows.append((d.name or "(root)", d.module_type.__name__, d.kind, _detail(d)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = []
        for i, r in enumerate(rows):
            lines.append(
                "  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths, strict=False))
                + "  "
                + r[3]
            )
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
        counts = ", ".join(f"{v} {k}" for k, v in self.counts().items() if v)
        head = (
            f"qswap plan for {self.model_type.__name__}: backend {self.backend.name!r}, "
            f"mode {self.config.mode!r}, {len(self._groups)} fusion group(s); {counts}"
        )
        tail = list(self.notes)
        if self.narrowed and self.narrowing is not None:
            tail.append(f"{len(self.narrowed)} layer(s) have {self.narrowing}")
        if self.uncovered:
            tail.append(
                f"{len(self.uncovered)} module(s) with float parameters have no registry entry "
                "(plan.uncovered_report() shows how to register them): "
                + ", ".join(self.uncovered[:8])
                + (", ..." if len(self.uncovered) > 8 else "")
            )
        return "\n".join([head, *lines, *tail])

    def explain(self, name: str) -> str:
        """The rule cascade, registry lookup and final specs that decided module ``name``.

        >>> import torch, qswap
        >>> print(qswap.plan(torch.nn.Sequential(torch.nn.Linear(2, 2)), "w8a8_minmax").explain("0").splitlines()[0])
        0 (torch.nn.Linear): quantize
        """
        d = self[name]
        cfg = self.config
        lines = [f"{name or '(root)'} ({qualified_name(d.module_type)}): {d.kind}"]
        lines.append(f"  reason: {d.reason}")
        if self.narrowing is not None and name in self.narrowed:
            lines.append(f"  {self.narrowing}")
        if d.shared_with is not None:
            lines.append(f"  same module object as {d.shared_with!r}; decided once, there")
        if d.group is not None:
            g = self._groups[d.group]
            lines.append(
                f"  fusion group {d.group}: {' + '.join(g.paths)} "
                f"({' + '.join(t.__name__ for t in g.types)} -> {g.fused_type.__name__})"
            )
        vnni = "" if cfg.vnni == "auto" else f", vnni {str(cfg.vnni).lower()}"
        lines.append(
            f"  config: backend {cfg.backend!r}, mode {cfg.mode!r}, strict {cfg.strict}{vnni}"
        )
        if d.rules:
            lines.append("  rules that matched (in order; later ones override earlier ones):")
            for i in d.rules:
                lines.append(
                    f"    rules[{i}] {_describe_match(cfg.rules[i])}: {_rule_fields(cfg.rules[i])}"
                )
        else:
            lines.append("  rules that matched: none (config defaults)")
        lookup = d.layer.module_type if d.layer is not None else d.module_type
        lines.append("  registry:")
        text = self.registry.explain(lookup, self.backend.name)
        lines.extend(f"    {line}" for line in text.splitlines())
        if d.fallback and d.backend != self.backend.name:
            text = self.registry.explain(lookup, "fake")
            lines.append("  registry (fallback backend 'fake'):")
            lines.extend(f"    {line}" for line in text.splitlines())
        layer = d.layer
        if layer is not None:
            lines.append(
                f"  specs (backend {layer.backend!r}, counterpart "
                f"{qualified_name(layer.counterpart) if layer.counterpart else 'generic fake-quant'}):"
            )
            for slot in ("weight", "input", "output"):
                spec = getattr(layer, slot)
                lines.append(f"    {slot}: {describe_spec(spec) if spec else 'not quantized'}")
            for slot, spec in layer.slots.items():
                lines.append(f"    {slot}: {describe_spec(spec)}")
        return "\n".join(lines)

    def fallback_summary(self) -> str | None:
        """One line on the layers that fall back from the backend (to fake or float), or None.

        >>> import torch, qswap
        >>> qswap.plan(torch.nn.Sequential(torch.nn.Linear(2, 2)), "x86_int8").fallback_summary() is None
        True
        """
        if not self.backend.integer or "fallback" in self.config.model_fields_set:
            return None  # a config that says `fallback:` has chosen what such layers become
        fell: dict[str, list[str]] = {}
        layers = 0
        for d in self.decisions.values():
            if d.shared_with is not None or d.kind in ("fuse", "passthrough"):
                continue
            if d.kind == "skip" and d.rules:
                continue  # a rule asked for it
            layers += 1
            if d.fallback or (d.kind == "skip" and d.name in self.uncovered):
                fell.setdefault(d.module_type.__name__, []).append(d.name)
        if not fell:
            return None
        count = sum(len(v) for v in fell.values())
        kinds = sorted(fell.items(), key=lambda kv: -len(kv[1]))
        shown = ", ".join(f"{name} x{len(paths)}" for name, paths in kinds[:4])
        more = ", ..." if len(kinds) > 4 else ""
        target = "float" if self.config.fallback == "float" else "fake (simulated in float)"
        return (
            f"{count} of {layers} layers cannot run on backend {self.backend.name!r} and fall back "
            f"to {target}: {shown}{more}. print(qswap.plan(model, config)) shows each with its "
            "reason"
        )

    def uncovered_report(self) -> str:
        """All modules with float parameters that no entry covers, with registration snippets.

        >>> import torch, qswap
        >>> qswap.plan(torch.nn.Sequential(torch.nn.Linear(2, 2)), "w8a8_minmax").uncovered_report()
        'Every module with float parameters is covered by a registry entry.'
        """
        if not self.uncovered:
            return "Every module with float parameters is covered by a registry entry."
        from qswap.registry import registration_template

        by_type: dict[type, list[str]] = {}
        for path in self.uncovered:
            by_type.setdefault(self.decisions[path].module_type, []).append(path)
        backend = self.backend.name
        what = (
            "fake-quantized generically (each float parameter through parametrize, inputs "
            "and outputs through hooks)"
            if any(self.decisions[p].kind == "wrap" for p in self.uncovered)
            else "left in float"
        )
        lines = [
            (
                f"{len(self.uncovered)} module(s) of {len(by_type)} type(s) hold float parameters "
                f"but have no mapping for backend {backend!r}; they are {what}."
            ),
            (
                "To give a type its own counterpart, register it on a child registry "
                '(reg = qswap.Registry("mine", parent=qswap.default_registry())) and pass '
                "registry=reg:"
            ),
        ]
        for cls, paths in by_type.items():
            shown = ", ".join(paths[:5]) + (
                f", ... ({len(paths)} in all)" if len(paths) > 5 else ""
            )
            lines.append("")
            lines.append(f"{qualified_name(cls)}: {shown}")
            reason = self._uncovered_reasons.get(cls)
            if reason:
                lines.append(f"  ({reason})")
            template = registration_template(cls, backend)
            params = self._uncovered_params.get(cls)
            if params and params != ["weight"]:
                slots = ", ".join(f"{p}: 0" for p in params)
                template = template.replace("slots: {weight: 0}", f"slots: {{{slots}}}")
            lines.extend(f"    {line}" for line in template.splitlines())
        return "\n".join(lines)


def describe_spec(spec: QuantSpec) -> str:
    """One line describing a spec: ``int8 symmetric per_channel(axis=0) minmax/affine``.

    >>> describe_spec(QuantSpec())
    'int8 symmetric per_tensor observer=minmax quantizer=affine'
    """
    kind = f"{'int' if spec.signed else 'uint'}{spec.bits}"
    gran: str = spec.granularity
    if gran == "per_channel":
        gran += f"(axis={spec.axis})"
    elif gran == "per_group":
        gran += f"(axis={spec.axis}, group_size={spec.group_size})"
    extra = " reduce_range" if spec.reduce_range else ""
    obs = _component(spec.observer)
    qz = _component(spec.quantizer)
    method = "" if spec.method is None else f" method={_component(spec.method)}"
    return f"{kind} {spec.scheme} {gran}{extra} observer={obs} quantizer={qz}{method}"


def _component(ref: Any) -> str:
    options = getattr(ref, "options", None)
    if options:
        return f"{ref.name}({', '.join(f'{k}={v!r}' for k, v in options.items())})"
    return str(ref.name)


def _short_spec(spec: QuantSpec | None) -> str:
    if spec is None:
        return "-"
    gran = {"per_tensor": "", "per_channel": "/ch", "per_group": f"/g{spec.group_size}"}
    bits = spec.bits - 1 if spec.reduce_range else spec.bits  # the grid it really uses
    return f"{'' if spec.signed else 'u'}{bits}{gran[spec.granularity]}"


def _detail(d: Decision) -> str:
    layer = d.layer
    if layer is None or d.kind not in ("quantize", "wrap"):
        return d.reason
    bits = (
        f"w{_short_spec(layer.weight)} in{_short_spec(layer.input)} out{_short_spec(layer.output)}"
    )
    if layer.slots:
        bits += " " + " ".join(f"{k}{_short_spec(v)}" for k, v in layer.slots.items())
    return f"[{bits}] {d.reason}"


def _describe_match(rule: Rule) -> str:
    m = rule.match
    parts = [
        f"{k}={getattr(m, k)!r}" for k in ("name", "regex", "type") if getattr(m, k) is not None
    ]
    return "{" + ", ".join(parts) + "}"


def _patch_fields(patch: QuantSpecPatch) -> dict[str, Any]:
    return {k: getattr(patch, k) for k in patch.model_fields_set if getattr(patch, k) is not None}


def _rule_fields(rule: Rule) -> str:
    if rule.skip:
        return "skip: true"
    parts = []
    for key in ("weight", "activation", "input", "output"):
        patch = getattr(rule, key)
        if patch is not None:
            fields = ", ".join(f"{k}={_fmt(v)}" for k, v in _patch_fields(patch).items())
            parts.append(f"{key}.{{{fields}}}")
    for slot, patch in rule.slots.items():
        fields = ", ".join(f"{k}={_fmt(v)}" for k, v in _patch_fields(patch).items())
        parts.append(f"slots.{slot}.{{{fields}}}")
    return "; ".join(parts) or "(nothing)"


def _fmt(value: Any) -> str:
    if hasattr(value, "name") and hasattr(value, "options"):
        return _component(value)
    return repr(value)


# --------------------------------------------------------------------------- inputs


def split_inputs(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Normalise example inputs or one calibration batch to ``(args, kwargs)``.

    A tensor is one positional argument, a tuple or list the positional arguments, a
    dict the keyword arguments; ``None`` stays ``None``.

    >>> split_inputs({"x": 1})
    ((), {'x': 1})
    """
    if example is None:
        return None
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small objects.

    On a big model every allocation burst triggers full collections that scan all live
    objects (thousands of modules and tensors); pausing them while plan, prepare and
    convert build their objects halves their cost. The previous state is restored.

    >>> import gc
    >>> with gc_paused():
    ...     gc.isenabled()
    False
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def set_eval(model: nn.Module) -> list[weakref.ref[nn.Module]]:
    """``model.train(False)``, touching only the modules still in training mode.

    ``train`` sets the flag of every module through ``nn.Module.__setattr__``; on a model of
    thousands of modules that costs milliseconds even when all are in eval mode already. A
    module that overrides ``train`` gets the real call. Returns weak references to the
    modules that were in training mode, for :func:`restore_training`: a module replaced
    meanwhile (sequential calibration swaps each solved weight method out) is not kept
    alive by them.

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2)).train()
    >>> restore = set_eval(m); m.training, m[0].training, len(restore)
    (False, False, 2)
    >>> restore_training(restore); m[0].training
    True
    """
    found = {id(model): model}  # model.modules(), without its per-module generator frames
    stack = [model]
    while stack:
        for child in stack.pop()._modules.values():
            if child is not None and id(child) not in found:
                found[id(child)] = child
                stack.append(child)
    modules = list(found.values())
    training = [m for m in modules if m.training]
    if any(type(m).train is not nn.Module.train for m in modules):
        model.train(False)
    else:
        for m in training:
            m.training = False
    return [weakref.ref(m) for m in training]


def restore_training(modules: Sequence[weakref.ref[nn.Module]]) -> None:
    """Put back in training mode the modules :func:`set_eval` took out of it (those alive)."""
    for ref in modules:
        module = ref()
        if module is not None:
            module.training = True


# --------------------------------------------------------------------------- the walk


@dataclass
class _Node:
    module: nn.Module
    paths: list[str]
    rules: set[int] = field(default_factory=set)


class _Cascade:
    """Resolves slot specs for a module from its rules; results are cached per rule set."""

    def __init__(self, cfg: QConfig, registry: Registry) -> None:
        self.cfg = cfg
        self.registry = registry
        self.cache: dict[tuple[Any, ...], QuantSpec] = {}
        # (rule index, slot name) of every rules[i].slots entry that reached some module
        self.used_slots: set[tuple[int, str]] = set()
        # the config's default weight axis when the last resolve put a mapping's axis instead
        self.replaced: int | None = None
        self.replaced_cache: dict[tuple[Any, ...], int | None] = {}

    def patches(
        self, slot: str, rules: Sequence[int], redirected: Sequence[tuple[int, str, QuantSpecPatch]]
    ) -> list[tuple[int, QuantSpecPatch]]:
        """Patches for ``slot`` in cascade order: by rule index, within a rule general first."""
        out: list[tuple[int, QuantSpecPatch]] = []
        extra = {(i, s): p for i, s, p in redirected}
        order = sorted(set(rules) | {i for i, _, _ in redirected})
        for i in order:
            if i in rules:
                rule = self.cfg.rules[i]
                if slot in ("input", "output"):
                    found = [rule.activation, getattr(rule, slot)]
                elif slot == "weight":
                    found = [rule.weight]
                else:
                    found = [rule.weight, rule.slots.get(slot)]
                    if slot in rule.slots:
                        self.used_slots.add((i, slot))
                out.extend((i, p) for p in found if p is not None)
            patch = extra.get((i, slot))
            if patch is not None:
                out.append((i, patch))
        return out

    def resolve(
        self,
        path: str,
        slot: str,
        rules: tuple[int, ...],
        redirected: tuple[tuple[int, str, QuantSpecPatch], ...],
        default_axis: int | None,
        scalar: bool = False,
    ) -> QuantSpec:
        key = (
            slot if slot in ("input", "output", "weight") else ("param", slot),
            rules,
            tuple((i, s) for i, s, _ in redirected if s == slot),
            default_axis,
            scalar,
        )
        found = self.cache.get(key)
        if found is not None:
            self.replaced = self.replaced_cache[key]
            return found
        is_act = slot in ("input", "output")
        base = self.cfg.activation if is_act else self.cfg.weight
        data: dict[str, Any] = {name: getattr(base, name) for name in _SPEC_FIELDS}
        explicit_axis = False
        last_rule: int | None = None
        replaced: int | None = None  # the config's default axis, where the mapping's replaced it
        for i, patch in self.patches(slot, rules, redirected):
            last_rule = i
            fields = _patch_fields(patch)
            data.update(fields)
            explicit_axis = explicit_axis or "axis" in fields
            gran = fields.get("granularity")
            if gran is not None:
                if gran == "per_tensor" and "axis" not in fields:
                    data["axis"] = None
                if gran != "per_group" and "group_size" not in fields:
                    data["group_size"] = None
        if not is_act and data["granularity"] != "per_tensor":
            if scalar:
                data.update(granularity="per_tensor", axis=None, group_size=None)
            elif not explicit_axis and default_axis is not None:
                data["axis"] = default_axis
                replaced = base.axis if base.axis != default_axis else None
        if last_rule is None and all(
            data[k] == getattr(base, k) for k in ("axis", "granularity", "group_size")
        ):
            spec = base
        else:
            try:
                spec = QuantSpec.model_validate(data, context={"registry": self.registry})
            except ValidationError as exc:
                err = exc.errors(include_url=False)[0]
                msg = err.get("ctx", {}).get("message") or err.get("msg", "invalid")
                where = f"rules[{last_rule}]" if last_rule is not None else slot
                raise ConfigError(
                    f"module {path!r}: the {slot} spec resolved from the config defaults and "
                    f"rules {list(rules)} is invalid: {msg}",
                    path=where,
                ) from None
        self.cache[key] = spec
        self.replaced = self.replaced_cache[key] = replaced
        return spec


def _float_params(module: nn.Module) -> list[str]:
    """Names of the module's own floating-point parameters (parametrized ones included)."""
    names = [n for n, p in module._parameters.items() if p is not None and p.is_floating_point()]
    plists = module._modules.get("parametrizations")
    if plists is not None and parametrize.is_parametrized(module):
        for n, plist in plists._modules.items():
            original = getattr(plist, "original", None)
            if original is None:
                original = getattr(plist, "original0", None)
            if isinstance(original, torch.Tensor) and original.is_floating_point():
                names.append(n)
    return names


def _type_of(module: nn.Module) -> type:
    """The module's class, seen through ``torch.nn.utils.parametrize``'s injected subclass."""
    cls = type(module)
    if "parametrizations" in module._modules and parametrize.is_parametrized(module):
        return parametrize.type_before_parametrizations(module)
    return cls


def _param_shape(module: nn.Module, name: str) -> tuple[int, ...]:
    p = module._parameters.get(name)
    if p is None:
        with torch.no_grad():
            return tuple(getattr(module, name).shape)
    return tuple(p.shape)


def _fit_to_shape(
    path: str, slot: str, spec: QuantSpec, shape: tuple[int, ...]
) -> tuple[QuantSpec, str | None]:
    """``spec`` as the tensor of ``shape`` can take it: an impossible axis is an error naming
    the layer; groups that do not divide a channel fall back to per-channel, with a note."""
    if spec.granularity == "per_tensor":
        return spec, None
    ndim = len(shape)
    axis = 0 if spec.axis is None else spec.axis
    where = f"layer {path or '(root)'!r}: its {slot} of shape {list(shape)}"
    if not -ndim <= axis < ndim:
        raise PlanError(
            f"{where} has no axis {axis} for {spec.granularity} (a {ndim}-d tensor takes "
            f"-{ndim} <= axis < {ndim}). Set this slot's axis with a rule, e.g. "
            f"{{match: {{name: '{path}'}}, {'weight' if slot == 'weight' else 'slots'}: ...}}, "
            "or use granularity: per_tensor"
        )
    if spec.granularity == "per_group":
        channels = shape[axis]
        per_channel = 1
        for i, size in enumerate(shape):
            if i != axis % ndim:
                per_channel *= size
        size = spec.group_size or 0
        if ndim < 2 or size <= 0 or per_channel % size:
            fallback = spec.model_copy(update={"granularity": "per_channel", "group_size": None})
            return fallback, (
                f"{slot}: per_group({size}) cannot split {per_channel} element(s) per channel "
                f"of {channels}; per_channel instead"
            )
    return spec, None


def _param_ndim(module: nn.Module, name: str) -> int:
    p = module._parameters.get(name)
    if p is None:
        with torch.no_grad():
            return int(getattr(module, name).dim())
    return int(p.dim())


def _weight_location(module: nn.Module) -> nn.Module | None:
    """The module that owns the ``weight`` of ``module`` (itself, or a fused container's first child)."""
    if "weight" in _float_params(module):
        return module
    if isinstance(module, nn.Sequential) and len(module) > 0:
        return _weight_location(module[0])
    return None


class _Walker:
    """Per-plan state: the config, registry lookups (cached per class) and resolved specs."""

    def __init__(self, cfg: QConfig, registry: Registry) -> None:
        self.cfg = cfg
        self.registry = registry
        self.backend = registry.backend(cfg.backend)
        self.cascade = _Cascade(cfg, registry)
        self.mapping_cache: dict[tuple[type, str], MappingEntry | None] = {}
        self.uncovered_reasons: dict[type, str] = {}
        self.uncovered_params: dict[type, list[str]] = {}
        # (layer, slot, config axis, mapping axis) where a mapping's channel axis replaced
        # the config's default weight axis
        self.axis_replaced: list[tuple[str, str, int, int | None]] = []
        # integer-backend layers: how to decide them again as a fallback, given the reason
        self.redo: dict[str, Callable[[str], Decision]] = {}
        self.narrowed: list[str] = []  # layers whose weights keep to 7 bits (no VNNI)
        self.saturating: list[str] = []  # layers that saturate here (vnni: true on no VNNI)
        self._pairs: tuple[bool, bool] | None = None

    def pair_sums(self) -> tuple[bool, bool]:
        """``(narrow, here)``: whether the target's kernels saturate, and whether this CPU's do.

        Asked only when a layer could saturate (8-bit activations meet 8-bit weights on a
        backend that declares ``saturates``), so no other plan pays for the measurement.
        """
        if self._pairs is None:
            probe = self.backend.saturates
            here = bool(probe()) if probe is not None else False
            vnni = self.cfg.vnni
            self._pairs = (here if vnni == "auto" else not vnni, here)
        return self._pairs

    def guard_pairs(self, layer: LayerSpec) -> LayerSpec:
        """Keep the weights of a layer whose u8 x s8 pairs would saturate to 7 bits."""
        b = self.backend
        if not b.integer or b.saturates is None or layer.backend != b.name:
            return layer
        w, x = layer.weight, layer.input
        if w is None or x is None or layer.mode not in ("static", "qat"):
            return layer
        lo, hi = x.quant_range()
        codes = hi + (128 if lo < 0 else 0)  # torch's quint8 codes (signed: shifted by 128)
        if not pair_saturates(act_codes=codes, weight_range=w.quant_range()):
            return layer
        narrow, here = self.pair_sums()
        if not narrow:
            if here:
                self.saturating.append(layer.name)
            return layer
        self.narrowed.append(layer.name)
        return dataclasses.replace(
            layer,
            weight=w.model_copy(update={"reduce_range": True}),
            notes=(*layer.notes, "weights kept to 7 bits (no VNNI)"),
        )

    def narrowing_reason(self) -> str:
        """Why the plan keeps weights to 7 bits, for decision reasons and ``plan.explain``."""
        if self.cfg.vnni is False:
            why = "vnni: false (the CPU that runs it has no VNNI)"
        else:
            why = saturation_reason(f"backend {self.backend.name!r}")
        return f"weights kept to 7 bits (reduce_range): {why}; set vnni: true for a CPU with VNNI"

    def find(self, cls: type, backend: str) -> MappingEntry | None:
        key = (cls, backend)
        if key not in self.mapping_cache:
            self.mapping_cache[key] = self.registry.find_mapping(cls, backend)
        return self.mapping_cache[key]

    def why_unmapped(self, cls: type, backend: str) -> str:
        for base in cls.__mro__[1:]:
            if base is nn.Module or not (isinstance(base, type) and issubclass(base, nn.Module)):
                break
            entry = self.find(base, backend)
            if entry is None:
                continue
            if getattr(cls, "forward", None) is not getattr(base, "forward", None):
                return (
                    f"subclass of {qualified_name(base)} that overrides forward: not treated as "
                    f"{base.__name__}"
                )
            return (
                f"subclass of {qualified_name(base)}, whose mapping is registered without "
                "subclasses=True"
            )
        return f"no mapping for backend {backend!r}"

    # -- specs --------------------------------------------------------------------------

    def layer_spec(
        self,
        path: str,
        module: nn.Module,
        qtype: type,
        entry: MappingEntry | None,
        rules: tuple[int, ...],
        redirected: tuple[tuple[int, str, QuantSpecPatch], ...],
        backend: str,
        aliases: tuple[str, ...],
    ) -> LayerSpec:
        mode = self.cfg.mode
        casc = self.cascade
        weight: QuantSpec | None = None
        slots: dict[str, QuantSpec] = {}
        notes: list[str] = []
        requested = {s for i in rules for s in self.cfg.rules[i].slots} | {
            s for _, s, _ in redirected if s not in ("input", "output", "weight")
        }

        def fitted(slot: str, owner: nn.Module, pname: str, axis: int | None) -> QuantSpec:
            shape = _param_shape(owner, pname)
            spec = casc.resolve(path, slot, rules, redirected, axis, len(shape) == 0)
            unused = casc.replaced
            if unused is not None:
                # the mapping names this layer's channel axis; the config's default is unused
                # here, but must still be an axis of the tensor (-100 is a mistake, not a choice)
                _fit_to_shape(path, slot, spec.model_copy(update={"axis": unused}), shape)
                self.axis_replaced.append((path, slot, unused, spec.axis))
            spec, note = _fit_to_shape(path, slot, spec, shape)
            if note is not None:
                notes.append(note)
            return spec

        if entry is not None:
            for slot, axis in entry.slots.items():
                if slot == "weight":
                    owner = _weight_location(module)
                    if owner is not None:
                        weight = fitted("weight", owner, "weight", axis)
                else:
                    owner_slot = _slot_owner(module, slot)
                    if owner_slot is not None:
                        slots[slot] = fitted(slot, *owner_slot, axis)
            params = set(_float_params(module))
            for slot in sorted(requested - set(entry.slots)):
                if slot in params:
                    slots[slot] = fitted(slot, module, slot, None)
        else:
            kept = []
            for name in _float_params(module):
                if _param_ndim(module, name) < 2 and name not in requested:
                    kept.append(name)  # a bias or a norm's scale: float unless a rule names it
                    continue
                spec = fitted(name, module, name, None)
                if name == "weight":
                    weight = spec
                else:
                    slots[name] = spec
            if kept and (weight is not None or slots):
                notes.append(f"{', '.join(kept)} stay float (1-d; a rule's slots: can name them)")
        if weight is not None and self._fits_inputs(weight) and isinstance(module, _LOOKUPS):
            assert weight.method is not None  # _fits_inputs said it has one
            notes.append(
                f"weight method {weight.method.name!r} fits a weight to the features a layer "
                "multiplies it with; an embedding reads its rows by index: rounded to nearest"
            )
            weight = weight.model_copy(update={"method": None})
        inp: QuantSpec | None = None
        out: QuantSpec | None = None
        if mode in ("static", "qat"):
            inp = casc.resolve(path, "input", rules, redirected, None)
            out = casc.resolve(path, "output", rules, redirected, None)
        elif mode == "dynamic" and (weight is not None or slots):
            inp = casc.resolve(path, "input", rules, redirected, None)
        return LayerSpec(
            name=path,
            module_type=qtype,
            counterpart=entry.counterpart if entry is not None else None,
            weight=weight,
            input=inp,
            output=out,
            slots=slots,
            backend=backend,
            mode=mode,
            aliases=aliases,
            registry=self.registry,
            notes=tuple(notes),
        )

    def _fits_inputs(self, spec: QuantSpec) -> bool:
        """Whether ``spec``'s weight method records the layer's inputs (GPTQ, AWQ...; not RTN)."""
        if spec.method is None:
            return False
        return bool(getattr(self.registry.method(spec.method.name).cls, "records_inputs", True))

    def backend_problem(self, layer: LayerSpec) -> str | None:
        """What the backend cannot run of this layer as planned (its ``check``), or None."""
        check = self.backend.check
        return check(layer) if check is not None else None

    def bits_problem(self, layer: LayerSpec) -> str | None:
        b = self.backend
        lo, hi = b.weight_bits
        for slot, spec in layer.param_specs().items():
            if not lo <= spec.bits <= hi:
                return (
                    f"backend {b.name!r} runs {lo}..{hi}-bit weights, {slot} asks bits={spec.bits}"
                )
        lo, hi = b.activation_bits
        for slot, spec in layer.activation_specs().items():
            if not lo <= spec.bits <= hi:
                return (
                    f"backend {b.name!r} runs {lo}..{hi}-bit activations, {slot} asks "
                    f"bits={spec.bits}"
                )
        if b.integer:
            from qswap.methods import runs_on_integer_grid

            for slot, spec in {**layer.param_specs(), **layer.activation_specs()}.items():
                name = spec.quantizer.name
                if not runs_on_integer_grid(self.registry.quantizer(name).cls):
                    return (
                        f"backend {b.name!r} runs uniform integer grids, {slot} asks quantizer "
                        f"{name!r}, which is not one"
                    )
        return None


def _slot_owner(module: nn.Module, slot: str) -> tuple[nn.Module, str] | None:
    """``(owner, parameter name)`` for a dotted parameter slot of ``module``, if it has one."""
    prefix, _, name = slot.rpartition(".")
    owner: nn.Module = module
    if prefix:
        try:
            owner = module.get_submodule(prefix)
        except AttributeError:
            return None
    if name in _float_params(owner):
        return owner, name
    if not prefix and isinstance(module, nn.Sequential) and len(module) > 0:
        return _slot_owner(module[0], slot)
    return None


def _walk_nodes(walk: Sequence[tuple[str, nn.Module]]) -> tuple[list[_Node], dict[str, _Node]]:
    """Group the paths of a ``named_modules(remove_duplicate=False)`` walk by module object."""
    nodes: dict[int, _Node] = {}
    order: list[_Node] = []
    by_path: dict[str, _Node] = {}
    for path, module in walk:
        node = nodes.get(id(module))
        if node is None:
            node = nodes[id(module)] = _Node(module, [path])
            order.append(node)
        else:
            node.paths.append(path)
        by_path[path] = node
    return order, by_path


def _nearest(probe: str, names: Sequence[str], n: int = 3) -> list[str]:
    """The ``n`` names most similar to ``probe`` (ties in model order)."""
    matcher = difflib.SequenceMatcher()
    matcher.set_seq2(probe)
    scored = []
    for i, name in enumerate(names):
        matcher.set_seq1(name)
        scored.append((-matcher.ratio(), i, name))
    return [name for _, _, name in sorted(scored)[:n]]


def _rule_mismatch(i: int, rule: Rule, by_path: Mapping[str, _Node], model: nn.Module) -> str:
    m = rule.match
    if m.type is not None and m.name is None and m.regex is None:
        types = list(dict.fromkeys(type(n.module).__name__ for n in by_path.values()))
        near = _nearest(m.type.rpartition(".")[2], types)
        listing = f"nearest module types: {', '.join(near) or 'none'}"
    else:
        probe = (m.name or m.regex or "").replace("*", "").replace("?", "").strip(".")
        near = _nearest(probe, [p for p in by_path if p])
        listing = f"nearest module names: {', '.join(near) or 'none'}"
        if m.type is not None:
            listing += f" (and the type must be {m.type!r})"
    return (
        f"no module of {type(model).__name__} matches {_describe_match(rule)}; {listing}. "
        "Fix the match, delete the rule, or set strict: false to only warn"
    )


def plan(
    model: nn.Module,
    config: QConfig | Mapping[str, Any] | str | os.PathLike[str],
    *,
    example_inputs: Any = None,
    registry: Registry | None = None,
) -> Plan:
    """Decide, without touching ``model``, what quantizing it with ``config`` does to each module.

    ``example_inputs`` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments) enables trace-based fusion; without it, ``nn.Sequential`` adjacency is used.

    >>> import torch, qswap
    >>> p = qswap.plan(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), "w8a8_minmax")
    >>> [d.kind for d in p]
    ['passthrough', 'quantize', 'fuse']
    """
    reg = registry if registry is not None else default_registry()
    cfg = load_config(config, registry=registry)
    _refuse_quantized(model)
    w = _Walker(cfg, reg)
    with gc_paused():
        # modules that do two jobs (timm's BatchNormAct2d) are planned as their parts, in a
        # copy (qswap.decompose); prepare decomposes its own copy the same way
        return _plan(decomposed(model, reg), cfg, reg, w, example_inputs)


_QUANTIZED_PACKAGES = (
    "torch.ao.nn.quantized",
    "torch.ao.nn.intrinsic.quantized",
    "torch.nn.quantized",
    "torch.nn.intrinsic.quantized",
)


def _refuse_quantized(model: nn.Module) -> None:
    """A model that PyTorch's own flows quantized already is no float model: say so, by path."""
    for path, module in model.named_modules():
        cls = type(module)
        if cls.__module__.startswith(_QUANTIZED_PACKAGES) and not cls.__module__.startswith(
            "qswap"
        ):
            raise PlanError(
                f"module {path or '(root)'!r} is {qualified_name(cls)}, a layer PyTorch's "
                "quantization already converted (it takes quantized tensors, not float ones). "
                "qswap quantizes float models: pass the float model this one was made from"
            )


def _plan(model: nn.Module, cfg: QConfig, reg: Registry, w: _Walker, example_inputs: Any) -> Plan:
    backend = w.backend
    walk = list(model.named_modules(remove_duplicate=False))
    nodes, by_path = _walk_nodes(walk)
    redirect = _match_rules(cfg, nodes, by_path, model, w)

    traced: list[_Traced] = []
    groups = _fusion_groups(model, cfg, reg, example_inputs, traced)
    member: dict[str, int] = {}
    head: dict[str, int] = {}
    kept: dict[str, int] = {}
    for gi, g in enumerate(groups):
        head[g.paths[0]] = gi
        for p in g.paths[1:]:
            if p in g.kept:
                kept[p] = gi
            else:
                member[p] = gi

    decisions: dict[str, Decision] = {}
    layers: dict[str, LayerSpec] = {}
    uncovered: list[str] = []
    decided: dict[int, Decision] = {}
    # Ancestors whose decision covers their subtree: (path, "mapped" | "skipped", rule index).
    covering: list[tuple[str, str, int | None]] = []
    for path, module in walk:
        while covering and not (
            covering[-1][0] in ("", path) or path.startswith(covering[-1][0] + ".")
        ):
            covering.pop()

        first = decided.get(id(module))
        if first is not None:
            decisions[path] = Decision(
                name=path,
                module_type=_type_of(module),
                kind=first.kind,
                reason=f"same module object as {first.name!r} (decided once, there)",
                backend=first.backend,
                counterpart=first.counterpart,
                group=first.group,
                rules=first.rules,
                shared_with=first.name,
                fallback=first.fallback,
                layer=first.layer,
            )
            continue
        d, is_uncovered = _decide(
            w, by_path[path], path, covering, member, head, groups, redirect.get(path, ())
        )
        if path in kept:
            g = groups[kept[path]]
            d = dataclasses.replace(
                d,
                reason=f"folded into {g.paths[0]!r} (group {kept[path]}) and kept in place for "
                f"its other calls; {d.reason}",
            )
        decided[id(module)] = d
        decisions[path] = d
        if d.layer is not None:
            layers[path] = d.layer
        if is_uncovered:
            uncovered.append(path)
            cls = _type_of(module)
            w.uncovered_reasons.setdefault(cls, w.why_unmapped(cls, backend.name))
            w.uncovered_params.setdefault(cls, _float_params(module))
        if module._modules:
            if d.kind == "quantize" and d.group is None:
                covering.append((path, "mapped", None))
            elif d.kind == "skip" and d.reason.startswith("rules["):
                covering.append((path, "skipped", _skip_rule(cfg, d.rules)))
            elif d.kind == "skip" and d.reason.startswith("inside") and covering:
                covering.append((path, "skipped", covering[-1][2]))
            if "parametrizations" in module._modules and parametrize.is_parametrized(module):
                # parametrize's own modules are not layers: never quantize or wrap them
                prefix = f"{path}.parametrizations" if path else "parametrizations"
                covering.append((prefix, "parametrize", None))

    _tie_weights(w, model, decisions, layers)
    if backend.float_outputs and traced:
        _float_model_outputs(traced[0].trace, groups, decisions, layers)
    _check_slots(w, cfg, layers, by_path)
    if w.saturating:
        shown = ", ".join(repr(n) for n in w.saturating[:3])
        more = f" and {len(w.saturating) - 3} more" if len(w.saturating) > 3 else ""
        warnings.warn(
            f"the config says vnni: true, but {saturation_reason(f'backend {backend.name!r}')}: "
            f"{shown}{more} "
            "will compute saturated sums when run on this machine. Plan with vnni: auto "
            "here, or run the model on a CPU with VNNI",
            UserWarning,
            stacklevel=3,
        )
    if w._pairs is not None and cfg.vnni == "auto":
        # what was measured goes into the plan's config, so that a saved model or artifact
        # is rebuilt with the same weight grids on any machine
        cfg = cfg.model_copy(update={"vnni": not w._pairs[0]})
    return Plan(
        config=cfg,
        registry=reg,
        backend=backend,
        model_type=type(model),
        decisions=decisions,
        groups=groups,
        layers=layers,
        uncovered=uncovered,
        uncovered_reasons=w.uncovered_reasons,
        uncovered_params=w.uncovered_params,
        traced=traced[0] if traced else None,
        narrowed=w.narrowed,
        narrowing=w.narrowing_reason() if w.narrowed else None,
        notes=_axis_notes(w),
    )


def _float_model_outputs(
    tr: Trace,
    groups: Sequence[_Group],
    decisions: dict[str, Decision],
    layers: dict[str, LayerSpec],
) -> None:
    """Drop the output quantizer of layers whose every output only leaves the model.

    For a backend that declares ``float_outputs``: its kernels dequantize inside, so an
    output nothing else reads stays float (a classifier's logits keep their precision).
    """
    last = {g.paths[0]: g.paths[-1] for g in groups}  # a fused layer's output is its last member's
    note = "output stays float: only the model returns it (no 8-bit rounding of the result)"
    for name, layer in list(layers.items()):
        if layer.output is None or layer.backend != decisions[name].backend:
            continue
        calls = tr.calls_of(last.get(name, name))
        outs = [v for c in calls for v in c.outputs]
        if not calls or not outs or not all(tr.is_output(v) and not tr.consumers(v) for v in outs):
            continue
        layer = dataclasses.replace(layer, output=None, notes=(*layer.notes, note))
        layers[name] = layer
        d = decisions[name]
        decisions[name] = dataclasses.replace(d, layer=layer, reason=f"{d.reason}; {note}")
        for alias in layer.aliases:
            if alias in decisions:
                decisions[alias] = dataclasses.replace(decisions[alias], layer=layer)


def _axis_notes(w: _Walker) -> list[str]:
    """A line for the plan when mappings' channel axes replaced the config's default axis."""
    if not w.axis_replaced:
        return []
    path, slot, axis, used = w.axis_replaced[0]
    line = (
        f"weight.axis {axis} of the config defaults is not used by {len(w.axis_replaced)} "
        f"slot(s) whose mapping names their channel axis (e.g. {path or '(root)'!r} {slot}: "
        f"axis {used}); a rule's weight: {{axis: N}} sets it per layer"
    )
    return [line]


def _skip_rule(cfg: QConfig, rules: Sequence[int]) -> int | None:
    found: int | None = None
    for i in rules:
        r = cfg.rules[i]
        if "skip" in r.model_fields_set:
            found = i if r.skip else None
    return found


def _match_rules(
    cfg: QConfig,
    nodes: Sequence[_Node],
    by_path: Mapping[str, _Node],
    model: nn.Module,
    w: _Walker,
) -> dict[str, list[tuple[int, str, QuantSpecPatch]]]:
    """Record on each node the rules matching any of its paths; enforce ``strict``.

    Returns the patches that dotted slots (``k_proj.input``) of a matched module forward
    to its submodules, by submodule path.
    """
    rules = cfg.rules
    redirect: dict[str, list[tuple[int, str, QuantSpecPatch]]] = {}
    if not rules:
        return redirect
    hits = [0] * len(rules)
    matchers = [r.match.matches for r in rules]
    dotted = [[(s, p) for s, p in r.slots.items() if "." in s] for r in rules]
    for node in nodes:
        module = node.module
        for path in node.paths:
            for i, matches in enumerate(matchers):
                try:
                    hit = matches(path, module)
                except TimeoutError:
                    raise ConfigError(
                        f"the regex {rules[i].match.regex!r} took too long on the module path "
                        f"{path[:80]!r} (nested repetition such as (a|aa)+ backtracks "
                        "exponentially); simplify it, or use name: with a glob",
                        path=f"rules[{i}].match.regex",
                    ) from None
                if hit:
                    node.rules.add(i)
                    hits[i] += 1
                    for slot, patch in dotted[i]:
                        rel, _, leaf = slot.rpartition(".")
                        target = f"{path}.{rel}" if path else rel
                        if target in by_path:
                            redirect.setdefault(target, []).append((i, leaf, patch))
                            w.cascade.used_slots.add((i, slot))
    for i, count in enumerate(hits):
        if count == 0:
            message = _rule_mismatch(i, rules[i], by_path, model)
            if cfg.strict:
                raise ConfigError(message, path=f"rules[{i}].match")
            warnings.warn(f"rules[{i}].match: {message}", UserWarning, stacklevel=4)
    return redirect


def _check_slots(
    w: _Walker, cfg: QConfig, layers: Mapping[str, LayerSpec], by_path: Mapping[str, _Node]
) -> None:
    """A rule's ``slots:`` name must exist on at least one module it matched."""
    for i, rule in enumerate(cfg.rules):
        for slot in rule.slots:
            if (i, slot) in w.cascade.used_slots:
                continue
            matched = [p for p, node in by_path.items() if i in node.rules]
            if not matched or rule.skip:
                continue
            have: set[str] = set()
            for p in matched:
                lay = layers.get(p)
                if lay is not None:
                    have.update(["input", "output"], lay.param_specs())
                have.update(_float_params(by_path[p].module))
                have.update(f"{name}.{{input,output}}" for name in by_path[p].module._modules)
            message = (
                f"rules[{i}].slots names {slot!r}, but the module(s) it matches "
                f"({', '.join(m or '(root)' for m in matched[:3])}{', ...' if len(matched) > 3 else ''}) "
                f"have no such slot; their slots are: {', '.join(sorted(have)) or 'none'}"
            )
            if cfg.strict:
                raise PlanError(message)
            warnings.warn(message, UserWarning, stacklevel=3)


def _decide(
    w: _Walker,
    node: _Node,
    path: str,
    covering: list[tuple[str, str, int | None]],
    member: Mapping[str, int],
    head: Mapping[str, int],
    groups: Sequence[_Group],
    redirected: Sequence[tuple[int, str, QuantSpecPatch]],
) -> tuple[Decision, bool]:
    """The decision for a module object at its first path, and whether it is uncovered.

    The cascade: what encloses or fuses it (:func:`_placed`), then what a mapping of the
    backend makes of it (:func:`_mapped`), else what the generic path makes of it
    (:func:`_unmapped`).
    """
    module = node.module
    mtype = _type_of(module)
    rules = tuple(sorted(node.rules))
    base: dict[str, Any] = {"name": path, "module_type": mtype, "rules": rules}
    gi = head.get(path)
    placed = _placed(w, base, path, covering, member, groups, rules, gi)
    if placed is not None:
        return placed, False
    qtype: type = mtype
    note = ""
    if gi is not None:
        g = groups[gi]
        qtype = g.fused_type
        note = f"fused {' + '.join(t.__name__ for t in g.types)} -> {qtype.__name__}; "
    site = _Site(
        w, base, path, module, qtype, rules, tuple(redirected), tuple(node.paths[1:]), gi, note
    )
    entry = w.find(qtype, w.backend.name)
    if entry is not None:
        return _mapped(site, entry), False
    return _unmapped(site)


@dataclass(frozen=True)
class _Site:
    """What :func:`_decide` knows of one module once placement is ruled out."""

    w: _Walker
    base: dict[str, Any]
    path: str
    module: nn.Module
    qtype: type
    rules: tuple[int, ...]
    red: tuple[tuple[int, str, QuantSpecPatch], ...]
    aliases: tuple[str, ...]
    gi: int | None
    note: str

    def fallback(self, why: str) -> Decision:
        return _fallback(
            self.w,
            self.base,
            self.path,
            self.module,
            self.qtype,
            self.rules,
            self.red,
            self.aliases,
            self.gi,
            self.note,
            why,
        )

    def passthrough(self, reason: str) -> Decision:
        return Decision(**self.base, kind="passthrough", group=self.gi, reason=reason)


def _placed(
    w: _Walker,
    base: dict[str, Any],
    path: str,
    covering: list[tuple[str, str, int | None]],
    member: Mapping[str, int],
    groups: Sequence[_Group],
    rules: tuple[int, ...],
    gi: int | None,
) -> Decision | None:
    """The decision where what encloses the module (or a fusion, or a skip rule) settles it."""
    cfg = w.cfg
    if covering and covering[-1][1] == "parametrize":
        return Decision(
            **base,
            kind="passthrough",
            reason=f"torch.nn.utils.parametrize machinery of {covering[-1][0].rpartition('.')[0]!r}",
        )
    if covering and covering[-1][1] == "mapped":
        return Decision(
            **base,
            kind="passthrough",
            reason=f"inside {covering[-1][0]!r}, which its counterpart quantizes as a whole",
        )
    if path in member:
        g = groups[member[path]]
        return Decision(
            **base,
            kind="fuse",
            group=member[path],
            reason=f"fused into {g.paths[0]!r} (group {member[path]}: "
            f"{' + '.join(t.__name__ for t in g.types)} -> {g.fused_type.__name__})",
        )
    skip_rule: int | None = None
    for i in rules:
        r = cfg.rules[i]
        if "skip" in r.model_fields_set:
            skip_rule = i if r.skip else None
    if skip_rule is not None:
        return Decision(
            **base,
            kind="skip",
            group=gi,
            reason=f"rules[{skip_rule}] skips it (match {_describe_match(cfg.rules[skip_rule])}); "
            "stays float",
        )
    if covering and covering[-1][1] == "skipped":
        anc, _, rule_i = covering[-1]
        return Decision(
            **base,
            kind="skip",
            group=gi,
            reason=f"inside {anc!r}, which rules[{rule_i}] skips; stays float",
        )
    return None


def _mapped(site: _Site, entry: Any) -> Decision:
    """The decision for a module the backend has a mapping for."""
    w, bname = site.w, site.w.backend.name
    layer = w.layer_spec(
        site.path, site.module, site.qtype, entry, site.rules, site.red, bname, site.aliases
    )
    if not layer.param_specs() and not layer.activation_specs():
        kept = "its parameters are 1-d (biases, norm scales), which stay float; " * bool(
            _float_params(site.module)
        )
        return site.passthrough(
            f"{site.note}{kept}nothing to quantize in mode {w.cfg.mode!r}; runs as it is"
        )
    problem = w.bits_problem(layer) or w.backend_problem(layer)
    if problem is not None:
        return site.fallback(problem)
    layer = w.guard_pairs(layer)
    if w.backend.integer:
        w.redo[site.path] = site.fallback
    return Decision(
        **site.base,
        kind="quantize",
        backend=bname,
        counterpart=entry.counterpart,
        group=site.gi,
        layer=layer,
        reason=_noted(
            f"{site.note}counterpart {entry.counterpart.__name__} on backend {bname!r}", layer
        ),
    )


def _unmapped(site: _Site) -> tuple[Decision, bool]:
    """The decision for a module without a mapping on the backend, and whether it is uncovered."""
    w, cfg, module, note = site.w, site.w.cfg, site.module, site.note
    bname = w.backend.name
    if not _float_params(module):
        if module._modules:
            return site.passthrough("container; its children are decided one by one"), False
        return site.passthrough(
            f"{note}no parameters and no mapping for backend {bname!r}; runs in float"
        ), False
    why = w.why_unmapped(site.qtype, bname)
    requested = {s for i in site.rules for s in cfg.rules[i].slots} | {s for _, s, _ in site.red}
    weighty = [n for n in _float_params(module) if _param_ndim(module, n) >= 2 or n in requested]
    if not weighty and cfg.mode in ("weight_only", "dynamic"):
        return site.passthrough(
            f"{note}its parameters are 1-d (biases, norm scales), which stay float, and "
            f"mode {cfg.mode!r} quantizes no activations here"
        ), False
    if w.backend.integer:
        if w.find(site.qtype, "fake") is None and cfg.strict:
            return Decision(
                **site.base,
                kind="skip",
                group=site.gi,
                reason=f"{note}{why}; stays float (strict: true; set strict: false to "
                "fake-quantize it generically)",
            ), True
        return site.fallback(why), True
    layer = w.layer_spec(
        site.path, module, site.qtype, None, site.rules, site.red, bname, site.aliases
    )
    if not layer.param_specs() and not layer.activation_specs():
        return site.passthrough(
            f"{note}{why}; its parameters are 1-d (biases, norm scales), which stay "
            "float, and this mode quantizes no activations"
        ), False
    return Decision(
        **site.base,
        kind="wrap",
        backend=bname,
        group=site.gi,
        layer=layer,
        reason=_noted(
            f"{note}{why}: generic fake-quant of "
            f"{', '.join(layer.param_specs()) or 'its activations'}",
            layer,
        ),
    ), True


def _fallback(
    w: _Walker,
    base: dict[str, Any],
    path: str,
    module: nn.Module,
    qtype: type,
    rules: tuple[int, ...],
    red: tuple[tuple[int, str, QuantSpecPatch], ...],
    aliases: tuple[str, ...],
    gi: int | None,
    note: str,
    why: str,
) -> Decision:
    """The configured backend cannot run this module: fake-quant it, or leave it float."""
    if w.cfg.fallback == "float":
        return Decision(
            **base, kind="skip", group=gi, reason=f"{note}{why}; stays float (fallback: float)"
        )
    fake = w.find(qtype, "fake")
    if fake is not None:
        layer = w.layer_spec(path, module, qtype, fake, rules, red, "fake", aliases)
        return Decision(
            **base,
            kind="quantize",
            backend="fake",
            counterpart=fake.counterpart,
            group=gi,
            layer=layer,
            fallback=True,
            reason=_noted(f"{note}{why}; falls back to fake ({fake.counterpart.__name__})", layer),
        )
    if _float_params(module):
        layer = w.layer_spec(path, module, qtype, None, rules, red, "fake", aliases)
        if layer.param_specs():
            return Decision(
                **base,
                kind="wrap",
                backend="fake",
                group=gi,
                layer=layer,
                fallback=True,
                reason=_noted(
                    f"{note}{why}; falls back to generic fake-quant of "
                    f"{', '.join(layer.param_specs())}",
                    layer,
                ),
            )
        why += "; its parameters are 1-d (biases, norm scales), which stay float"
    return Decision(**base, kind="skip", group=gi, reason=f"{note}{why}; stays float")


def _slot_tensor(module: nn.Module, slot: str) -> torch.Tensor | None:
    """The parameter object behind a layer's slot (its float original when parametrized)."""
    if slot == "weight":
        owner = _weight_location(module)
        found = (owner, "weight") if owner is not None else None
    else:
        found = _slot_owner(module, slot)
    if found is None:
        return None
    owner, name = found
    tensor = owner._parameters.get(name)
    if tensor is not None:
        return tensor
    plists = owner._modules.get("parametrizations")
    plist = plists._modules.get(name) if plists is not None else None
    original = getattr(plist, "original", None)
    return original if isinstance(original, torch.Tensor) else None


def _tie_weights(
    w: _Walker, model: nn.Module, decisions: dict[str, Decision], layers: dict[str, LayerSpec]
) -> None:
    """A parameter several layers share (a tied embedding and output head) is one tensor.

    It is quantized once, with the spec of the first layer that holds it; the others use
    that quantized tensor. A tie cannot span a float copy and a packed integer copy, so where
    its layers would run on different backends (or be packed twice), they all run on the
    fallback backend, with the reason in the plan.
    """
    holders: dict[int, list[tuple[str, str]]] = {}
    for path, layer in layers.items():
        module = model.get_submodule(path)
        for slot in layer.param_specs():
            tensor = _slot_tensor(module, slot)
            if tensor is not None:
                holders.setdefault(id(tensor), []).append((path, slot))
    for group in holders.values():
        if len({path for path, _ in group}) < 2:
            continue
        first, first_slot = group[0]
        tie = f"{first}.{first_slot}" if first else first_slot
        separate = w.backend.integer and not w.backend.shares_ties
        if len({layers[path].backend for path, _ in group}) > 1 or separate:
            for path, slot in group:
                redo = w.redo.get(path)
                if redo is None or layers[path].backend != w.backend.name:
                    continue
                why = (
                    f"its {slot} is tied to {tie} (one tensor in several layers), which "
                    f"backend {w.backend.name!r} would hold as separate copies"
                )
                _set_decision(decisions, layers, path, redo(why))
            group = [(path, slot) for path, slot in group if path in layers]
        # a layer whose weight method fits its own weight (GPTQ on a tied lm_head) gets its
        # own copy at calibration; the others still share one rounding
        fitted = [
            (path, slot) for path, slot in group if w._fits_inputs(layers[path].param_specs()[slot])
        ]
        if fitted and len(fitted) < len(group):
            for path, slot in fitted:
                method = layers[path].param_specs()[slot].method
                assert method is not None
                note = (
                    f"{slot} untied from {tie}: weight method {method.name!r} fits this layer's "
                    "own copy, the other layers share the plain rounding"
                )
                layer = layers[path]
                _set_decision(
                    decisions,
                    layers,
                    path,
                    dataclasses.replace(
                        decisions[path],
                        layer=dataclasses.replace(layer, notes=(*layer.notes, note)),
                        reason=f"{decisions[path].reason}; {note}",
                    ),
                )
            group = [member for member in group if member not in fitted]
        if len({path for path, _ in group}) < 2:
            continue
        first, first_slot = group[0]
        tie = f"{first}.{first_slot}" if first else first_slot
        spec = layers[first].param_specs()[first_slot]
        for path, slot in group[1:]:
            layer = layers[path]
            if path == first:
                continue
            note = f"{slot} tied to {tie}: quantized once, with its spec"
            changes: dict[str, Any] = {"notes": (*layer.notes, note)}
            if slot == "weight":
                changes["weight"] = spec
            else:
                changes["slots"] = {**layer.slots, slot: spec}
            new_layer = dataclasses.replace(layer, **changes)
            d = decisions[path]
            _set_decision(
                decisions,
                layers,
                path,
                dataclasses.replace(d, layer=new_layer, reason=f"{d.reason}; {note}"),
            )


def _set_decision(
    decisions: dict[str, Decision], layers: dict[str, LayerSpec], path: str, d: Decision
) -> None:
    """Replace the decision at ``path`` and at every other path of the same module object."""
    decisions[path] = d
    if d.layer is not None:
        layers[path] = d.layer
    else:
        layers.pop(path, None)
    for other, found in list(decisions.items()):
        if found.shared_with == path:
            decisions[other] = dataclasses.replace(
                found,
                kind=d.kind,
                backend=d.backend,
                counterpart=d.counterpart,
                fallback=d.fallback,
                layer=d.layer,
            )


def _noted(reason: str, layer: LayerSpec) -> str:
    """A decision's reason followed by what the plan changed from the config for the layer."""
    return "; ".join((reason, *layer.notes))


# --------------------------------------------------------------------------- fusion


def _fusion_groups(
    model: nn.Module,
    cfg: QConfig,
    reg: Registry,
    example_inputs: Any,
    traced: list[_Traced] | None = None,
) -> list[_Group]:
    """The fusion groups the config asks for, with the type each one fuses into."""
    if cfg.fusion == "off":
        return []
    from qswap import fuse

    inputs = split_inputs(example_inputs)
    tr = None
    if inputs is not None:
        from qswap.trace import trace

        tr = trace(model, inputs[0], inputs[1])
        if traced is not None:
            # kept so that int8 lowering need not trace the fused model again, and QAT can
            # tie quantizers along the dataflow
            training = any(m.training for m in model.modules())
            traced.append(_Traced(tr, inputs[0], inputs[1], training))
    if isinstance(cfg.fusion, list):
        found = fuse.check_explicit_groups(model, cfg.fusion, tr, reg)
    else:
        found = fuse.find_fusion_groups(model, tr, reg)
    fused_types: dict[tuple[int, tuple[type, ...]], type] = {}
    out: list[_Group] = []
    for g in found:
        key = (id(g.pattern), tuple(g.types))
        fused = fused_types.get(key)
        if fused is None:
            # A fuser returns the same type for the same input types: call it once per
            # pattern (the built-in fusers copy their inputs, so the model is untouched).
            modules = [model.get_submodule(p) for p in g.paths]
            fused = fused_types[key] = type(g.pattern.fuse(*modules))
        if (
            cfg.fusion == "auto"
            and reg.find_mapping(fused, cfg.backend) is None
            and reg.find_mapping(g.types[0], cfg.backend) is not None
        ):
            continue  # the backend runs the first layer as it is, but not what fusing makes
        kept = tuple(getattr(g, "kept", ()))
        out.append(_Group(tuple(g.paths), tuple(g.types), fused, g, kept))
    return out
