"""Bias correction: remove the mean output shift that rounding the weights causes.

Rounding a layer's weights to ``Wq`` moves its output by ``(Wq - W) x``. Over the
calibration data that error has a mean, ``(Wq - W) E[x]``, which a layer passes on to the
next as a systematic offset. With ``bias_correction: true`` (static and weight-only modes; on in the
``x86_int8`` and ``qnnpack_int8`` presets) ``prepare`` records the mean input of every
conv/linear layer with a bias while calibration runs, and ``convert`` subtracts that shift
from the bias (the same correction as NNCF's fast bias correction or AIMET's empirical
one, without a second pass). Convolution inputs are averaged per position, so padding is
accounted for exactly; inputs whose spatial size changes between batches fall back to one
mean per channel.

    >>> import torch
    >>> from qswap.config import QuantSpec
    >>> obs = InputMeanObserver(QuantSpec(signed=False, scheme="affine"), kind="linear")
    >>> _ = obs(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    >>> obs.mean().tolist()
    [2.0, 3.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from qswap.exceptions import CalibrationError
from qswap.observers import Observer
from qswap.quantizers import add_buffer, set_buffer
from qswap.slots import activation_owner

if TYPE_CHECKING:
    from qswap.config import QuantSpec

__all__ = ["InputMeanObserver", "apply_shift", "correctable", "shift_of"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def correctable(module: nn.Module) -> nn.Linear | nn.modules.conv._ConvNd | None:
    """The linear or (non-transposed) convolution a layer computes with a bias, else ``None``.

    A fused container (``ConvReLU2d``, ``LinearReLU``, any ``Sequential``) computes with its
    first child.
    """
    inner = activation_owner(module, "input")
    if isinstance(inner, nn.Linear) and inner.bias is not None:
        return inner
    if (
        isinstance(inner, nn.modules.conv._ConvNd)
        and not inner.transposed
        and inner.bias is not None
        and len(inner.kernel_size) in _CONV  # not .weight: it may run a parametrization
    ):
        return inner
    return None


class InputMeanObserver(Observer):
    """Running mean of a layer's input: per feature (linear) or per position (convolution).

    ``total`` sums the inputs, ``count`` how many were summed into each entry. A
    convolution's ``total`` has shape ``(C, *spatial)`` while every batch has the same
    spatial size, and ``(C,)`` once they differ. Merging adds sums and counts; across
    processes ``reduce_state`` does the same with every rank's state, and a later reduction
    adds only what each rank observed since the last one.
    """

    total: Tensor
    count: Tensor
    _synced: tuple[Tensor, float, int] | None = None  # the state the last reduction left

    def __init__(
        self,
        spec: QuantSpec,
        options: BaseModel | Mapping[str, Any] | None = None,
        *,
        kind: Literal["linear", "conv"] = "linear",
    ) -> None:
        super().__init__(spec, options)
        self.kind = kind
        add_buffer(self, "total", torch.zeros(0, dtype=torch.float64))
        add_buffer(self, "count", torch.zeros((), dtype=torch.float64))

    def observe(self, x: Tensor) -> None:
        """Add this batch's inputs to the sums."""
        x = x.to(torch.float64)
        if self.kind == "linear":
            total = x.reshape(-1, x.shape[-1]).sum(0)
            count = float(x.numel() // max(x.shape[-1], 1))
        else:
            if x.dim() < 3:
                raise CalibrationError(
                    f"a convolution's input has a batch, a channel and spatial axes; got a "
                    f"tensor of shape {tuple(x.shape)}"
                )
            total, count = x.sum(0), float(x.shape[0])
        self._add(total, count)

    def _add(self, total: Tensor, count: float) -> None:
        mine = self.total
        if mine.numel() == 0:
            set_buffer(self, "total", total.to(mine.device))
            self.count.fill_(count)
            return
        if mine.shape != total.shape:
            if self.kind == "linear" or mine.shape[0] != total.shape[0]:
                raise CalibrationError(
                    f"{type(self).__name__} saw inputs with {total.shape[0]} features or "
                    f"channels after {mine.shape[0]}; a layer's input size must stay the same"
                )
            # spatial sizes differ: keep one sum per channel from now on
            positions = mine[0].numel()
            if positions > 1 or mine.dim() > 1:
                set_buffer(self, "total", mine.reshape(mine.shape[0], -1).sum(1))
                self.count.mul_(positions)
            per = total[0].numel()
            total, count = total.reshape(total.shape[0], -1).sum(1), count * per
            mine = self.total
        set_buffer(self, "total", mine + total.to(mine.device))
        self.count.add_(count)

    def mean(self) -> Tensor:
        """The mean input: ``(F,)`` for a linear layer, ``(C, *spatial)`` or ``(C,)`` for a conv."""
        self._require_seen()
        return self.total / self.count

    def calculate_qparams(self) -> Any:
        raise CalibrationError(
            "InputMeanObserver records a mean for bias correction; it has no quantization "
            "parameters"
        )

    def _merge_state(self, other: InputMeanObserver) -> None:
        self._add(other.total, float(other.count))

    def reduce_state(self, group: Any) -> None:
        """Make this observer the sum of every rank's (collective; see ``qswap.distributed``).

        Ranks may hold means of different shapes (other spatial sizes): they combine per
        channel. What an earlier reduction already shared is counted once.
        """
        import torch.distributed as dist

        synced = self._synced
        mine = (self.total.detach().cpu(), float(self.count), int(self.num_batches))
        fits = synced is not None and synced[0].shape == mine[0].shape and mine[1] >= synced[1]
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (mine, fits), group=group)
        fold = InputMeanObserver(self.spec, self.options, kind=self.kind)
        batches = 0
        base = synced if synced is not None and all(ok for _, ok in gathered) else None
        if base is not None:
            fold._add(base[0].clone(), base[1])
            batches = base[2]
        for (total, count, seen), _ in gathered:
            if base is not None:
                total, count, seen = total - base[0], count - base[1], seen - base[2]
            if count > 0:
                fold._add(total, count)
            batches += seen
        device = self.total.device
        set_buffer(self, "total", fold.total.to(device))
        self.count.fill_(float(fold.count))
        self.num_batches.fill_(batches)
        self._synced = (self.total.detach().cpu().clone(), float(self.count), batches)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, batches={int(self.num_batches)}"


def shift_of(module: nn.Module, weight_error: Tensor, observer: InputMeanObserver) -> Tensor:
    """``E[(Wq - W) x]`` per output channel: what to subtract from ``module``'s bias.

    ``module`` is the linear or convolution (see :func:`correctable`) and ``weight_error``
    is ``Wq - W`` in its weight's shape; the result has ``weight_error``'s dtype. The
    module's weight is not read (a parametrization on it would observe it again).

    >>> import torch
    >>> from qswap.config import QuantSpec
    >>> conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    >>> obs = InputMeanObserver(QuantSpec(), kind="conv")
    >>> x = torch.rand(8, 1, 5, 5)
    >>> _ = obs(x)
    >>> dw = torch.full_like(conv.weight, 0.01)
    >>> direct = torch.nn.functional.conv2d(x, dw, padding=1).mean((0, 2, 3))
    >>> bool(torch.allclose(shift_of(conv, dw, obs), direct, atol=1e-6))
    True
    """
    mean = observer.mean()
    dtype = weight_error.dtype
    error = weight_error.detach().to(torch.float64)
    if isinstance(module, nn.Linear):
        return (error @ mean.to(error.device)).to(dtype)
    if not isinstance(module, nn.modules.conv._ConvNd):
        raise TypeError(f"bias correction needs a Linear or a convolution, got {type(module)}")
    dims = error.dim() - 2
    conv = _CONV[dims]
    x = mean.to(error.device)
    if x.dim() == dims + 1:
        # per position: the layer's own padding, stride, dilation and groups apply exactly
        if module.padding_mode != "zeros":
            pad = module._reversed_padding_repeated_twice
            x = F.pad(x[None], pad, mode=module.padding_mode)
            padding: Any = 0
        else:
            x, padding = x[None], module.padding
        out = conv(x, error, None, module.stride, padding, module.dilation, module.groups)
    else:
        # per channel: the kernel sees the channel means everywhere (padding ignored)
        x = x.reshape(1, -1, *([1] * dims)).expand(1, x.numel(), *error.shape[2:])
        out = conv(x, error, None, 1, 0, 1, module.groups)
    return out.mean(dim=tuple(range(2, out.dim()))).reshape(-1).to(dtype)


def apply_shift(module: nn.Module, shift: Tensor | None, *, undo: bool = False) -> None:
    """Subtract ``shift`` from the bias of ``module``'s linear/convolution (add it: ``undo``).

    Only a plain bias parameter is changed (one the user parametrized is left alone). A layer
    that ends up running in float after all gets its bias back with ``undo=True``.
    """
    core = correctable(module)
    if shift is None or core is None:
        return
    bias = core._parameters.get("bias")
    if bias is None:
        return
    with torch.no_grad():
        delta = shift.to(device=bias.device, dtype=bias.dtype)
        bias.add_(delta) if undo else bias.sub_(delta)
