"""The criss-cross joint softmax's own autograd function (affinity._JointSoftmax2d): equal to the literal
``softmax(cat([rows, columns with the query masked]))`` in float64, values and gradients, for any scale."""

from __future__ import annotations

import pytest
import torch

from nonlocalnet.affinity import _JointSoftmax2d


def _literal(e_row, e_col, scale):
    """softmax over [row | column] with the query's own column entry at -inf, laid out as the function's."""
    hh = e_col.shape[-1]
    col = (scale * e_col).masked_fill(torch.eye(hh, dtype=torch.bool), float("-inf")).transpose(1, 2)  # (B,H,W,H)
    att = torch.softmax(torch.cat([scale * e_row, col], -1), -1)
    ww = e_row.shape[-1]
    return att[..., :ww], att[..., ww:].transpose(1, 2)


@pytest.mark.parametrize("scale", [1.0, 0.37, -1.3])
def test_joint_softmax_equals_literal_and_gradchecks(scale):
    g = torch.Generator().manual_seed(0)
    b, hh, ww = 2, 5, 4
    e_row = (3 * torch.randn(b, hh, ww, ww, generator=g, dtype=torch.float64)).requires_grad_(True)
    e_col = (3 * torch.randn(b, ww, hh, hh, generator=g, dtype=torch.float64)).requires_grad_(True)
    a_row, a_col = _JointSoftmax2d.apply(e_row, e_col, scale, hh)
    r_row, r_col = _literal(e_row, e_col, scale)
    torch.testing.assert_close(a_row, r_row, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a_col, r_col, rtol=1e-12, atol=1e-14)
    assert float(a_col.diagonal(dim1=-2, dim2=-1).abs().max()) == 0.0
    torch.testing.assert_close(a_row.sum(-1) + a_col.sum(-1).transpose(1, 2),
                               torch.ones(b, hh, ww, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    w1, w2 = torch.randn(a_row.shape, generator=g, dtype=torch.float64), torch.randn(a_col.shape, generator=g,
                                                                                      dtype=torch.float64)
    got = torch.autograd.grad((a_row * w1).sum() + (a_col * w2).sum(), (e_row, e_col))
    want = torch.autograd.grad((r_row * w1).sum() + (r_col * w2).sum(), (e_row, e_col))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda r, c: _JointSoftmax2d.apply(r, c, scale, hh), (e_row, e_col))


def test_joint_softmax_refuses_double_backward():
    e_row = torch.randn(1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    e_col = torch.randn(1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    a_row, a_col = _JointSoftmax2d.apply(e_row, e_col, 1.0, 3)
    (g,) = torch.autograd.grad((a_row ** 2).sum() + a_col.sum(), e_row, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
