"""Dataflow trace of one forward pass: leaf-module calls and the torch functions between them.

Forward hooks on every leaf module plus a ``TorchFunctionMode`` record what the forward
actually does, so fusion and quant/dequant boundaries never depend on module names or on
``torch.fx`` being able to trace the model (data-dependent ``if``, Python loops and
``x.view(x.size(0), -1)`` are all fine). Tensors are identified by *value*: an in-place op
(``ReLU(inplace=True)``, ``out += identity``) produces a new value of the same tensor, so the
recorded dataflow is a DAG.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils.hooks import RemovableHandle

from qswap.tree import walk_modules

__all__ = [
    "Call",
    "RecursionRoom",
    "Scope",
    "Trace",
    "Value",
    "flatten_tensors",
    "function_name",
    "nesting_depth",
    "recursion_room",
    "trace",
]

# Calls that read only a tensor's metadata. They are not data consumers (fusing or
# quantizing the producer cannot change their result), so they are not recorded.
_METADATA_METHODS = frozenset(
    f"torch.Tensor.{name}"
    for name in (
        "size",
        "dim",
        "ndimension",
        "numel",
        "nelement",
        "stride",
        "storage_offset",
        "is_contiguous",
        "element_size",
        "is_floating_point",
        "is_complex",
        "is_signed",
        "get_device",
        "data_ptr",
        "__len__",
        "has_names",
        "is_pinned",
        "is_shared",
    )
)


@dataclass(frozen=True, slots=True)
class Value:
    """One version of one tensor seen during the trace.

    ``producer`` is the index of the ``Call`` that made it (``None`` for model inputs,
    parameters, buffers and tensors created outside what the trace sees). ``version_of`` is
    the value an in-place op overwrote to make this one (same tensor object). ``name`` is
    ``"args[0]"``/``"kwargs['mask']"`` for model inputs and the dotted name for a parameter
    or buffer used outside a leaf module (``"scale"``).
    """

    id: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    producer: int | None
    version_of: int | None
    name: str | None


@dataclass(frozen=True, slots=True)
class Call:
    """One leaf-module call or one torch function/method call outside leaf modules.

    ``target`` is the module's first dotted path (``paths`` lists every path that names the
    same module object) or the function's name as ``torch.overrides.resolve_name`` spells it
    (``"torch.flatten"``, ``"torch.Tensor.view"``, ``"torch.Tensor.add_"`` for ``+=``,
    ``"torch.nn.functional.relu"``). ``inputs``/``outputs`` are value ids, flattened from
    nested tuples, lists and dicts; an input modified in place appears in ``outputs`` as a new
    value, and a call that returns its input unchanged (``nn.Identity``) repeats its id.
    """

    index: int
    kind: Literal["module", "function"]
    target: str
    module_type: type[nn.Module] | None
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Scope:
    """One call of a container (non-leaf) module; ``calls[start:stop]`` ran inside it.

    ``Trace.scopes`` lists them in the order they finish (inner blocks before their parent);
    the model itself has no scope.
    """

    target: str
    paths: tuple[str, ...]
    module_type: type[nn.Module]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    start: int
    stop: int


class Trace:
    """The recorded forward pass: calls in execution order, values, model inputs and outputs.

    >>> t = trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), (torch.randn(1, 2),))
    >>> [c.target for c in t.consumers(t.calls[0].outputs[0])]
    ['1']
    """

    def __init__(
        self,
        calls: list[Call],
        values: dict[int, Value],
        inputs: tuple[int, ...],
        outputs: tuple[int, ...],
        output_paths: tuple[str, ...],
        scopes: list[Scope],
    ) -> None:
        self.calls = calls
        self.values = values
        self.inputs = inputs
        self.outputs = outputs
        self.output_paths = output_paths
        self.scopes = scopes
        self._output_set = frozenset(outputs)
        self._consumers: dict[int, list[Call]] = {}
        self._by_path: dict[str, list[Call]] = {}
        for call in calls:
            seen: set[int] = set()
            for vid in call.inputs:
                if vid not in seen:
                    seen.add(vid)
                    self._consumers.setdefault(vid, []).append(call)
            for path in call.paths:
                self._by_path.setdefault(path, []).append(call)

    def consumers(self, value_id: int) -> list[Call]:
        """Calls that read ``value_id``, in execution order, each once (model outputs not included)."""
        return list(self._consumers.get(value_id, ()))

    def producer(self, value_id: int) -> Call | None:
        """The call that produced ``value_id``, or ``None`` for inputs, parameters and constants."""
        index = self.values[value_id].producer
        return None if index is None else self.calls[index]

    def calls_of(self, module_path: str) -> list[Call]:
        """Every call of the module object named ``module_path`` (any of its paths), in order."""
        return list(self._by_path.get(module_path, ()))

    def is_output(self, value_id: int) -> bool:
        """Whether ``value_id`` is (part of) what the model returns."""
        return value_id in self._output_set

    def module_calls(self) -> list[Call]:
        """The leaf-module calls, in execution order."""
        return [c for c in self.calls if c.kind == "module"]

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self) -> Iterator[Call]:
        return iter(self.calls)

    def __repr__(self) -> str:
        return f"<Trace {len(self.calls)} calls, {len(self.values)} values>"

    def __str__(self) -> str:
        def ids(vids: tuple[int, ...]) -> str:
            return ", ".join(f"%{v}" for v in vids)

        lines = [f"inputs: {ids(self.inputs)}"]
        for c in self.calls:
            kind = c.module_type.__name__ if c.module_type is not None else "fn"
            lines.append(
                f"#{c.index} {ids(c.outputs) or '-'} = {c.target} [{kind}]({ids(c.inputs)})"
            )
        lines.append(f"outputs: {ids(self.outputs)}")
        return "\n".join(lines)


def _flatten(obj: Any, path: str, out: list[tuple[str, torch.Tensor]]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            _flatten(item, f"{path}[{i}]", out)
    elif isinstance(obj, Mapping):
        for key, item in obj.items():
            _flatten(item, f"{path}[{key!r}]", out)


def flatten_tensors(obj: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor in ``obj`` (nested tuples, lists and dicts), appended to ``out``."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            flatten_tensors(item, out)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            flatten_tensors(item, out)
    return out


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except RecursionError:
        raise
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _looks_inplace(name: str, module: nn.Module | None) -> bool:
    """Fallback for tensors without a version counter (made under ``torch.inference_mode``)."""
    if module is not None:
        return bool(getattr(module, "inplace", False))
    last = name.rsplit(".", 1)[-1]
    return (last.endswith("_") and not last.endswith("__")) or last.startswith("__i")


_NAMES: dict[Any, str] = {}


def function_name(func: Callable[..., Any]) -> str:
    """The name a ``Call`` records for a torch function, as ``torch.overrides.resolve_name`` has it.

    Use it inside your own ``TorchFunctionMode`` to match the calls of a ``Trace``.

    >>> function_name(torch.Tensor.add_), function_name(torch.flatten)
    ('torch.Tensor.add_', 'torch.flatten')
    """
    name = _NAMES.get(func)
    if name is None:
        resolved = resolve_name(func)
        if resolved is None:
            module = getattr(func, "__module__", None) or "torch"
            resolved = f"{module}.{getattr(func, '__qualname__', repr(func))}"
        name = _NAMES[func] = resolved
    return name


class _Tracer(TorchFunctionMode):
    """Hook targets and function mode for one trace; all state lives here."""

    def __init__(self, params: dict[int, str], module_paths: dict[int, tuple[str, ...]]) -> None:
        super().__init__()
        self.depth = 0
        self.calls: list[Call] = []
        self.values: dict[int, Value] = {}
        self.scopes: list[Scope] = []
        self.params = params
        self.module_paths = module_paths
        # id(tensor) -> [value id, version counter when that value was assigned, weakref]
        self.live: dict[int, list[Any]] = {}
        self.pending: list[tuple[list[torch.Tensor], list[int], list[int]] | None] = []
        self.scope_stack: list[tuple[tuple[int, ...], int] | None] = []

    # -- values ---------------------------------------------------------------------------
    def _forget(self, key: int, ref: weakref.ref[torch.Tensor]) -> None:
        entry = self.live.get(key)
        if entry is not None and entry[2] is ref:
            del self.live[key]

    def new_value(
        self,
        t: torch.Tensor,
        producer: int | None,
        version_of: int | None = None,
        name: str | None = None,
    ) -> int:
        vid = len(self.values)
        self.values[vid] = Value(vid, tuple(t.shape), t.dtype, producer, version_of, name)
        key = id(t)
        entry = self.live.get(key)
        if entry is not None:  # same object, new version: keep its weakref
            entry[0] = vid
            entry[1] = _version(t)
        else:

            def forget(r: weakref.ref[torch.Tensor], k: int = key) -> None:
                self._forget(k, r)

            ref = weakref.ref(t, forget)
            self.live[key] = [vid, _version(t), ref]
        return vid

    def lookup(self, t: torch.Tensor) -> int:
        """Current value id of ``t``; unknown tensors become constants (or named parameters)."""
        entry = self.live.get(id(t))
        if entry is None:
            return self.new_value(t, None, None, self.params.get(id(t)))
        version = _version(t)
        if version != entry[1]:  # mutated where the trace could not see it (e.g. via a view)
            return self.new_value(t, None, entry[0], None)
        vid: int = entry[0]
        return vid

    def record(
        self,
        kind: Literal["module", "function"],
        target: str,
        module: nn.Module | None,
        in_tensors: list[torch.Tensor],
        in_ids: list[int],
        in_versions: list[int],
        result: Any,
    ) -> None:
        index = len(self.calls)
        out_tensors: list[torch.Tensor] = []
        flatten_tensors(result, out_tensors)
        mutated: dict[int, int] = {}  # id(tensor) -> new value id
        for t, vid, version in zip(in_tensors, in_ids, in_versions, strict=False):
            key = id(t)
            if key in mutated:
                continue
            now = _version(t)
            if now != version or (
                version == -1
                and any(o is t for o in out_tensors)
                and _looks_inplace(target, module)
            ):
                mutated[key] = self.new_value(t, index, vid)
        out_ids: list[int] = []
        for t in out_tensors:
            key = id(t)
            if key in mutated:
                out_ids.append(mutated[key])
            elif key in self.live and any(t is i for i in in_tensors):
                out_ids.append(self.lookup(t))  # returned an input unchanged
            else:
                out_ids.append(self.new_value(t, index))
        for vid in mutated.values():
            if vid not in out_ids:
                out_ids.append(vid)  # mutated but not returned (``x[0] = 1``)
        module_type = type(module) if module is not None else None
        paths = self.module_paths.get(id(module), ()) if module is not None else ()
        self.calls.append(
            Call(index, kind, target, module_type, tuple(in_ids), tuple(out_ids), paths)
        )

    def inputs_of(self, tensors: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        ids = [self.lookup(t) for t in tensors]
        return ids, [_version(t) for t in tensors]

    # -- functions ------------------------------------------------------------------------
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        if self.depth:
            return func(*args, **kwargs)
        name = function_name(func)
        if name in _METADATA_METHODS:
            return func(*args, **kwargs)
        if name.endswith(".__get__"):
            result = func(*args, **kwargs)
            if not isinstance(result, torch.Tensor):
                return result  # a metadata getter (.shape, .dtype, .device, ...)
            in_tensors: list[torch.Tensor] = []
            flatten_tensors(args, in_tensors)
            in_ids, versions = self.inputs_of(in_tensors)
            self.record("function", name, None, in_tensors, in_ids, versions, result)
            return result
        in_tensors = []
        flatten_tensors(args, in_tensors)
        if kwargs:
            flatten_tensors(kwargs, in_tensors)
        in_ids, versions = self.inputs_of(in_tensors)
        result = func(*args, **kwargs)
        self.record("function", name, None, in_tensors, in_ids, versions, result)
        return result

    # -- leaf modules -----------------------------------------------------------------------
    def enter(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.depth += 1

    def leaf_pre(self, module: nn.Module, args: Any, kwargs: Any, entered: bool) -> None:
        if not entered:
            self.depth += 1
        if self.depth != 1:  # a leaf called from inside another leaf: part of that call
            self.pending.append(None)
            return
        tensors: list[torch.Tensor] = []
        flatten_tensors(args, tensors)
        if kwargs:
            flatten_tensors(kwargs, tensors)
        ids, versions = self.inputs_of(tensors)
        self.pending.append((tensors, ids, versions))

    def leaf_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        entry = self.pending.pop()
        if entry is not None:
            tensors, ids, versions = entry
            target = self.module_paths.get(id(module), ("",))[0]
            self.record("module", target, module, tensors, ids, versions, output)
        self.depth -= 1

    # -- containers -------------------------------------------------------------------------
    def scope_pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self.depth:
            self.scope_stack.append(None)
            return
        self.depth += 1  # our own bookkeeping is not part of the forward
        tensors: list[torch.Tensor] = []
        flatten_tensors(args, tensors)
        if kwargs:
            flatten_tensors(kwargs, tensors)
        ids = tuple(self.lookup(t) for t in tensors)
        self.depth -= 1
        self.scope_stack.append((ids, len(self.calls)))

    def scope_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        entry = self.scope_stack.pop()
        if entry is None:
            return
        self.depth += 1
        tensors: list[torch.Tensor] = []
        flatten_tensors(output, tensors)
        out_ids = tuple(self.lookup(t) for t in tensors)
        self.depth -= 1
        paths = self.module_paths[id(module)]
        self.scopes.append(
            Scope(paths[0], paths, type(module), entry[0], out_ids, entry[1], len(self.calls))
        )


def _record_before_input_slot(module: nn.Module, hook_id: int) -> None:
    """Move pre-hook ``hook_id`` (the last one) in front of qswap's input-slot pre-hook, if any.

    The slot's fake-quantization is part of the layer's call: the trace records the tensors
    the layer receives, so the dataflow from the previous call stays connected. The other
    hooks keep their order, so removing ours restores the original one.
    """
    slot = module._modules.get("qswap_input")
    if slot is None:
        return
    hooks = module._forward_pre_hooks
    keys = [key for key in hooks if key != hook_id]
    for i, key in enumerate(keys):
        if getattr(hooks[key], "__self__", None) is slot:
            for later in keys[i:]:
                hooks[later] = hooks.pop(later)  # to the end, keeping their order
            return


_ROOM_LOCK = threading.Lock()
_ROOM: list[int] = [0, 0]  # [calls holding a raised limit, the limit before the first of them]
_FRAMES_PER_LEVEL = 12  # a hooked module call: _call_impl, hooks, forward and qswap's own


def nesting_depth(model: nn.Module) -> int:
    """How many modules deep ``model`` nests (1 for a module without children).

    >>> nesting_depth(nn.Sequential(nn.Sequential(nn.Linear(2, 2))))
    3
    """
    deepest = 1
    stack = [(model, 1)]
    while stack:
        module, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in module._modules.values() if c is not None)
    return deepest


@contextlib.contextmanager
def recursion_room(depth: int) -> Iterator[None]:
    """Enough Python stack for a forward ``depth`` modules deep with qswap's hooks on each.

    A model nested 200 deep runs in plain PyTorch, but hooks add frames per level; this raises
    ``sys.getrecursionlimit()`` for the block when it would not do, and puts it back when the
    last block holding it ends (threads included).
    """
    needed = depth * _FRAMES_PER_LEVEL + 500
    if needed <= sys.getrecursionlimit() and not _ROOM[0]:
        yield
        return
    with _ROOM_LOCK:
        if _ROOM[0] == 0:
            _ROOM[1] = sys.getrecursionlimit()
        _ROOM[0] += 1
        if needed > sys.getrecursionlimit():
            sys.setrecursionlimit(needed)
    try:
        yield
    finally:
        with _ROOM_LOCK:
            _ROOM[0] -= 1
            if _ROOM[0] == 0:
                sys.setrecursionlimit(_ROOM[1])


class RecursionRoom:
    """Forward (pre-)hooks giving every call of a deep model ``recursion_room`` (convert adds
    them to a converted model nested deeper than the recursion limit allows with hooks)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._local = threading.local()

    def enter(self, module: nn.Module, args: Any) -> None:
        stack = self._local.__dict__.setdefault("stack", [])
        room = recursion_room(self.depth)
        room.__enter__()
        stack.append(room)

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = self._local.__dict__.get("stack")
        if stack:
            stack.pop().__exit__(None, None, None)

    def __getstate__(self) -> dict[str, Any]:
        return {"depth": self.depth}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.depth = state["depth"]
        self._local = threading.local()

    @staticmethod
    def needed(model: nn.Module) -> RecursionRoom | None:
        """A room for ``model`` if its depth needs one, else None."""
        depth = nesting_depth(model)
        if depth * _FRAMES_PER_LEVEL + 500 <= sys.getrecursionlimit():
            return None
        return RecursionRoom(depth)


def _hook(
    tracer: _Tracer,
    model: nn.Module,
    leaves: Sequence[nn.Module],
    containers: Sequence[nn.Module],
    handles: list[RemovableHandle],
) -> None:
    """Put the tracer's hooks on every leaf and container (their handles go to ``handles``).

    The hooks sit on the caller's modules for the trace's duration: another thread running
    (or tracing) the same model meanwhile must neither feed this trace nor be disturbed, so
    each hook acts only in the thread that traces.
    """
    here = threading.get_ident()

    def mine(hook: Callable[..., None]) -> Callable[..., None]:
        def only_here(*a: Any) -> None:
            if threading.get_ident() == here:
                hook(*a)

        return only_here

    for m in leaves:
        has_pre = bool(m._forward_pre_hooks)
        if has_pre:
            handles.append(
                m.register_forward_pre_hook(mine(tracer.enter), prepend=True, with_kwargs=True)
            )

        def pre(mod: nn.Module, args: Any, kw: Any, _entered: bool = has_pre) -> None:
            if threading.get_ident() == here:
                tracer.leaf_pre(mod, args, kw, _entered)

        handle = m.register_forward_pre_hook(pre, with_kwargs=True)
        handles.append(handle)
        if has_pre:
            _record_before_input_slot(m, handle.id)
        handles.append(m.register_forward_hook(mine(tracer.leaf_post), with_kwargs=True))
    for m in containers:
        if m is model:
            continue
        handles.append(m.register_forward_pre_hook(mine(tracer.scope_pre), with_kwargs=True))
        handles.append(m.register_forward_hook(mine(tracer.scope_post), with_kwargs=True))


def trace(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    leaf: Callable[[str, nn.Module], bool] | None = None,
) -> Trace:
    """Run ``model(*example_inputs, **example_kwargs)`` once under ``no_grad`` and record its dataflow.

    Leaves are modules without children (``torch.ao.nn.intrinsic`` fused modules count as
    leaves, and so do layers whose only children are torch's ``parametrizations`` or qswap's
    ``qswap_input``/``qswap_output`` slots, whose inputs are recorded as they reach the layer,
    before its input slot; a user-written model without submodules is traced op by op). ``leaf(path, module)``
    may mark more modules as leaves: one call each, their insides not traced. The model runs
    in its current train/eval mode and is not modified: hooks are removed (also when the
    forward raises) and buffers a training-mode forward updates are restored.

    >>> t = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), (torch.randn(1, 3, 8, 8),))
    >>> [(c.target, c.module_type.__name__) for c in t.calls]
    [('0', 'Conv2d'), ('1', 'BatchNorm2d')]
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    kwargs = dict(example_kwargs or {})
    module_paths, leaves, containers = walk_modules(model, leaf)
    params: dict[int, str] = {}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for m in (*leaves, *containers):
        prefix = module_paths[id(m)][0]
        prefix = f"{prefix}." if prefix else ""
        for tensors in (m._parameters, m._buffers):
            for name, tensor in tensors.items():
                if tensor is not None:
                    params.setdefault(id(tensor), f"{prefix}{name}")
        if m.training:  # a training-mode forward may update buffers (BatchNorm statistics)
            saved.extend((b, b.clone()) for b in m._buffers.values() if b is not None)
    tracer = _Tracer(params, module_paths)
    handles: list[RemovableHandle] = []
    try:
        _hook(tracer, model, leaves, containers, handles)
        named_inputs: list[tuple[str, torch.Tensor]] = []
        _flatten(tuple(example_inputs), "args", named_inputs)
        for key, value in kwargs.items():
            _flatten(value, f"kwargs[{key!r}]", named_inputs)
        input_ids = tuple(tracer.new_value(t, None, None, n) for n, t in named_inputs)

        with torch.no_grad(), tracer, recursion_room(nesting_depth(model)):
            result = model(*example_inputs, **kwargs)
            named_outputs: list[tuple[str, torch.Tensor]] = []
            tracer.depth += 1
            _flatten(result, "output", named_outputs)
            tracer.depth -= 1
            output_ids = tuple(tracer.lookup(t) for _, t in named_outputs)
    finally:
        for handle in handles:
            handle.remove()
        if saved:
            with torch.no_grad():
                for buffer, copy in saved:
                    buffer.copy_(copy)
    return Trace(
        tracer.calls,
        tracer.values,
        input_ids,
        output_ids,
        tuple(name for name, _ in named_outputs),
        tracer.scopes,
    )


def fused_view(
    t: Trace,
    model: nn.Module,
    groups: Sequence[tuple[Sequence[str], Sequence[str]]],
    *,
    leaf: Callable[[str, nn.Module], bool] | None = None,
) -> Trace | None:
    """What ``trace`` would record on ``model``, the traced model after fusing ``groups``.

    ``groups`` are ``(member paths in forward order, kept paths)``: the first member now runs
    the whole group and makes the output of the last member not kept; the other members not
    kept are ``nn.Identity`` (their calls hand that output back); kept members still run
    (see ``qswap.fuse.FusionGroup``). Module types and paths are read from ``model`` as it is
    now, so fused, folded and swapped modules show their new types. Call indices are those
    a new trace would give; ``leaf(path, module)`` marks more leaves, as for ``trace``.

    ``None`` when ``t`` cannot tell what ``model`` does without running it: a member called
    more than once, a kept member before a fused one, a module that changed from leaf to
    container or back, a path that no longer exists, or an intermediate value still read.

    >>> seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval()
    >>> t = trace(seq, (torch.randn(1, 2),))
    >>> from qswap.fuse import fuse_model, find_fusion_groups
    >>> from qswap.registry import default_registry
    >>> reg = default_registry()
    >>> fuse_model(seq, find_fusion_groups(seq, t, reg), reg)
    >>> [(c.target, c.module_type.__name__) for c in fused_view(t, seq, [(("0", "1"), ())]).calls]
    [('0', 'LinearReLU'), ('1', 'Identity')]
    """
    outputs_of: dict[int, tuple[int, ...]] = {}  # head call index -> the fused outputs
    identity_of: dict[int, tuple[int, ...]] = {}  # removed member call index -> its value
    for members, kept in groups:
        fused: list[Call] = []
        for path in members[: len(members) - len(kept)]:
            found = t.calls_of(path)
            if len(found) != 1 or path in kept:
                return None
            fused.append(found[0])
        out = fused[-1].outputs
        outputs_of[fused[0].index] = out
        for c in fused[1:]:
            identity_of[c.index] = out
    module_paths, leaves, containers = walk_modules(model, leaf)
    leaf_of: dict[str, nn.Module] = {}
    for m in leaves:
        for path in module_paths[id(m)]:
            leaf_of[path] = m
    container_paths = {p for m in containers for p in module_paths[id(m)]}
    if any(s.target not in container_paths for s in t.scopes):
        return None  # a container is now a leaf (or gone): its calls would change
    removed: set[int] = set()
    for index, out in outputs_of.items():
        removed.update(v for v in t.calls[index].outputs if v not in out)
    for index, out in identity_of.items():
        removed.update(v for v in t.calls[index].outputs if v not in out)
    values = dict(t.values)
    calls: list[Call] = []
    for c in t.calls:
        if c.kind != "module":
            if removed.intersection(c.inputs):
                return None
            calls.append(c)
            continue
        module = leaf_of.get(c.target)
        if module is None:
            return None  # gone, or no longer a leaf: a new trace would see its insides
        paths = module_paths[id(module)]
        ins, outs = c.inputs, c.outputs
        if c.index in outputs_of:
            outs = outputs_of[c.index]
            for v in outs:
                old = values[v]
                values[v] = Value(v, old.shape, old.dtype, c.index, None, old.name)
        elif c.index in identity_of:
            ins = outs = identity_of[c.index]
        elif removed.intersection(ins):
            return None
        calls.append(Call(c.index, "module", paths[0], type(module), ins, outs, paths))
    if removed.intersection(t.outputs):
        return None
    for v in removed:
        values.pop(v, None)
    return Trace(calls, values, t.inputs, t.outputs, t.output_paths, list(t.scopes))
