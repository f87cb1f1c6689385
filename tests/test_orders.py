"""Every accepted order of an expansion gives a finite, exact output (issue 21): CGNL's Taylor order P of the
Gaussian kernel (the spectral filters' orders: tests/test_spectral.py::test_every_order_is_finite_and_exact)."""

from __future__ import annotations

import pytest
import torch
from _util import assert_close, randomize

import nonlocalnet
from nonlocalnet import reference as ref
from nonlocalnet.presets import MAX_TAYLOR_ORDER


@pytest.mark.parametrize("order", [0, 1, 3, 8, 16, 24, MAX_TAYLOR_ORDER])
@pytest.mark.parametrize("prefactor", ["exact", "constant"])
def test_every_taylor_order_is_finite_and_exact(order, prefactor):
    block = randomize(nonlocalnet.build_block("cgnl", 8, dim=2, kernel="gaussian", taylor_order=order,
                                              rbf_prefactor=prefactor, rbf_gamma=0.1)).eval()
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(order))
    assert_close(block(x), ref.forward(block, x))
    # float32 at the default γ with large features (the k-th term as (√(2γ)x)^k/√k!: no x^k overflow)
    big = nonlocalnet.build_block("cgnl", 64, kernel="gaussian", taylor_order=order, rbf_prefactor=prefactor)
    y = big(torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(1)) * 10)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("order", [MAX_TAYLOR_ORDER + 1, 200, -1, 2.5, True])
def test_taylor_order_out_of_range(order):
    with pytest.raises(ValueError, match=rf"taylor_order: expected an int in \[0, {MAX_TAYLOR_ORDER}\].*got"):
        nonlocalnet.build_block("cgnl", 8, kernel="gaussian", taylor_order=order)
