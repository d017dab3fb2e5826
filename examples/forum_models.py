"""The two models from the forum thread, written exactly as their users wrote them, plus digits data.

``Cifar_VGG`` and the hand-written ResNet-18 are what users fought PyTorch's eager quantization
flow with: inplace ReLUs, ``x.view(x.size(0), -1)``, one ReLU module used twice per block and a
plain ``out += identity`` skip. They are never edited to make quantization work. A ``width``
multiplier keeps tests fast. ``load_digits_dataset`` and ``train`` give a trained model in seconds.

Run ``python examples/forum_models.py`` to train both on scikit-learn's digits and print accuracy.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "Cifar_VGG",
    "DigitsData",
    "DigitsVGG",
    "ResNet",
    "accuracy",
    "cfgs",
    "load_digits_dataset",
    "make_layers",
    "resnet18",
    "train",
    "trained_vgg",
    "vgg",
]

cfgs: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def make_layers(cfg: list[int | str], batch_norm: bool = False) -> nn.Sequential:
    """VGG feature extractor: conv(3x3) [+ BatchNorm] + ReLU(inplace) per number, MaxPool per 'M'."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            v = int(v)
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def _scaled(cfg: list[int | str], width: float) -> list[int | str]:
    return [v if isinstance(v, str) else max(1, int(v * width)) for v in cfg]


class Cifar_VGG(nn.Module):
    """VGG for 32x32 inputs: features, global average pool, view, two Linear layers."""

    def __init__(self, cfg: str = "A", num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        self.features = make_layers(_scaled(cfgs[cfg], width), batch_norm=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        hidden = max(1, int(512 * width))
        self.classifier = nn.Sequential(nn.Linear(hidden, hidden), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        x = self.classifier(x)
        return x


def vgg(cfg: str = "A", num_classes: int = 10, width: float = 1.0) -> Cifar_VGG:
    """The forum's ``Cifar_VGG`` with batch norm (cfg 'A' by default)."""
    return Cifar_VGG(cfg, num_classes=num_classes, width=width)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Residual block; one ReLU module serves both activations and the skip is a plain ``+=``."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class ResNet(nn.Module):
    """ResNet written out by hand: stem, layer1..4, avgpool, ``torch.flatten``, fc."""

    def __init__(
        self,
        block: type[BasicBlock],
        layers: list[int],
        num_classes: int = 10,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        self.inplanes = max(1, int(64 * width))
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, max(1, int(64 * width)), layers[0])
        self.layer2 = self._make_layer(block, max(1, int(128 * width)), layers[1], stride=2)
        self.layer3 = self._make_layer(block, max(1, int(256 * width)), layers[2], stride=2)
        self.layer4 = self._make_layer(block, max(1, int(512 * width)), layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(max(1, int(512 * width)) * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x


def resnet18(num_classes: int = 10, width: float = 1.0) -> ResNet:
    """The forum's hand-written ResNet-18 (BasicBlock, [2, 2, 2, 2])."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width=width)


class DigitsData(NamedTuple):
    """scikit-learn digits as float32 ``[N, 3, 32, 32]`` images in [0, 1] and int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_dataset(seed: int = 0) -> DigitsData:
    """Digits (8x8) upsampled bilinearly to 3x32x32, stratified 1437/360 train/test split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the forum examples need scikit-learn; install it with: pip install 'qswap[examples]'"
        ) from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.int64)
    index = list(range(len(labels)))
    train_idx, test_idx = train_test_split(
        index, test_size=360, stratify=digits.target, random_state=seed
    )
    train_t = torch.tensor(train_idx)
    test_t = torch.tensor(test_idx)
    return DigitsData(images[train_t], labels[train_t], images[test_t], labels[test_t])


def train(
    model: nn.Module,
    data: DigitsData,
    epochs: int = 5,
    *,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` (Adam, one-cycle schedule) for a few epochs, deterministically; returns it in eval mode.

    Shuffling uses its own generator seeded with ``seed``; seed the model's initialisation
    yourself (``torch.manual_seed``) before building it.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.y_train)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    return 100.0 * correct / len(y)


class DigitsVGG(NamedTuple):
    """A forum VGG trained on digits, with its data, calibration batches and an example input."""

    data: DigitsData
    model: nn.Module
    calib: list[torch.Tensor]
    example: tuple[torch.Tensor]


def trained_vgg(quick: bool = False) -> DigitsVGG:
    """``vgg(width=0.25)`` trained 6 epochs on digits, and 8 calibration batches of 32 images.

    With ``quick`` (the test suite's short run) it takes a sliver of the data, one epoch and
    one calibration batch, so that every step of an example still runs.
    """
    data = load_digits_dataset(seed=0)
    if quick:
        data = DigitsData(
            data.x_train[:128], data.y_train[:128], data.x_test[:64], data.y_test[:64]
        )
    torch.manual_seed(0)
    model = train(vgg(width=0.25), data, epochs=1 if quick else 6)
    calib = [data.x_train[i : i + 32] for i in range(0, 32 if quick else 256, 32)]
    return DigitsVGG(data, model, calib, (data.x_test[:1],))


def main() -> None:
    """Train both forum models (width 0.25) on digits and print their float accuracy."""
    data = load_digits_dataset(seed=0)
    for name, build in (("Cifar_VGG", vgg), ("ResNet-18", resnet18)):
        torch.manual_seed(0)
        model = build(width=0.25)
        start = time.perf_counter()
        train(model, data, epochs=5)
        seconds = time.perf_counter() - start
        acc = accuracy(model, data.x_test, data.y_test)
        print(f"{name}: test accuracy {acc:.2f} % after {seconds:.1f} s of training")


if __name__ == "__main__":
    main()
