"""Shared test helpers."""

from __future__ import annotations

import torch

RTOL = 1e-6


def randomize(block: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (also the zero-initialized norms) so no term hides behind a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return block.double()


def assert_close(y: torch.Tensor, r: torch.Tensor, rtol: float = RTOL) -> None:
    assert y.shape == r.shape
    assert torch.isfinite(y).all()
    scale = r.abs().max().clamp_min(1e-12)
    err = float(((y - r).abs().max() / scale).detach())
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"
