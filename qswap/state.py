"""What qswap keeps on a prepared or converted model, and the copy every stage starts from.

The state (plan, registry, stage, example inputs, layer specs) lives on a private attribute
(``_qswap``), not a submodule, so the model's ``state_dict`` holds only tensors.
:func:`copy_model` is ``copy.deepcopy`` made several times faster on big models (measured in
``bench/bench_prepare.py``): the user's model is never changed, so each stage copies it.

    >>> import torch
    >>> state_of(torch.nn.Linear(2, 2)) is None
    True
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from pydantic import BaseModel
from torch import nn

if TYPE_CHECKING:
    from qswap.plan import LayerSpec, Plan
    from qswap.registry import Registry

__all__ = ["STATE_ATTR", "QSwapState", "copy_model", "state_of"]


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


_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


_MODULE_GETSTATE = nn.Module.__getstate__


_MODULE_SETSTATE = nn.Module.__setstate__


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


_OBJECT_REDUCE_EX: Any = object.__reduce_ex__


_OBJECT_REDUCE: Any = object.__reduce__
