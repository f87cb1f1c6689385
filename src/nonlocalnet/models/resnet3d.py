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

from torch import nn

from .units import BasicBlock, Bottleneck, ResNetBase

__all__ = ["BasicBlock3d", "Bottleneck3d", "ResNet3D", "resnet3d18", "resnet3d50"]


class BasicBlock3d(BasicBlock):
    """:class:`~nonlocalnet.models.units.BasicBlock` with 3×3×3 convs (``dim=3``)."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__(in_channels, planes, stride, downsample, dim=3)


class Bottleneck3d(Bottleneck):
    """:class:`~nonlocalnet.models.units.Bottleneck` with 1×1×1 / 3×3×3 convs (``dim=3``)."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__(in_channels, planes, stride, downsample, dim=3)


class ResNet3D(ResNetBase):
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
        self._build_stages(block, layers, num_classes, dim=3)


def resnet3d18(num_classes: int = 400, *, conv1_t_size: int = 7, conv1_t_stride: int = 1, no_max_pool: bool = False,
               in_channels: int = 3) -> ResNet3D:
    return ResNet3D(BasicBlock3d, [2, 2, 2, 2], num_classes, conv1_t_size=conv1_t_size, conv1_t_stride=conv1_t_stride,
                    no_max_pool=no_max_pool, in_channels=in_channels)


def resnet3d50(num_classes: int = 400, *, conv1_t_size: int = 7, conv1_t_stride: int = 1, no_max_pool: bool = False,
               in_channels: int = 3) -> ResNet3D:
    return ResNet3D(Bottleneck3d, [3, 4, 6, 3], num_classes, conv1_t_size=conv1_t_size, conv1_t_stride=conv1_t_stride,
                    no_max_pool=no_max_pool, in_channels=in_channels)
