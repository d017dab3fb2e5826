"""Quantization-aware training: conv/linear + BatchNorm groups that keep training, and freeze-BN.

In ``mode: qat``, ``prepare`` does not fold a BatchNorm into the convolution (or Linear)
before it, because folding with eval statistics would freeze them. The group's modules
stay as they are inside a :class:`TrainableFusion` container, and the weight is observed
and fake-quantized *as BatchNorm will fold it* by a :class:`FoldedWeightObserver`:

    w_q = fake_quant(w * s) / s,    s = gamma / sqrt(running_var + eps)

so ``conv(x, w_q)`` followed by the BatchNorm in training mode is the folded-weight
fake-quant of Jacob et al. (2018) and of ``torch.ao.nn.intrinsic.qat.ConvBn2d``: batch
statistics normalize, running statistics keep updating, and the quantization grid is the
one the folded weight gets. ``convert`` folds each group with the same fuser PTQ uses, so
the result is the same (int8 or fake) model PTQ makes.

Groups that start with anything else (a transposed convolution, a custom layer with a
custom fuser) fuse at ``prepare`` as in PTQ, which fixes their BatchNorm statistics.

The freeze-BN schedule: after a few epochs, :func:`freeze_bn_stats` switches the
BatchNorms of these groups to their running statistics for good (``model.train()`` no
longer unfreezes them), so the last epochs train exactly the function ``convert`` folds.

    >>> import torch, qswap
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> prepared = qswap.prepare(model, {"mode": "qat"}, example_inputs=(torch.randn(1, 3, 8, 8),))
    >>> type(prepared[0]).__name__, freeze_bn_stats(prepared)
    ('TrainableFusion', 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from qswap.slots import WeightObserver, version_key
from qswap.tree import replace_module

if TYPE_CHECKING:
    from qswap.fuse import FusionGroup
    from qswap.registry import FusionPattern, Registry

__all__ = [
    "FoldedWeightObserver",
    "TrainableFusion",
    "foldable",
    "freeze_bn_stats",
    "fuse_for_qat",
]

_EPS = 1e-12
_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def foldable(types: Sequence[type]) -> bool:
    """Whether a fusion group of ``types`` folds a BatchNorm into a convolution or Linear.

    >>> foldable((nn.Conv2d, nn.BatchNorm2d, nn.ReLU)), foldable((nn.Conv2d, nn.ReLU))
    (True, False)
    """
    return (
        len(types) >= 2
        and isinstance(types[0], type)
        and issubclass(types[0], _FIRST)
        and isinstance(types[1], type)
        and issubclass(types[1], nn.modules.batchnorm._BatchNorm)
    )


class TrainableFusion(nn.Sequential):
    """A conv/linear + BatchNorm (+ activation) fusion group kept unfolded for QAT.

    It runs its members in order (so their own hooks still fire), its ``weight`` slot is
    the first member's, and ``fold()`` returns what the group's fuser makes of it with the
    current running statistics -- the module PTQ would have had in its place.
    """

    def __init__(self, members: Sequence[nn.Module], pattern: FusionPattern) -> None:
        super().__init__(*members)
        self.pattern = pattern
        self.bn_frozen = False

    @property
    def bn(self) -> nn.modules.batchnorm._BatchNorm:
        """The BatchNorm of the group."""
        bn = self[1]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):  # pragma: no cover - by build
            raise TypeError(f"TrainableFusion holds {type(bn).__name__} where BatchNorm goes")
        return bn

    def train(self, mode: bool = True) -> TrainableFusion:
        """Set training mode; a frozen BatchNorm stays in eval mode."""
        super().train(mode)
        if self.bn_frozen:
            self.bn.train(False)
        return self

    def freeze_bn(self, freeze: bool = True) -> None:
        """Use (``True``) or stop using the running statistics in training mode."""
        self.bn_frozen = freeze
        self.bn.train(self.training and not freeze)

    def fold(self) -> nn.Module:
        """The fused module for the current weights and running statistics (eval-mode fold).

        Forward pre-hooks of the first member and forward hooks of the last move to it.
        """
        members = list(self)
        fused = self.pattern.fuse(*members)
        from qswap.fuse import carry_hooks

        carry_hooks(fused, members[0], members[-1])
        return fused.train(self.training)

    def extra_repr(self) -> str:
        return "bn frozen" if self.bn_frozen else ""


def _fold_factor(bn: nn.modules.batchnorm._BatchNorm, like: torch.Tensor) -> torch.Tensor:
    """``gamma / sqrt(running_var + eps)`` shaped to scale ``like``'s output channels (axis 0)."""
    var = bn.running_var
    if var is None:  # pragma: no cover - refused by foldable groups' fusers at plan time
        raise TypeError("a BatchNorm without running statistics cannot be folded")
    s = torch.rsqrt(var.to(like.dtype) + bn.eps)
    if bn.weight is not None:
        s = bn.weight.to(like.dtype) * s
    # keep the sign, stay away from 0 (a zero gamma would make w_q / s undefined)
    s = torch.where(s.abs() < _EPS, torch.full_like(s, _EPS), s)
    return s.reshape(-1, *([1] * (like.dim() - 1)))


class FoldedWeightObserver(WeightObserver):
    """Weight observer for a :class:`TrainableFusion`: observes and fake-quantizes ``w * s``.

    ``s`` folds the group's BatchNorm; the result is divided by ``s`` again so the conv
    feeds the BatchNorm as before. The BatchNorm is referenced, not owned (it stays a
    member of the group).
    """

    def __init__(
        self,
        observer: nn.Module,
        quantizer: nn.Module | None,
        bn: nn.modules.batchnorm._BatchNorm,
    ) -> None:
        super().__init__(observer, quantizer)
        object.__setattr__(self, "_bn", bn)  # not a submodule: the group owns it

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Observe the folded weight; in QAT return ``fake_quant(w * s) / s``."""
        bn: nn.modules.batchnorm._BatchNorm = self.__dict__["_bn"]
        s = _fold_factor(bn, weight)
        folded = weight * s
        key = version_key(weight)
        stats = (
            None
            if key is None
            else (
                *key,
                getattr(bn.running_var, "_version", 0),
                -1 if bn.weight is None else bn.weight._version,
            )
        )
        changed = self._observe(folded, stats)
        if self.quantizer is None:
            return weight
        return self._fake_quantize(folded, changed) / s


def fuse_for_qat(model: nn.Module, groups: Sequence[FusionGroup], registry: Registry) -> list[str]:
    """Fuse ``groups`` in place for QAT: BatchNorm groups become :class:`TrainableFusion`.

    Other groups (conv + ReLU, ...) fuse as in PTQ. Returns the first paths of the
    trainable groups.
    """
    from qswap.fuse import fuse_model
    from qswap.tree import walk_modules

    by_types = {tuple(p.types): p for p in reversed(registry.fusion_patterns())}
    trainable = [g for g in groups if foldable(g.types)]
    module_paths, _, _ = walk_modules(model)
    heads: list[str] = []
    for group in trainable:
        modules = [model.get_submodule(p) for p in group.paths]
        members = [
            nn.ReLU(inplace=getattr(m, "inplace", False)).train(m.training)
            if path in group.kept and type(m) is nn.ReLU
            else m
            for path, m in zip(group.paths, modules, strict=False)
        ]
        fused = TrainableFusion(members, by_types.get(tuple(group.types), group.pattern))
        fused.train(modules[0].training)
        for position, module in enumerate(modules):
            if group.paths[position] in group.kept:
                continue
            for path in module_paths.get(id(module), (group.paths[position],)):
                replacement = fused if position == 0 else nn.Identity().train(module.training)
                replace_module(model, (path,), replacement)
        heads.append(group.paths[0])
    rest = [g for g in groups if not foldable(g.types)]
    if rest:
        fuse_model(model, rest, registry)
    return heads


def freeze_bn_stats(model: nn.Module, freeze: bool = True) -> int:
    """Freeze (or unfreeze) the BatchNorm statistics of every QAT conv/linear + BN group.

    Frozen, the BatchNorms use and keep their running statistics even in training mode,
    so training sees exactly the folded weights ``convert`` will produce. Returns how many
    groups changed.

    >>> freeze_bn_stats(torch.nn.Linear(2, 2))
    0
    """
    count = 0
    for module in model.modules():
        if isinstance(module, TrainableFusion):
            module.freeze_bn(freeze)
            count += 1
    return count
