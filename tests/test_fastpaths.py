"""The unit's structured paths (NonlocalUnit._lowrank_cf, _channels_cf, _unary_cf): taken where they apply, equal
to the generic path and to the dense algebra they stand for (float64)."""

import pytest
import torch
from torch.testing import assert_close

import nonlocalnet
from nonlocalnet import reference as ref
from nonlocalnet.blocks import NonlocalUnit
from nonlocalnet.filters import apply_filter, lowrank_terms


def randomize(block):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return block.double()


@pytest.mark.parametrize("coef", [((0.0, 1.0),), ((-1.0, 1.0),), ((1.0, 0.0), (0.0, 1.0)),
                                  ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (-1.0, 2.0, 0.0)),
                                  tuple(tuple(float(i == j) for j in range(5)) for i in range(5)),
                                  ((0.5, -2.0, 0.0, 3.0),)])
def test_lowrank_terms_equal_the_chebyshev_basis(coef):
    """α_t Z + U R_t equals B_t(A) Z computed with the formed A = U Vᵀ."""
    torch.manual_seed(0)
    u, v, z = (torch.randn(2, 9, 3, dtype=torch.float64), torch.randn(2, 9, 3, dtype=torch.float64),
               torch.randn(2, 9, 4, dtype=torch.float64))
    a = u @ v.transpose(1, 2)
    want = apply_filter(lambda t: a @ t, z, coef)
    got = lowrank_terms(coef, v.transpose(1, 2) @ z, lambda: v.transpose(1, 2) @ u)
    for w, (alpha, r) in zip(want, got):
        assert_close(alpha * z + (0 if r is None else u @ r), w, rtol=1e-12, atol=1e-12)


FAST = [("a2", {}), ("nl", {"kernel": "dot_product"}), ("ns", {"kernel": "dot_product"}), ("snl", {}),
        ("gsnl", {}), ("cheby", {"order": 3}), ("cheby", {"order": 0}), ("snl", {"units": 2}),
        ("a2", {"recurrence": 2}), ("cgnl", {}), ("cgnl", {"groups": 4}), ("cgnl", {"units": 2}),
        ("cgnl", {"normalization": "count", "scale": True}), ("gc", {}), ("gc", {"fusion": "add_mul"}),
        ("gc", {"value_proj": True}), ("snl", {"out_norm": "gamma", "zero_init": False}),
        ("nl", {"kernel": "dot_product", "out_norm": "none", "zero_init": False})]


@pytest.mark.parametrize("name,opts", FAST)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_structured_path_is_taken_and_exact(name, opts, dim, monkeypatch):
    block = randomize(nonlocalnet.build_block(name, 8, dim=dim, **opts))
    x = torch.randn((2, 8) + {1: (12,), 2: (4, 5), 3: (2, 3, 4)}[dim], dtype=torch.float64)  # N > rank: low rank
    want = ref.forward(block, x)

    def generic(*args, **kwargs):
        raise AssertionError("the generic filter path was taken")

    monkeypatch.setattr(NonlocalUnit, "filter_terms", generic)
    assert_close(block(x), want, rtol=1e-10, atol=1e-10)
    # channels_last input: the generic path (tokens-major), same values
    if dim == 2:
        monkeypatch.undo()
        xl = x.to(memory_format=torch.channels_last)
        assert_close(block(xl), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,opts", [("a2", {}), ("snl", {}), ("cheby", {"order": 2}), ("cgnl", {"groups": 2}),
                                       ("gc", {})])
def test_structured_path_gradients(name, opts):
    block = randomize(nonlocalnet.build_block(name, 4, dim=2, **opts))
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


def test_structured_path_under_autocast_keeps_the_residual_in_float32():
    """bf16 autocast: the GEMMs run in bf16, the residual sum stays in the input's float32 (not fused)."""
    block = nonlocalnet.build_block("a2", 16, dim=2)
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == torch.float32
    assert_close(y, block(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", ["gc", "a2", "snl", "cgnl"])
def test_structured_path_backward_under_autocast(name):
    """Forward under bf16 autocast and backward: gradients of the input and parameters in float32, finite, close
    to the float32 ones."""
    torch.manual_seed(0)
    block = nonlocalnet.build_block(name, 16, dim=2)
    if name == "gc":  # GC's last conv starts at zero: give the branch a gradient path
        torch.nn.init.normal_(block.units[0].w[0].conv2.weight, std=0.1)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    block(x).square().sum().backward()
    want = x.grad.clone()
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in block.parameters())
    assert (x.grad - want).norm() <= 0.05 * want.norm()
