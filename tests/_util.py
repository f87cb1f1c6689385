"""Shared test helpers."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from nonlocalnet import reference as ref
from nonlocalnet.blocks import NonlocalUnit

RTOL = 1e-6
ROOT = Path(__file__).resolve().parents[1]


class Tokens(nn.Module):
    """Tokens (B, 1 + h*w, C): a class token in front of patch tokens, like a ViT (but says nothing about it)."""

    def __init__(self, c=12):
        super().__init__()
        self.patch = nn.Conv2d(3, c, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.blocks = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c))

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.blocks(torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1))[:, 0]


def dnl_terms(block: nn.Module, x: torch.Tensor, tau: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """DNL's two graphs written out for a 2-D input (Yin et al., ECCV 2020, Eq. 12): the whitened pairwise softmax
    ``softmax((θ-μ_θ)(φ-μ_φ)ᵀ/(√C_s·τ))`` ``(B, N, N)`` and the unary row ``a = softmax(w_m X)`` ``(B, N)``."""
    tok = x.flatten(2).transpose(1, 2)
    e = block.edges
    q = tok @ e.theta.weight.flatten(1).T + e.theta.bias
    k = tok @ e.phi.weight.flatten(1).T + e.phi.bias
    q, k = q - q.mean(1, keepdim=True), k - k.mean(1, keepdim=True)
    pair = torch.softmax(q @ k.transpose(1, 2) / (q.shape[-1] ** 0.5 * tau), -1)
    return pair, torch.softmax((tok @ e.mask.weight.flatten(1).T + e.mask.bias)[..., 0], -1)


def assert_structured_path(block: nn.Module, x: torch.Tensor, monkeypatch, rtol: float = 1e-10) -> None:
    """``block(x)`` equals the dense reference with the generic filter path patched to raise: a structured path
    (the low-rank one, ...) computed it."""
    want = ref.forward(block, x)

    def generic(*args, **kwargs):
        raise AssertionError("the generic filter path was taken")

    monkeypatch.setattr(NonlocalUnit, "filter_terms", generic)
    torch.testing.assert_close(block(x), want, rtol=rtol, atol=rtol)
    monkeypatch.undo()


def run_docs_example(doc: str, heading: str) -> None:
    """Run the first python example of the section ``## heading`` of ``docs/<doc>`` (fails if it has none)."""
    text = (ROOT / "docs" / doc).read_text()
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    assert code, f"docs/{doc}: the section {heading!r} has no python example"
    exec(compile(code[0], f"docs/{doc} ({heading})", "exec"), {})


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
