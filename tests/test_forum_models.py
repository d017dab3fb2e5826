"""Tests for examples/forum_models.py: the forum's models as written, and the digits data."""

from __future__ import annotations

import torch
from forum_models import BasicBlock, Cifar_VGG, load_digits_dataset, resnet18, vgg
from torch import nn


def test_digits_split_and_shape() -> None:
    """Digits become 3x32x32 images in [0, 1], split 1437/360 stratified, the same for a seed."""
    data = load_digits_dataset(seed=0)
    assert data.x_train.shape == (1437, 3, 32, 32) and data.x_test.shape == (360, 3, 32, 32)
    assert data.y_train.shape == (1437,) and data.y_test.dtype == torch.int64
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0
    counts = torch.bincount(data.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    again = load_digits_dataset(seed=0)
    assert torch.equal(again.x_test, data.x_test) and torch.equal(again.y_train, data.y_train)
    assert not torch.equal(load_digits_dataset(seed=1).y_test, data.y_test)


def test_vgg_as_written() -> None:
    """Cifar_VGG 'A' has 8 conv-bn-relu(inplace) triples, 5 pools and two bare Linear layers."""
    model = vgg(width=0.25)
    assert isinstance(model, Cifar_VGG)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds.count("Conv2d") == 8 and kinds.count("MaxPool2d") == 5
    assert all(m.inplace for m in model.features if isinstance(m, nn.ReLU))
    assert [type(m) for m in model.classifier] == [nn.Linear, nn.Linear]
    assert model.classifier[0].in_features == 128
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_as_written() -> None:
    """ResNet-18 has 8 BasicBlocks with one shared inplace ReLU each and 3 downsample pairs."""
    model = resnet18(width=0.25)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    assert all(b.relu.inplace for b in blocks)
    assert sum(b.downsample is not None for b in blocks) == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
