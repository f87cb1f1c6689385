"""The layout of the features at a placement: which axis holds the channels and where the positions are.

A nonlocal block works on channels-first features ``(B, C, *S)``. Models also hand over

* channels-last features ``(B, *S, C)`` (NHWC / NDHWC: Swin stages in timm and torchvision), and
* tokens ``(B, L, C)`` with ``L = P + prod(grid)``: ``P`` prefix tokens (class / register / distillation
  tokens) followed by the patch tokens of a ``grid`` (ViT, DeiT, EVA, ...).

:func:`feature_layout` decides the layout of one recorded tensor shape, from (first match wins)

1. the placement's ``layout`` key (with ``grid`` / ``prefix_tokens`` for tokens);
2. what the model says: a patch embedding with a ``grid_size`` and ``num_prefix_tokens`` (timm ViTs),
   torchvision's ``VisionTransformer`` (``image_size`` / ``patch_size``, one class token), timm's
   ``feature_info`` (``num_chs`` of the module; ``output_fmt`` breaks a tie), and known channels-last module
   types inside the target (Swin blocks and stages, patch merging);
3. the channel counts of the model's layers: a 4-D/5-D tensor is channels-first when its dim 1, and not its
   last dim, is a channel count of a convolution or batch norm; channels-last when its last dim, and not dim 1,
   is a width of a linear layer or layer norm (when both fit, timm's ``output_fmt == "NHWC"`` decides). A 3-D
   tensor is tokens by the same rule (then the grid must be known), or 1-D channels-first features.

Anything else is ambiguous: a ValueError that names the shape and the ``layout`` key, never a guess.
:class:`Layout` converts to channels-first and back (prefix tokens are split off and passed through unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LAYOUTS", "Layout", "check_stated_layout", "feature_layout", "model_feature_info"]

LAYOUTS = ("channels_first", "channels_last", "tokens")

# Module types (by class name, so neither library is imported) whose outputs are channels-last (B, H, W, C).
CHANNELS_LAST_TYPES = frozenset({
    "SwinTransformerBlock", "SwinTransformerBlockV2", "SwinTransformerStage", "SwinTransformerV2Stage",
    "PatchMerging", "PatchMergingV2",
})
_CF_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)


@dataclass(frozen=True)
class Layout:
    """A feature layout: ``kind`` (one of :data:`LAYOUTS`), ``channels``, ``spatial`` (the sizes of the
    positions' axes: the token ``grid`` for tokens), ``prefix`` (prefix tokens) and ``source`` (where the
    layout was taken from, for messages)."""

    kind: str
    channels: int
    spatial: tuple[int, ...]
    prefix: int = 0
    source: str = ""

    @property
    def dim(self) -> int:
        return len(self.spatial)

    def to_channels_first(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(channels-first features, prefix tokens or None)``."""
        if self.kind == "channels_last":
            return x.movedim(-1, 1), None
        if self.kind == "tokens":
            prefix = x[:, : self.prefix] if self.prefix else None
            body = x[:, self.prefix:] if self.prefix else x
            return body.transpose(1, 2).unflatten(2, self.spatial), prefix
        return x, None

    def from_channels_first(self, y: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "channels_last":
            return y.movedim(1, -1)
        if self.kind == "tokens":
            body = y.flatten(2).transpose(1, 2)
            return torch.cat([prefix, body], 1) if prefix is not None else body
        return y


def model_feature_info(model: nn.Module) -> list[dict[str, Any]]:
    """timm's ``feature_info`` as a list of dicts (``module``, ``num_chs``, ``reduction``); [] if none."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, Sequence) and all(isinstance(d, Mapping) and "module" in d for d in info):
        return [dict(d) for d in info]
    return []


def _token_grid(model: nn.Module) -> tuple[tuple[int, ...], int, str] | None:
    """``(grid, prefix tokens, source)`` when the model says its features are tokens."""
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    if grid is not None and hasattr(model, "num_prefix_tokens"):
        return tuple(int(g) for g in grid), int(model.num_prefix_tokens), \
            "the model's patch_embed.grid_size and num_prefix_tokens (timm)"
    if type(model).__name__ == "VisionTransformer" and hasattr(model, "image_size") and hasattr(model, "patch_size"):
        g = int(model.image_size) // int(model.patch_size)
        return (g, g), 1, "the model's image_size / patch_size and class token (torchvision VisionTransformer)"
    return None


def _channels_last_type(target: nn.Module) -> str | None:
    """The name of a module type known to give channels-last features, inside ``target`` (or None)."""
    for m in target.modules():
        if type(m).__name__ in CHANNELS_LAST_TYPES:
            return type(m).__name__
    return None


def _widths(model: nn.Module) -> tuple[set[int], set[int]]:
    """Channel counts of channels-first layers and widths of channels-last layers (linear, layer norm)."""
    cf, cl = set(), set()
    for m in model.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            cf.update((m.in_channels, m.out_channels))
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            cf.add(m.num_features)
        elif isinstance(m, nn.GroupNorm):
            cf.add(m.num_channels)
        elif isinstance(m, nn.Linear):
            cl.update((m.in_features, m.out_features))
        elif isinstance(m, nn.LayerNorm):
            cl.add(int(m.normalized_shape[-1]))
    return cf, cl


def _ambiguous(where: str, shape: tuple[int, ...], why: str) -> ValueError:
    return ValueError(
        f"{where}: cannot tell the layout of features of shape {shape} ({why}); give the placement key "
        "'layout': 'channels_first' (B, C, *S), 'channels_last' (B, *S, C) or 'tokens' (B, L, C) with "
        "'grid': [h, w] (and 'prefix_tokens' for class/register tokens in front)")


def _tokens(where: str, shape: tuple[int, ...], grid: Sequence[int] | None, prefix: int | None,
            model_grid: tuple[tuple[int, ...], int, str] | None, source: str) -> Layout:
    if len(shape) != 3:
        raise ValueError(f"{where}: layout 'tokens' needs a 3-D tensor (B, L, C), got shape {shape}")
    length, channels = shape[1], shape[2]
    if grid is None and model_grid is not None:
        grid, prefix, source = model_grid[0], model_grid[1] if prefix is None else prefix, model_grid[2]
    elif prefix is None and model_grid is not None:  # the grid from the placement, the prefix tokens from the model
        prefix, source = model_grid[1], f"{source}; prefix tokens from {model_grid[2]}"
    if grid is None:
        raise ValueError(f"{where}: tokens of shape {shape} (B, L={length}, C={channels}) need their grid: give the "
                         "placement key 'grid': [h, w] (the patch grid; 'prefix_tokens' = L - h*w is then implied)")
    grid = tuple(int(g) for g in grid)
    n = math.prod(grid)
    if prefix is None:
        prefix = length - n
        if prefix >= grid[-1]:  # a whole row of the grid or more in front: the grid is likely off
            square = next((((r, r), p) for p in range(grid[-1]) if (r := math.isqrt(length - p)) ** 2 == length - p),
                          None)
            hint = f" (e.g. grid [{square[0][0]}, {square[0][1]}] with {square[1]} prefix token(s))" if square else ""
            raise ValueError(f"{where}: grid {list(grid)} leaves {prefix} of the L={length} tokens of shape {shape} in "
                             f"front of its {n} patch tokens, a whole row ({grid[-1]}) or more: if that is right, "
                             f"confirm it with the placement key 'prefix_tokens': {prefix}; else correct 'grid'{hint}")
    if prefix < 0 or prefix + n != length:
        raise ValueError(f"{where}: tokens of shape {shape} do not fit grid {list(grid)} with {prefix} prefix "
                         f"token(s) ({source}): L={length} but prefix + prod(grid) = {prefix + n}; set 'grid' / "
                         "'prefix_tokens' in the placement (or the model's input size)")
    return Layout("tokens", channels, grid, prefix, source)


def feature_layout(model: nn.Module, target: nn.Module, path: str, shape: Sequence[int],
                   spec: Mapping[str, Any] | None = None, where: str = "after") -> Layout:
    """The :class:`Layout` of a tensor of ``shape`` seen ``where`` the module ``target`` at ``path``
    (see the module docstring for the rules). ``spec``: the placement (keys ``layout``, ``grid``,
    ``prefix_tokens``, ``in_channels``)."""
    spec = spec or {}
    shape = tuple(int(s) for s in shape)
    at = f"placement at {path!r} ({where} it)"
    if len(shape) < 3:
        raise ValueError(f"{at}: the tensor has shape {shape}; a nonlocal block needs (B, C, *spatial), "
                         "(B, *spatial, C) or tokens (B, L, C)")
    kind, grid, prefix = spec.get("layout"), spec.get("grid"), spec.get("prefix_tokens")
    model_grid = _token_grid(model)
    if kind == "tokens" or (kind is None and grid is not None):
        return _tokens(at, shape, grid, prefix, model_grid, "the placement's layout / grid keys")
    if kind == "channels_last":
        return Layout("channels_last", shape[-1], shape[1:-1], 0, "the placement's layout key")
    if kind == "channels_first":
        return Layout("channels_first", shape[1], shape[2:], 0, "the placement's layout key")
    if kind is not None:
        raise ValueError(f"placement key 'layout' must be one of {', '.join(LAYOUTS)}, got {kind!r}")
    kind, source = _infer(model, target, path, shape, where, at)
    if kind == "tokens":
        return _tokens(at, shape, None, prefix, model_grid, source)
    if kind == "channels_last":
        return Layout("channels_last", shape[-1], shape[1:-1], 0, source)
    return Layout("channels_first", shape[1], shape[2:], 0, source)


def check_stated_layout(model: nn.Module, target: nn.Module, path: str, shape: Sequence[int],
                        spec: Mapping[str, Any], where: str, layout: Layout) -> None:
    """A ``layout`` key that puts the channels on the other axis than what the model says or its layer widths
    show (``channels_last`` for channels-first features, ``channels_first`` for tokens): a ValueError naming the
    key. Given ``in_channels`` too (which then matched), the user has confirmed the layout: no check; where the
    evidence is ambiguous, the key decides."""
    stated = spec.get("layout")
    if stated is None or spec.get("in_channels") is not None:
        return
    shape = tuple(int(s) for s in shape)
    at = f"placement at {path!r} ({where} it)"
    try:
        kind, source = _infer(model, target, path, shape, where, at)
    except ValueError:
        return
    axis = {"channels_first": 1, "channels_last": -1, "tokens": -1}
    if axis[kind] == axis[stated]:
        return
    shown = "dim 1" if axis[kind] == 1 else "the last dim"
    looks = "like tokens" if kind == "tokens" else kind.replace("_", "-")
    raise ValueError(
        f"{at}: 'layout': {stated!r} reads {layout.channels} channels from the features of shape {shape}, but they "
        f"look {looks} ({source}: {shown}, {shape[axis[kind]]}, is the channel axis); correct the "
        f"placement key 'layout' (or remove it), or confirm it by giving 'in_channels': {layout.channels}")


def _infer(model: nn.Module, target: nn.Module, path: str, shape: tuple[int, ...], where: str,
           at: str) -> tuple[str, str]:
    """``(kind, source)`` from what the model says, else the channel counts of its layers (rules 2 and 3 of the
    module docstring); a ValueError naming the ``layout`` key when they do not decide."""
    info = {d["module"]: d for d in model_feature_info(model)}
    original = ".".join(p for p in path.split(".") if p != "module")  # feature_info names predate the wrappers
    chs = info.get(original, {}).get("num_chs") if where == "after" else None
    model_grid = _token_grid(model)
    if model_grid is not None and len(shape) == 3:
        return "tokens", model_grid[2]
    model_nhwc = getattr(model, "output_fmt", None) == "NHWC"
    if chs is not None and len(shape) in (4, 5):
        if chs == shape[1] and (chs != shape[-1] or not model_nhwc):
            return "channels_first", "the model's feature_info (timm)"
        if chs == shape[-1]:
            return "channels_last", "the model's feature_info (timm)" + (" and output_fmt 'NHWC'" if model_nhwc else "")
    known = _channels_last_type(target)
    if known is not None and len(shape) in (4, 5):
        return "channels_last", f"the module type {known} (channels-last features)"

    # the channel counts of the model's layers
    cf_widths, cl_widths = _widths(model)
    first, last = shape[1] in cf_widths, shape[-1] in cl_widths
    if first and last and model_nhwc and len(shape) in (4, 5):
        return "channels_last", "the model's output_fmt 'NHWC' (timm)"
    if len(shape) == 3:
        if first and not last:
            return "channels_first", "the channel counts of the model's layers"
        if last and not first:
            return "tokens", "the widths of the model's linear layers"
        raise _ambiguous(at, shape, "(B, C, L) features or (B, L, C) tokens: "
                         + ("both fit the model's layer widths" if first else "neither fits the model's layer widths"))
    if first and not last:
        return "channels_first", "the channel counts of the model's layers"
    if last and not first:
        return "channels_last", "the widths of the model's linear / norm layers"
    raise _ambiguous(at, shape, "channels first or last: " + (
        f"dim 1 ({shape[1]}) is a convolution's channel count and the last dim ({shape[-1]}) a linear layer's width"
        if first else f"neither dim 1 ({shape[1]}) nor the last dim ({shape[-1]}) is a channel count of the "
                      "model's layers"))
