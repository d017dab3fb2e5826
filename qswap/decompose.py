"""Decompositions: a module that does two jobs, seen as the modules it is made of.

(And hook-based ``weight_norm``/``spectral_norm`` seen as the weight they compute.)

timm's ``BatchNormAct2d`` is a BatchNorm and an activation in one class. Seen as a
``Sequential`` of a ``BatchNorm2d`` and the activation, its BatchNorm folds into the
convolution before it (and a ReLU fuses with it) like any BatchNorm, and the activation runs
as any activation. A registry maps a class to a function building that equivalent module
from the module's own tensors (``Registry.register_decomposition``, or ``decompositions:`` in
a pack); ``plan`` and ``prepare`` apply it to qswap's copy of the model, never to the user's.

    >>> import torch
    >>> from torch import nn
    >>> from qswap.registry import Registry
    >>> class BNReLU(nn.BatchNorm2d):
    ...     def forward(self, x):
    ...         return torch.relu(super().forward(x))
    >>> reg = Registry("doc")
    >>> reg.register_decomposition(BNReLU, lambda m: nn.Sequential(batchnorm_of(m), nn.ReLU()))
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), BNReLU(4)).eval()
    >>> [type(m).__name__ for m in decomposed(model, reg)[1]]
    ['BatchNorm2d', 'ReLU']
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from qswap.exceptions import RegistrationError
from qswap.registry import Registry, qualified_name

__all__ = ["batchnorm_act", "batchnorm_of", "decompose_in_place", "decomposed"]


def _legacy_hooks(module: nn.Module) -> list[Any]:
    """torch.nn.utils.weight_norm / spectral_norm hooks (the old, hook-based reparametrizations)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return [
        h for h in module._forward_pre_hooks.values() if isinstance(h, WeightNorm | SpectralNorm)
    ]


def _materialize(module: nn.Module) -> None:
    """Replace hook-based weight_norm/spectral_norm by the weight they compute (eval values)."""
    from torch.nn.utils import remove_spectral_norm, remove_weight_norm
    from torch.nn.utils.spectral_norm import SpectralNorm

    for hook in _legacy_hooks(module):
        if isinstance(hook, SpectralNorm):
            remove_spectral_norm(module, hook.name)
        else:
            remove_weight_norm(module, hook.name)


def _needs_work(model: nn.Module, registry: Registry) -> bool:
    deco = registry.has_decompositions()
    for m in model.modules():
        if m._forward_pre_hooks and _legacy_hooks(m):
            return True
        if deco and m is not model and registry.decomposition(type(m)) is not None:
            return True
    return False


def decompose_in_place(model: nn.Module, registry: Registry) -> list[str]:
    """Replace every module that has a decomposition (the root excepted); return their paths.

    Every path of a module reachable at several paths gets the same replacement. Layers that
    ``torch.nn.utils.weight_norm``/``spectral_norm`` reparametrize with hooks get the weight
    those compute instead (their eval-mode values): the weight is what quantization rounds,
    and the hooks would not survive fusion. The parametrize-based forms
    (``torch.nn.utils.parametrizations``) are kept as they are.
    """
    for m in model.modules():
        if m._forward_pre_hooks and _legacy_hooks(m):
            _materialize(m)
    if not registry.has_decompositions():
        return []
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if path and registry.decomposition(type(module)) is not None:
            found.setdefault(id(module), (module, []))[1].append(path)
    done: list[str] = []
    for module, paths in found.values():
        decompose = registry.decomposition(type(module))
        if decompose is None:  # the registry changed meanwhile
            continue
        replacement = decompose(module)
        if not isinstance(replacement, nn.Module):
            raise RegistrationError(
                f"the decomposition of {qualified_name(type(module))} returned "
                f"{type(replacement).__name__}, not an nn.Module; return the equivalent module"
            )
        replacement.train(module.training)
        for path in paths:
            model.set_submodule(path, replacement, strict=True)
        done.extend(paths)
    return done


def decomposed(model: nn.Module, registry: Registry) -> nn.Module:
    """``model`` itself when nothing in it has a decomposition, else a decomposed deep copy."""
    if not _needs_work(model, registry):
        return model
    # a hook-based weight_norm leaves its computed weight (no graph leaf, so no deepcopy) on
    # the module: copy a detached clone in its place; the hook recomputes it anyway
    memo: dict[int, Any] = {}
    for m in model.modules():
        for hook in _legacy_hooks(m) if m._forward_pre_hooks else ():
            value = m.__dict__.get(hook.name)
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    copied = copy.deepcopy(model, memo)
    decompose_in_place(copied, registry)
    return copied


def batchnorm_of(module: nn.modules.batchnorm._BatchNorm) -> nn.BatchNorm2d:
    """A plain ``BatchNorm2d`` holding ``module``'s own parameters and statistics (no copies)."""
    bn = nn.BatchNorm2d(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
    )
    for name in ("weight", "bias"):
        bn._parameters[name] = module._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        bn._buffers[name] = module._buffers.get(name)
    return bn.train(module.training)


def batchnorm_act(module: nn.Module) -> nn.Module:
    """timm's ``BatchNormAct2d`` (``.drop``, ``.act``) as ``Sequential(bn, [drop,] act)``.

    The BatchNorm holds the module's own tensors; an ``nn.Identity`` drop (timm's default) is
    left out, so a convolution, this BatchNorm and a ReLU are consecutive and fuse.
    """
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise RegistrationError(
            f"batchnorm_act decomposes BatchNorm subclasses with .act (timm's BatchNormAct2d), "
            f"got {type(module).__name__}"
        )
    parts: OrderedDict[str, nn.Module] = OrderedDict(bn=batchnorm_of(module))
    drop = getattr(module, "drop", None)
    if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
        parts["drop"] = drop
    act = getattr(module, "act", None)
    parts["act"] = act if isinstance(act, nn.Module) else nn.Identity()
    return nn.Sequential(parts)
