"""``build_model(arch, num_classes, **kwargs)`` and ``list_models()``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from .preresnet import PreResNet
from .resnet import resnet50, resnet50_cifar
from .resnet3d import resnet3d18, resnet3d50

__all__ = ["build_model", "list_models"]

_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "preresnet20": partial(PreResNet, 20),
    "preresnet56": partial(PreResNet, 56),
    "preresnet110": partial(PreResNet, 110),
    "preresnet164": partial(PreResNet, 164),
    "resnet50": resnet50,
    "resnet50_cifar": resnet50_cifar,
    "resnet3d18": resnet3d18,
    "resnet3d50": resnet3d50,
}


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(_ARCHS)


def build_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a backbone + classifier by name.

    ``kwargs`` go to the constructor: ``bottleneck``/``widths``/``in_channels`` for ``preresnet*``;
    ``zero_init_residual``/``in_channels`` for ``resnet50*``; ``conv1_t_size``/``conv1_t_stride``/
    ``no_max_pool``/``in_channels`` for ``resnet3d*``.
    """
    key = arch.lower().replace("-", "")
    if key not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(_ARCHS)}")
    return _ARCHS[key](num_classes=num_classes, **kwargs)
