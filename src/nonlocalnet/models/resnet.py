"""ResNet-50 (He et al., "Deep Residual Learning for Image Recognition", 2016) and its CIFAR variant.

Module names follow torchvision's ResNet so that state dicts are interchangeable:

    conv1, bn1, relu, maxpool   stem ("res1"): 7×7/2 conv + 3×3/2 max-pool (ImageNet) or 3×3/1 conv and no
                                pooling (CIFAR variant, ``maxpool`` is an ``nn.Identity``)
    layer1 .. layer4            stages "res2" .. "res5" with [3, 4, 6, 3] bottleneck units
    avgpool, fc                 global average pooling and classifier

Bottleneck unit ``layer{k}.{i}``: ``conv1, bn1`` (1×1), ``conv2, bn2`` (3×3, carries the stride — the
"ResNet v1.5" placement used by torchvision), ``conv3, bn3`` (1×1, expansion 4), ``relu`` and, in the first
unit of a stage, ``downsample = Sequential(1×1 conv, BN)``. Post-activation: ``relu(x' + F(x))``.
The units, stages and ``forward`` are shared with the 3-D ResNet (``models/units.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .units import BasicBlock, Bottleneck, ResNetBase

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet50", "resnet50_cifar"]


class ResNet(ResNetBase):
    """2-D ResNet with torchvision-compatible module names.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of units in each of the four stages.
        num_classes: classifier size.
        stem: ``"imagenet"`` (7×7/2 conv + max-pool, 224×224 inputs) or ``"cifar"`` (3×3/1 conv, no
            max-pool, 32×32 inputs; ``maxpool`` is an ``nn.Identity`` so the names stay the same).
        zero_init_residual: zero the last BN scale of every unit (each unit starts as the identity).
        in_channels: number of input channels.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        stem: str = "imagenet",
        zero_init_residual: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries, got {list(layers)}")
        if stem == "imagenet":
            self.conv1: nn.Module = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
            self.dry_run_input_shape = (in_channels, 64, 64)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
            self.dry_run_input_shape = (in_channels, 32, 32)
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.stem_type = stem
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self._build_stages(block, layers, num_classes, dim=2)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)


def resnet50(num_classes: int = 1000, *, zero_init_residual: bool = False, in_channels: int = 3) -> ResNet:
    """ResNet-50 for ImageNet-sized inputs (7×7/2 stem + max-pool)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, stem="imagenet", zero_init_residual=zero_init_residual,
                  in_channels=in_channels)


def resnet50_cifar(num_classes: int = 100, *, zero_init_residual: bool = False, in_channels: int = 3) -> ResNet:
    """ResNet-50 for 32×32 inputs (3×3/1 stem, no max-pool), as used for CIFAR in the SNL paper (Table 5)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, stem="cifar", zero_init_residual=zero_init_residual,
                  in_channels=in_channels)
