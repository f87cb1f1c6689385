"""GC and DNL as presets over the shared design, against reference.py and against the papers' formulas.

GC: Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", ICCVW 2019
(arXiv 1904.11492), Eq. 4. DNL: Yin et al., "Disentangled Non-Local Neural Networks", ECCV 2020
(arXiv 2006.06668), Eq. 12. float64, rtol 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from _util import assert_close, dnl_terms, randomize

import nonlocalnet
from nonlocalnet import affinity as aff
from nonlocalnet import reference as ref

SHAPES = {1: (2, 8, 7), 2: (2, 8, 5, 4), 3: (2, 8, 3, 4, 3)}


def x_of(shape, seed=1, requires_grad=False):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed),
                       requires_grad=requires_grad)


def peak_bytes(fn) -> int:
    """Peak CPU bytes allocated while ``fn`` runs (profiler memory events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------------------- GC
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("fusion", ["mul", "add_mul"])
@pytest.mark.parametrize("backend", ["auto", "dense", "chunked"])
def test_gc_fusions_match_reference(dim, fusion, backend):
    block = randomize(nonlocalnet.build_block("gc", 8, dim=dim, fusion=fusion, backend=backend,
                                              bottleneck_channels=3, memory_budget=0.0005))
    x = x_of(SHAPES[dim])
    for training in (False, True):
        block.train(training)
        assert_close(block(x), ref.forward(block, x))
    assert_close(block.affinity(x), ref.affinity(block, x))


def test_gc_is_gcnet_eq4_literally():
    """Y = X ⊙ σ(T_m(c)) + T_a(c), c = Σ_j softmax(w_m x_j) x_j, T = conv∘ReLU∘LN∘conv (GCNet Eq. 4 + §4.2)."""
    block = randomize(nonlocalnet.build_block("gc", 8, fusion="add_mul", bottleneck_channels=4))
    x = x_of((2, 8, 5, 6))
    xs = x.flatten(2)  # (B, C, N)
    m = block.edges.mask
    logits = torch.einsum("c,bcn->bn", m.weight.flatten(), xs) + m.bias
    a = torch.softmax(logits, -1)
    ctx = torch.einsum("bcn,bn->bc", xs, a)

    def transform(t):
        h = t @ t_.conv1.weight.flatten(1).T + t_.conv1.bias
        h = torch.nn.functional.layer_norm(h, (h.shape[-1],), t_.norm.weight, t_.norm.bias, t_.norm.eps)
        return torch.relu(h) @ t_.conv2.weight.flatten(1).T + t_.conv2.bias

    t_ = block.units[0].w_mul[0]
    gate = torch.sigmoid(transform(ctx))
    t_ = block.units[0].w[0]
    add = transform(ctx)
    expect = x * gate[:, :, None, None] + add[:, :, None, None]
    assert_close(block(x), expect)


def test_gc_graph_is_rank_one_and_never_n_by_n():
    block = nonlocalnet.build_block("gc", 8, dim=2).double()
    x = x_of((2, 8, 6, 5))
    graph = block.build_graph(x)
    assert isinstance(graph, aff.UnaryGraph) and graph.backend == "lowrank"
    a = block.affinity(x)
    assert a.shape == (2, 30, 30)
    assert torch.allclose(a, a[:, :1].expand_as(a))  # every query sees the same weights: A = 1·aᵀ
    assert torch.allclose(a.sum(-1), torch.ones(2, 30, dtype=torch.float64))
    assert int(torch.linalg.matrix_rank(a[0])) == 1
    v = torch.randn(2, 30, 3, dtype=torch.float64)
    av = graph.matmul(v)
    assert av.stride(1) == 0  # one context per batch item, broadcast over positions
    assert_close(av, a @ v)

    # N = 96² = 9216: a dense A would be 9216² float32 = 324 MiB; GC stays near its activations
    big = nonlocalnet.build_block("gc", 16, dim=2)
    xb = torch.randn(1, 16, 96, 96)
    with torch.no_grad():
        peak = peak_bytes(lambda: big(xb))
    n = 96 * 96
    assert peak < n * n * 4 / 50, peak


def test_gc_zero_init_is_identity_and_the_gate_starts_at_half():
    x = x_of((2, 8, 4, 4))
    gc = nonlocalnet.build_block("gc", 8).double()
    assert torch.equal(gc(x), x)
    gate = nonlocalnet.build_block("gc", 8, fusion="mul").double()
    assert_close(gate(x), 0.5 * x)  # mmcv / GCNet: the last conv of each transform is zero-initialized


def test_gc_gradcheck_add_mul():
    block = randomize(nonlocalnet.build_block("gc", 4, dim=2, fusion="add_mul", bottleneck_channels=2, units=2))
    x = x_of((1, 4, 3, 2), requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_unary_kernel_on_other_presets():
    """kernel='unary' works with any filter: GCNet's 'simplified NL' is nl with the unary kernel."""
    for name in ("nl", "snl"):
        block = randomize(nonlocalnet.build_block(name, 8, dim=2, kernel="unary"))
        x = x_of((2, 8, 4, 5))
        assert block.edges.normalization == "softmax"
        assert_close(block(x), ref.forward(block, x))


# --------------------------------------------------------------------------------------- DNL
def test_dnl_affinity_is_whitened_pairwise_plus_unary():
    block = randomize(nonlocalnet.build_block("dnl", 8, dim=2))
    x = x_of((2, 8, 4, 5))
    pair, a = dnl_terms(block, x)  # C_s = 4, τ = 0.05 (the preset's and mmseg's default)
    expect = pair + a[:, None, :]
    got = block.affinity(x)
    assert_close(got, expect)
    assert torch.allclose(got.sum(-1), torch.full((2, 20), 2.0, dtype=torch.float64))  # two stochastic terms
    assert block.build_graph(x).backend == "sdpa+lowrank"


@pytest.mark.parametrize("kernel", ["dot_product", "gaussian", "concatenation"])
def test_dnl_with_other_pairwise_kernels(kernel):
    block = randomize(nonlocalnet.build_block("dnl", 8, dim=1, kernel=kernel))
    x = x_of((2, 8, 9))
    assert_close(block(x), ref.forward(block, x))
    assert_close(block.affinity(x), ref.affinity(block, x))


def test_dnl_gradcheck_train_mode():
    block = randomize(nonlocalnet.build_block("dnl", 4, dim=1, temperature=0.5))
    block.train()
    x = x_of((1, 4, 5), requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-6)


def test_dnl_pairwise_term_on_sdpa_is_linear_in_memory():
    """The pairwise term runs on fused attention: peak memory far below one N × N matrix, unlike dense."""
    torch.manual_seed(0)
    n_side = 48
    n = n_side * n_side
    x = torch.randn(1, 16, n_side, n_side)
    peaks = {}
    for backend in ("sdpa", "dense"):
        block = nonlocalnet.build_block("dnl", 16, backend=backend).eval()
        with torch.no_grad():
            peaks[backend] = peak_bytes(lambda b=block: b(x))
    nn_bytes = n * n * 4
    assert peaks["dense"] > nn_bytes, peaks
    assert peaks["sdpa"] < nn_bytes / 8, peaks


def test_dnl_zero_init_is_identity():
    x = x_of((2, 8, 4, 4))
    block = nonlocalnet.build_block("dnl", 8).double().eval()
    assert torch.equal(block(x), x)


# --------------------------------------------------------------------------------------- options
def test_key_channels_gives_c_s_directly():
    block = nonlocalnet.build_block("nl", 72, key_channels=16)  # timm's NonLocalAttn width for C = 72
    assert block.edges.theta.weight.shape == (16, 72, 1, 1)
    assert block.units[0].g.weight.shape == (16, 72, 1, 1)
    cc = nonlocalnet.build_block("cc", 4, key_channels=3)
    assert cc.edges.theta.weight.shape == (3, 4, 1, 1)
    block = randomize(nonlocalnet.build_block("snl", 6, key_channels=5))
    x = x_of((2, 6, 3, 3))
    assert_close(block(x), ref.forward(block, x))


def test_cgnl_float_scale_is_a_multiplier():
    x = x_of((2, 8, 3, 4))
    plain = randomize(nonlocalnet.build_block("cgnl", 8, out_norm="none"))
    half = randomize(nonlocalnet.build_block("cgnl", 8, out_norm="none", scale=0.5))
    unit = randomize(nonlocalnet.build_block("cgnl", 8, out_norm="none", scale=True))
    assert_close(half(x) - x, 0.5 * (plain(x) - x))
    assert_close(unit(x) - x, (plain(x) - x) / (12 * 4) ** 0.5)  # 1/sqrt(N'·C_g), N' = 12, C_g = C_s = 4
    assert_close(half(x), ref.forward(half, x))


@pytest.mark.parametrize("groups", [1, 2])
def test_cgnl_constant_prefactor(groups):
    block = randomize(nonlocalnet.build_block("cgnl", 8, kernel="gaussian", rbf_prefactor="constant",
                                              rbf_gamma=0.1, taylor_order=2, groups=groups))
    x = x_of((2, 8, 3, 4))
    assert_close(block(x), ref.forward(block, x))
    exact = randomize(nonlocalnet.build_block("cgnl", 8, kernel="gaussian", rbf_gamma=0.1, taylor_order=2,
                                              groups=groups))
    assert not torch.allclose(block(x), exact(x))


@pytest.mark.parametrize("name,options,words", [
    ("gc", dict(sub_sample=True), ["sub_sample", "unary"]),
    ("dnl", dict(sub_sample=True), ["sub_sample", "unary"]),
    ("gc", dict(normalization="row"), ["normalization", "softmax"]),
    ("gc", dict(backend="sdpa"), ["sdpa", "unary"]),
    ("gc", dict(fusion="mul", out_norm="bn"), ["out_norm", "mul"]),
    ("gc", dict(fusion="both"), ["fusion", "add_mul"]),
    ("gc", dict(out_map="mlp"), ["out_map", "bottleneck"]),
    ("gc", dict(bottleneck_channels=0), ["bottleneck_channels", "positive"]),
    ("nl", dict(bottleneck_channels=4), ["bottleneck_channels", "out_map"]),
    ("gc", dict(value_proj="no"), ["value_proj", "bool"]),
    ("gc", dict(value_channels=4), ["value_channels", "value_proj"]),
    ("cc", dict(unary=True), ["unary", "cc"]),
    ("cgnl", dict(whiten=True), ["whiten", "cgnl"]),
    ("nl", dict(kernel="dot_product", temperature=0.1), ["temperature", "dot_product"]),
    ("dnl", dict(temperature=0), ["temperature", "positive"]),
    ("nl", dict(key_channels=0), ["key_channels", "positive"]),
    ("nl", dict(key_channels=4, reduction=2), ["key_channels", "reduction"]),
    ("cgnl", dict(rbf_prefactor="approx"), ["rbf_prefactor", "constant"]),
    ("cc", dict(out_map="bottleneck"), ["bottleneck", "out_proj"]),
])
def test_bad_options(name, options, words):
    with pytest.raises((ValueError, TypeError)) as e:
        nonlocalnet.build_block(name, 8, **options)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
