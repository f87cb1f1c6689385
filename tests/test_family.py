"""The later members of the family built on the registered parts: Efficient Attention (a preset over A²'s graph)
and the learnable polynomial responses BernNet and GPR-GNN (filters usable by every block)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import nonlocalnet
from nonlocalnet import reference as ref
from nonlocalnet.testing import check_block, largest_tensor, randomize


def bernstein(theta: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """BernNet's response, written out: Σ_k relu(θ_k) C(K,k) (λ_L/2)^k (1 - λ_L/2)^(K-k), λ_L = 1 - λ."""
    k_max = len(theta) - 1
    x = (1 - lam) / 2
    return sum(max(t, 0.0) * math.comb(k_max, k) * x**k * (1 - x) ** (k_max - k) for k, t in enumerate(theta))


def efficient_attention(x, wq, bq, wk, bk, wv, bv, wr, br):
    """Shen et al.'s module as their code computes it (channels-first, one head): keys softmax over positions,
    queries over channels, context = K Vᵀ, out = reprojection(contextᵀ Q) + x."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    keys = torch.softmax(torch.einsum("oc,bcn->bon", wk, flat) + bk[:, None], dim=2)
    queries = torch.softmax(torch.einsum("oc,bcn->bon", wq, flat) + bq[:, None], dim=1)
    values = torch.einsum("oc,bcn->bon", wv, flat) + bv[:, None]
    attended = (keys @ values.transpose(1, 2)).transpose(1, 2) @ queries
    return (torch.einsum("oc,bcn->bon", wr, attended) + br[:, None]).reshape(b, c, h, w) + x


def test_efficient_equals_the_papers_module():
    block = randomize(nonlocalnet.build_block("efficient", 8)).double()
    e, u = block.edges, block.units[0]
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    sq = lambda conv: conv.weight[:, :, 0, 0]  # noqa: E731
    want = efficient_attention(x, sq(e.theta), e.theta.bias, sq(e.phi), e.phi.bias, sq(u.g), u.g.bias,
                               sq(u.w[0]), u.w[0].bias)
    assert_close(block(x), want, rtol=1e-10, atol=1e-10)
    assert_close(ref.forward(block, x), want, rtol=1e-10, atol=1e-10)


def test_efficient_is_exact_linear_and_checked():
    report = check_block("efficient")
    assert max(v for k, v in report.items() if k != "largest_tensor") < 1e-12
    block = nonlocalnet.build_block("efficient", 8)
    assert block.units[0]._paths[0] == "_lowrank_cf"
    assert largest_tensor(block, torch.randn(2, 8, 24, 24)) <= 2 * 8 * 24 * 24  # nothing larger than the input


@pytest.mark.parametrize("filt", ["bernstein", "gpr"])
def test_learned_responses_on_every_graph(filt):
    for name, opts in [("snl", {}), ("nl", {}), ("efficient", {}), ("cc", {"reduction": 2})]:
        report = check_block(name, filter=filt, order=3, dims=(1, 2), gradcheck=name == "snl", **opts)
        assert report["2d"] < 1e-10, (name, report)


def test_bernstein_response_and_init():
    unit = nonlocalnet.build_block("snl", 8, filter="bernstein", order=3).units[0]
    lam = np.linspace(-1, 1, 9)
    with torch.no_grad():
        assert_close(unit.responses(torch.tensor(lam)), torch.ones(1, 9), check_dtype=False)  # all-pass at init
        unit.spectral.theta.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
        got = unit.responses(torch.tensor(lam)).numpy()[0]
    np.testing.assert_allclose(got, bernstein(np.array([0.5, -1.0, 2.0, 0.25]), lam), rtol=1e-6, atol=1e-7)
    unit.reset_parameters()
    assert_close(unit.spectral.theta.detach(), torch.ones(4))


def test_gpr_response_and_init():
    unit = nonlocalnet.build_block("snl", 8, filter="gpr", order=4).units[0]
    ppr = np.array([0.1 * 0.9**k for k in range(4)] + [0.9**4])
    np.testing.assert_allclose(unit.spectral.gamma.detach().numpy(), ppr, rtol=1e-6)
    assert abs(ppr.sum() - 1) < 1e-12  # the PageRank weights sum to 1: response 1 at λ = 1
    lam = np.linspace(-1, 1, 7)
    with torch.no_grad():
        got = unit.responses(torch.tensor(lam)).numpy()[0]
    np.testing.assert_allclose(got, np.polyval(ppr[::-1], lam), rtol=1e-6)
    # a GPR block equals Σ_k γ_k A^k Z W with A formed densely
    block = randomize(nonlocalnet.build_block("snl", 6, filter="gpr", order=3)).double()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    assert_close(block(x), ref.forward(block, x), rtol=1e-10, atol=1e-10)


def test_learned_orders_are_checked():
    for filt in ("bernstein", "gpr"):
        with pytest.raises(ValueError, match=r"order: expected an int in \[1, 32\]"):
            nonlocalnet.build_block("snl", 8, filter=filt, order=0)
        with pytest.raises(ValueError, match=r"order: expected an int in \[1, 32\]"):
            nonlocalnet.build_block("snl", 8, filter=filt, order=33)
