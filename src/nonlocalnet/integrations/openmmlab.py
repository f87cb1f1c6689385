"""nonlocalnet blocks in OpenMMLab configs (mmdet, mmseg, mmpretrain, mmaction2: mmengine's registries).

Importing this module registers every preset in mmengine's ``MODELS`` registry, in a child registry of scope
``nonlocalnet``: ``nonlocalnet.<NAME>`` (the preset's name in capitals: ``nonlocalnet.SNL``, ``nonlocalnet.NL``,
``nonlocalnet.A2``, ...; ``nonlocalnet.list_blocks()``) and ``nonlocalnet.Block`` (the preset given by ``name=``).
Building one calls ``nonlocalnet.build_block(preset, in_channels, **options)`` and returns that
:class:`~nonlocalnet.NonlocalBlock` (the same state dict as ``build_block``'s), so an entry takes ``in_channels``
(given by the backbone, as mmdet/mmseg ResNets give it to their plugins) plus any block option (``reduction``,
``dim=3`` for video, ...). mmcv's ``build_plugin_layer`` (mmcv 2.x looks plugins up in mmengine's ``MODELS``)
names the layer ``nonlocalnet_<name>`` + postfix. With mmcv 1.x, whose plugins live in its own
``PLUGIN_LAYERS``, the entries are registered there too.

A config (docs/models.md)::

    custom_imports = dict(imports=["nonlocalnet.integrations.openmmlab"], allow_failed_imports=False)
    model = dict(backbone=dict(type="ResNet", depth=50, plugins=[
        dict(cfg=dict(type="nonlocalnet.SNL", reduction=4), stages=(False, False, True, False),
             position="after_conv2")]))

mmengine is the optional extra ``openmmlab`` (``pip install 'nonlocalnet[openmmlab]'``), never a core
dependency: without it, importing this module raises an ImportError that says so.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nonlocalnet.presets import PRESETS, build_block

try:
    from mmengine.registry import MODELS
except ImportError as e:  # the optional extra `openmmlab`
    raise ImportError("nonlocalnet.integrations.openmmlab needs mmengine (the optional extra 'openmmlab'): "
                      "pip install 'nonlocalnet[openmmlab]'") from e
try:
    from mmcv.cnn import PLUGIN_LAYERS  # mmcv 1.x only; mmcv 2.x builds plugins from mmengine's MODELS
except ImportError:
    PLUGIN_LAYERS = None

__all__ = ["SCOPE", "ENTRIES", "Block", "registry_name"]

SCOPE = "nonlocalnet"


def registry_name(preset: str) -> str:
    """``snl`` -> ``nonlocalnet.SNL``: the ``type`` of a preset in an OpenMMLab config."""
    return f"{SCOPE}.{preset.upper()}"


class _Preset:
    """A registry entry for one preset: ``cls(in_channels, **options)`` is ``build_block(cls.preset, ...)``."""

    preset: str
    _abbr_: str

    def __new__(cls, in_channels: int, **options: Any) -> nn.Module:
        return build_block(cls.preset, in_channels, **options)


class Block:
    """``Block(in_channels, name, **options)`` is ``build_block(name, in_channels, **options)``: any preset by name
    (``dict(type="nonlocalnet.Block", name="dnl", ...)``)."""

    _abbr_ = "nonlocalnet"

    def __new__(cls, in_channels: int, name: str, **options: Any) -> nn.Module:
        return build_block(name, in_channels, **options)


def _entry(preset: str) -> type:
    return type(preset.upper(), (_Preset,), {
        "preset": preset, "_abbr_": f"nonlocalnet_{preset}", "__module__": __name__,
        "__doc__": f"``{registry_name(preset)}``: ``build_block({preset!r}, in_channels, **options)`` "
                   f"({PRESETS[preset].reference})."})


ENTRIES: dict[str, type] = {p.upper(): _entry(p) for p in PRESETS} | {"Block": Block}
"""Registry key (in the ``nonlocalnet`` scope) -> entry."""


def _scope_of(parent):
    """The child registry of scope ``nonlocalnet`` under ``parent`` (mmengine's or mmcv 1.x's ``Registry``;
    created once, a re-import reuses it)."""
    return parent.children.get(SCOPE) or type(parent)(parent.name, parent=parent, scope=SCOPE)


for _parent in (MODELS, PLUGIN_LAYERS):
    if _parent is not None:
        _registry = _scope_of(_parent)
        for _key, _cls in ENTRIES.items():
            _registry.register_module(name=_key, module=_cls, force=True)
