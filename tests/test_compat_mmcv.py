"""The converters against the real OpenMMLab modules (``make test-interop``, where mmcv-lite is installed):
mmcv's ``ContextBlock`` with ``pooling_type="att"`` and ``"avg"``, every fusion type, float64, eval and train mode,
and a few SGD steps taken on both. tests/test_compat_family.py checks the same conversions against literal
re-implementations without mmcv."""

from __future__ import annotations

import pytest
import torch
from _util import assert_close

from nonlocalnet.compat import from_mmcv

pytestmark = pytest.mark.interop
mmcv_cnn = pytest.importorskip("mmcv.cnn")

DT = torch.float64
FUSIONS = [("channel_add",), ("channel_mul",), ("channel_add", "channel_mul")]


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # mmcv zero-initializes the last conv of each branch: make every term count
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if p.dim() == 3 else 0.0))
    return module


@pytest.mark.parametrize("pooling", ["att", "avg"])
@pytest.mark.parametrize("fusions", FUSIONS)
def test_mmcv_context_block(pooling, fusions):
    src = _randomize(mmcv_cnn.ContextBlock(16, 0.25, pooling_type=pooling, fusion_types=fusions).to(DT), seed=1)
    assert any(k.startswith("conv_mask") for k in src.state_dict()) == (pooling == "att")
    block = from_mmcv(src.state_dict(), module="ContextBlock")
    assert block.edges.mask.weight.requires_grad == (pooling == "att")
    x = torch.randn(2, 16, 7, 5, generator=torch.Generator().manual_seed(2), dtype=DT)
    for train in (False, True):
        src.train(train), block.train(train)
        assert_close(block(x), src(x))
    # three SGD steps on each (same loss, same lr): still the same function, and not the initial one
    src.train(), block.train()
    before = src(x).detach()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (src, block)]
    target = torch.randn(2, 16, 7, 5, generator=torch.Generator().manual_seed(3), dtype=DT)
    for _ in range(3):
        for m, opt in zip((src, block), opts):
            opt.zero_grad()
            ((m(x) - target) ** 2).mean().backward()
            opt.step()
    assert not torch.allclose(src(x), before)
    assert_close(block(x), src(x))
