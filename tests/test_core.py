"""Every fast path against the dense literal reference (float64, rtol 1e-6), and autograd checks."""

from __future__ import annotations

import itertools

import pytest
import torch
from _util import assert_close, randomize

import nonlocalnet
from nonlocalnet import reference as ref
from nonlocalnet.kernels import KERNELS, valid_backends, valid_normalizations

SHAPES = {1: (2, 8, 7), 2: (2, 8, 5, 4), 3: (2, 8, 3, 4, 3)}


def backends_of(name: str, kernel: str, normalization: str) -> list[str]:
    return list(valid_backends(kernel, normalization, nonlocalnet.PRESETS[name].mode))


# the spectral filters (heat, cayley, wavelet) have their own suite: tests/test_spectral.py
SPECTRAL = ("cayley", "heat", "wavelet")
PRESET_CASES = [
    (name, dim, backend)
    for name in nonlocalnet.list_blocks() if name not in SPECTRAL
    for dim in (1, 2, 3)
    for backend in backends_of(name, nonlocalnet.PRESETS[name].defaults.get("kernel", "embedded_gaussian"),
                               nonlocalnet.PRESETS[name].defaults.get("normalization", "softmax"))
]


@pytest.mark.parametrize("name,dim,backend", PRESET_CASES)
@pytest.mark.parametrize("training", [False, True])
def test_preset_matches_reference(name, dim, backend, training):
    # memory_budget tiny so that 'chunked' really splits the rows into several blocks
    block = randomize(nonlocalnet.build_block(name, 8, dim=dim, backend=backend, memory_budget=0.0005,
                                              **({"reduction": 2} if name == "cc" else {})))
    block.train(training)
    x = torch.randn(SHAPES[dim], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_close(block(x), ref.forward(block, x))
    if name != "cgnl":
        assert_close(block.affinity(x), ref.affinity(block, x))


KERNEL_NORMS = [(k, n) for k in KERNELS for n in valid_normalizations(k)]


# symmetric + sub_sample and the unary kernel + sub_sample are rejected at build time (tests/test_errors.py,
# tests/test_gc_dnl.py), so they are not cases here
@pytest.mark.parametrize("kernel,normalization,sub_sample",
                         [(k, n, s) for k, n in KERNEL_NORMS for s in (False, True)
                          if not (s and (n == "symmetric" or KERNELS[k].unary))])
@pytest.mark.parametrize("filt", ["nl", "snl"])
def test_every_kernel_and_normalization(kernel, normalization, sub_sample, filt):
    for backend in backends_of("nl", kernel, normalization):
        block = randomize(nonlocalnet.build_block(
            "nl", 8, dim=2, kernel=kernel, normalization=normalization, sub_sample=sub_sample, filter=filt,
            backend=backend, memory_budget=0.0005, scale=True))
        x = torch.randn(2, 8, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.5
        assert_close(block(x), ref.forward(block, x))
        assert_close(block.affinity(x), ref.affinity(block, x))


@pytest.mark.parametrize("name", ["nl", "ns", "snl", "gsnl", "cheby", "a2", "cgnl", "cc"])
@pytest.mark.parametrize("units", [2, 3])
def test_stage_of_units(name, units):
    opts = {"units": units}
    if name == "cc":
        opts["reduction"] = 2
    block = randomize(nonlocalnet.build_block(name, 8, dim=2, **opts))
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    assert_close(block(x), ref.forward(block, x))


@pytest.mark.parametrize("order", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("backend", ["lowrank", "dense", "chunked"])
def test_chebyshev_orders(order, backend):
    block = randomize(nonlocalnet.build_block("cheby", 8, dim=2, order=order, backend=backend,
                                              memory_budget=0.0005))
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    assert_close(block(x), ref.forward(block, x))


@pytest.mark.parametrize("kernel", ["dot_product", "gaussian"])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("normalization,scale", [("none", False), ("count", False), ("none", True)])
def test_cgnl_variants(kernel, groups, normalization, scale):
    block = randomize(nonlocalnet.build_block("cgnl", 8, dim=2, kernel=kernel, groups=groups,
                                              normalization=normalization, scale=scale, taylor_order=3,
                                              rbf_gamma=0.1))
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    assert_close(block(x), ref.forward(block, x))


def test_cgnl_taylor_converges_to_rbf():
    """The Taylor expansion of order P approaches exp(-γ (t - p)²) (the kernel it stands for)."""
    block = randomize(nonlocalnet.build_block("cgnl", 4, dim=1, kernel="gaussian", taylor_order=12,
                                              rbf_gamma=0.5))
    x = torch.randn(1, 4, 5, dtype=torch.float64) * 0.5
    tok = x.movedim(1, -1).reshape(1, -1, 4)
    m = ref.cgnl_channel_affinity(block.edges, tok)[0, 0]
    t = ref._lin(block.edges.theta, tok).reshape(-1)
    p = ref._lin(block.edges.phi, tok).reshape(-1)
    exact = torch.exp(-0.5 * (t[:, None] - p[None, :]) ** 2)
    assert torch.allclose(m, exact, rtol=1e-6, atol=1e-9)


GRAD_CASES = [(n, b) for n in nonlocalnet.list_blocks() if n not in SPECTRAL for b in backends_of(
    n, nonlocalnet.PRESETS[n].defaults.get("kernel", "embedded_gaussian"),
    nonlocalnet.PRESETS[n].defaults.get("normalization", "softmax"))]


@pytest.mark.parametrize("name,backend", GRAD_CASES)
def test_gradcheck(name, backend):
    opts = {"reduction": 2} if name == "cc" else {}
    block = randomize(nonlocalnet.build_block(name, 4, dim=2, backend=backend, memory_budget=0.0001,
                                              units=2, **opts))
    block.eval()  # BN in eval: a fixed affine map (train-mode BN is checked against the reference above)
    shape = (1, 4, 3, 3) if name == "neighborhood" else (1, 4, 3, 2)  # its 3-position window needs >= 3 per axis
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = list(block.parameters())
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)
    # gradients w.r.t. parameters agree with the reference's autograd
    y = block(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), params, allow_unused=True)
    r = ref.forward(block, x)
    rgrads = torch.autograd.grad((r * g).sum(), params, allow_unused=True)
    for a, b in zip(grads, rgrads):
        if b is None:
            continue
        assert a is not None
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["nl", "snl", "cc", "cgnl", "a2"])
def test_train_mode_grad_with_bn(name):
    """Train mode (BatchNorm on batch statistics): gradcheck, and input gradients equal the reference's."""
    opts = {"reduction": 2} if name == "cc" else {}
    block = randomize(nonlocalnet.build_block(name, 4, dim=1, **opts))
    block.train()
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-6)
    g = torch.randn(2, 4, 5, dtype=torch.float64)
    (gx,) = torch.autograd.grad((block(x) * g).sum(), x)
    (rx,) = torch.autograd.grad((ref.forward(block, x) * g).sum(), x)
    assert torch.allclose(gx, rx, rtol=1e-6, atol=1e-9)


def test_all_combinations_of_dim_and_units_and_subsample_run_exactly():
    for dim, units, sub in itertools.product((1, 2, 3), (1, 2), (False, True)):
        block = randomize(nonlocalnet.build_block("nl", 8, dim=dim, units=units, sub_sample=sub))
        x = torch.randn(SHAPES[dim], dtype=torch.float64)
        assert_close(block(x), ref.forward(block, x))
