"""Backbones (PreResNet, ResNet-50, 3-D ResNet; torchvision / timm / your own by ``build_model``) and generic
nonlocal-block insertion (channels-first, channels-last and token features).

See ``docs/models.md``.
"""

from .insert import (
    PLACEMENT_KEYS,
    BlockChain,
    Inserted,
    default_input_shape,
    get_module,
    insert_blocks,
    inserted_blocks,
    remap_state_dict,
    resolve_placement,
    strip_blocks,
)
from .layout import LAYOUTS, Layout, feature_layout
from .preresnet import PreActBasicBlock, PreActBottleneck, PreResNet
from .registry import build_model, check_outputs, is_user_arch, list_models, register_model
from .resnet import ResNet, resnet50, resnet50_cifar
from .resnet3d import ResNet3D, resnet3d18, resnet3d50

__all__ = [
    "LAYOUTS",
    "Layout",
    "PLACEMENT_KEYS",
    "BlockChain",
    "Inserted",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreResNet",
    "ResNet",
    "ResNet3D",
    "build_model",
    "check_outputs",
    "default_input_shape",
    "feature_layout",
    "get_module",
    "insert_blocks",
    "inserted_blocks",
    "is_user_arch",
    "list_models",
    "register_model",
    "remap_state_dict",
    "resnet3d18",
    "resnet3d50",
    "resnet50",
    "resnet50_cifar",
    "resolve_placement",
    "strip_blocks",
]
