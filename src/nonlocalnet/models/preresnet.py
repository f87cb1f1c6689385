"""Pre-activation ResNets for 32×32 inputs (He et al., "Identity Mappings in Deep Residual Networks", 2016).

Every residual unit is ``x + F(x)`` with ``F`` made of BN-ReLU-conv layers ("full pre-activation").
The network is

    stem        3×3 conv, 3 -> 16 channels (no BN/ReLU: the first unit pre-activates it)
    stage1      n units, width 16 (×4 with bottleneck units), 32×32
    stage2      n units, width 32 (×4), first unit has stride 2 -> 16×16
    stage3      n units, width 64 (×4), first unit has stride 2 -> 8×8
    final_bn    BN (followed by ReLU and global average pooling in ``forward``)
    head        linear classifier

Basic units (two 3×3 convs) give depth ``6n + 2``; bottleneck units (1×1, 3×3, 1×1 convs, expansion 4)
give depth ``9n + 2``. When a unit changes the number of channels or the resolution, its shortcut is a
1×1 convolution (stride 1 or 2, no bias, no BN) applied to the *pre-activated* input, as in the authors'
reference implementation; the residual branch starts from the same pre-activation.

Module paths: ``stage{k}.{i}`` is the (i+1)-th unit of stage k, e.g. ``stage2.1`` is "the 2nd residual
block of stage 2"; inside a unit ``bn1, conv1, bn2, conv2[, bn3, conv3][, shortcut]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .units import init_weights

__all__ = ["PreActBasicBlock", "PreActBottleneck", "PreResNet"]


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class _PreActUnit(nn.Module):
    """What both units share: ``bn1`` + ReLU pre-activates the input, which feeds the residual branch
    (:meth:`_branch`) and the 1×1 ``shortcut`` (``None``: identity on the raw input)."""

    expansion: int

    def _init_shortcut(self, in_channels: int, planes: int, stride: int) -> None:
        """Record ``in_channels``/``out_channels`` and add ``shortcut`` (registered last, after the convs)."""
        out_channels = planes * self.expansion
        self.in_channels, self.out_channels = in_channels, out_channels
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def _branch(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        return self._branch(pre) + identity


class PreActBasicBlock(_PreActUnit):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 plus shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes * self.expansion)
        self._init_shortcut(in_channels, planes, stride)

    def _branch(self, pre: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn2(self.conv1(pre))))


class PreActBottleneck(_PreActUnit):
    """BN-ReLU-conv1×1-BN-ReLU-conv3×3-BN-ReLU-conv1×1 (expansion 4) plus shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self._init_shortcut(in_channels, planes, stride)

    def _branch(self, pre: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return self.conv3(F.relu(self.bn3(out)))


class PreResNet(nn.Module):
    """Pre-activation ResNet for CIFAR-sized inputs.

    Args:
        depth: total number of weighted layers; ``6n + 2`` (basic units) or ``9n + 2`` (bottleneck units).
        num_classes: size of the classifier output.
        bottleneck: use bottleneck units. ``None`` (default) picks bottleneck units for depth >= 164 (He et
            al.'s PreResNet-164/1001) and basic units below. The SNL authors' code builds its
            "PreResNet-56" with bottleneck units (``9·6 + 2``, ~0.59 M parameters instead of ~0.86 M):
            pass ``bottleneck=True``.
        widths: base widths of the three stages (default 16, 32, 64).
        in_channels: number of input channels.
    """

    dry_run_input_shape = (3, 32, 32)

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        *,
        bottleneck: bool | None = None,
        widths: tuple[int, int, int] = (16, 32, 64),
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if bottleneck is None:
            bottleneck = depth >= 164
        block: type[PreActBasicBlock] | type[PreActBottleneck]
        if bottleneck:
            block, per_unit = PreActBottleneck, 9
        else:
            block, per_unit = PreActBasicBlock, 6
        if depth < per_unit + 2 or (depth - 2) % per_unit:
            kind = "bottleneck" if bottleneck else "basic"
            raise ValueError(f"PreResNet depth with {kind} units must be {per_unit}n+2 (n >= 1), got {depth}")
        if len(widths) != 3:
            raise ValueError(f"widths must have 3 entries, got {widths!r}")
        n = (depth - 2) // per_unit
        self.depth, self.bottleneck, self.blocks_per_stage = depth, bool(bottleneck), n
        self.dry_run_input_shape = (in_channels, 32, 32)

        self.stem = _conv3x3(in_channels, widths[0])
        channels = widths[0]
        for k, (width, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            units = []
            for i in range(n):
                unit = block(channels, width, stride if i == 0 else 1)
                channels = unit.out_channels
                units.append(unit)
            self.add_module(f"stage{k}", nn.Sequential(*units))
        self.num_features = channels
        self.final_bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, num_classes)
        init_weights(self, dim=2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map after ``final_bn`` + ReLU, ``(B, C, H/4, W/4)``."""
        x = self.stem(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        return F.relu(self.final_bn(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
