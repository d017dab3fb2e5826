"""``prepare`` and ``calibrate``: fuse a copy of the model, attach observers, run data through it.

Nothing is rewritten: weights are observed through ``torch.nn.utils.parametrize``,
inputs and outputs through forward hooks, with the observers the registry names in
the config. The prepared model carries its plan on a private attribute (``_qswap``),
not as a submodule, so its ``state_dict`` holds only tensors.

    >>> import torch, qswap
    >>> prepared = qswap.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a8_minmax")
    >>> qswap.calibrate(prepared, [torch.randn(2, 4)]) is prepared
    True
"""

from __future__ import annotations

import copy
import itertools
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from pydantic import BaseModel
from torch import nn

from qswap.bias_correction import InputMeanObserver, correctable
from qswap.config import QConfig, QuantSpec
from qswap.decompose import decompose_in_place
from qswap.exceptions import CalibrationError, FallbackWarning, PlanError
from qswap.methods import learns_qparams
from qswap.registry import Registry, default_registry
from qswap.slots import (
    ActivationSlot,
    Components,
    WeightObserver,
    attach_activation,
    attach_parametrization,
    param_location,
)
from qswap.trace import nesting_depth, recursion_room
from qswap.walker import LayerSpec, Plan, gc_paused, plan, set_eval, split_inputs

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "QSwapState",
    "WeightObserver",
    "calibrate",
    "copy_model",
    "prepare",
    "state_of",
]

STATE_ATTR = "_qswap"


@dataclass
class QSwapState:
    """What qswap keeps on a prepared or converted model (attribute ``_qswap``, not a submodule).

    ``layers`` are the plan's layer specs; after ``convert`` they carry their qparams.
    """

    plan: Plan
    registry: Registry
    stage: Literal["prepared", "converted"]
    example_args: tuple[Any, ...] | None = None
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, LayerSpec] = field(default_factory=dict)
    #: how the last ``calibrate`` stopped, when it raised: the observers hold partial
    #: statistics, and ``convert`` refuses them until a ``calibrate`` runs to its end
    failed: str | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> QSwapState:
        # The plan, registry and example inputs are read-only: a copied model shares them.
        return QSwapState(
            self.plan,
            self.registry,
            self.stage,
            self.example_args,
            dict(self.example_kwargs),
            dict(self.layers),
            self.failed,
        )


def state_of(model: nn.Module) -> QSwapState | None:
    """The qswap state of a prepared or converted model, or ``None`` for any other model.

    >>> import torch
    >>> state_of(torch.nn.Linear(2, 2)) is None
    True
    """
    found = model.__dict__.get(STATE_ATTR)
    return found if isinstance(found, QSwapState) else None


# --------------------------------------------------------------------------- copying


_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)
_MODULE_GETSTATE = nn.Module.__getstate__
_MODULE_SETSTATE = nn.Module.__setstate__
_OBJECT_REDUCE_EX: Any = object.__reduce_ex__
_OBJECT_REDUCE: Any = object.__reduce__


def _parametrized_base(cls: type) -> type | None:
    """The original class of a ``torch.nn.utils.parametrize`` class, else ``None``."""
    copier = vars(cls).get("__deepcopy__")
    if (
        copier is not None
        and getattr(copier, "__module__", None) == "torch.nn.utils.parametrize"
        and len(cls.__bases__) == 1
    ):
        return cls.__bases__[0]
    return None


def _plain_module_class(cls: type) -> bool:
    """Whether ``copy.deepcopy`` of an instance reduces to copying its ``__dict__``."""
    return bool(
        getattr(cls, "__deepcopy__", None) is None
        and getattr(cls, "__reduce_ex__", None) is _OBJECT_REDUCE_EX
        and getattr(cls, "__reduce__", None) is _OBJECT_REDUCE
        and getattr(cls, "__getstate__", None) is _MODULE_GETSTATE
        and getattr(cls, "__setstate__", None) is _MODULE_SETSTATE
        and not any("__slots__" in vars(k) for k in cls.__mro__[:-1])
    )


def copy_model(model: nn.Module, share: Iterable[nn.Module] = ()) -> nn.Module:
    """A deep copy of ``model``, as ``copy.deepcopy`` makes it, several times faster on big models.

    Modules whose class copies by ``__dict__`` (nearly all) are copied structurally;
    everything else (tensors, custom attributes, exotic modules) goes through
    ``copy.deepcopy`` with one shared memo, so tied and shared objects stay shared.
    Modules in ``share`` are not copied: the copy refers to the same objects.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> c = copy_model(m)
    >>> c[0].weight is m[0].weight, torch.equal(c[0].weight, m[0].weight)
    (False, True)
    """
    memo: dict[int, Any] = {id(m): m for m in share}
    plain: dict[type, bool] = {}
    return _copy_module(model, memo, plain, set())


def _copy_tensor(t: Any, memo: dict[int, Any], seen: set[int]) -> Any:
    """``copy.deepcopy(t, memo)``, by a plain clone where that gives the same result.

    The clone is taken only for a plain leaf tensor that alone fills a storage not met
    before in this copy (and has no grad nor Python attributes); anything that may share
    storage goes through ``copy.deepcopy`` so sharing stays exactly as it makes it.
    ``nn.Parameter.__deepcopy__`` already is a bare clone, cheaper than these checks.
    """
    if type(t) is not torch.Tensor:
        return copy.deepcopy(t, memo)
    done = memo.get(id(t))
    if done is not None:
        return done
    if t.layout is torch.strided:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        torch_memo = cast(dict[Any, Any], memo).setdefault("torch", {})
        if (
            t.is_leaf
            and t.grad is None
            and not t.is_quantized
            and not t.is_meta
            and t.is_contiguous()
            and t.storage_offset() == 0
            and storage.nbytes() == t.numel() * t.element_size()
            and ptr not in seen
            and storage._cdata not in torch_memo
            and not t.__dict__
        ):
            seen.add(ptr)
            new = t.detach().clone().requires_grad_(t.requires_grad)
            # as Tensor.__deepcopy__ does: later copies of this storage share the clone's
            torch_memo[storage._cdata] = new.untyped_storage()
            memo[id(t)] = new
            return new
        seen.add(ptr)
    return copy.deepcopy(t, memo)


def _copy_module(
    module: nn.Module, memo: dict[int, Any], plain: dict[type, bool], seen: set[int]
) -> nn.Module:
    done = memo.get(id(module))
    if done is not None:
        return done  # type: ignore[no-any-return]
    cls = type(module)
    ok = plain.get(cls)
    if ok is None:
        base = _parametrized_base(cls)
        ok = plain[cls] = _plain_module_class(cls if base is None else base)
    if not ok:
        return copy.deepcopy(module, memo)
    if "_qswap_owner" in vars(cls) or _parametrized_base(cls) is not None:
        # parametrize keeps its properties on a per-module class; give the copy its own
        # so that changing one module's parametrizations never changes the other's.
        namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        cls = type(cls.__name__, cls.__bases__, namespace)
        new = cls.__new__(cls)
        cls._qswap_owner = id(new)  # type: ignore[attr-defined]
    else:
        new = cls.__new__(cls)
    memo[id(module)] = new
    keep = memo.setdefault(id(memo), [])
    keep.append(module)  # as deepcopy does: keep originals alive while ids are memo keys
    state: dict[str, Any] = {}
    # Children first: hooks that are bound methods of a child then find it in the memo.
    children = module.__dict__["_modules"]
    copied = type(children)()
    for name, child in children.items():
        copied[name] = None if child is None else _copy_module(child, memo, plain, seen)
    for key, value in module.__dict__.items():
        kind = type(value)
        if key == "_modules":
            state[key] = copied
        elif kind in _PLAIN:
            state[key] = value
        elif (kind is OrderedDict or kind is dict or kind is set) and not value:
            state[key] = kind()
        elif isinstance(value, BaseModel) and value.model_config.get("frozen"):
            state[key] = value  # frozen pydantic models (specs, options) are never mutated
        elif key == "_compiled_call_impl":
            continue
        elif isinstance(value, torch.Tensor) and not value.is_leaf:
            # a tensor a hook computed (legacy weight_norm's weight), which deepcopy refuses:
            # a detached copy; the hook computes it again on the next forward
            state[key] = memo[id(value)] = value.detach().clone()
        elif (key == "_parameters" or key == "_buffers") and (kind is dict or kind is OrderedDict):
            state[key] = memo[id(value)] = kind(
                (name, _copy_tensor(t, memo, seen)) for name, t in value.items()
            )
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


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
    from qswap.convert import input_sources

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
    from qswap.slots import activation_slot

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


def _attach_observers(
    model: nn.Module, the_plan: Plan, layers: Mapping[str, LayerSpec], components: Components
) -> None:
    from qswap.convert import keeps_input_grid

    mode = the_plan.config.mode
    qat = mode == "qat"
    correct_bias = the_plan.config.bias_correction and mode in ("static", "weight_only")
    tied: dict[int, WeightObserver] = {}  # a tensor several layers share: one observer
    for name, layer in layers.items():
        module = model.get_submodule(name)
        for slot, spec in layer.param_specs().items():
            owner, pname = param_location(module, slot)
            tensor = owner._parameters.get(pname)  # else parametrized by the user already
            observer = tied.get(id(tensor)) if tensor is not None else None
            if observer is None:
                quantizer = components.create("quantizer", spec) if qat else None
                observer = _weight_observer(
                    module, slot, components.create("observer", spec), quantizer
                )
                device = tensor.device if tensor is not None else _device_of(owner)
                if device is not None and device.type != "cpu":
                    observer.to(device)
                if tensor is not None and type(observer) is WeightObserver:
                    tied[id(tensor)] = observer  # the plan gives tied slots one spec
            attach_parametrization(owner, pname, observer)
        if mode not in ("static", "qat"):
            # weight_only: no activations; dynamic: quantized per batch at run time
            mean = _input_mean(module, layer, the_plan.config.activation) if correct_bias else None
            if mean is not None:  # weight_only with bias correction: record the input mean only
                _attach_slot(module, "input", ActivationSlot(), mean, _device_of(module))
            continue
        acts = layer.activation_specs()
        if not acts:
            continue
        if keeps_input_grid(layer):
            continue  # a pooling (...) layer on its chained input's grid: nothing to observe
        device = _device_of(module)
        for which, spec in acts.items():
            if which == "input" and layer.input_from is not None:
                # observed as the producer's output; bias correction still needs the mean here
                mean = _input_mean(module, layer, spec) if correct_bias else None
                if mean is not None:
                    _attach_slot(module, "input", ActivationSlot(), mean, device)
                continue
            slot_module = ActivationSlot(
                observer=components.create("observer", spec),
                quantizer=components.create("quantizer", spec) if qat else None,
                requant=qat,
            )
            mean = _input_mean(module, layer, spec) if which == "input" and correct_bias else None
            _attach_slot(module, which, slot_module, mean, device)


def _attach_slot(
    module: nn.Module,
    which: str,
    slot_module: ActivationSlot,
    mean: InputMeanObserver | None,
    device: torch.device | None,
) -> None:
    """Hook ``slot_module`` (with bias correction's ``mean``, if any) on the module's device."""
    if mean is not None:
        slot_module.add_module("mean", mean)
    if device is not None and device.type != "cpu":
        slot_module.to(device)
    attach_activation(module, which, slot_module)


# --------------------------------------------------------------------------- calibrate


def calibrate(
    prepared: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    progress: bool | None = None,
    process_group: ProcessGroup | None = None,
) -> nn.Module:
    """Run ``batches`` through a prepared model (eval mode, no grad) so its observers see data.

    Each batch is a tensor (one positional argument), a tuple or list (the positional
    arguments) or a dict (keyword arguments); a tensor given alone as ``batches`` is one
    batch (as ``qswap quantize --calib`` takes it), not one per row. ``progress`` shows a tqdm bar on stderr
    (default: only when stderr is a terminal). The first batch becomes the example
    input when ``prepare`` got none. Returns ``prepared``.

    When ``torch.distributed`` is initialized, ``batches`` is this rank's shard and the call
    is collective: the observers are then reduced across ``process_group`` (default: the
    world), so every rank ends with the same observers and ``convert`` gives the same
    qparams everywhere (see ``qswap.distributed``). A rank that raises here makes the
    others raise a ``CalibrationError`` naming it. With one process nothing changes.

    >>> import torch, qswap
    >>> prepared = qswap.prepare(torch.nn.Linear(4, 4), "w8a8_minmax")
    >>> _ = qswap.calibrate(prepared, [torch.randn(2, 4)] * 3, max_batches=2, progress=False)
    """
    state = state_of(prepared)
    if state is None:
        raise CalibrationError(
            f"calibrate() needs a model returned by qswap.prepare(), got a "
            f"{type(prepared).__name__} that qswap did not prepare; call "
            "prepared = qswap.prepare(model, config) first and calibrate that"
        )
    if state.stage != "prepared":
        raise CalibrationError(
            "calibrate() got a model that qswap.convert() already converted; its observers are "
            "gone. Calibrate the prepared model before converting it"
        )
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise CalibrationError(
            f"max_batches must be a positive number of batches (or None for all), got "
            f"{max_batches!r}"
        )
    if isinstance(batches, torch.Tensor):
        batches = [batches]  # one batch, not one per row
    from qswap.distributed import check_reducible, distributed_context, report_failure

    group = distributed_context(process_group)
    if group is not None:
        check_reducible(prepared)  # every rank fails alike, before any batch runs
    show = progress if progress is not None else _stderr_is_tty()
    total: int | None = None
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
        batches = itertools.islice(batches, max_batches)
    from tqdm import tqdm

    flags = set_eval(prepared)  # restored as they were when calibration ends
    seen = 0
    first: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    try:
        with torch.no_grad():
            bar = tqdm(
                batches,
                total=total,
                disable=not show,
                desc="qswap calibrate",
                unit="batch",
                file=sys.stderr,
                dynamic_ncols=True,
            )
            try:
                depth = nesting_depth(prepared)
                for batch in bar:
                    args, kwargs = _batch_inputs(batch, seen)
                    with recursion_room(depth):
                        _run(prepared, batch, args, kwargs, seen)
                    if first is None:
                        first = (args, kwargs)
                    seen += 1
            finally:
                bar.close()
        if first is None:
            raise CalibrationError(
                "calibrate() saw no batch: the iterable of batches was empty. Pass an iterable "
                "with one model input per batch (a tensor, a tuple of positional arguments or "
                "a dict of keyword arguments), e.g. [x[i:i + 32] for i in range(0, len(x), 32)]"
            )
    except BaseException as exc:
        state.failed = f"batch {seen + 1} raised {type(exc).__name__}: {str(exc)[:200]}"
        if group is not None and isinstance(exc, Exception):
            report_failure(group, exc)  # the other ranks raise instead of waiting for us
        raise
    finally:
        for m, flag in flags:
            m.training = flag
    state.failed = None  # a calibration that ran to its end: what the observers hold is whole
    if state.example_args is None:
        state.example_args, state.example_kwargs = first
    if group is not None:
        from qswap.distributed import sync_observers

        sync_observers(prepared, process_group)
    if state.plan.config.mode == "qat":
        _start_learned_quantizers(prepared)  # after the merge: every rank starts alike
    return prepared


def _start_learned_quantizers(prepared: nn.Module) -> None:
    """Set learning quantizers (LSQ) from everything calibration observed, not its first batch.

    In QAT such a quantizer takes its qparams from the observer once, then trains them.
    """
    for module in prepared.modules():
        quantizer: Any = getattr(module, "quantizer", None)
        observer: Any = getattr(module, "observer", None)
        if not isinstance(module, (WeightObserver, ActivationSlot)) or quantizer is None:
            continue
        if observer is not None and observer.seen and learns_qparams(quantizer):
            quantizer.set_qparams(observer.calculate_qparams())


def _stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def _batch_inputs(batch: Any, index: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    split = split_inputs(batch)
    if split is None:
        raise CalibrationError(
            f"calibration batch {index} is None; each batch must be a tensor, a tuple of "
            "positional arguments or a dict of keyword arguments"
        )
    return split


def _run(
    model: nn.Module, batch: Any, args: tuple[Any, ...], kwargs: dict[str, Any], index: int
) -> None:
    try:
        model(*args, **kwargs)
    except TypeError as exc:
        pairs = isinstance(batch, (tuple, list)) and len(batch) > 1
        if index == 0 and pairs and "argument" in str(exc):
            raise CalibrationError(
                f"calibration batch 0 is a {type(batch).__name__} of {len(batch)} items, which "
                f"calibrate() passes as {len(batch)} positional arguments, and the model "
                f"refused them ({exc}). If the batches are (inputs, labels) pairs, pass "
                "(x for x, _ in loader) instead"
            ) from exc
        raise
