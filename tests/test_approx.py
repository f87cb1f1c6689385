"""The softmax approximations (``approx="performer"`` / ``"nystrom"``, docs/approximations.md): the fast path equals
the literal random-feature / landmark formula of reference.py (float64, 1/2/3-D, every polynomial filter and the
spectral ones), gradcheck, no N x N tensor, the pieces (orthogonal features, segment means, the pseudo-inverse)
against their definitions, the approximation against the exact softmax, and the errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import nonlocalnet
from nonlocalnet import affinity as aff
from nonlocalnet import reference
from nonlocalnet.blocks import NonlocalUnit
from nonlocalnet.cli import main
from nonlocalnet.testing import SHAPES, check_block, largest_tensor, randomize

EG = dict(kernel="embedded_gaussian", normalization="softmax")
# (preset, options): every polynomial filter, DNL's pairwise + unary sum, the Gaussian kernel (no projections)
POLYNOMIAL = [("nl", {}), ("ns", {}), ("snl", EG), ("gsnl", EG), ("cheby", dict(EG, order=3)),
              ("snl", dict(EG, filter="bernstein", order=3)), ("snl", dict(EG, filter="gpr", order=2)),
              ("dnl", {}), ("dnl", dict(pairwise_gamma=True)), ("nl", dict(kernel="gaussian"))]
# m: Performer features (more than, and not a multiple of, C_s = 4: two orthogonal blocks, one cut); Nyström
# landmarks (3 divides none of N = 10, 20 and the gradcheck's 9... but 24; uneven segments are taken)
APPROX = [("performer", 5), ("nystrom", 3)]


@pytest.mark.parametrize("approx,m", APPROX)
@pytest.mark.parametrize("name,options", POLYNOMIAL, ids=[f"{n}-{o.get('filter', o.get('kernel', ''))}-{i}"
                                                          for i, (n, o) in enumerate(POLYNOMIAL)])
def test_fast_path_equals_the_literal_approximation(name, options, approx, m):
    report = check_block(name, approx=approx, approx_features=m, **options)
    assert max(v for k, v in report.items() if k[0].isdigit()) < 1e-12
    assert report["largest_tensor"] < 256**2 / 8  # 16 x 16 positions: no N x N matrix (nor a quarter of one)


@pytest.mark.parametrize("approx,m", [("performer", 5), ("nystrom", 2)])
def test_sub_sampled_keys(approx, m):
    report = check_block("nl", approx=approx, approx_features=m, sub_sample=True, gradcheck=False)
    assert max(v for k, v in report.items() if k[0].isdigit()) < 1e-12


@pytest.mark.parametrize("approx,m", [("performer", 5), ("nystrom", 1)])
def test_pyramid_pooled_keys(approx, m):
    """APNB's keys (the pyramid of pooled grids) under the approximation: N' keys, not N."""
    report = check_block("apnb", approx=approx, approx_features=m)
    assert max(v for k, v in report.items() if k[0].isdigit()) < 1e-12


@pytest.mark.parametrize("approx,m", APPROX)
def test_the_structured_low_rank_path_runs_on_them(approx, m, monkeypatch):
    """The approximate graph is a LowRankGraph, and the polynomial filters take the one-GEMM path on it."""
    block = nonlocalnet.build_block("cheby", 8, order=3, approx=approx, approx_features=m, **EG)
    x = torch.randn(2, 8, 4, 5)
    assert type(block.build_graph(x)) is aff.LowRankGraph
    taken = []
    original = NonlocalUnit._lowrank_cf

    def spy(self, h, graph):
        out = original(self, h, graph)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(NonlocalUnit, "_lowrank_cf", spy)
    block(x)
    assert taken == [True]


@pytest.mark.parametrize("approx,m", APPROX)
@pytest.mark.parametrize("name", ["heat", "cayley", "wavelet"])
def test_spectral_filters_are_exact_on_the_approximate_graph(name, approx, m):
    """A ≈ U Vᵀ is factorizable (not symmetric): the r x r core gives f(Ã) exactly; the reference forms Ã and
    takes matrix_exp (heat, wavelet) or the dense complex inverse (Cayley)."""
    gen = torch.Generator().manual_seed(3)
    for dim in (1, 2, 3):
        block = randomize(nonlocalnet.build_block(name, 8, dim=dim, approx=approx, approx_features=m, **EG))
        x = torch.randn((2, 8) + SHAPES[dim], generator=gen, dtype=torch.float64)
        want = reference.forward(block, x, spectral_method="expm")
        torch.testing.assert_close(block(x), want, rtol=1e-6, atol=1e-9)
    block = randomize(nonlocalnet.build_block(name, 8, approx=approx, approx_features=m, spectral_path="exact", **EG))
    x = torch.randn(1, 8, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


@pytest.mark.parametrize("approx", ["performer", "nystrom"])
def test_no_n_by_n_tensor_at_the_default_m(approx):
    """N = 32 x 32 = 1024 positions, m = 64 (the default): forward and backward stay O(N m)."""
    block = nonlocalnet.build_block("nl", 16, approx=approx)
    n = 32 * 32
    largest = largest_tensor(block, torch.randn(2, 16, 32, 32))
    assert largest <= 2 * n * 64 < n * n // 4


def test_performer_features_are_a_buffer_that_reloads_to_the_same_function():
    torch.manual_seed(0)
    block = nonlocalnet.build_block("nl", 8, approx="performer", approx_features=12).eval()
    w = block.edges.random_features
    assert w.shape == (12, 4) and "edges.random_features" in block.state_dict()
    torch.manual_seed(1)
    other = nonlocalnet.build_block("nl", 8, approx="performer", approx_features=12).eval()
    x = torch.randn(2, 8, 5, 5)
    assert not torch.equal(other.edges.random_features, w)
    other.load_state_dict(block.state_dict())
    torch.testing.assert_close(other(x), block(x), rtol=0, atol=0)
    # orthogonal within each block of C_s = 4 rows; lengths those of Gaussian vectors, not all equal
    for b0 in (0, 4, 8):
        rows = w[b0:b0 + 4].double()
        gram = rows @ rows.T
        torch.testing.assert_close(gram - torch.diag(torch.diagonal(gram)), torch.zeros(4, 4, dtype=torch.float64),
                                   atol=1e-5, rtol=0)
    assert w.norm(dim=1).std() > 0.05
    torch.manual_seed(0)  # drawn from torch's generator: the same seed, the same features
    again = nonlocalnet.build_block("nl", 8, approx="performer", approx_features=12)
    torch.testing.assert_close(again.edges.random_features, w, rtol=0, atol=0)


def test_orthogonal_features_estimate_the_exponential_without_bias():
    """E[φ(x)·φ(y)] = exp(x·y) (Performers, FAVOR+): the softmax estimate converges as m grows, as with i.i.d.
    Gaussian features (a QR without the sign correction does not: its first rows are biased)."""
    gen = torch.Generator().manual_seed(0)
    q = 0.2 * torch.randn(1, 64, 8, generator=gen, dtype=torch.float64)
    k = 0.2 * torch.randn(1, 64, 8, generator=gen, dtype=torch.float64)
    exact = torch.softmax(q @ k.transpose(1, 2), -1)
    errs = []
    for m in (16, 256, 4096):
        w = aff.orthogonal_gaussian(m, 8, dtype=torch.float64, generator=gen)
        a = reference.performer_affinity(q, k, w, 1.0)
        errs.append(float((a - exact).norm() / exact.norm()))
    assert errs[0] > 2 * errs[1] > 4 * errs[2] and errs[2] < 0.03, errs


def test_segment_means_follow_the_authors_extension():
    """N = 10, m = 4: ⌊10/4⌋ = 2, the first (2+1)·4 − 10 = 2 segments of 2 positions, then 2 of 3."""
    t = torch.arange(10, dtype=torch.float64).reshape(1, 10, 1)
    got = aff.segment_means(t, 4)[0, :, 0].tolist()
    assert got == [0.5, 2.5, 5.0, 8.0]
    torch.testing.assert_close(aff.segment_means(t, 4), reference.landmarks(t, 4))
    assert aff.segment_means(t, 5)[0, :, 0].tolist() == [0.5, 2.5, 4.5, 6.5, 8.5]  # m divides N: equal segments


def test_iterative_pinv_approaches_the_pseudo_inverse():
    """Six iterations of the seventh-order method (Razavi et al. 2014) from the paper's Z_0 reach the pseudo-inverse
    of a well-conditioned softmax matrix; an ill-conditioned one needs more (the approximation, not a bug)."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 8, 8, generator=gen, dtype=torch.float64)
    eye = torch.eye(8, dtype=torch.float64)

    def err(a, iterations=6):
        exact = torch.linalg.pinv(a)
        return float((aff.iterative_pinv(a, iterations) - exact).norm() / exact.norm())

    assert err(torch.softmax(noise + 4 * eye, -1)) < 1e-12  # condition numbers 2.0-3.3
    assert err(torch.softmax(noise, -1)) > 0.5  # 32-234: six iterations are far off ...
    assert err(torch.softmax(noise, -1), 20) < 1e-12  # ... twenty are not
    a = torch.softmax(noise, -1)
    z0 = a.transpose(1, 2) / (a.sum(1).amax(-1) * a.sum(2).amax(-1))[:, None, None]  # Aᵀ/(‖A‖₁‖A‖_∞)
    torch.testing.assert_close(aff.iterative_pinv(a, 0), z0)


def test_nystrom_with_every_position_a_landmark_is_near_the_softmax():
    """m = N: the landmarks are the queries and keys themselves, Ã = A Z A with Z ≈ A⁺ (six iterations; the authors'
    code takes the exact softmax there instead, this library the formula at every m)."""
    gen = torch.Generator().manual_seed(0)
    q = 0.5 * torch.randn(2, 16, 4, generator=gen, dtype=torch.float64)
    k = 0.5 * torch.randn(2, 16, 4, generator=gen, dtype=torch.float64)
    exact = torch.softmax(q @ k.transpose(1, 2), -1)
    a = aff.nystrom_graph(q, k, 16, 1.0).dense()
    torch.testing.assert_close(a, reference.nystrom_affinity(q, k, 16, 1.0))
    err = float((a - exact).norm() / exact.norm())
    assert err < 0.05  # 2.4 %: what is left is the six-iteration pseudo-inverse of a near-uniform softmax
    coarse = aff.nystrom_graph(q, k, 4, 1.0).dense()
    assert float((coarse - exact).norm() / exact.norm()) > 2 * err  # fewer landmarks, a coarser approximation


def test_approximations_differ_from_the_exact_block():
    """Same weights: the approximate block is close to the exact one, not equal (the reference is not the softmax)."""
    torch.manual_seed(0)
    exact = randomize(nonlocalnet.build_block("nl", 8, dim=1), std=0.2)
    x = torch.randn(2, 8, 64, dtype=torch.float64)
    want = exact(x)
    for approx, m in (("performer", 256), ("nystrom", 16)):
        b = nonlocalnet.build_block("nl", 8, dim=1, approx=approx, approx_features=m).double()
        b.load_state_dict(exact.state_dict(), strict=False)
        with torch.no_grad():
            err = float((b(x) - want).norm() / (want - x).norm())
        assert 1e-6 < err < 0.5, (approx, err)


@pytest.mark.parametrize("options,match", [
    (dict(kernel="dot_product"), r"approx='performer' approximates the softmax of an exp kernel "
                                 r"\(embedded_gaussian, gaussian\); kernel 'dot_product' is not one \(a factorizable"),
    (dict(kernel="concatenation"), "kernel 'concatenation' is not one"),
    (dict(normalization="symmetric"), "approximates the softmax \\(row\\) normalization, got normalization="
                                      "'symmetric'"),
    (dict(backend="sdpa"), "backend: approx='performer' builds its own factorized graph"),
    (dict(approx_features=0), "approx_features: expected a positive int, got 0"),
    (dict(approx_features=2.5), "approx_features: expected a positive int, got 2.5"),
])
def test_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        nonlocalnet.build_block("nl", 8, **{"approx": "performer", **options})


def test_clear_errors_elsewhere():
    with pytest.raises(ValueError, match="approx: expected None .* or one of 'performer', 'nystrom', got 'linformer'"):
        nonlocalnet.build_block("nl", 8, approx="linformer")
    with pytest.raises(ValueError, match="approx_features: .*give approx too"):
        nonlocalnet.build_block("nl", 8, approx_features=32)
    with pytest.raises(ValueError, match="kernel 'unary' is not one"):
        nonlocalnet.build_block("gc", 8, approx="nystrom")
    with pytest.raises(ValueError, match="kernel 'relu_dot' is not one"):
        nonlocalnet.build_block("snl", 8, approx="nystrom")
    with pytest.raises(ValueError, match="heads: approx='performer' approximates one softmax graph; heads=2"):
        nonlocalnet.build_block("nl", 8, approx="performer", heads=2)
    with pytest.raises(ValueError, match="option 'approx' does not apply to block 'cc'"):
        nonlocalnet.build_block("cc", 8, approx="nystrom")
    block = nonlocalnet.build_block("nl", 8, approx="nystrom", approx_features=64)
    with pytest.raises(ValueError, match="approx_features: approx='nystrom' takes m = 64 landmarks as segment "
                                         "means of the 49 query and 49 key positions and needs m <= 49"):
        block(torch.randn(1, 8, 7, 7))


def test_bench_approx_smoke(tmp_path):
    """`nonlocalnet bench --approx`: every case runs and is recorded, with real errors (no timing assertion)."""
    out = tmp_path / "approx.json"
    assert main(["bench", "--approx", "--sizes", "8", "--video", "2x4x4", "--features", "4", "16", "--channels", "8",
                 "--repeats", "1", "--logit-scales", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    errs = [r for r in data["rows"] if "method" in r]
    assert {(r["method"], r["m"], r["N"]) for r in errs} == {(a, m, n) for a in ("performer", "nystrom")
                                                            for m in (4, 16) for n in (64, 32)}
    assert all(0 < r["err_az"] < 10 and math.isfinite(r["err_out"]) for r in errs)
    nys = {r["m"]: r["err_az"] for r in errs if r["method"] == "nystrom" and r["N"] == 64}
    assert nys[16] < nys[4]  # more landmarks, less error
    timed = [r for r in data["rows"] if "case" in r]
    assert {r["case"] for r in timed} >= {"exact", "performer 16", "nystrom 4"}
    assert all(r["ms"] > 0 and r["peak_mib"] > 0 for r in timed)
    assert len(data["summary"]) == 3 * 4  # targets 1 %, 5 %, 25 % x sizes x methods
    out64 = {r["m"]: r["err_out"] for r in errs if r["method"] == "nystrom" and r["N"] == 64}
    for target in (0.01, 0.05, 0.25):  # the summary's cell: the smallest m within the target
        cell = [s for s in data["summary"] if s["target"] == target and s["N"] == 64 and s["method"] == "nystrom"][0]
        assert cell["m"] == min([m for m, e in out64.items() if e <= target], default=None)
