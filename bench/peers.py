"""PyTorch's own int8 flows on the forum models, as their users must write them.

* **eager** (``torch.ao.quantization``): the user edits the model: QuantStub/DeQuantStub
  around it, hand-written fuse lists, and -- for ResNet -- a BasicBlock rewritten to use
  ``FloatFunctional`` for the skip and separate ReLUs (the forum's block uses one ReLU
  module twice and a plain ``out += identity``, which eager mode cannot quantize). Those
  edits live here, as wrapped/edited *copies*; the trained weights are shared.
* **FX** (``torch.ao.quantization.quantize_fx``): ``prepare_fx`` / ``convert_fx`` with
  ``get_default_qconfig_mapping("x86")`` on the unedited model.

Both use PyTorch's x86 defaults: histogram activations with ``reduce_range``, per-channel
symmetric int8 weights. torch 2.13 marks this API deprecated; its warnings are silenced here.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "EagerBasicBlock",
    "Stubbed",
    "eager_fuse_lists",
    "eager_quantize",
    "fx_quantize",
    "torch_ao_quiet",
]


@contextmanager
def torch_ao_quiet() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation warnings (only those) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings(
            "ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel"
        )
        warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated")
        warnings.filterwarnings("ignore", message=r"(?s).*must be in the range \[0, 255\]")
        warnings.filterwarnings("ignore", message=r"(?s).*reduce_range will be deprecated")
        yield


with torch_ao_quiet():
    import torch.ao.quantization as tq
    from torch.ao.nn.quantized import FloatFunctional
    from torch.ao.quantization import quantize_fx


class Stubbed(nn.Module):
    """``QuantStub -> model -> DeQuantStub``: what eager mode needs around every model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.model = model
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.model(self.quant(x)))


class EagerBasicBlock(nn.Module):
    """The forum's BasicBlock as eager mode needs it: FloatFunctional skip, ReLU fused away."""

    conv1: nn.Module
    bn1: nn.Module
    relu: nn.Module
    conv2: nn.Module
    bn2: nn.Module
    downsample: nn.Module | None
    skip: FloatFunctional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.skip.add_relu(out, identity)


def _edit_resnet(model: nn.Module) -> nn.Module:
    """Swap every BasicBlock's class for EagerBasicBlock and give it a FloatFunctional."""
    for module in model.modules():
        if type(module).__name__ == "BasicBlock":
            module.__class__ = EagerBasicBlock
            module.skip = FloatFunctional()
    return model


def eager_fuse_lists(model: nn.Module) -> list[list[str]]:
    """The fuse lists a user writes by hand for the forum's VGG and ResNet (inside ``Stubbed``)."""
    lists: list[list[str]] = []
    inner = model.model if isinstance(model, Stubbed) else model
    prefix = "model." if isinstance(model, Stubbed) else ""
    if hasattr(inner, "features"):  # Cifar_VGG: conv, bn, relu triples in features
        layers = list(inner.features)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d):
                group = [f"{prefix}features.{i}", f"{prefix}features.{i + 1}"]
                if i + 2 < len(layers) and isinstance(layers[i + 2], nn.ReLU):
                    group.append(f"{prefix}features.{i + 2}")
                lists.append(group)
        return lists
    lists.append([f"{prefix}conv1", f"{prefix}bn1", f"{prefix}relu"])
    for name, module in inner.named_modules():
        if isinstance(module, EagerBasicBlock):
            p = f"{prefix}{name}"
            lists.append([f"{p}.conv1", f"{p}.bn1", f"{p}.relu"])
            lists.append([f"{p}.conv2", f"{p}.bn2"])
            if module.downsample is not None:
                lists.append([f"{p}.downsample.0", f"{p}.downsample.1"])
    return lists


def eager_quantize(
    model: nn.Module, calib: Iterable[torch.Tensor], *, backend: str = "x86"
) -> nn.Module:
    """PyTorch eager int8 of a copy of ``model``: edit, stub, fuse, prepare, calibrate, convert."""
    work = copy.deepcopy(model).eval()
    if not hasattr(work, "features"):
        work = _edit_resnet(work)
    stubbed = Stubbed(work).eval()
    with torch_ao_quiet():
        stubbed.qconfig = tq.get_default_qconfig(backend)  # type: ignore[assignment]
        fused = tq.fuse_modules(stubbed, eager_fuse_lists(stubbed))
        prepared = tq.prepare(fused)
        with torch.no_grad():
            for x in calib:
                prepared(x)
        return tq.convert(prepared)


def fx_quantize(
    model: nn.Module, calib: Iterable[torch.Tensor], example: torch.Tensor, *, backend: str = "x86"
) -> nn.Module:
    """PyTorch FX int8 of a copy of the unedited ``model`` with the x86 default qconfig mapping."""
    work = copy.deepcopy(model).eval()
    with torch_ao_quiet():
        mapping = tq.get_default_qconfig_mapping(backend)
        prepared = quantize_fx.prepare_fx(work, mapping, (example,))
        with torch.no_grad():
            for x in calib:
                prepared(x)
        return quantize_fx.convert_fx(prepared)
