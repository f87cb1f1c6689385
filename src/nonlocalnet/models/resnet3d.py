"""3-D ResNets for video clips (Hara et al., "Can Spatiotemporal 3D CNNs Retrace the History of 2D CNNs and
ImageNet?", 2018): the 2-D ResNet with every k×k kernel replaced by k×k×k.

Input ``(B, C, T, H, W)``. Module names mirror the 2-D ResNet:

    conv1, bn1, relu, maxpool   7×7×7 conv, stride (1, 2, 2), padding 3, then a 3×3×3 max-pool of stride 2
    layer1 .. layer4            stages "res2" .. "res5"; the first unit of layer2..4 has stride 2 in T, H, W
    avgpool, fc                 global average pooling over (T, H, W) and classifier

Units: ``BasicBlock3d`` (two 3×3×3 convs; depth 18 = [2, 2, 2, 2]) and ``Bottleneck3d`` (1×1×1, 3×3×3
carrying the stride, 1×1×1 with expansion 4; depth 50 = [3, 4, 6, 3]). Shortcuts that change shape are
``downsample = Sequential(1×1×1 conv, BN)`` (Hara et al.'s shortcut type "B").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BasicBlock3d", "Bottleneck3d", "ResNet3D", "resnet3d18", "resnet3d50"]


class BasicBlock3d(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck3d(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet3D(nn.Module):
    """3-D ResNet.

    Args:
        block: ``BasicBlock3d`` or ``Bottleneck3d``.
        layers: number of units in each of the four stages.
        num_classes: classifier size.
        conv1_t_size: temporal kernel size of the stem conv (default 7).
        conv1_t_stride: temporal stride of the stem conv (default 1).
        no_max_pool: skip the stem max-pool (``maxpool`` becomes ``nn.Identity``).
        in_channels: number of input channels.
    """

    dry_run_input_shape = (3, 4, 32, 32)

    def __init__(
        self,
        block: type[BasicBlock3d] | type[Bottleneck3d],
        layers: Sequence[int],
        num_classes: int = 400,
        *,
        conv1_t_size: int = 7,
        conv1_t_stride: int = 1,
        no_max_pool: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries, got {list(layers)}")
        self.dry_run_input_shape = (in_channels, 4, 32, 32)
        self.conv1 = nn.Conv3d(
            in_channels,
            64,
            kernel_size=(conv1_t_size, 7, 7),
            stride=(conv1_t_stride, 2, 2),
            padding=(conv1_t_size // 2, 3, 3),
            bias=False,
        )
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.Identity() if no_max_pool else nn.MaxPool3d(3, stride=2, padding=1)
        self._channels = 64
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.num_features = self._channels
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(self._channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self._channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv3d(self._channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm3d(out_channels),
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


def resnet3d18(num_classes: int = 400, **kwargs) -> ResNet3D:
    return ResNet3D(BasicBlock3d, [2, 2, 2, 2], num_classes, **kwargs)


def resnet3d50(num_classes: int = 400, **kwargs) -> ResNet3D:
    return ResNet3D(Bottleneck3d, [3, 4, 6, 3], num_classes, **kwargs)
