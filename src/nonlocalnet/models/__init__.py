"""Backbones (PreResNet, ResNet-50, 3-D ResNet) and generic nonlocal-block insertion.

See ``docs/models.md``.
"""

from .insert import (
    PLACEMENT_KEYS,
    BlockChain,
    Inserted,
    get_module,
    insert_blocks,
    inserted_blocks,
    remap_state_dict,
    resolve_placement,
    strip_blocks,
)
from .preresnet import PreActBasicBlock, PreActBottleneck, PreResNet
from .registry import build_model, list_models
from .resnet import ResNet, resnet50, resnet50_cifar
from .resnet3d import ResNet3D, resnet3d18, resnet3d50

__all__ = [
    "PLACEMENT_KEYS",
    "BlockChain",
    "Inserted",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreResNet",
    "ResNet",
    "ResNet3D",
    "build_model",
    "get_module",
    "insert_blocks",
    "inserted_blocks",
    "list_models",
    "remap_state_dict",
    "resnet3d18",
    "resnet3d50",
    "resnet50",
    "resnet50_cifar",
    "resolve_placement",
    "strip_blocks",
]
