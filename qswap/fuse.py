"""Fusion: find module chains such as conv -> bn -> relu without names, check explicit groups, fuse.

With a ``Trace`` a registered pattern matches a chain of leaf-module calls in which each
intermediate tensor has exactly one consumer, the next module of the pattern; a module that runs
more than once never fuses. Without a trace, consecutive children of an ``nn.Sequential`` match.
The built-in fusers fold batch norm with torch's own helpers (``torch.nn.utils.fusion``) and
return ``torch.ao.nn.intrinsic`` containers for the ReLU patterns; they never modify their inputs.
``fuse_model`` and ``fuse_group`` change the model in place anyway, so for the built-in patterns
they build the fused module from the model's own modules instead of from deep copies.
"""

from __future__ import annotations

import copy
import difflib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import nn
from torch.nn.utils.fusion import (
    fuse_conv_bn_eval,
    fuse_conv_bn_weights,
    fuse_linear_bn_eval,
    fuse_linear_bn_weights,
)

from qswap.exceptions import PlanError, UnsupportedModuleError
from qswap.trace import Call, Trace
from qswap.tree import replace_module, walk_modules

if TYPE_CHECKING:
    from types import ModuleType

    from qswap.registry import FusionPattern, Registry

__all__ = [
    "FusionGroup",
    "carry_hooks",
    "check_explicit_groups",
    "explain_unfused",
    "find_fusion_groups",
    "fuse_bn_relu",
    "fuse_conv_bn",
    "fuse_conv_bn_relu",
    "fuse_conv_relu",
    "fuse_group",
    "fuse_linear_bn",
    "fuse_linear_bn_relu",
    "fuse_linear_relu",
    "fuse_model",
]


# --------------------------------------------------------------------------- fusers


_NNI: list[ModuleType] = []


def _intrinsic() -> ModuleType:
    """``torch.ao.nn.intrinsic``, imported on first use (torch marks torch.ao deprecated)."""
    if not _NNI:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
            import torch.ao.nn.intrinsic as nni
        _NNI.append(nni)
    return _NNI[0]


_M = TypeVar("_M", bound=nn.Module)


def _copy(module: _M) -> _M:
    """Deep copy without forward hooks (``fuse_model`` moves the caller's hooks itself)."""
    clone = copy.deepcopy(module)
    for m in clone.modules():
        _strip_hooks(m)
    return clone


_HOOK_ATTRS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _strip_hooks(m: nn.Module) -> None:
    _set_hooks(m, (OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()))


def _check_foldable(first: nn.Module, bn: nn.Module) -> nn.modules.batchnorm._BatchNorm:
    """``bn`` once it is known that it can fold into ``first``; ``UnsupportedModuleError`` else."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedModuleError(f"cannot fold {type(bn).__name__}: expected a BatchNorm")
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModuleError(
            f"cannot fold {type(bn).__name__} without running statistics "
            "(track_running_stats=False); leave it unfused"
        )
    if isinstance(first, nn.modules.conv._ConvNd):
        channels = first.out_channels
    elif isinstance(first, nn.Linear):
        channels = first.out_features
    else:
        raise UnsupportedModuleError(
            f"cannot fold a BatchNorm into {type(first).__name__}: expected a convolution or Linear"
        )
    if bn.num_features != channels:
        raise UnsupportedModuleError(
            f"cannot fold {type(bn).__name__}({bn.num_features}) into "
            f"{type(first).__name__} with {channels} output channels"
        )
    return bn


def _fold_bn(first: nn.Module, bn: nn.Module) -> nn.Module:
    norm = _copy(_check_foldable(first, bn)).eval()
    training = first.training
    fused: nn.Module
    if isinstance(first, nn.modules.conv._ConvNd):
        transpose = isinstance(first, nn.modules.conv._ConvTransposeNd)
        fused = fuse_conv_bn_eval(_copy(first).eval(), norm, transpose=transpose)
    else:
        fused = fuse_linear_bn_eval(_copy(cast(nn.Linear, first)).eval(), norm)
    return fused.train(training)


def _relu(relu: nn.Module) -> nn.ReLU:
    if type(relu) is not nn.ReLU:
        raise UnsupportedModuleError(f"expected nn.ReLU, got {type(relu).__name__}")
    return nn.ReLU(inplace=relu.inplace).train(relu.training)


def _relu_container(kind: type) -> type[nn.Module]:
    """The ``torch.ao.nn.intrinsic`` class that runs ``kind`` followed by a ReLU."""
    nni = _intrinsic()
    kinds: dict[type[nn.Module], type[nn.Module]] = {
        nn.Conv1d: nni.ConvReLU1d,
        nn.Conv2d: nni.ConvReLU2d,
        nn.Conv3d: nni.ConvReLU3d,
        nn.Linear: nni.LinearReLU,
        nn.BatchNorm2d: nni.BNReLU2d,
        nn.BatchNorm3d: nni.BNReLU3d,
    }
    container = kinds.get(kind)
    if container is None:
        names = ", ".join(k.__name__ for k in kinds)
        raise UnsupportedModuleError(
            f"no fused ReLU container for {kind.__name__}; supported: {names}"
        )
    return container


def _with_relu(module: nn.Module, relu: nn.Module, training: bool) -> nn.Module:
    container = _relu_container(type(module))
    fused: nn.Module = container(module, _relu(relu))
    return fused.train(training)


def fuse_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """Fold ``bn`` into a copy of ``conv`` (eval-mode statistics); the inputs are not modified.

    >>> conv, bn = nn.Conv2d(3, 4, 3).eval(), nn.BatchNorm2d(4).eval()
    >>> x = torch.randn(1, 3, 8, 8)
    >>> torch.allclose(fuse_conv_bn(conv, bn)(x), bn(conv(x)), atol=1e-6)
    True
    """
    return _fold_bn(conv, bn)


def fuse_conv_bn_relu(conv: nn.Module, bn: nn.Module, relu: nn.Module) -> nn.Module:
    """Fold ``bn`` into ``conv`` and wrap it with ``relu`` in a ``ConvReLU1d/2d/3d``.

    >>> type(fuse_conv_bn_relu(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).__name__
    'ConvReLU2d'
    """
    return _with_relu(_fold_bn(conv, bn), relu, conv.training)


def fuse_conv_relu(conv: nn.Module, relu: nn.Module) -> nn.Module:
    """Wrap copies of ``conv`` and ``relu`` in a ``ConvReLU1d/2d/3d``.

    >>> type(fuse_conv_relu(nn.Conv1d(3, 4, 3), nn.ReLU())).__name__
    'ConvReLU1d'
    """
    return _with_relu(_copy(conv), relu, conv.training)


def fuse_linear_bn(linear: nn.Module, bn: nn.Module) -> nn.Module:
    """Fold ``bn`` (``BatchNorm1d``) into a copy of ``linear`` (eval-mode statistics).

    >>> type(fuse_linear_bn(nn.Linear(3, 4), nn.BatchNorm1d(4))).__name__
    'Linear'
    """
    return _fold_bn(linear, bn)


def fuse_linear_bn_relu(linear: nn.Module, bn: nn.Module, relu: nn.Module) -> nn.Module:
    """Fold ``bn`` into ``linear`` and wrap it with ``relu`` in a ``LinearReLU``.

    >>> type(fuse_linear_bn_relu(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())).__name__
    'LinearReLU'
    """
    return _with_relu(_fold_bn(linear, bn), relu, linear.training)


def fuse_linear_relu(linear: nn.Module, relu: nn.Module) -> nn.Module:
    """Wrap copies of ``linear`` and ``relu`` in a ``LinearReLU``.

    >>> type(fuse_linear_relu(nn.Linear(3, 4), nn.ReLU())).__name__
    'LinearReLU'
    """
    return _with_relu(_copy(linear), relu, linear.training)


def fuse_bn_relu(bn: nn.Module, relu: nn.Module) -> nn.Module:
    """Wrap copies of ``bn`` (``BatchNorm2d``/``3d``) and ``relu`` in a ``BNReLU2d``/``3d``.

    >>> type(fuse_bn_relu(nn.BatchNorm2d(4), nn.ReLU())).__name__
    'BNReLU2d'
    """
    return _with_relu(_copy(bn), relu, bn.training)


def _fuse_owned(first: nn.Module, bn: nn.Module | None, relu: nn.Module | None) -> nn.Module:
    """What the built-in fuser gives for ``first`` (+ ``bn``) (+ ``relu``), built from ``first``.

    No copy: ``first`` itself loses its forward hooks, takes the folded weights and goes into
    the ReLU container. Every check (and the folding arithmetic) runs first, in the public
    fusers' order, so a refused group leaves the modules untouched.
    """
    training = first.training
    folded: tuple[nn.Parameter, nn.Parameter] | None = None
    if bn is not None:
        norm = _check_foldable(first, bn)
        weight: Any = first.weight
        bias: Any = first.bias
        mean, var = cast(torch.Tensor, norm.running_mean), cast(torch.Tensor, norm.running_var)
        if isinstance(first, nn.modules.conv._ConvNd):
            transpose = isinstance(first, nn.modules.conv._ConvTransposeNd)
            folded = fuse_conv_bn_weights(
                weight, bias, mean, var, norm.eps, norm.weight, norm.bias, transpose
            )
        else:
            folded = fuse_linear_bn_weights(
                weight, bias, mean, var, norm.eps, norm.weight, norm.bias
            )
    container = new_relu = None
    if relu is not None:
        container = _relu_container(type(first))
        new_relu = _relu(relu)
    _strip_hooks(first)
    if folded is not None:
        first.weight, first.bias = folded
        first.train(training)
    if container is None:
        return first
    fused: nn.Module = container(first, new_relu)
    return fused.train(training)


# each built-in fuser with what follows its first module: (a BatchNorm?, a ReLU?)
_BUILT_IN: tuple[tuple[Callable[..., nn.Module], bool, bool], ...] = (
    (fuse_conv_bn, True, False),
    (fuse_conv_bn_relu, True, True),
    (fuse_conv_relu, False, True),
    (fuse_linear_bn, True, False),
    (fuse_linear_bn_relu, True, True),
    (fuse_linear_relu, False, True),
    (fuse_bn_relu, False, True),
)


def _fuse_in_place(
    fuser: object, modules: Sequence[nn.Module], sharing: _Sharing
) -> nn.Module | None:
    """``fuser(*modules)`` built from ``modules`` themselves, or ``None`` to call the fuser.

    Only for a built-in fuser given as many modules as it takes, whose first module
    nothing else in the model shares tensors with (``_Sharing.owns``).
    """
    for public, has_bn, has_relu in _BUILT_IN:
        if fuser is public:
            if len(modules) != 1 + has_bn + has_relu or not sharing.owns(modules[0]):
                return None
            bn = modules[1] if has_bn else None
            return _fuse_owned(modules[0], bn, modules[-1] if has_relu else None)
    return None


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return int(t.untyped_storage().data_ptr()) or None
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without storage
        return None


class _Sharing:
    """Which storages more than one parameter or buffer slot of a model uses (found on first ask)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._shared: set[int] | None = None

    def _find(self) -> set[int]:
        seen: set[int] = set()
        shared: set[int] = set()
        done: set[int] = set()
        stack = [self.model]
        while stack:
            module = stack.pop()
            if id(module) in done:
                continue
            done.add(id(module))
            for slots in (module._parameters, module._buffers):
                for t in slots.values():
                    key = None if t is None else _storage_key(t)
                    if key is not None:
                        (shared if key in seen else seen).add(key)
            stack.extend(c for c in module._modules.values() if c is not None)
        return shared

    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` may be reused: a plain leaf whose tensors nothing else holds.

        Tensors tied to another module (or any storage that cannot be told apart) and
        modules with submodules or their own ``__deepcopy__`` keep the copying fusers.
        """
        if module._modules or getattr(type(module), "__deepcopy__", None) is not None:
            return False
        if self._shared is None:
            self._shared = self._find()
        for slots in (module._parameters, module._buffers):
            for t in slots.values():
                if t is None:
                    continue
                key = _storage_key(t)
                if key is None or key in self._shared:
                    return False
        return True


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class FusionGroup:
    """Module paths (forward order) that fuse into one module, the pattern that matched, and why.

    ``origin`` is where the pattern was registered (``"torch_nn.yaml:31"``); the first path
    receives ``pattern.fuse(*modules)``, the others become ``nn.Identity`` — except the paths in
    ``kept``: an idempotent activation (``ReLU``) that also runs elsewhere in the forward is
    folded into the fused module *and* left in place, since ``relu(relu(x)) == relu(x)``.
    """

    paths: tuple[str, ...]
    types: tuple[type, ...]
    origin: str
    reason: str
    pattern: FusionPattern = field(repr=False, compare=False)
    kept: tuple[str, ...] = ()


def _patterns(patterns: Sequence[FusionPattern] | Registry) -> list[FusionPattern]:
    if hasattr(patterns, "fusion_patterns"):
        found: list[FusionPattern] = patterns.fusion_patterns()
    else:
        found = list(patterns)
    return sorted(found, key=lambda p: -len(p.types))  # stable: registry order among equals


def _types_text(types: Sequence[type]) -> str:
    return "(" + ", ".join(t.__name__ for t in types) + ")"


def _describe(call: Call) -> str:
    if call.kind == "module" and call.module_type is not None:
        return f"{call.target} ({call.module_type.__name__})"
    return call.target


def _plural(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _single_call(trace: Trace, path: str) -> Call | str:
    calls = trace.calls_of(path)
    if not calls:
        return f"{path} does not run in the traced forward"
    if len(calls) > 1:
        return (
            f"{path} runs {len(calls)} times in the forward; a module that runs more than once "
            "cannot be fused"
        )
    return calls[0]


def _link_problem(trace: Trace, a: Call, b: Call, a_path: str, b_path: str) -> str | None:
    """Why ``b`` cannot directly follow ``a`` in a fused chain, or ``None`` when it can."""
    outputs = sorted(set(a.outputs))
    if len(outputs) != 1:
        return (
            f"{a_path} returns {len(outputs)} tensors; only a module with one output can be "
            "fused with the next"
        )
    value = outputs[0]
    consumers = trace.consumers(value)
    if all(c.index != b.index for c in consumers):
        targets = _plural([_describe(c) for c in consumers]) or "nothing but the model output"
        return (
            f"{a_path} and {b_path} are not consecutive in the forward: "
            f"the output of {a_path} goes to {targets}"
        )
    others = [_describe(c) for c in consumers if c.index != b.index]
    if others:
        return (
            f"the output of {a_path} is also used by {_plural(others)}; fusing would change "
            "what that code sees"
        )
    if trace.is_output(value):
        return f"the output of {a_path} is also a model output; fusing would change it"
    if set(b.inputs) != {value}:
        return f"{b_path} takes more inputs than the output of {a_path}; it cannot be fused"
    return None


# Activations f with f(f(x)) == f(x): fusing one into the previous module while leaving the
# module in place for its other calls changes no output.
_IDEMPOTENT: tuple[type, ...] = (nn.ReLU, nn.ReLU6)


def _traced_groups(
    model: nn.Module, trace: Trace, patterns: list[FusionPattern]
) -> list[FusionGroup]:
    by_type: dict[type, list[Call]] = {}
    runs: dict[str, int] = {}
    for call in trace.calls:
        if call.kind != "module" or call.module_type is None:
            continue
        runs[call.target] = runs.get(call.target, 0) + 1
        by_type.setdefault(call.module_type, []).append(call)
    claimed: set[str] = set()
    found: list[tuple[int, FusionGroup]] = []
    for pattern in patterns:
        for head in by_type.get(pattern.types[0], ()):
            if head.target in claimed or runs[head.target] != 1:
                continue
            chain = [head]
            for kind in pattern.types[1:]:
                prev = chain[-1]
                values = set(prev.outputs)
                if len(values) != 1:
                    break
                value = values.pop()
                consumers = trace.consumers(value)
                if len(consumers) != 1 or trace.is_output(value):
                    break
                nxt = consumers[0]
                if (
                    nxt.kind != "module"
                    or nxt.module_type is not kind
                    or nxt.target in claimed
                    or set(nxt.inputs) != {value}
                ):
                    break
                shared_tail = (
                    runs[nxt.target] != 1
                    and len(chain) == len(pattern.types) - 1
                    and kind in _IDEMPOTENT
                )
                if runs[nxt.target] != 1 and not shared_tail:
                    break
                chain.append(nxt)
            if len(chain) != len(pattern.types):
                continue
            paths = tuple(c.target for c in chain)
            kept: tuple[str, ...] = ()
            if runs[paths[-1]] != 1:
                kept = (paths[-1],)
            claimed.update(p for p in paths if p not in kept)
            reason = (
                f"traced: {' -> '.join(paths)} run back to back and each intermediate "
                "tensor has exactly one consumer"
            )
            if kept:
                reason += (
                    f"; {kept[0]} also runs elsewhere, so it stays in place "
                    f"({pattern.types[-1].__name__} is idempotent)"
                )
            found.append(
                (
                    head.index,
                    FusionGroup(paths, pattern.types, pattern.origin, reason, pattern, kept),
                )
            )
    found.sort(key=lambda item: item[0])
    groups = [group for _, group in found]
    for group in groups:
        _check_model_matches(model, group)
    return groups


def _check_model_matches(model: nn.Module, group: FusionGroup) -> None:
    for path, kind in zip(group.paths, group.types, strict=False):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if type(module) is not kind:
            found = "nothing" if module is None else type(module).__name__
            raise PlanError(
                f"the trace does not match the model: {path} is a {kind.__name__} in the trace "
                f"but {found} in {type(model).__name__}; trace the model you fuse"
            )


def _sequential_groups(model: nn.Module, patterns: list[FusionPattern]) -> list[FusionGroup]:
    module_paths, _, containers = walk_modules(model)
    owners: dict[int, int] = {}  # id(child) -> how many (parent, name) slots hold it
    for parent in containers:
        for child in parent._modules.values():
            if child is not None:
                owners[id(child)] = owners.get(id(child), 0) + 1
    sequentials = [m for m in containers if type(m) is nn.Sequential]
    claimed: set[int] = set()
    found: list[tuple[int, int, FusionGroup]] = []
    for pattern in patterns:
        size = len(pattern.types)
        for order, seq in enumerate(sequentials):
            children = [(n, c) for n, c in seq._modules.items() if c is not None]
            i = 0
            while i + size <= len(children):
                window = children[i : i + size]
                if all(
                    type(child) is kind and id(child) not in claimed and owners[id(child)] == 1
                    for (_, child), kind in zip(window, pattern.types, strict=False)
                ):
                    seq_path = module_paths[id(seq)][0]
                    prefix = f"{seq_path}." if seq_path else ""
                    paths = tuple(f"{prefix}{name}" for name, _ in window)
                    claimed.update(id(child) for _, child in window)
                    where = f"nn.Sequential '{seq_path}'" if seq_path else "the model"
                    reason = f"no example inputs: consecutive children of {where}"
                    group = FusionGroup(paths, pattern.types, pattern.origin, reason, pattern)
                    found.append((order, i, group))
                    i += size
                else:
                    i += 1
    found.sort(key=lambda item: (item[0], item[1]))
    return [group for _, _, group in found]


def find_fusion_groups(
    model: nn.Module, trace: Trace | None, patterns: Sequence[FusionPattern] | Registry
) -> list[FusionGroup]:
    """Groups of modules that ``patterns`` (or a registry's patterns) fuse, in forward order.

    Patterns are tried longest first; a module joins at most one group.

    >>> from qswap.registry import FusionPattern
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> p = FusionPattern((nn.Conv2d, nn.BatchNorm2d), fuse_conv_bn, "doc")
    >>> [g.paths for g in find_fusion_groups(model, None, [p])]
    [('0', '1')]
    """
    ordered = _patterns(patterns)
    if trace is None:
        return _sequential_groups(model, ordered)
    return _traced_groups(model, trace, ordered)


def check_explicit_groups(
    model: nn.Module,
    groups: Sequence[Sequence[str]],
    trace: Trace | None,
    patterns: Sequence[FusionPattern] | Registry,
) -> list[FusionGroup]:
    """Validate fusion groups given by name (``fusion: [[conv1, bn1, relu]]`` in a config).

    Raises ``PlanError`` saying which group is wrong and why: an unknown module path, no
    registered pattern for the types, modules that are not consecutive in the traced forward,
    an intermediate tensor used elsewhere, or a module that runs more than once.

    >>> from qswap.registry import FusionPattern
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> p = FusionPattern((nn.Conv2d, nn.BatchNorm2d), fuse_conv_bn, "doc")
    >>> check_explicit_groups(model, [["0", "1"]], None, [p])[0].paths
    ('0', '1')
    """
    ordered = _patterns(patterns)
    by_types = {tuple(p.types): p for p in reversed(ordered)}  # first registered wins
    module_paths, _, _ = walk_modules(model)
    names = [p for paths in module_paths.values() for p in paths if p]
    seen: dict[str, int] = {}
    result: list[FusionGroup] = []
    for index, group in enumerate(groups):
        paths = tuple(group)
        where = f"fusion[{index}] = {list(paths)}"
        if len(paths) < 2:
            raise PlanError(f"{where}: a fusion group needs at least two modules")
        modules: list[nn.Module] = []
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                close = difflib.get_close_matches(path, names, n=1)
                if close:
                    hint = f"; did you mean '{close[0]}'?"
                else:
                    some = ", ".join(f"'{n}'" for n in names[:3])
                    hint = f"; its modules have names like {some}" if names else ""
                raise PlanError(
                    f"{where}: no module named '{path}' in {type(model).__name__}{hint}"
                ) from None
            if path in seen:
                raise PlanError(
                    f"{where}: '{path}' is already in fusion[{seen[path]}]; a module can "
                    "join one group only"
                )
            seen[path] = index
            modules.append(module)
        types = tuple(type(m) for m in modules)
        pattern = by_types.get(types)
        if pattern is None:
            starting = [_types_text(p.types) for p in ordered if p.types[0] is types[0]]
            known = (
                f"patterns starting with {types[0].__name__}: {', '.join(starting)}"
                if starting
                else f"no pattern starts with {types[0].__name__}"
            )
            raise PlanError(
                f"{where}: no fusion pattern is registered for {_types_text(types)} ({known}); "
                "register one with reg.register_fusion(types, fuser) or change the group"
            )
        if trace is not None:
            calls: list[Call] = []
            for path in paths:
                call = _single_call(trace, path)
                if isinstance(call, str):
                    raise PlanError(f"{where}: {call}")
                calls.append(call)
            for (a, a_path), (b, b_path) in zip(
                zip(calls, paths, strict=False),
                zip(calls[1:], paths[1:], strict=False),
                strict=False,
            ):
                problem = _link_problem(trace, a, b, a_path, b_path)
                if problem is not None:
                    raise PlanError(f"{where}: {problem}")
            reason = "explicit group, checked against the trace"
        else:
            reason = _untraced_reason(paths, modules, model, where)
        result.append(FusionGroup(paths, pattern.types, pattern.origin, reason, pattern))
    return result


def _untraced_reason(
    paths: tuple[str, ...], modules: list[nn.Module], model: nn.Module, where: str
) -> str:
    parents = {p.rpartition(".")[0] for p in paths}
    if len(parents) == 1:
        parent = model.get_submodule(parents.pop())
        if type(parent) is nn.Sequential:
            children = list(parent._modules.values())
            positions = [next(i for i, c in enumerate(children) if c is m) for m in modules]
            if positions != list(range(positions[0], positions[0] + len(positions))):
                seq = paths[0].rpartition(".")[0]
                where_seq = f"nn.Sequential '{seq}'" if seq else "the model"
                raise PlanError(
                    f"{where}: these are not consecutive children of {where_seq}; list "
                    "modules that run one after the other, in forward order"
                )
            return "explicit group: consecutive children of an nn.Sequential"
    return "explicit group, not checked: pass example inputs to check it against a trace"


def explain_unfused(
    model: nn.Module,
    trace: Trace | None,
    patterns: Sequence[FusionPattern] | Registry,
    groups: Sequence[FusionGroup],
) -> dict[str, str]:
    """Why each module whose type appears in some pattern is not in ``groups``, by path.

    >>> from qswap.registry import FusionPattern
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)).eval()
    >>> p = FusionPattern((nn.Conv2d, nn.ReLU), fuse_conv_relu, "doc")
    >>> from qswap.trace import trace as trace_model
    >>> explain_unfused(model, trace_model(model, (torch.randn(1, 3, 8, 8),)), [p], [])["0"]
    'followed by 1 (MaxPool2d); no registered pattern continues Conv2d with MaxPool2d'
    """
    ordered = _patterns(patterns)
    fused = {p for g in groups for p in g.paths}
    group_of = {p: g for g in groups for p in g.paths}
    relevant = {t for p in ordered for t in p.types}
    heads = {t for p in ordered for t in p.types[:-1]}
    tails = {t for p in ordered for t in p.types[1:]}
    pairs = {(p.types[i], p.types[i + 1]) for p in ordered for i in range(len(p.types) - 1)}
    reasons: dict[str, str] = {}
    if trace is None:
        module_paths, leaves, _ = walk_modules(model)
        for module in leaves:
            path = module_paths[id(module)][0]
            if type(module) in relevant and path not in fused and path:
                reasons[path] = (
                    "no example inputs: without a trace only consecutive children of an "
                    "nn.Sequential fuse"
                )
        return reasons
    seen: set[str] = set()
    for call in trace.calls:
        kind = call.module_type
        if call.kind != "module" or kind is None or kind not in relevant:
            continue
        path = call.target
        if path in fused or path in seen:
            continue
        seen.add(path)
        single = _single_call(trace, path)
        if isinstance(single, str):
            reasons[path] = single.removeprefix(f"{path} ")
            continue
        parts: list[str] = []
        if kind in heads:
            parts.append(_next_problem(trace, call, pairs, group_of))
        if kind in tails:
            parts.append(_previous_problem(trace, call, pairs, group_of))
        reasons[path] = "; ".join(parts)
    return reasons


def _next_problem(
    trace: Trace,
    call: Call,
    pairs: set[tuple[type, type]],
    group_of: dict[str, FusionGroup],
) -> str:
    values = sorted(set(call.outputs))
    if len(values) != 1:
        return f"it returns {len(values)} tensors"
    consumers = trace.consumers(values[0])
    if not consumers:
        return "its output is only a model output"
    if len(consumers) > 1:
        return f"its output goes to {_plural([_describe(c) for c in consumers])}"
    nxt = consumers[0]
    if nxt.kind != "module" or nxt.module_type is None or call.module_type is None:
        return f"its output goes to {nxt.target}, not to a module"
    if (call.module_type, nxt.module_type) not in pairs:
        return (
            f"followed by {_describe(nxt)}; no registered pattern continues "
            f"{call.module_type.__name__} with {nxt.module_type.__name__}"
        )
    if nxt.target in group_of:
        return f"followed by {nxt.target}, which fuses into {list(group_of[nxt.target].paths)}"
    runs = len(trace.calls_of(nxt.target))
    if runs > 1:
        return f"followed by {nxt.target}, which runs {runs} times in the forward"
    return _link_problem(trace, call, nxt, call.target, nxt.target) or (
        f"followed by {_describe(nxt)}, but no registered pattern covers the whole chain"
    )


def _previous_problem(
    trace: Trace,
    call: Call,
    pairs: set[tuple[type, type]],
    group_of: dict[str, FusionGroup],
) -> str:
    inputs = sorted(set(call.inputs))
    producer = trace.producer(inputs[0]) if len(inputs) == 1 else None
    if producer is None:
        return "its input does not come from a single module"
    if producer.kind != "module" or producer.module_type is None or call.module_type is None:
        return f"its input comes from {producer.target}, not from a module"
    if (producer.module_type, call.module_type) not in pairs:
        return f"preceded by {_describe(producer)}, which no registered pattern joins with it"
    if producer.target in group_of:
        return (
            f"preceded by {producer.target}, which fuses into "
            f"{list(group_of[producer.target].paths)}"
        )
    return f"preceded by {_describe(producer)}, which does not fuse"


# --------------------------------------------------------------------------- fusing


_Hooks = tuple[OrderedDict[int, Any], ...]


def _hooks_of(first: nn.Module, last: nn.Module | None) -> _Hooks:
    """Copies of the pre-hooks of ``first`` and the forward hooks of ``last`` (none if ``None``)."""
    pre = (
        OrderedDict(first._forward_pre_hooks),
        OrderedDict(first._forward_pre_hooks_with_kwargs),
    )
    if last is None:
        return (*pre, OrderedDict(), OrderedDict(), OrderedDict())
    return (
        *pre,
        OrderedDict(last._forward_hooks),
        OrderedDict(last._forward_hooks_with_kwargs),
        OrderedDict(last._forward_hooks_always_called),
    )


def _set_hooks(module: nn.Module, hooks: _Hooks) -> None:
    """Give ``module`` these five forward-hook dicts (``_HOOK_ATTRS`` order)."""
    # nn.Module.__setattr__ would only check that these names are no parameter, buffer or
    # submodule before storing them; store them directly unless a class changes setattr.
    store = object.__setattr__ if type(module).__setattr__ is nn.Module.__setattr__ else setattr
    for name, value in zip(_HOOK_ATTRS, hooks, strict=False):
        store(module, name, value)


def carry_hooks(fused: nn.Module, first: nn.Module, last: nn.Module) -> None:
    """Pre-hooks of the first module and forward hooks of the last now run on ``fused``."""
    _set_hooks(fused, _hooks_of(first, last))


def _fuse(
    model: nn.Module,
    group: FusionGroup,
    module_paths: dict[int, tuple[str, ...]],
    by_types: dict[tuple[type, ...], FusionPattern],
    sharing: _Sharing,
) -> None:
    where = f"fusion group {list(group.paths)}"
    modules: list[nn.Module] = []
    for path, kind in zip(group.paths, group.types, strict=False):
        if not path:
            raise PlanError(f"{where}: the model itself cannot be part of a fusion group")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise PlanError(
                f"{where}: no module named '{path}' in {type(model).__name__}"
            ) from None
        if type(module) is not kind:
            raise PlanError(
                f"{where}: {path} is a {type(module).__name__}, expected {kind.__name__}; "
                "was the model fused already?"
            )
        modules.append(module)
    pattern = by_types.get(tuple(group.types), group.pattern)
    # a kept tail keeps its own hooks: they still fire on its other calls
    last = None if group.kept else modules[-1]
    hooks = _hooks_of(modules[0], last)  # taken before an in-place fusion strips them
    fused = None
    if len(modules) == len(pattern.types):
        fused = _fuse_in_place(pattern.fuser, modules, sharing)
    if fused is None:
        fused = pattern.fuse(*modules)
        hooks = _hooks_of(modules[0], last)
    _set_hooks(fused, hooks)
    for position, module in enumerate(modules):
        if group.paths[position] in group.kept:
            continue
        # every path naming the same object, so an alias never keeps the unfused module
        for path in module_paths.get(id(module), (group.paths[position],)):
            if position == 0:
                replace_module(model, (path,), fused)
            else:
                replace_module(model, (path,), nn.Identity().train(module.training))


def _fusers(
    patterns: Sequence[FusionPattern] | Registry | None,
) -> dict[tuple[type, ...], FusionPattern]:
    if patterns is None:
        return {}
    return {tuple(p.types): p for p in reversed(_patterns(patterns))}


def fuse_group(
    model: nn.Module,
    group: FusionGroup,
    patterns: Sequence[FusionPattern] | Registry | None = None,
) -> None:
    """Fuse one group in place: the first module becomes the fused one, the others ``nn.Identity``.

    The group's own pattern fuses it unless ``patterns`` (or a registry) has one for its types.
    The built-in fusers build the fused module from the model's own modules (no copies) unless
    one of its tensors is shared with another module.

    >>> from qswap.registry import FusionPattern
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> p = FusionPattern((nn.Linear, nn.ReLU), fuse_linear_relu, "doc")
    >>> fuse_group(model, find_fusion_groups(model, None, [p])[0])
    >>> [type(m).__name__ for m in model]
    ['LinearReLU', 'Identity']
    """
    module_paths, _, _ = walk_modules(model)
    _fuse(model, group, module_paths, _fusers(patterns), _Sharing(model))


def fuse_model(
    model: nn.Module,
    groups: Sequence[FusionGroup],
    patterns: Sequence[FusionPattern] | Registry | None = None,
) -> None:
    """Fuse every group in place (``nn.Sequential``, ``ModuleList`` and ``ModuleDict`` included).

    Pre-hooks of a group's first module and forward hooks of its last move to the fused module.
    The built-in fusers build the fused module from the model's own modules (no copies) unless
    one of its tensors is shared with another module.

    >>> from qswap.registry import FusionPattern
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> p = FusionPattern((nn.Conv2d, nn.BatchNorm2d, nn.ReLU), fuse_conv_bn_relu, "doc")
    >>> fuse_model(model, find_fusion_groups(model, None, [p]))
    >>> [type(m).__name__ for m in model]
    ['ConvReLU2d', 'Identity', 'Identity']
    """
    module_paths, _, _ = walk_modules(model)
    by_types = _fusers(patterns)
    sharing = _Sharing(model)
    for group in groups:
        _fuse(model, group, module_paths, by_types, sharing)
