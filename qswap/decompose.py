"""Decompositions: a module that does two jobs, seen as the modules it is made of.

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

from torch import nn

from qswap.exceptions import RegistrationError
from qswap.registry import Registry, qualified_name

__all__ = ["batchnorm_act", "batchnorm_of", "decompose_in_place", "decomposed"]


def decompose_in_place(model: nn.Module, registry: Registry) -> list[str]:
    """Replace every module that has a decomposition (the root excepted); return their paths.

    Every path of a module reachable at several paths gets the same replacement.
    """
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
    if not registry.has_decompositions() or not any(
        registry.decomposition(type(m)) is not None for m in model.modules() if m is not model
    ):
        return model
    copied = copy.deepcopy(model)
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
