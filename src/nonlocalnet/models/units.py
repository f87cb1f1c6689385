"""Pieces shared by the 2-D and 3-D ResNets and the PreResNet.

- :class:`BasicBlock` / :class:`Bottleneck`: the post-activation residual units, for ``dim``-D inputs
  (``dim=2``: Conv2d/BatchNorm2d, ``dim=3``: Conv3d/BatchNorm3d; the module names do not depend on ``dim``);
- :class:`ResNetBase`: stages ``layer1 .. layer4``, ``avgpool``, ``fc`` and ``forward`` of a ResNet whose stem
  (``conv1, bn1, relu, maxpool``) the subclass builds;
- :func:`init_weights`: He-normal (fan-out) convolutions, BN scale 1 / shift 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNetBase", "conv_bn", "init_weights"]

_LAYERS: dict[int, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d),
    3: (nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d),
}


def _layers(dim: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    try:
        return _LAYERS[dim]
    except KeyError:
        raise ValueError(f"dim must be 1, 2 or 3, got {dim!r}") from None


def conv_bn(dim: int) -> tuple[type[nn.Module], type[nn.Module]]:
    """``(ConvNd, BatchNormNd)`` for ``dim``-D inputs."""
    conv, bn, _ = _layers(dim)
    return conv, bn


def init_weights(model: nn.Module, dim: int = 2) -> None:
    """He-normal (``fan_out``, ReLU) weights for every ``dim``-D conv, ones/zeros for every ``dim``-D BN."""
    conv, bn = conv_bn(dim)
    for m in model.modules():
        if isinstance(m, conv):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, bn):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3×3 (×3) convs with BN; ``relu(x' + F(x))``."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 dim: int = 2):
        super().__init__()
        conv, bn = conv_bn(dim)
        self.conv1 = conv(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, 3, padding=1, bias=False)
        self.bn2 = bn(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1, 3×3 (carries the stride), 1×1 (expansion 4) convs with BN; ``relu(x' + F(x))``."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 dim: int = 2):
        super().__init__()
        conv, bn = conv_bn(dim)
        self.conv1 = conv(in_channels, planes, 1, bias=False)
        self.bn1 = bn(planes)
        self.conv2 = conv(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = bn(planes)
        self.conv3 = conv(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = bn(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBase(nn.Module):
    """A ResNet after its stem: the subclass registers ``conv1, bn1, relu, maxpool`` (64 channels out), then
    calls :meth:`_build_stages`, which adds ``layer1 .. layer4``, ``avgpool``, ``fc`` and initializes the
    weights (:func:`init_weights`)."""

    def _build_stages(self, block, layers: Sequence[int], num_classes: int, dim: int) -> None:
        self._channels = 64
        self.layer1 = self._make_layer(block, 64, layers[0], 1, dim)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, dim)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, dim)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, dim)
        self.num_features = self._channels
        self.avgpool = _layers(dim)[2](1)
        self.fc = nn.Linear(self._channels, num_classes)
        init_weights(self, dim)

    def _make_layer(self, block, planes: int, n: int, stride: int, dim: int) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self._channels != out_channels:
            conv, bn = conv_bn(dim)
            downsample = nn.Sequential(
                conv(self._channels, out_channels, 1, stride=stride, bias=False),
                bn(out_channels),
            )
        units = [block(self._channels, planes, stride, downsample)]
        self._channels = out_channels
        units += [block(out_channels, planes) for _ in range(1, n)]
        return nn.Sequential(*units)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
