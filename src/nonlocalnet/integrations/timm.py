"""nonlocalnet blocks as timm attention layers: ``attn_layer=attn("snl")`` in a timm model definition.

timm's ResNet and ByobNet definitions take their attention layer as a name or as a callable
(``block_args=dict(attn_layer=...)`` in ``timm.models.resnet.ResNet``, ``ByoModelCfg(attn_layer=...)``);
``timm.layers.get_attn`` passes a callable through and ``create_attn`` calls it as ``layer(channels, **kwargs)``
with the channels of the block's output and timm's ``device`` / ``dtype`` keywords. :func:`attn` returns such a
callable for every preset (``nonlocalnet.list_blocks()``); the module it builds is the block
``nonlocalnet.build_block(name, channels, **options)`` builds, so state dicts are interchangeable.

>>> import torch
>>> from nonlocalnet.integrations.timm import attn
>>> layer = attn("snl", reduction=4)(64)           # what timm does with attn_layer=attn("snl", reduction=4)
>>> layer(torch.randn(2, 64, 8, 8)).shape
torch.Size([2, 64, 8, 8])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nonlocalnet.presets import PRESETS, build_block

__all__ = ["Attn", "attn"]


class Attn:
    """An attention-layer factory with timm's signature: ``Attn(name, **options)(channels, **kwargs)`` is
    ``build_block(name, channels, **options, **kwargs)`` on ``device`` / ``dtype`` when timm gives them.
    Picklable (a class, not a closure), so model configs holding it can be copied and saved."""

    def __init__(self, name: str, **options: Any) -> None:
        if name not in PRESETS:
            raise ValueError(f"attn: unknown block {name!r}; valid: {', '.join(PRESETS)}")
        self.name = name
        self.options = options

    def __call__(self, channels: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
        block = build_block(self.name, channels, **{**self.options, **kwargs})
        if device is not None or dtype is not None:
            block = block.to(device=device, dtype=dtype)
        return block

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"attn({self.name!r}{opts})"


def attn(name: str, **options: Any) -> Attn:
    """The timm attention layer for the preset ``name`` with ``options`` (``build_block``'s keywords), e.g.
    ``timm.models.resnet.ResNet(BasicBlock, [2, 2, 2, 2], block_args=dict(attn_layer=attn("nl")))``."""
    return Attn(name, **options)
