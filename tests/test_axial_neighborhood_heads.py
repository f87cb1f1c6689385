"""Axial attention (a product graph), neighborhood attention (a banded graph) and multi-head graphs: each against
its literal dense form (float64, rtol 1e-6) in 1/2/3-D, gradcheck, no N x N tensor, the errors, the analyses and
bench (docs/framework.md "Graph modes")."""

from __future__ import annotations

import pytest
import torch
from _util import randomize
from torch.testing import assert_close

import nonlocalnet
from nonlocalnet import affinity as aff
from nonlocalnet import reference as ref
from nonlocalnet.testing import check_block, largest_tensor

SHAPES = {1: (2, 8, 7), 2: (2, 8, 5, 4), 3: (2, 8, 3, 4, 3)}
RTOL, ATOL = 1e-6, 1e-9


def _x(shape, seed=1):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- the graphs themselves
def test_neighborhood_window_is_nat_s():
    """1-D, L = 7, k = 3: the window of i is i-1..i+1, shifted inward at the two ends (NAT)."""
    idx = aff.neighborhood_index((7,), 3)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [4, 5, 6]]
    assert aff.neighborhood_index((5,), 5).tolist() == [[0, 1, 2, 3, 4]] * 5  # k = L: every key
    assert aff.neighborhood_index((4,), 1).tolist() == [[0], [1], [2], [3]]  # k = 1: the position itself
    # 2-D (3 x 4), k = 3: query (0, 3) (flat 3) sees rows 0..2, columns 1..3
    idx2 = aff.neighborhood_index((3, 4), 3)
    assert sorted(idx2[3].tolist()) == [r * 4 + c for r in range(3) for c in (1, 2, 3)]
    mask = ref.neighborhood_mask((3, 4, 5), 3)
    assert (mask.sum(1) == 27).all() and mask.diagonal().all()  # k^d keys each, the query among them
    for i, row in enumerate(aff.neighborhood_index((3, 4, 5), 3).tolist()):
        assert sorted(row) == mask[i].nonzero().flatten().tolist()  # index arithmetic == the loops' mask


def test_axial_is_height_then_width():
    """A = A_W A_H: the H-axis graph is applied first (Axial-DeepLab's order), written out with explicit loops
    over the columns and rows of a 3 x 4 grid."""
    b = randomize(nonlocalnet.build_block("axial", 4, dim=2))
    x = _x((1, 4, 3, 4))
    tok = x.movedim(1, -1).reshape(1, 12, 4)
    q, k = ref._lin(b.edges.theta, tok)[0], ref._lin(b.edges.phi, tok)[0]
    s = b.edges.scale_value
    v = torch.randn(12, 2, dtype=torch.float64)

    def attend(rows):  # one softmax over the positions `rows`, applied to `cur`
        out = cur.clone()
        for i in rows:
            w = torch.softmax(torch.stack([s * q[i] @ k[j] for j in rows]), 0)
            out[i] = sum(wj * cur[j] for wj, j in zip(w, rows))
        return out

    cur = v
    after_h = torch.zeros_like(v)
    for c in range(4):  # along H: column c
        col = [r * 4 + c for r in range(3)]
        after_h[col] = attend(col)[col]
    cur = after_h
    want = torch.zeros_like(v)
    for r in range(3):  # then along W: row r, on the output of the H step
        row = [r * 4 + c for c in range(4)]
        want[row] = attend(row)[row]
    graph = b.build_graph(x)
    assert_close(graph.matmul(v[None])[0], want, rtol=1e-12, atol=1e-12)
    assert_close(b.affinity(x)[0] @ v, want, rtol=1e-12, atol=1e-12)
    h_then_w = graph.graphs[1].dense() @ graph.graphs[0].dense()
    w_then_h = graph.graphs[0].dense() @ graph.graphs[1].dense()
    assert_close(b.affinity(x), h_then_w, rtol=1e-12, atol=1e-12)
    assert (h_then_w - w_then_h).abs().max() > 1e-3  # the order is a real choice


def test_axial_in_1d_is_nl():
    axial = randomize(nonlocalnet.build_block("axial", 8, dim=1))
    nl = nonlocalnet.build_block("nl", 8, dim=1, scale=True).double()
    nl.load_state_dict(axial.state_dict())
    x = _x((2, 8, 9))
    assert_close(axial(x), nl(x), rtol=1e-12, atol=1e-12)


def test_neighborhood_with_the_whole_input_as_window_is_nl():
    nb = randomize(nonlocalnet.build_block("neighborhood", 8, dim=2, kernel_size=5))
    nl = nonlocalnet.build_block("nl", 8, dim=2, scale=True).double()
    nl.load_state_dict(nb.state_dict())
    x = _x((2, 8, 5, 5))
    assert_close(nb(x), nl(x), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------- exact against the literal
CASES = [("axial", {}), ("axial", {"backend": "dense"}), ("axial", {"filter": "cheby", "order": 2}),
         ("axial", {"units": 2, "filter": "ns"}), ("axial", {"kernel": "gaussian"}),
         ("neighborhood", {}), ("neighborhood", {"kernel_size": 1}), ("neighborhood", {"backend": "dense"}),
         ("neighborhood", {"filter": "gsnl"}), ("neighborhood", {"units": 2, "recurrence": 2}),
         ("nl", {"heads": 2}), ("nl", {"heads": 4, "backend": "dense"}),
         ("nl", {"heads": 2, "backend": "chunked", "memory_budget": 0.0005}),
         ("nl", {"heads": 2, "normalization": "symmetric", "filter": "cheby", "order": 2}),
         ("nl", {"heads": 2, "sub_sample": True}), ("nl", {"heads": 2, "kernel": "gaussian"}),
         ("dnl", {"heads": 2}), ("ns", {"heads": 4, "units": 2}), ("nl", {"heads": 2, "value_channels": 6}),
         ("axial", {"heads": 2}), ("neighborhood", {"heads": 2}), ("neighborhood", {"heads": 2, "backend": "dense"})]


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("training", [False, True])
def test_equals_the_literal_form(name, opts, dim, training):
    block = randomize(nonlocalnet.build_block(name, 8, dim=dim, **opts)).train(training)
    x = _x(SHAPES[dim])
    assert_close(block(x), ref.forward(block, x), rtol=RTOL, atol=ATOL)
    assert_close(block.affinity(x), ref.affinity(block, x), rtol=RTOL, atol=ATOL)


def test_neighborhood_larger_windows():
    for ks, shape in [(5, (2, 8, 6, 5)), (7, (1, 8, 7, 9)), (3, (1, 8, 3, 5, 4)), (5, (2, 8, 11))]:
        block = randomize(nonlocalnet.build_block("neighborhood", 8, dim=len(shape) - 2, kernel_size=ks))
        x = _x(shape)
        assert_close(block(x), ref.forward(block, x), rtol=RTOL, atol=ATOL)


def test_heads_literally():
    """heads = 2: each head's softmax over its channel group of θ, φ (scale 1/sqrt(C_s/h)), applied to its
    channel group of Z, concatenated, then W and BN (Vaswani et al. 2017, §3.2.2), written out here."""
    block = randomize(nonlocalnet.build_block("nl", 8, dim=1, heads=2, scale=True, key_channels=4,
                                              value_channels=6)).eval()
    x = _x((2, 8, 7))
    tok = x.transpose(1, 2)
    q, k = ref._lin(block.edges.theta, tok), ref._lin(block.edges.phi, tok)
    z = ref._lin(block.units[0].g, tok)
    heads = [torch.softmax(q[..., 2 * i:2 * i + 2] @ k[..., 2 * i:2 * i + 2].transpose(1, 2) / 2 ** 0.5, -1)
             @ z[..., 3 * i:3 * i + 3] for i in range(2)]
    f = ref._lin(block.units[0].w[0], torch.cat(heads, -1))
    want = tok + ref.out_norm(block.units[0].norm, f)
    assert_close(block(x), want.transpose(1, 2), rtol=1e-10, atol=1e-12)
    assert block.edges.scale_value == pytest.approx(1 / 2 ** 0.5)


@pytest.mark.parametrize("name", ["efficient", "a2"])
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("backend", ["auto", "lowrank", "dense"])
def test_heads_of_double_attention(name, dim, backend):
    """A²'s kernel with heads = 2 (the Efficient Attention authors' head_count): each head's queries softmaxed
    over its own channel group, its keys over the positions, against the reference's per-head literal graphs; the
    low-rank path forms no N x N' tensor."""
    block = randomize(nonlocalnet.build_block(name, 8, dim=dim, heads=2, backend=backend)).eval()
    x = _x(SHAPES[dim])
    assert_close(block(x), ref.forward(block, x), rtol=RTOL, atol=ATOL)
    if backend != "dense" and dim == 2:  # nothing larger than the 2 x 8 x 576 input (a graph: 2 x 576 x 576)
        assert largest_tensor(block, torch.randn(2, 8, 24, 24, dtype=torch.float64)) <= 2 * 8 * 576


def test_heads_of_double_attention_literally():
    """heads = 2 on the efficient preset, written out: head i's softmax over channels of its θ group times the
    softmax over positions of its φ group, applied to its group of Z; one softmax over all 4 channels differs."""
    block = randomize(nonlocalnet.build_block("efficient", 8, dim=1, heads=2, key_channels=4,
                                              value_channels=6)).eval()
    x = _x((2, 8, 7))
    tok = x.transpose(1, 2)
    q, k = ref._lin(block.edges.theta, tok), ref._lin(block.edges.phi, tok)
    z = ref._lin(block.units[0].g, tok)
    heads = [torch.softmax(q[..., 2 * i:2 * i + 2], -1) @ torch.softmax(k[..., 2 * i:2 * i + 2], 1).transpose(1, 2)
             @ z[..., 3 * i:3 * i + 3] for i in range(2)]
    want = tok + ref._lin(block.units[0].w[0], torch.cat(heads, -1))
    assert_close(block(x), want.transpose(1, 2), rtol=1e-10, atol=1e-12)
    one = nonlocalnet.build_block("efficient", 8, dim=1, key_channels=4, value_channels=6, dtype=torch.float64).eval()
    one.load_state_dict(block.state_dict())
    assert (one(x) - block(x)).abs().max() > 1e-3


def test_heads_keep_the_state_dict():
    for name in ("nl", "axial", "neighborhood", "dnl"):
        one, two = nonlocalnet.build_block(name, 8), nonlocalnet.build_block(name, 8, heads=2)
        assert {k: v.shape for k, v in one.state_dict().items()} == {k: v.shape for k, v in two.state_dict().items()}
    assert "heads" not in nonlocalnet.build_block("nl", 8).options  # the default is not shown (repr, configs)


@pytest.mark.parametrize("name,opts", [("axial", {}), ("neighborhood", {}), ("nl", {"heads": 2}),
                                       ("axial", {"heads": 2, "units": 2}), ("neighborhood", {"heads": 2}),
                                       ("nl", {"heads": 2, "backend": "dense", "normalization": "symmetric"}),
                                       ("efficient", {"heads": 2}), ("a2", {"heads": 2, "backend": "dense"})])
def test_gradcheck(name, opts):
    block = randomize(nonlocalnet.build_block(name, 4, dim=2, **opts)).eval()
    x = _x((1, 4, 3, 4)).requires_grad_(True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)
    params = list(block.parameters())
    y = block(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), params, allow_unused=True)
    rgrads = torch.autograd.grad((ref.forward(block, x) * g).sum(), params, allow_unused=True)
    for a, b in zip(grads, rgrads):
        if b is not None:
            assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name,opts", [("axial", {}), ("neighborhood", {}), ("nl", {"heads": 2}),
                                       ("axial", {"heads": 2}), ("neighborhood", {"heads": 4})])
def test_public_check(name, opts):
    report = check_block(name, **opts)
    assert all(report[f"{d}d"] < 1e-8 for d in (1, 2, 3)) and report["gradcheck"] == 0.0
    assert report["largest_tensor"] < (16 * 16) ** 2


@pytest.mark.parametrize("name,opts", [("axial", {}), ("neighborhood", {}), ("neighborhood", {"kernel_size": 7}),
                                       ("axial", {"filter": "cheby", "order": 2}), ("nl", {"heads": 2}),
                                       ("axial", {"heads": 2}), ("neighborhood", {"heads": 2})])
def test_never_n_by_n(name, opts):
    block = nonlocalnet.build_block(name, 8, **opts)
    n = 24 * 24
    largest = largest_tensor(block, torch.randn(2, 8, 24, 24))
    assert largest < n * n, f"{name} {opts} built a tensor of {largest} elements (N² = {n * n})"
    assert block.build_graph(torch.randn(2, 8, 24, 24)).backend in ("axial", "neighborhood", "sdpa")


def test_cost_is_linear_in_the_axes():
    """The largest tensor of the axial graph grows as N·(H+W) and that of the neighborhood graph as N·k²."""
    sizes = {}
    for s in (16, 32):
        x = torch.randn(1, 8, s, s)
        sizes[s] = (largest_tensor(nonlocalnet.build_block("axial", 8, units=1), x, backward=False),
                    largest_tensor(nonlocalnet.build_block("neighborhood", 8), x, backward=False))
    assert sizes[32][0] <= 8 * sizes[16][0]  # N·L: x8 from 16 to 32 (N² would be x16)
    assert sizes[32][1] <= 4 * sizes[16][1]  # N·k²: x4


# ----------------------------------------------------------------------------------------- filters on these graphs
def test_spectral_filters_run_as_the_chebyshev_approximation():
    """The product graph is not symmetric: the spectral filters run as their Chebyshev expansion on A·v products
    (as on CC's graph), compared with the matrix exponential of the dense A; 'exact' is refused."""
    block = randomize(nonlocalnet.build_block("axial", 8, dim=2, filter="heat", approx_order=24))
    x = _x((1, 8, 3, 4))
    assert_close(block(x), ref.forward(block, x, spectral_method="expm"), rtol=RTOL, atol=ATOL)
    nb = randomize(nonlocalnet.build_block("neighborhood", 8, dim=1, filter="heat", approx_order=24))
    x1 = _x((1, 8, 6))
    assert_close(nb(x1), ref.forward(nb, x1, spectral_method="expm"), rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="spectral_path='exact' needs a factorizable kernel"):
        nonlocalnet.build_block("axial", 8, filter="heat", spectral_path="exact")
    # per head: the same spectral filter on each head's symmetric graph (the reference: eigh per head)
    sym = randomize(nonlocalnet.build_block("nl", 8, dim=2, heads=2, normalization="symmetric", filter="heat",
                                            approx_order=40))
    assert_close(sym(x), ref.forward(sym, x), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("value", [2, 0, -1, True, 3.0, "3"])
def test_kernel_size_must_be_odd_positive(value):
    with pytest.raises(ValueError, match="kernel_size: expected an odd int >= 1"):
        nonlocalnet.build_block("neighborhood", 8, kernel_size=value)


def test_kernel_size_larger_than_the_input():
    block = nonlocalnet.build_block("neighborhood", 8, dim=3, kernel_size=3)
    with pytest.raises(ValueError, match=r"x: spatial size \(2, 4, 4\) is smaller than kernel_size=3 along axis 0"):
        block(torch.randn(1, 8, 2, 4, 4))
    with pytest.raises(ValueError, match="kernel_size"):
        nonlocalnet.build_block("nl", 8, kernel_size=3)  # an option of the neighborhood graph only


@pytest.mark.parametrize("name,opts,words", [
    ("nl", dict(heads=3), ["heads (3) must divide C_s (4) and value_channels (4)"]),
    ("nl", dict(heads=2, value_channels=3), ["value_channels (3)"]),
    ("nl", dict(heads=3, kernel="gaussian", value_channels=6), ["in_channels", "(8)"]),
    ("nl", dict(heads=2, kernel="dot_product"), ["heads=2", "kernels embedded_gaussian, gaussian, double_attention",
                                                 "dot_product"]),
    ("efficient", dict(heads=3, key_channels=6, value_channels=4), ["heads (3)", "value_channels (4)"]),
    ("cc", dict(heads=2), ["heads=2", "crisscross"]),
    ("cgnl", dict(heads=2), ["heads=2"]),
    ("gc", dict(heads=2), ["heads=2", "unary"]),
    ("nl", dict(heads=0), ["heads: expected a positive int"]),
    ("nl", dict(heads=True), ["heads: expected a positive int"]),
    ("axial", dict(sub_sample=True), ["sub_sample", "axial"]),
    ("neighborhood", dict(sub_sample=True), ["sub_sample", "neighborhood"]),
    ("axial", dict(normalization="symmetric"), ["normalization: axial", "'softmax', 'row'"]),
    ("axial", dict(kernel="dot_product"), ["kernel"]),
    ("neighborhood", dict(backend="sdpa"), ["backend", "'auto', 'dense'"]),
    ("axial", dict(unary=True), ["unary"]),
])
def test_errors_name_the_argument(name, opts, words):
    with pytest.raises(ValueError) as e:
        nonlocalnet.build_block(name, 8, **opts)
    for w in words:
        assert w in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------------- around the blocks
def test_listed_analyzed_and_benched(tmp_path, capsys):
    from nonlocalnet.analysis import (
        Batch,
        run_affinity,
        run_attention,
        run_cost,
        run_dynamics,
        run_filter,
        run_spectrum,
    )
    from nonlocalnet.bench import run as bench_run
    from nonlocalnet.cli import main
    from nonlocalnet.models import build_model, insert_blocks
    from nonlocalnet.runs import Loaded

    assert main(["blocks"]) == 0
    out = capsys.readouterr().out
    assert "axial" in out and "neighborhood" in out and "Neighborhood Attention Transformer" in out
    net = build_model("preresnet20", 10)
    insert_blocks(net, [{"stage": 1, "after_block": 2, "block": "axial"},
                        {"stage": 2, "after_block": 2, "block": "neighborhood", "options": {"heads": 2}}],
                  input_shape=(3, 16, 16))
    loaded = Loaded.from_model(net, input_shape=(3, 16, 16))
    assert len(loaded.blocks) == 2
    batch = Batch.from_tensor(torch.randn(2, 3, 16, 16))
    a = run_affinity(loaded, tmp_path / "aff", batch=batch)
    assert [(b["n"], b["n_keys"]) for b in a["blocks"]] == [(256, 256), (64, 64)]
    run_attention(loaded, tmp_path / "att", batch=batch, images=1)
    assert list((tmp_path / "att").glob("*.png"))
    f = run_filter(loaded, tmp_path / "filt", batch=batch, images=1)
    assert len(f["blocks"]) == 2
    run_spectrum(loaded, tmp_path / "spec")
    run_dynamics(loaded, tmp_path / "dyn", batch=batch)
    c = run_cost(loaded, tmp_path / "cost")
    assert c
    rows = bench_run(blocks=["axial", "neighborhood"], sizes=[8], batch=1, channels=16, modes=["fwd"], repeats=1)
    got = {(r.block, r.backend): r for r in rows}
    assert set(got) == {("axial", "auto"), ("axial", "dense"), ("neighborhood", "auto"), ("neighborhood", "dense")}
    assert got["axial", "auto"].taken == "axial" and got["neighborhood", "auto"].taken == "neighborhood"
    assert all(r.time_ms > 0 for r in rows)


@pytest.mark.parametrize("name,opts", [("nl", {"heads": 2}), ("axial", {"heads": 2})])
def test_heads_compile_and_export(name, opts):
    """Multi-head graphs trace without graph breaks (fullgraph, forward and backward) and export."""
    block = randomize(nonlocalnet.build_block(name, 8, **opts)).float().eval()
    x = torch.randn(2, 8, 6, 5, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert torch.allclose(y, block(x), atol=1e-6, rtol=1e-6)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    ep = torch.export.export(block, (x.detach(),))
    assert torch.allclose(ep.module()(x.detach()), block(x.detach()), atol=1e-6, rtol=1e-6)
