"""Deployment: torch.compile without graph breaks, torch.export, ONNX under onnxruntime — every preset."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from _util import randomize

import nonlocalnet

PRESETS = nonlocalnet.list_blocks()


def _block(name: str) -> torch.nn.Module:
    opts = {"reduction": 2} if name == "cc" else {}
    return randomize(nonlocalnet.build_block(name, 8, **opts)).float().eval()


@pytest.mark.parametrize("name", PRESETS)
def test_compile_fullgraph_no_graph_breaks(name):
    """fullgraph=True raises on any graph break; aot_eager traces forward and backward graphs."""
    block = _block(name)
    x = torch.randn(2, 8, 6, 5, requires_grad=True)
    torch._dynamo.reset()  # a fresh cache per block: the recompile limit is per code object
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert torch.allclose(y, block(x), atol=1e-6, rtol=1e-6)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", PRESETS)
def test_torch_export(name):
    block = _block(name)
    x = torch.randn(2, 8, 6, 5)
    ep = torch.export.export(block, (x,))
    assert torch.allclose(ep.module()(x), block(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", PRESETS)
def test_onnx_export_matches_onnxruntime(name):
    if name in ("cayley", "heat", "wavelet"):
        pytest.skip("ONNX has no matrix exponential and no complex tensors (the exact r x r path uses both)")
    ort = pytest.importorskip("onnxruntime")
    block = _block(name)
    x = torch.randn(2, 8, 6, 5)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(block, (x,), buf, dynamo=False, opset_version=17)
    sess = ort.InferenceSession(buf.getvalue())
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(y, block(x).detach().numpy(), rtol=1e-4, atol=1e-5)
