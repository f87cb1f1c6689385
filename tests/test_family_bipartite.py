"""Blocks whose keys are not the positions: APNB (pyramid-pooled keys and values, sub-sampling generalised),
External Attention (a bipartite graph against learned memory slots) and Agent Attention (positions through n pooled
agents: A²'s low-rank structure), each against a literal re-implementation of the authors' forward written here with
torch.nn.functional only, the dense reference, and the public check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _util import assert_structured_path
from torch.testing import assert_close

import nonlocalnet
from nonlocalnet import reference as ref
from nonlocalnet.testing import check_block, largest_tensor, randomize

DT = torch.float64


def sq(conv):
    return conv.weight.flatten(1)


# --------------------------------------------------------------------------------------- APNB
def psp(t, sizes):
    """The APNB authors' PSPModule: an adaptive average pool to (s, s) per size, flattened and concatenated."""
    b, c = t.shape[:2]
    return torch.cat([F.adaptive_avg_pool2d(t, (s, s)).reshape(b, c, -1) for s in sizes], -1)


def apnb_attention(x, wq, bq, wk, bk, wv, bv, ww, bw, sizes):
    """The APNB authors' _SelfAttentionBlock.forward (queries θ, keys φ; the authors share one key/query
    projection with BN+ReLU, here they are two plain 1x1 convs): project, then pool keys and values,
    softmax(θ psp(φ)ᵀ / sqrt(C_k)), then W; our preset adds the input (the residual form)."""
    b, c, h, w = x.shape
    ck = wq.shape[0]
    value = psp(F.conv2d(x, wv[..., None, None], bv), sizes)  # (B, C_v, S)
    query = F.conv2d(x, wq[..., None, None], bq).reshape(b, ck, -1).transpose(1, 2)  # (B, N, C_k)
    key = psp(F.conv2d(x, wk[..., None, None], bk), sizes)  # (B, C_k, S)
    sim = torch.softmax(ck ** -0.5 * (query @ key), dim=-1)
    context = (sim @ value.transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
    return F.conv2d(context, ww[..., None, None], bw)


@pytest.mark.parametrize("sizes", [(1, 3, 6, 8), (2, 3)])
def test_apnb_equals_the_authors_attention(sizes):
    block = randomize(nonlocalnet.build_block("apnb", 8, pool_sizes=sizes))
    e, u = block.edges, block.units[0]
    x = torch.randn(2, 8, 7, 9, dtype=DT)
    want = x + apnb_attention(x, sq(e.theta), e.theta.bias, sq(e.phi), e.phi.bias, sq(u.g), u.g.bias,
                              sq(u.w[0]), u.w[0].bias, sizes)
    assert_close(block(x), want, rtol=1e-10, atol=1e-10)
    assert_close(ref.forward(block, x), want, rtol=1e-10, atol=1e-10)
    assert block.affinity(x).shape == (2, 63, sum(s * s for s in sizes))


def test_apnb_is_checked_and_never_n_by_n():
    report = check_block("apnb")
    assert max(v for k, v in report.items() if k != "largest_tensor") < 1e-12
    block = nonlocalnet.build_block("apnb", 8)
    x = torch.randn(2, 8, 24, 24)
    n = 24 * 24
    assert largest_tensor(block, x) < n * n
    assert block.affinity(x).shape == (2, n, 110)  # 1 + 9 + 36 + 64 pyramid bins
    assert block.build_graph(x).backend == "sdpa"  # softmax over the 110 keys on fused attention
    # 1-D: s bins per size, 3-D: s^3 (the authors' PSPModule in 1-D and 3-D)
    assert nonlocalnet.build_block("apnb", 8, dim=1).affinity(torch.randn(1, 8, 20)).shape == (1, 20, 18)
    b3 = nonlocalnet.build_block("apnb", 8, dim=3, pool_sizes=(1, 2))
    assert b3.affinity(torch.randn(1, 8, 3, 4, 5)).shape == (1, 60, 9)
    # a new apnb block is the identity (W zero-initialized, as the authors' code)
    assert_close(block(x), x)


def test_apnb_pools_with_adaptive_bins():
    """The pyramid keys equal PyTorch's adaptive pools (the library) and the reference's explicit loops."""
    t = torch.randn(2, 5 * 7, 3, dtype=DT)
    want = psp(t.transpose(1, 2).reshape(2, 3, 5, 7), (1, 3, 6)).transpose(1, 2)
    assert_close(ref.pyramid_pool(t, (5, 7), (1, 3, 6)), want, rtol=1e-12, atol=1e-12)
    from nonlocalnet import affinity as aff  # the ONNX-export form (bin matrices) equals the adaptive pools
    for spatial, grid in [((5, 7), (3, 6)), ((2, 3, 4), (1, 7, 2)), ((9,), (4,))]:
        tt = torch.randn(2, math.prod(spatial), 3, dtype=DT)
        assert_close(aff.adaptive_pool_matrices(tt, spatial, grid), aff.adaptive_pool_tokens(tt, spatial, grid),
                     rtol=1e-12, atol=1e-12)
    t3 = torch.randn(1, 2 * 3 * 4, 2, dtype=DT)
    got = ref.pyramid_pool(t3, (2, 3, 4), (2,))
    grid = t3.reshape(1, 2, 3, 4, 2)
    assert_close(got[0, 0], grid[0, 0, 0:2, 0:2].reshape(-1, 2).mean(0))  # bin (0, 0, 0): rows [0, 2), cols [0, 2)
    assert_close(got[0, 7], grid[0, 1, 1:3, 2:4].reshape(-1, 2).mean(0))  # bin (1, 1, 1): [1, 2), [1, 3), [2, 4)


def test_apnb_other_graphs_and_filters():
    # the pyramid is an option of every position graph that sub-samples: NL's and SNL-style filters of order <= 1
    for name, opts in [("nl", {"sub_sample": True, "pool_sizes": (1, 2)}),
                       ("apnb", {"kernel": "dot_product", "normalization": "count"}),
                       ("apnb", {"filter": "snl"})]:
        report = check_block(name, dims=(1, 2), gradcheck=False, **opts)
        assert report["2d"] < 1e-10, (name, opts, report)


def test_apnb_option_errors():
    with pytest.raises(ValueError, match=r"pool_sizes: expected a non-empty tuple of positive ints"):
        nonlocalnet.build_block("apnb", 8, pool_sizes=(1, 0))
    with pytest.raises(ValueError, match=r"pool_sizes: expected"):
        nonlocalnet.build_block("apnb", 8, pool_sizes=())
    with pytest.raises(ValueError, match=r"pool_sizes: expected"):
        nonlocalnet.build_block("apnb", 8, pool_sizes=3)
    with pytest.raises(ValueError, match=r"pool_sizes: sets how sub_sample=True pools"):
        nonlocalnet.build_block("nl", 8, pool_sizes=(1, 2))
    with pytest.raises(ValueError, match=r"sub_sample: powers of A"):
        nonlocalnet.build_block("apnb", 8, filter="cheby", order=2)
    with pytest.raises(ValueError, match="normalization='symmetric' needs a square affinity"):
        nonlocalnet.build_block("apnb", 8, kernel="relu_dot", normalization="symmetric")


# --------------------------------------------------------------------------------------- External Attention
def external_attention(x, w1, b1, mk, mv, w2, bn_w, bn_b):
    """The External Attention authors' External_attention.forward (EANet, model_torch.py), BatchNorm in training
    mode: conv1 (with bias), linear_0 = M_k, softmax over the positions, l1 over the memory slots with their 1e-9,
    linear_1 = M_v, conv2 (no bias) + BN, the residual, then a ReLU."""
    idn = x
    b, c, h, w = x.shape
    t = F.conv2d(x, w1[..., None, None], b1).reshape(b, c, h * w)
    attn = torch.einsum("sc,bcn->bsn", mk, t)
    attn = torch.softmax(attn, dim=-1)
    attn = attn / (1e-9 + attn.sum(dim=1, keepdim=True))
    t = torch.einsum("cs,bsn->bcn", mv, attn).reshape(b, c, h, w)
    t = F.conv2d(t, w2[..., None, None])
    t = F.batch_norm(t, None, None, bn_w, bn_b, training=True, eps=1e-5)
    return F.relu(t + idn)


def test_external_equals_the_authors_module():
    block = randomize(nonlocalnet.build_block("external", 8, memory_size=5))
    e, u = block.edges, block.units[0]
    with torch.no_grad():
        u.w[0].bias.zero_()  # the authors' conv2 has no bias (one before BatchNorm changes nothing but the stats)
    x = torch.randn(2, 8, 4, 6, dtype=DT)
    want = external_attention(x, sq(e.theta), e.theta.bias, sq(e.memory), sq(u.memory), sq(u.w[0]),
                              u.norm.bn.weight, u.norm.bn.bias)
    assert_close(F.relu(block(x)), want, rtol=1e-10, atol=1e-10)
    assert_close(F.relu(ref.forward(block, x)), want, rtol=1e-10, atol=1e-10)
    assert [n for n, _ in block.named_parameters()] == [
        "edges.theta.weight", "edges.theta.bias", "edges.memory.weight", "units.0.memory.weight",
        "units.0.w.0.weight", "units.0.w.0.bias", "units.0.norm.bn.weight", "units.0.norm.bn.bias"]
    assert e.memory.weight.shape == (5, 8, 1, 1) and u.memory.weight.shape == (8, 5, 1, 1)


def test_external_graph_is_bipartite_and_double_normalized():
    block = randomize(nonlocalnet.build_block("external", 8)).double()
    x = torch.randn(2, 8, 5, 5, dtype=DT)
    a = block.affinity(x)
    assert a.shape == (2, 25, 64)  # N x S, S = memory_size = 64 by default
    assert_close(a, ref.affinity(block, x), rtol=1e-12, atol=1e-14)
    # rows sum to 1 (up to the 1e-9), and each column was a softmax over the positions before the row l1 norm
    rows = a.detach().sum(-1)
    assert float((rows - 1).abs().max()) < 1e-7
    logits = torch.einsum("bnc,sc->bns", ref._lin(block.edges.theta, x.flatten(2).transpose(1, 2)),
                          sq(block.edges.memory))
    col = torch.softmax(logits, 1)
    assert_close(a, col / (1e-9 + col.sum(-1, keepdim=True)), rtol=1e-12, atol=1e-14)


def test_external_softmax_over_slots_is_position_wise():
    """`normalization="softmax"` on the memory graph: a softmax over the slots of each position alone (the
    control of docs/results.md for External Attention's double normalization), checked against the dense reference
    with gradcheck; in eval mode a position's output depends on its own input only."""
    report = check_block("external", normalization="softmax", memory_size=5, dims=(1, 2))
    assert max(v for k, v in report.items() if k != "largest_tensor") < 1e-12
    block = randomize(nonlocalnet.build_block("external", 8, normalization="softmax")).double().eval()
    x = torch.randn(2, 8, 5, 5, dtype=DT)
    a = block.affinity(x)
    logits = torch.einsum("bnc,sc->bns", ref._lin(block.edges.theta, x.flatten(2).transpose(1, 2)),
                          sq(block.edges.memory))
    assert_close(a, torch.softmax(logits, -1), rtol=1e-12, atol=1e-14)
    x2 = x.clone()
    x2[0, :, 1, 3] += 1.0
    with torch.no_grad():
        changed = (block(x2) - block(x)).abs().sum(1)
    assert changed[0, 1, 3] > 1e-3 and int((changed > 1e-12).sum()) == 1  # only the perturbed position moves
    double = randomize(nonlocalnet.build_block("external", 8)).double().eval()
    with torch.no_grad():
        coupled = (double(x2) - double(x)).abs().sum(1)
    assert int((coupled[0] > 1e-12).sum()) == 25  # the double normalization couples every position
    with pytest.raises(ValueError, match="normalization: external .* takes"):
        nonlocalnet.build_block("external", 8, normalization="symmetric")


def test_external_is_checked_and_never_n_by_n():
    for opts in ({}, {"memory_size": 3}, {"eval_mode": True}):
        report = check_block("external", **opts)
        assert max(v for k, v in report.items() if k != "largest_tensor") < 1e-12
    x = torch.randn(2, 8, 24, 24)
    n = 24 * 24
    block = nonlocalnet.build_block("external", 8)
    assert largest_tensor(block, x) < n * n
    assert block.units[0]._paths == ()  # the generic path: the values at the slots are M_v, not Z
    assert block.build_graph(x).backend == "bipartite"
    # other filters of order <= 1 on the same graph (Z = X at the positions, M_v at the slots)
    assert check_block("external", filter="snl", dims=(2,), gradcheck=False)["2d"] < 1e-12
    assert check_block("external", value_proj=True, value_channels=4, dims=(2,), gradcheck=False)["2d"] < 1e-12


def test_external_option_errors():
    with pytest.raises(ValueError, match=r"memory_size: expected a positive int"):
        nonlocalnet.build_block("external", 8, memory_size=0)
    with pytest.raises(ValueError, match=r"filter: external's graph is N x S"):
        nonlocalnet.build_block("external", 8, filter="cheby", order=2)
    with pytest.raises(ValueError, match=r"filter: external's graph is N x S"):
        nonlocalnet.build_block("external", 8, filter="heat")
    with pytest.raises(ValueError, match=r"sub_sample: external's keys are learned memory slots"):
        nonlocalnet.build_block("external", 8, sub_sample=True)
    with pytest.raises(ValueError, match=r"kernel: unknown kernel 'dot_product'"):
        nonlocalnet.build_block("external", 8, kernel="dot_product")
    with pytest.raises(ValueError, match=r"normalization"):
        nonlocalnet.build_block("nl", 8, normalization="double")  # the memory graph's normalization only
    with pytest.raises(ValueError, match=r"option 'memory_size' does not apply to block 'nl'"):
        nonlocalnet.build_block("nl", 8, memory_size=4)


# --------------------------------------------------------------------------------------- Agent Attention
def agent_attention(x, wq, bq, wk, bk, wv, bv, wp, bp, grid):
    """The Agent Attention authors' AgentAttention.forward for one head, without their depthwise conv and position
    biases: agents = AdaptiveAvgPool2d(grid) of the query map, agent_attn = softmax(agents·scale @ kᵀ),
    agent_v = agent_attn @ v, q_attn = softmax(q·scale @ agentsᵀ), out = proj(q_attn @ agent_v); plus the input."""
    b, c, h, w = x.shape
    tok = x.reshape(b, c, -1).transpose(1, 2)
    q, k, v = tok @ wq.T + bq, tok @ wk.T + bk, tok @ wv.T + bv
    scale = q.shape[-1] ** -0.5
    agents = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(b, -1, h, w), grid).reshape(b, q.shape[-1], -1)
    agents = agents.transpose(1, 2)
    agent_v = torch.softmax(agents * scale @ k.transpose(1, 2), -1) @ v
    out = torch.softmax(q * scale @ agents.transpose(1, 2), -1) @ agent_v
    return (out @ wp.T + bp).transpose(1, 2).reshape(b, c, h, w) + x


@pytest.mark.parametrize("agents,grid", [(49, (7, 7)), (4, (2, 2)), ((2, 3), (2, 3))])
def test_agent_equals_the_authors_module(agents, grid):
    block = randomize(nonlocalnet.build_block("agent", 8, agents=agents))
    e, u = block.edges, block.units[0]
    assert e.agent_grid == grid and e.theta.weight.shape == (8, 8, 1, 1)  # one head over all C channels
    x = torch.randn(2, 8, 5, 6, dtype=DT)
    want = agent_attention(x, sq(e.theta), e.theta.bias, sq(e.phi), e.phi.bias, sq(u.g), u.g.bias,
                           sq(u.w[0]), u.w[0].bias, grid)
    assert_close(block(x), want, rtol=1e-10, atol=1e-10)
    assert_close(ref.forward(block, x), want, rtol=1e-10, atol=1e-10)


def test_agent_is_low_rank_checked_and_never_n_by_n(monkeypatch):
    report = check_block("agent")
    assert max(v for k, v in report.items() if k != "largest_tensor") < 1e-12
    block = randomize(nonlocalnet.build_block("agent", 8, agents=9))
    assert block.units[0]._paths[0] == "_lowrank_cf"
    x = torch.randn(2, 8, 6, 7, dtype=DT)
    graph = block.build_graph(x)
    assert graph.backend == "lowrank" and graph.u.shape == (2, 42, 9) and graph.unit_rows  # A = P Vᵀ, rank n
    assert_close(block.affinity(x), ref.affinity(block, x), rtol=1e-12, atol=1e-14)
    assert_close(block.affinity(x).sum(-1), torch.ones(2, 42, dtype=DT))  # rows of both factors sum to 1
    assert_structured_path(block, x, monkeypatch)
    n = 24 * 24
    assert largest_tensor(nonlocalnet.build_block("agent", 8), torch.randn(2, 8, 24, 24)) < n * n


def test_agent_grids_filters_and_errors():
    assert nonlocalnet.build_block("agent", 8, dim=1).edges.agent_grid == (49,)
    assert nonlocalnet.build_block("agent", 8, dim=3).edges.agent_grid == (1, 7, 7)  # 49 is not a cube
    assert nonlocalnet.build_block("agent", 8, dim=3, agents=8).edges.agent_grid == (2, 2, 2)
    # higher orders on the square rank-n graph, and pooled keys (the agents still come from every query)
    assert check_block("agent", agents=4, filter="cheby", order=3, dims=(1, 2), gradcheck=False)["2d"] < 1e-12
    assert check_block("agent", agents=4, sub_sample=True, dims=(2, 3), gradcheck=False)["3d"] < 1e-12
    # the heat filter, exact through the r x r core (A is not symmetric: the reference's matrix exponential)
    block = randomize(nonlocalnet.build_block("agent", 8, agents=4, filter="heat"))
    x = torch.randn(2, 8, 4, 5, dtype=DT)
    assert_close(block(x), ref.forward(block, x, spectral_method="expm"), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"agents: 5 agents do not form a 2-D grid"):
        nonlocalnet.build_block("agent", 8, agents=5)
    with pytest.raises(ValueError, match=r"agents: a grid of 3 sizes"):
        nonlocalnet.build_block("agent", 8, agents=(2, 2, 2))
    with pytest.raises(ValueError, match=r"agents: expected a positive int"):
        nonlocalnet.build_block("agent", 8, agents=0)
    with pytest.raises(ValueError, match=r"normalization"):
        nonlocalnet.build_block("agent", 8, normalization="row")


# --------------------------------------------------------------------------------------- both
@pytest.mark.parametrize("name", ["apnb", "external", "agent"])
def test_listed_analyzed_and_benched(name, tmp_path):
    from nonlocalnet.analysis import Batch, run_affinity, run_attention, run_cost, run_filter, run_spectrum
    from nonlocalnet.bench import run as bench_run
    from nonlocalnet.models import build_model, insert_blocks
    from nonlocalnet.runs import Loaded

    assert name in nonlocalnet.list_blocks()
    net = build_model("preresnet20", 10)
    insert_blocks(net, {"stage": 1, "after_block": 2, "block": name}, input_shape=(3, 16, 16))
    loaded = Loaded.from_model(net, input_shape=(3, 16, 16))
    batch = Batch.from_tensor(torch.randn(2, 3, 16, 16))
    n_keys = {"apnb": 110, "external": 64, "agent": 256}[name]
    aff = run_affinity(loaded, tmp_path / "aff", batch=batch)
    rec = aff["blocks"][0]
    assert (rec["n"], rec["n_keys"]) == (256, n_keys)
    assert ("powers undefined" in rec.get("note", "")) == (name != "agent")  # agent's graph is square
    assert abs(rec["row_sums"]["min"] - 1) < 1e-6 and abs(rec["row_sums"]["max"] - 1) < 1e-6
    att = run_attention(loaded, tmp_path / "att", batch=batch, images=1)
    # key nodes that are not a grid: rows over the N' nodes; agent's keys are the positions
    assert att["blocks"][0]["key_shape"] == ([16, 16] if name == "agent" else None)
    row = np.asarray(att["blocks"][0]["images"][0]["queries"][0]["row"])
    assert row.size == n_keys and abs(row.sum() - 1) < 1e-6
    assert list((tmp_path / "att").glob("*.png"))
    filt = run_filter(loaded, tmp_path / "filt", batch=batch, images=1)
    if name == "agent":  # eigenvalues through the r x r core: rank n = 49, the other N - 49 are 0
        assert "r x r core" in filt["blocks"][0]["lambda_histogram"]["source"]
    else:
        assert "no eigenvalues" in filt["blocks"][0]["lambda_note"]
    spec = run_spectrum(loaded, tmp_path / "spec")
    assert spec["blocks"][0]["matrices"][0]["w_shape"] == [16, 16]
    cost = run_cost(loaded, tmp_path / "cost")
    assert cost["blocks"][0]["n_keys"] == n_keys and cost["blocks"][0]["flops_auto"] > 0
    rows = bench_run(blocks=[name], sizes=[8], batch=1, channels=16, modes=["fwd"], repeats=1)
    assert rows and all(r.time_ms > 0 for r in rows)
    assert {r.taken for r in rows if r.backend == "auto"} == {{"apnb": "sdpa", "external": "bipartite",
                                                               "agent": "lowrank"}[name]}
    assert math.isfinite(rows[0].peak_mib)
