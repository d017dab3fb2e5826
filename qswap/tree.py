"""The model's module tree: every path of every module, and replacing a module at its paths.

A module object may sit at several paths (shared, aliased); every stage that walks or edits
the tree goes through these two functions, so they agree on what a path and a leaf are.

    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> paths, leaves, containers = walk_modules(m)
    >>> sorted(paths.values())
    [('',), ('0',), ('1',)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

__all__ = ["replace_module", "walk_modules"]


def _never(path: str, module: nn.Module) -> bool:
    return False


# qswap's own activation slots (``qswap.slots.INPUT_SLOT``/``OUTPUT_SLOT``): the module
# that carries them runs its hooks, not them, so it stays a leaf (a fake fallback layer)
_SLOT_NAMES = frozenset({"qswap_input", "qswap_output"})


def _has_children(module: nn.Module) -> bool:
    for name, child in module._modules.items():
        if child is None or name in _SLOT_NAMES:
            continue
        if name == "parametrizations" and hasattr(module, "parametrizations"):
            continue  # torch.nn.utils.parametrize keeps its modules here; still a leaf
        return True
    return False


def walk_modules(
    model: nn.Module, leaf: Callable[[str, nn.Module], bool] | None = None
) -> tuple[dict[int, tuple[str, ...]], list[nn.Module], list[nn.Module]]:
    """Every path of every module object, plus the leaves and containers (each object once).

    A leaf is a module without children of its own (torch's ``parametrizations`` and qswap's
    activation slots do not count), or one ``leaf(path, module)`` calls a leaf.
    """
    leaf = leaf or _never
    paths: dict[int, list[str]] = {}
    leaf_ids: set[int] = set()
    leaves: list[nn.Module] = []
    containers: list[nn.Module] = []
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        key = id(module)
        known = paths.get(key)
        if known is None:
            paths[key] = [path]
            childless = not _has_children(module)
            if module is model and childless and not type(module).__module__.startswith("torch."):
                # a user-written model without submodules: trace its functional ops instead
                childless = False
            if childless or leaf(path, module) or _default_leaf(path, module):
                leaf_ids.add(key)
                leaves.append(module)
                continue
            containers.append(module)
        else:
            if any(path.startswith(f"{p}.") or not p for p in known):
                continue  # a module inside itself: do not loop
            known.append(path)
            if key in leaf_ids:
                continue
        prefix = f"{path}." if path else ""
        stack.extend(
            (f"{prefix}{name}", child)
            for name, child in reversed(module._modules.items())
            if child is not None
            and not (name == "parametrizations" and hasattr(module, "parametrizations"))
        )
    return {k: tuple(v) for k, v in paths.items()}, leaves, containers


def replace_module(model: nn.Module, paths: Iterable[str], new: nn.Module) -> nn.Module:
    """Put ``new`` at every one of ``paths`` (``nn.Module.set_submodule``); returns the model.

    The path ``""`` is the model itself: ``new`` is then returned as the new root.

    >>> m = nn.Sequential(nn.Linear(2, 2))
    >>> type(replace_module(m, ["0"], nn.Identity())[0]).__name__
    'Identity'
    """
    root = model
    for path in paths:
        if not path:
            root = new
        elif root.get_submodule(path) is not new:
            root.set_submodule(path, new)
    return root


def _default_leaf(path: str, module: nn.Module) -> bool:
    # torch.ao.nn.intrinsic fused containers (ConvReLU2d, ...) run as one op.
    return type(module).__module__.startswith("torch.ao.nn.intrinsic")
