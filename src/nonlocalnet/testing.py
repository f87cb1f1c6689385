"""Checks any nonlocal block — the library's or one built from your own registered parts — against its dense form.

>>> from nonlocalnet.testing import check_block
>>> report = check_block("snl", kernel="relu_dot")          # raises AssertionError with the numbers if it fails
>>> sorted(report)                                           # what was checked, with the largest errors
['1d', '2d', '2d_channels_last', '3d', '3d_channels_last', 'gradcheck', 'largest_tensor']

For each ``dim`` in 1, 2, 3 the block is built in float64 with random parameters (so zero-initialized outputs do
not hide anything), and its output is compared with :func:`nonlocalnet.reference.forward` — every ``N × N`` matrix
formed, the kernel's :meth:`~nonlocalnet.kernels.Kernel.literal` formula, the filter's polynomial or literal form —
at ``rtol``; channels_last inputs must give the same output; ``torch.autograd.gradcheck`` runs on a small input.
``largest_tensor`` is the largest tensor (elements) any operation produced in a forward and backward at
``N = 16 × 16`` (2-D): below ``N²``, the block never formed an ``N × N`` matrix (:func:`largest_tensor`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import reference
from .blocks import NonlocalBlock
from .presets import build_block

SHAPES = {1: (10,), 2: (4, 5), 3: (3, 3, 4)}  # >= 3 per axis: a 3-position window (neighborhood) fits


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor(block: torch.nn.Module, x: torch.Tensor, backward: bool = True) -> int:
    """The number of elements of the largest tensor produced while running ``block(x)`` (and its backward)."""
    x = x.detach().requires_grad_(backward)
    with _LargestTensor() as rec:
        y = block(x)
        if backward:
            y.sum().backward()
    return rec.largest


def randomize(block: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """``block`` in float64 with every parameter drawn from ``N(0, std²)`` (in place; returned)."""
    gen = torch.Generator().manual_seed(seed)
    block = block.double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return block


def check_block(block: str | Callable[..., NonlocalBlock], in_channels: int = 8, *, dims: tuple[int, ...] = (1, 2, 3),
                rtol: float = 1e-6, atol: float = 1e-8, gradcheck: bool = True, channels_last: bool = True,
                eval_mode: bool = False, **options: Any) -> dict[str, float]:
    """Check a block against its dense literal form; returns ``{check: largest error}`` or raises AssertionError.

    ``block``: a registered block name (built with ``build_block(name, in_channels, dim=dim, **options)``) or a
    factory ``f(in_channels, dim=dim, **options) -> NonlocalBlock``. ``eval_mode``: compare in eval mode (BatchNorm
    with running statistics) instead of training mode.
    """
    def make(dim: int) -> NonlocalBlock:
        b = build_block(block, in_channels, dim=dim, **options) if isinstance(block, str) else \
            block(in_channels, dim=dim, **options)
        if not isinstance(b, NonlocalBlock):
            raise TypeError(f"block: expected a name or a factory of NonlocalBlock, got {type(b).__name__}")
        b = randomize(b)
        return b.eval() if eval_mode else b.train()

    def compare(what: str, got: torch.Tensor, want: torch.Tensor) -> float:
        err = (got.detach() - want.detach()).abs()
        bound = atol + rtol * want.abs()
        if not torch.isfinite(got).all() or (err > bound).any():
            raise AssertionError(f"{what}: the block differs from its dense form by {float(err.max()):.3g} "
                                 f"(rtol {rtol}, atol {atol}; largest |reference| {float(want.abs().max()):.3g})")
        return float(err.max())

    gen = torch.Generator().manual_seed(1)
    report: dict[str, float] = {}
    for dim in dims:
        b = make(dim)
        x = torch.randn((2, in_channels) + SHAPES[dim], generator=gen, dtype=torch.float64)
        want = reference.forward(b, x)
        report[f"{dim}d"] = compare(f"dim={dim}", b(x), want)
        if channels_last and dim >= 2:
            fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
            report[f"{dim}d_channels_last"] = compare(f"dim={dim}, channels_last", b(x.to(memory_format=fmt)), want)
    if gradcheck:
        b = make(2)
        x = torch.randn(1, in_channels, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
        if not torch.autograd.gradcheck(b, (x,), raise_exception=False):
            raise AssertionError("gradcheck: the block's gradients differ from finite differences (float64, "
                                 f"input {tuple(x.shape)})")
        report["gradcheck"] = 0.0
    b = make(2).float()
    report["largest_tensor"] = float(largest_tensor(b, torch.randn(2, in_channels, 16, 16, generator=gen)))
    return report
