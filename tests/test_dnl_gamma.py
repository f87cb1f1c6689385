"""DNL with the authors' learnable scale of the pairwise term (``pairwise_gamma=True``): ``A = γ·A_pairwise + 1·aᵀ``
with ``γ`` zero at init — Yin et al., "Disentangled Non-Local Neural Networks", ECCV 2020 (arXiv 2006.06668),
whose code multiplies the pairwise output by ``gamma = nn.Parameter(torch.zeros(1))`` before adding the unary
term. Against reference.py and the formula written out, float64, rtol 1e-6; gradcheck in the input and in γ."""

from __future__ import annotations

import pytest
import torch
from _util import assert_close, dnl_terms, randomize
from torch.func import functional_call

import nonlocalnet
from nonlocalnet import reference as ref
from nonlocalnet.analysis import load_run, run_affinity, run_attention, run_spectrum
from nonlocalnet.runs import build_model_from_config, config_from_dict, dump_config, save_weights
from nonlocalnet.testing import check_block


def x_of(shape, seed=1, requires_grad=False):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed),
                       requires_grad=requires_grad)


def test_check_block_with_pairwise_gamma():
    """1/2/3-D and channels_last against the dense literal form, gradcheck, and no N x N tensor on the default path."""
    report = check_block("dnl", 8, pairwise_gamma=True)
    assert report["largest_tensor"] < 2 * 256 * 256, report  # N = 16 x 16: one N x N matrix per sample is more


def test_affinity_is_gamma_times_whitened_pairwise_plus_unary():
    block = randomize(nonlocalnet.build_block("dnl", 8, dim=2, pairwise_gamma=True))
    with torch.no_grad():
        block.edges.gamma.fill_(0.37)
    x = x_of((2, 8, 4, 5))
    pair, a = dnl_terms(block, x)  # C_s = 4, τ = 0.05 (the preset's and mmseg's default)
    expect = 0.37 * pair + a[:, None, :]
    assert_close(block.affinity(x), expect)
    assert_close(ref.affinity(block, x), expect)
    assert torch.allclose(block.affinity(x).sum(-1), torch.full((2, 20), 1.37, dtype=torch.float64))
    assert block.build_graph(x).backend == "sdpa+lowrank"


@pytest.mark.parametrize("backend", ["auto", "dense", "chunked"])
@pytest.mark.parametrize("kernel", ["embedded_gaussian", "dot_product"])
def test_every_backend_matches_reference(backend, kernel):
    block = randomize(nonlocalnet.build_block("dnl", 8, dim=1, kernel=kernel, backend=backend, pairwise_gamma=True))
    x = x_of((2, 8, 9))
    assert_close(block(x), ref.forward(block, x))


def test_gamma_starts_at_zero_so_the_block_starts_as_its_unary_term():
    block = nonlocalnet.build_block("dnl", 8, pairwise_gamma=True, zero_init=False).double()
    assert torch.equal(block.edges.gamma, torch.zeros(1, dtype=torch.float64))
    x = x_of((2, 8, 4, 4))
    a = torch.softmax(block.edges.unary_logits(x.flatten(2).transpose(1, 2)), -1)
    assert_close(block.affinity(x), a[:, None, :].expand(2, 16, 16))
    block.eval()
    before = block(x)
    with torch.no_grad():  # γ = 0: the pairwise projections do not matter
        block.edges.theta.weight.normal_(), block.edges.phi.bias.normal_()
    assert_close(block(x), before)
    # and a nonzero γ changes the output
    with torch.no_grad():
        block.edges.gamma.fill_(0.5)
    assert not torch.allclose(block(x), before)


def test_gamma_gets_its_gradient_gradcheck():
    block = randomize(nonlocalnet.build_block("dnl", 4, dim=1, temperature=0.5, pairwise_gamma=True)).train()
    x = x_of((1, 4, 5))
    gamma = block.edges.gamma.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda g: functional_call(block, {"edges.gamma": g}, (x,)), (gamma,),
                                    eps=1e-6, atol=1e-6)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(block, (xg,), eps=1e-6, atol=1e-6)
    block(x).sum().backward()
    assert block.edges.gamma.grad is not None and block.edges.gamma.grad.abs() > 0


def test_default_dnl_has_no_gamma_and_the_same_state_dict():
    block = nonlocalnet.build_block("dnl", 8)
    assert block.edges.gamma is None and "edges.gamma" not in block.state_dict()
    with_gamma = nonlocalnet.build_block("dnl", 8, pairwise_gamma=True)
    assert set(with_gamma.state_dict()) - set(block.state_dict()) == {"edges.gamma"}
    assert "pairwise_gamma" in nonlocalnet.block_options("dnl")


@pytest.mark.parametrize("name, options, words", [
    ("nl", {"pairwise_gamma": True}, "pairwise_gamma: scales the pairwise term of a pairwise \\+ unary graph"),
    ("gc", {"pairwise_gamma": True}, "pairwise_gamma: .*kernel='unary'"),
    ("dnl", {"pairwise_gamma": 1}, "pairwise_gamma"),
    ("cc", {"pairwise_gamma": True}, "pairwise_gamma"),
])
def test_bad_options(name, options, words):
    with pytest.raises((ValueError, TypeError), match=words):
        nonlocalnet.build_block(name, 8, **options)


def test_analyses_see_gamma(tmp_path, one_thread):
    """attention / affinity / spectrum on a run whose DNL block has γ = 0.5: rows sum to 1 + γ, the notes say so."""
    raw = {"data": {"name": "demo", "size": 16, "options": {"train_size": 16, "test_size": 8}},
           "model": {"arch": "preresnet20", "blocks": [
               {"stage": 2, "after_block": 2, "block": "dnl", "options": {"pairwise_gamma": True}}]},
           "run": {"device": "cpu", "out": str(tmp_path)}}
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    model = build_model_from_config(cfg, 2, load_pretrained_weights=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "nonlocal_block" in name and "norm" in name:
                p.copy_(torch.randn(p.shape) * 0.5)
            if name.endswith("edges.gamma"):
                p.fill_(0.5)
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    meta = {"format": "nonlocalnet", "epoch": 0, "arch": cfg.model.arch, "config": dump_config(cfg)}
    save_weights(tmp_path / "last.safetensors", model.state_dict(), meta)
    loaded = load_run(tmp_path)
    (dnl,) = run_attention(loaded, tmp_path / "a", images=1, top=2)["blocks"]
    assert all(q["row_sum"] == pytest.approx(1.5, abs=1e-6) for q in dnl["images"][0]["queries"])
    assert any("1 + γ = 1.5" in n for n in dnl["notes"])
    (aff,) = run_affinity(loaded, tmp_path / "p", images=1, max_power=2, bins=10)["blocks"]
    assert aff["row_sums"]["min"] == pytest.approx(1.5) and aff["row_sums"]["max"] == pytest.approx(1.5)
    (spec,) = run_spectrum(loaded, tmp_path / "s")["blocks"]  # the weights' spectrum: γ is not a weight matrix
    assert spec["applies"] is True and len(spec["matrices"]) == 1 and any("1 + γ = 1.5" in n for n in spec["notes"])
