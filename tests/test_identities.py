"""The papers' identities, edge cases (zero degrees, N = 1, odd sub-sampling), dtypes, layouts, compile."""

from __future__ import annotations

import pytest
import torch
from _util import assert_close, randomize

import nonlocalnet
from nonlocalnet import reference as ref
from nonlocalnet.blocks import Affinity
from nonlocalnet.testing import largest_tensor


def _copy(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    with torch.no_grad():
        dst.copy_(src)


def snl_and(other: str, **opts):
    snl = randomize(nonlocalnet.build_block("snl", 8))
    common = dict(kernel="relu_dot", normalization="symmetric", out_norm="bn_relu", zero_init=False, bias=False)
    o = randomize(nonlocalnet.build_block(other, 8, **common, **opts), seed=5)
    o.edges.load_state_dict(snl.edges.state_dict())
    o.units[0].g.load_state_dict(snl.units[0].g.state_dict())
    o.units[0].norm.load_state_dict(snl.units[0].norm.state_dict())
    return snl, o


def test_snl_with_w1_zero_is_nl():
    snl, nl = snl_and("nl")
    with torch.no_grad():
        snl.units[0].w[0].weight.zero_()
        nl.units[0].w[0].weight.copy_(snl.units[0].w[1].weight)
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    snl.eval(), nl.eval()
    assert_close(snl(x), nl(x))


def test_snl_with_w1_minus_w2_is_ns():
    snl, ns = snl_and("ns")
    with torch.no_grad():
        snl.units[0].w[0].weight.copy_(-snl.units[0].w[1].weight)
        ns.units[0].w[0].weight.copy_(snl.units[0].w[1].weight)
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    snl.eval(), ns.eval()
    assert_close(snl(x), ns(x))
    # and NS really is (A - I) Z W: a zero response for a constant signal on a row-stochastic graph
    nsrow = nonlocalnet.build_block("ns", 8, out_norm="none", bias=False).double()
    const = torch.ones(1, 8, 3, 3, dtype=torch.float64)
    assert_close(nsrow(const), const, rtol=1e-12)


def test_cheby_order_1_is_snl():
    snl = randomize(nonlocalnet.build_block("snl", 8))
    ch = nonlocalnet.build_block("cheby", 8, order=1).double()
    ch.load_state_dict(snl.state_dict())
    x = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    for mode in (False, True):
        snl.train(mode), ch.train(mode)
        assert_close(ch(x), snl(x), rtol=1e-12)


def test_gsnl_matches_eq10():
    """Y = X + relu(BN(Z W_1 + A Z W_2 + (2A - I) Z W_3)), authors' output norm.

    Eq. 10 of Zhu, She, Zhang, Guo, "A Spectral Nonlocal Block for Neural Networks", ICLR 2020 submission
    (OpenReview rkgb9kSKwS).
    """
    block = randomize(nonlocalnet.build_block("gsnl", 8)).eval()
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    a = block.affinity(x)
    u = block.units[0]
    xt = x.flatten(2).transpose(1, 2)
    z = xt @ u.g.weight.flatten(1).T
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    w = [m.weight.flatten(1).T for m in u.w]
    f = z @ w[0] + a @ z @ w[1] + (2 * a - eye) @ z @ w[2]
    bn = u.norm.bn
    y = xt + torch.relu((f - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
    assert_close(block(x), y.transpose(1, 2).reshape(x.shape))


def test_stage_computes_affinity_once_from_stage_input(monkeypatch):
    calls = []
    original = Affinity.forward

    def counting(self, x, spatial):
        calls.append(x.detach().clone())
        return original(self, x, spatial)

    monkeypatch.setattr(Affinity, "forward", counting)
    block = randomize(nonlocalnet.build_block("snl", 8, units=3)).eval()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    y = block(x)
    assert len(calls) == 1
    assert torch.equal(calls[0], x.flatten(2).transpose(1, 2))
    # a stage of 3 units differs from the same units each recomputing A from their own input
    seq = x
    for unit in block.units:
        single = nonlocalnet.build_block("snl", 8).double().eval()
        single.edges.load_state_dict(block.edges.state_dict())
        single.units[0].load_state_dict(unit.state_dict())
        seq = single(seq)
    assert (seq - y).abs().max() > 1e-6
    assert_close(y, ref.forward(block, x))


def test_sym_normalized_spectrum_in_unit_interval():
    block = randomize(nonlocalnet.build_block("snl", 8))
    a = block.affinity(torch.randn(2, 8, 6, 6, dtype=torch.float64))
    assert torch.allclose(a, a.transpose(1, 2))
    ev = torch.linalg.eigvalsh(a)
    assert ev.max() <= 1 + 1e-9 and ev.min() >= -1 - 1e-9
    assert torch.allclose(ev.max(-1).values, torch.ones(2, dtype=a.dtype))  # non-negative graph: λ_max = 1


@pytest.mark.parametrize("backend", ["lowrank", "dense", "chunked"])
def test_zero_degree_rows_are_zero_not_nan(backend):
    block = nonlocalnet.build_block("snl", 4, backend=backend, memory_budget=0.0001).double()
    with torch.no_grad():
        block.edges.theta.weight.copy_(torch.eye(2, 4).view(2, 4, 1, 1))
        block.edges.phi.weight.copy_(torch.eye(2, 4).view(2, 4, 1, 1))
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64).abs()
    x[0, :2, 0, :] = -1.0  # first row of positions: relu(θ) = relu(φ) = 0 -> degree 0
    x.requires_grad_(True)
    a = block.affinity(x)
    assert torch.isfinite(a).all() and (a[0, :3] == 0).all() and (a[0, :, :3] == 0).all()
    y = block(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert_close(y, ref.forward(block, x))
    # every position isolated: A = 0, the block still returns finite values
    xneg = -torch.rand(1, 4, 3, 3, dtype=torch.float64)
    assert (block.affinity(xneg) == 0).all()
    assert torch.isfinite(block(xneg)).all()


@pytest.mark.parametrize("name", nonlocalnet.list_blocks())
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_single_position(name, dim):
    # neighborhood: a window of 1 (kernel_size > the input is an error, tests/test_axial_neighborhood_heads.py)
    opts = {"reduction": 2} if name == "cc" else {"kernel_size": 1} if name == "neighborhood" else {}
    block = randomize(nonlocalnet.build_block(name, 8, dim=dim, **opts))
    x = torch.randn(2, 8, *([1] * dim), dtype=torch.float64)
    y = block(x)
    assert torch.isfinite(y).all()
    assert_close(y, ref.forward(block, x))


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (2, 8, 3, 3), (2, 8, 2, 5, 5), (2, 8, 9)])
def test_odd_subsampling(shape):
    dim = len(shape) - 2
    for name in ("nl", "snl", "a2"):
        opts = {"normalization": "row"} if name == "snl" else {}
        block = randomize(nonlocalnet.build_block(name, 8, dim=dim, sub_sample=True, **opts))
        x = torch.randn(shape, dtype=torch.float64)
        y = block(x)
        assert torch.isfinite(y).all()
        assert_close(y, ref.forward(block, x))


def test_float32_matches_float64_reference():
    for name in nonlocalnet.list_blocks():
        opts = {"reduction": 2} if name == "cc" else {}
        block = randomize(nonlocalnet.build_block(name, 8, **opts))
        x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
        r = ref.forward(block, x)
        y = block.float()(x.float())
        assert y.dtype == torch.float32
        assert_close(y.double(), r, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["nl", "snl", "gsnl", "cheby", "a2", "cgnl", "cc", "ns"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_autocast_low_precision(name, dtype, seed):
    opts = {"reduction": 2} if name == "cc" else {}
    block = randomize(nonlocalnet.build_block(name, 16, **opts)).float().eval()
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    r = block(x)
    with torch.autocast("cpu", dtype=dtype):
        y = block(x)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    # Worst relative errors measured over 25 seeds (bf16 / fp16): nl 1.6e-2 / 1.7e-3, snl family <= 6.5e-3 / 1e-3,
    # cgnl 4e-3 / 5e-4 (its global sum in float32), cc 5.1e-2 / 6.2e-3 (bf16 logits, applied twice: recurrence 2).
    tol = {"cc": 8e-2}.get(name, 3e-2) if dtype == torch.bfloat16 else 1e-2
    assert_close(y, r, rtol=tol)


def test_degrees_in_float32_under_autocast():
    block = randomize(nonlocalnet.build_block("snl", 16)).float()
    x = torch.randn(2, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = block.build_graph(x)
        assert g.p.dtype == torch.bfloat16  # projections in bf16 ...
        assert g.left.dtype == torch.float32  # ... degrees in float32


@pytest.mark.parametrize("name", nonlocalnet.list_blocks())
def test_channels_last(name):
    opts = {"reduction": 2} if name == "cc" else {}
    block = randomize(nonlocalnet.build_block(name, 8, **opts)).float().eval()
    x = torch.randn(2, 8, 6, 5)
    xc = x.to(memory_format=torch.channels_last)
    y, yc = block(x), block(xc)
    assert yc.is_contiguous(memory_format=torch.channels_last)
    assert y.is_contiguous()
    assert torch.allclose(y, yc, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,opts", [("snl", {}), ("gsnl", {}), ("cheby", {"order": 3}), ("a2", {}),
                                       ("snl", {"units": 3}), ("nl", {"kernel": "dot_product"}),
                                       ("cgnl", {}), ("cc", {"reduction": 2}), ("nl", {"backend": "sdpa"})])
def test_fast_paths_never_build_n_by_n(name, opts):
    block = nonlocalnet.build_block(name, 8, **opts)
    x = torch.randn(2, 8, 24, 24, requires_grad=True)
    n = 24 * 24
    largest = largest_tensor(block, x)
    assert largest < n * n, f"{name} built a tensor of {largest} elements (N² = {n * n})"


def test_chunked_respects_memory_budget():
    budget_mib = 1.0
    block = nonlocalnet.build_block("nl", 8, kernel="concatenation", normalization="symmetric",
                                    backend="chunked", memory_budget=budget_mib)
    x = torch.randn(2, 8, 32, 32, requires_grad=True)
    largest = largest_tensor(block, x)
    assert largest * 4 <= budget_mib * 2**20
    assert largest < 1024 * 1024


def test_auto_never_exceeds_budget():
    block = nonlocalnet.build_block("nl", 8, memory_budget=1.0)  # exp kernel, softmax
    x = torch.randn(2, 8, 40, 40)
    assert block.build_graph(x).backend in ("sdpa", "chunked")
    block = nonlocalnet.build_block("nl", 8, kernel="concatenation", memory_budget=1.0)
    assert block.build_graph(x).backend == "chunked"
    small = torch.randn(2, 8, 8, 8)
    assert block.build_graph(small).backend == "dense"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["snl", "nl", "cc"])
def test_torch_compile_same_output(name):
    opts = {"reduction": 2} if name == "cc" else {}
    block = randomize(nonlocalnet.build_block(name, 8, **opts)).float().eval()
    x = torch.randn(2, 8, 8, 8)
    torch._dynamo.reset()  # a fresh cache per block: the recompile limit is per code object
    compiled = torch.compile(block, fullgraph=True)
    assert torch.allclose(compiled(x), block(x), atol=1e-5, rtol=1e-5)
