"""Spectral filters (heat, Cayley, wavelet): the exact r × r path and the Chebyshev approximation against the
dense reference (eigh / matrix_exp / complex Cayley transform) in float64, gradients, identities, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from _util import assert_close, randomize

import nonlocalnet
from nonlocalnet import reference as ref
from nonlocalnet import spectral as sp
from nonlocalnet import spectral_filters as sf
from nonlocalnet.affinity import LowRankGraph

SPECTRAL = ("cayley", "heat", "wavelet")
SHAPES = {1: (2, 8, 7), 2: (2, 8, 5, 4), 3: (2, 8, 3, 4, 3)}


def _x(shape, seed=1, scale=1.0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale


# auto (= the exact lowrank path, asserted below) at every dim and stage size; the explicit backends at 2-D
PRESET_CASES = ([(n, d, u, "auto") for n in SPECTRAL for d in (1, 2, 3) for u in (1, 2)]
                + [(n, 2, u, b) for n in SPECTRAL for u in (1, 2) for b in ("lowrank", "dense", "chunked")])


@pytest.mark.parametrize("name,dim,units,backend", PRESET_CASES)
def test_preset_matches_reference(name, dim, units, backend):
    """auto/lowrank: the exact r × r path. dense/chunked: the Chebyshev expansion, at K = 40 equal to the
    exact response to 1e-6 (its error against K: test_chebyshev_converges_at_the_analytic_rate)."""
    block = randomize(nonlocalnet.build_block(name, 8, dim=dim, units=units, backend=backend, memory_budget=0.0005,
                                              approx_order=40))
    block.train(units == 2)
    x = _x(SHAPES[dim])
    with torch.no_grad():
        assert_close(block(x), ref.forward(block, x))
    if backend in ("auto", "lowrank"):
        assert block.build_graph(x).backend == "lowrank"


@pytest.mark.parametrize("name", SPECTRAL)
@pytest.mark.parametrize("order", [0, 1, 3])
def test_orders(name, order):
    block = randomize(nonlocalnet.build_block(name, 8, dim=1, order=order))
    assert len(block.units[0].w) == sf.n_terms(name, order)
    x = _x(SHAPES[1])
    assert_close(block(x), ref.forward(block, x))


# wavelet terms are products of heat terms in the same algebra: one kernel for it is enough
FACTORIZABLE = [(k, n, f) for k in ("dot_product", "relu_dot", "double_attention")
                for n in ("count", "row", "symmetric", "none") for f in SPECTRAL
                if f != "wavelet" or k == "dot_product"]


@pytest.mark.parametrize("kernel,normalization,name", FACTORIZABLE)
def test_every_factorizable_graph_is_exact(kernel, normalization, name):
    """Any normalization: the filter is the matrix function (exp, resolvent) of A, exact through the core.
    Non-symmetric A: the reference is matrix_exp / the dense complex Cayley transform."""
    block = randomize(nonlocalnet.build_block(name, 8, dim=2, kernel=kernel, normalization=normalization,
                                              spectral_path="exact"), std=0.2)
    x = _x((1, 8, 3, 4), scale=0.5)
    method = "eigh" if normalization == "symmetric" else "expm"
    assert_close(block(x), ref.forward(block, x, spectral_method=method))


@pytest.mark.parametrize("name", SPECTRAL)
def test_approximation_on_exp_kernels(name):
    """sdpa (softmax, non-symmetric A) and symmetric exp graphs: the Chebyshev expansion of the response.
    Its error against the exact matrix function is measured; heat and wavelet (entire responses) converge
    on the unit disk; Cayley's poles at 1 + i/h limit it (docs/spectral.md)."""
    errs = []
    for k in (4, 8, 16):
        block = randomize(nonlocalnet.build_block(name, 8, dim=2, kernel="embedded_gaussian",
                                                  normalization="softmax", backend="sdpa", approx_order=k,
                                                  scale=True))
        x = _x((2, 8, 4, 4))
        r = ref.forward(block, x, spectral_method="expm")
        errs.append(float(((block(x) - r).abs().max() / r.abs().max()).detach()))
    assert errs[0] > errs[1] > errs[2]
    if name != "cayley":
        assert errs[2] < 1e-6
    sym = randomize(nonlocalnet.build_block(name, 8, dim=2, kernel="embedded_gaussian", normalization="symmetric",
                                            approx_order=40, scale=True))
    x = _x((2, 8, 4, 4))
    assert_close(sym(x), ref.forward(sym, x))


def test_criss_cross_graph_takes_the_approximation():
    block = randomize(nonlocalnet.build_block("cc", 8, dim=2, reduction=2, filter="heat", out_proj=True,
                                              value_channels=4, approx_order=24))
    x = _x((1, 8, 3, 4))
    assert_close(block(x), ref.forward(block, x, spectral_method="expm"))


def _core(seed=0, n=12, c=3, dead_channel=False, zero_rows=()):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(1, n, c, generator=g, dtype=torch.float64)
    q = torch.rand(1, n, c, generator=g, dtype=torch.float64)
    if dead_channel:
        p[..., 0] = 0
        q[..., 0] = 0
    for i in zero_rows:
        p[:, i] = 0
        q[:, i] = 0
    return LowRankGraph(p, q, "symmetric")


@pytest.mark.parametrize("name", SPECTRAL)
def test_chebyshev_converges_at_the_analytic_rate(name):
    """Chebyshev interpolation of an analytic response converges like ρ^-K, ρ the largest Bernstein ellipse
    parameter where the response is analytic: Cayley's poles at λ = 1 + i/h (h = 1: ρ = |z + √(z²−1)| ≈ 2.89,
    order R: the error carries a factor K^(R−1)); heat and wavelet are entire (faster than any ρ)."""
    graph = _core(n=30, c=3)
    z = _x((1, 30, 2))
    scales = sf.initial_scales(name, 2).double()
    exact = sf.filter_terms(name, 2, scales, graph, z, path="exact")
    errs = {}
    for k in (4, 8, 12, 16, 24):
        approx = sf.filter_terms(name, 2, scales, graph, z, path="chebyshev", approx_order=k)
        errs[k] = max(float((a - e).abs().max()) for a, e in zip(approx, exact))
    if name == "cayley":
        zc = complex(1, 1)
        rho = abs(zc + (zc * zc - 1) ** 0.5)
        for k, e in errs.items():
            assert e <= 50 * k * rho ** (-k), (k, e)
        assert errs[24] > 1e-13  # and it is not faster than that (the bound is tight up to a constant)
        assert errs[24] >= 1e-3 * 24 * rho ** (-24)
    else:
        ratios = [errs[k + 4] / errs[k] for k in (4, 8, 12)]
        assert ratios[0] < 1e-2 and ratios[1] < ratios[0] and ratios[2] < ratios[1]  # super-geometric
        assert errs[16] < 1e-10


def test_heat_at_t0_is_identity_and_cayley_order0():
    graph = _core()
    s = sp.core_matrix(graph.u, graph.v)
    z = _x((1, 12, 3))
    (out,) = sp.apply(graph.u, graph.v, [sp.heat(s, torch.tensor(0.0, dtype=torch.float64))], z)
    assert_close(out, z, rtol=1e-15)
    # cayley of order 0: F = Z W_0
    block = randomize(nonlocalnet.build_block("cayley", 8, dim=1, order=0, out_norm="none"))
    x = _x((2, 8, 5))
    tok = x.transpose(1, 2)
    u = block.units[0]
    expected = tok + (tok @ u.g.weight.flatten(1).T) @ u.w[0].weight.flatten(1).T
    assert_close(block(x), expected.transpose(1, 2), rtol=1e-14)


def test_core_algebra_identities():
    graph = _core(seed=3)
    a = graph.dense()
    s = sp.core_matrix(graph.u, graph.v)
    eye = torch.eye(12, dtype=torch.float64)

    def dense(el):
        return el[0] * eye + graph.u.to(el[1].dtype) @ el[1] @ graph.v.transpose(1, 2).to(el[1].dtype)

    t = 0.7
    assert torch.allclose(dense(sp.expm(s, t)), torch.linalg.matrix_exp(t * a), rtol=1e-12, atol=1e-13)
    r = sp.resolvent(s, 1.5 + 0.5j)
    direct = torch.linalg.inv((1.5 + 0.5j) * eye - a.to(torch.complex128))
    assert torch.allclose(dense(r), direct, rtol=1e-12, atol=1e-13)
    # exp(tA) exp(-tA) = I in the algebra
    prod = sp.mul(sp.expm(s, t), sp.expm(s, -t), s)
    assert torch.allclose(dense(prod), eye.expand(1, 12, 12), atol=1e-12)


@pytest.mark.parametrize("name", SPECTRAL)
@pytest.mark.parametrize("case", ["zero_rows", "dead_channel", "n1"])
@pytest.mark.parametrize("form", ["core", "dense"])
def test_degenerate_graphs(name, case, form):
    """Zero-degree rows, a dead relu channel (G = UᵀU singular), N = 1 < r: exact, no NaN, finite gradients
    equal to the reference's (matrix_exp: eigh's gradient is undefined at repeated eigenvalues), on both exact
    forms (the dense one's eigh has repeated eigenvalues here: its Daleckii–Krein backward does not mind)."""
    block = randomize(nonlocalnet.build_block(name, 8, dim=2, units=2)).eval()
    _force_form(block, form)
    x = _x((1, 8, 1, 1) if case == "n1" else (2, 8, 3, 4))
    with torch.no_grad():
        if case == "zero_rows":  # no bias: x = 0 at 5 positions of item 0 gives θ = φ = 0 there, zero degree
            x[0, :, 0, :] = 0
            x[0, :, 1, 0] = 0
        if case == "dead_channel":  # relu(θ)_0 = 0 everywhere: a zero column of U, G = UᵀU singular
            block.edges.theta.weight[0] = 0
    x.requires_grad_(True)
    if case == "zero_rows":
        d = block.build_graph(x).left
        assert (d == 0).any()
    params = [x] + list(block.parameters())
    y = block(x)
    r = ref.forward(block, x, spectral_method="expm")
    assert_close(y, r)
    assert_close(y, ref.forward(block, x))
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), params, allow_unused=True)
    rgrads = torch.autograd.grad((r * gy).sum(), params, allow_unused=True)
    for a, b in zip(grads, rgrads):
        if b is None:
            continue
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name,backend", [(n, b) for n in SPECTRAL for b in ("lowrank", "dense")]
                         + [("heat", "chunked")])
def test_gradcheck(name, backend):
    """Input and every parameter, the spectral scales (h, t, s) included."""
    block = randomize(nonlocalnet.build_block(name, 4, dim=2, backend=backend, units=2, memory_budget=0.0004,
                                              approx_order=6 if backend == "chunked" else 24)).eval()
    x = torch.randn(1, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in block.named_parameters() if n.endswith("log_scales")]
    assert len(names) == 2
    start = [block.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def fn(x, *log_scales):
        return torch.func.functional_call(block, dict(zip(names, log_scales)), (x,))

    # fast_mode: a random projection of the Jacobian (the full one is checked for the polynomial filters)
    assert torch.autograd.gradcheck(fn, (x, *start), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
    if backend == "lowrank":
        params = list(block.parameters())
        y = block(x)
        g = torch.randn_like(y)
        grads = torch.autograd.grad((y * g).sum(), params)
        r = ref.forward(block, x, spectral_method="expm")
        rgrads = torch.autograd.grad((r * g).sum(), params)
        for a, b in zip(grads, rgrads):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def _force_form(block, form):
    for unit in block.units:
        unit.spectral.form = form


def _initial_scales(block):
    with torch.no_grad():
        for unit in block.units:
            unit.spectral.log_scales.copy_(sf.initial_scales(unit.spectral.name, unit.spectral.order).log())
    return block


@pytest.mark.parametrize("name", SPECTRAL)
@pytest.mark.parametrize("normalization", ["symmetric", "row", "none"])
@pytest.mark.parametrize("form", ["core", "dense"])
def test_both_exact_forms_match_the_reference(name, normalization, form):
    """The r×r core and the N×N form (symmetric A: one eigh, Daleckii–Krein backward; otherwise the same algebra
    on N×N) give the reference's values and gradients (input, weights, scales), here with N = 12 > r = 8."""
    block = randomize(nonlocalnet.build_block(name, 8, dim=2, units=2, normalization=normalization)).eval()
    _force_form(block, form)
    x = _x((2, 8, 3, 4)).requires_grad_(True)
    params = [x] + list(block.parameters())
    y = block(x)
    r = ref.forward(block, x, spectral_method="expm")
    assert_close(y, r)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), params)
    rgrads = torch.autograd.grad((r * gy).sum(), params)
    for a, b in zip(grads, rgrads):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", SPECTRAL)
def test_gradcheck_dense_form(name):
    """gradcheck of the N×N form's custom backward (eigh + divided differences), scales included, N = 6 < r = 8."""
    block = _force_form_ret(randomize(nonlocalnet.build_block(name, 8, dim=2, order=2)).eval(), "dense")
    x = torch.randn(1, 8, 3, 2, dtype=torch.float64, requires_grad=True)
    (nm,) = [n for n, _ in block.named_parameters() if n.endswith("log_scales")]
    start = block.get_parameter(nm).detach().clone().requires_grad_(True)

    def fn(x, log_scales):
        return torch.func.functional_call(block, {nm: log_scales}, (x,))

    assert torch.autograd.gradcheck(fn, (x, start), eps=1e-6, atol=1e-6, rtol=1e-5)


def _force_form_ret(block, form):
    _force_form(block, form)
    return block


def test_divided_differences_are_the_derivative_at_equal_eigenvalues():
    """Γ[λ, λ] = B'(λ), and Γ[λ_i, λ_j] is continuous as λ_j → λ_i (no cancellation): against autograd's B'."""
    lam = torch.tensor([[-0.9, -0.2, 0.0, 0.3, 0.3 + 1e-12, 0.999]], dtype=torch.float64)
    for name, order in (("heat", 3), ("cayley", 3), ("wavelet", 3)):
        scales = sf.initial_scales(name, order).double() * 3
        gam = sf.divided_differences(name, order, scales, lam)
        lr = lam.clone().requires_grad_(True)
        f = sf.responses(name, order, scales, lr)
        for t in range(f.shape[0]):
            (d,) = torch.autograd.grad(f[t].sum(), lr, retain_graph=True, allow_unused=True)
            d = torch.zeros_like(lam) if d is None else d
            assert torch.allclose(gam[t].diagonal(dim1=-2, dim2=-1), d, rtol=1e-12, atol=1e-12), (name, t)
            assert torch.allclose(gam[t][0, 3, 4], d[0, 3], rtol=1e-9, atol=1e-12), (name, t)
        fd = f.detach()
        off = (fd[:, 0, 1] - fd[:, 0, 5]) / (lam[0, 1] - lam[0, 5])
        assert torch.allclose(gam[:, 0, 1, 5], off, rtol=1e-10, atol=1e-13)


def test_exact_form_is_chosen_by_cost(monkeypatch):
    """At ResNet res4 (C = 1024, C_s = 512: r = 1024) with N = 7² … 14², the dense N×N form; where N ≫ r the
    core; the non-symmetric graphs take the N×N algebra where N < r. And the block takes the chosen form."""
    for name in SPECTRAL:
        order = sf.DEFAULT_ORDER[name]
        for n in (49, 100, 196):
            assert sf.exact_form(name, order, n, 1024, 512, symmetric=True) == "dense"
        assert sf.exact_form(name, order, 4096, 64, 32, symmetric=True) == "core"
        assert sf.exact_form(name, order, 4 * 64 + 1, 64, 32, symmetric=True) == "core"  # N > 4r: never dense
        assert sf.exact_form(name, order, 49, 1024, 512, symmetric=False) == "dense"
        assert sf.exact_form(name, order, 2048, 1024, 512, symmetric=False) == "core"
    assert sf.exact_form("cayley", 2, 256, 64, 32, symmetric=True) == "core"  # one r×r solve: cheap
    taken = []
    monkeypatch.setattr(sp, "core_matrix", lambda *a, f=sp.core_matrix: taken.append("core") or f(*a))
    monkeypatch.setattr(sp, "symmetric_functions", lambda *a, f=sp.symmetric_functions: taken.append("dense") or f(*a))
    block = nonlocalnet.build_block("heat", 32).eval()  # r = 32
    block(torch.randn(1, 32, 4, 4))  # N = 16
    block(torch.randn(1, 32, 24, 24))  # N = 576 > 4r
    assert taken == ["dense", "core"]


ORDER_SWEEP = [(n, o) for n in SPECTRAL for o in sorted({0, 1, 2, 3, 5, 8, 12, 16, 24, sf.MAX_ORDER[n]})
               if o <= sf.MAX_ORDER[n]]


@pytest.mark.parametrize("name,order", ORDER_SWEEP)
def test_every_order_is_finite_and_exact(name, order):
    """Every accepted order (wavelet: scales up to 2^15), both exact forms: the reference in float64, finite
    gradients, float32 within 1e-4 (the bound of MAX_ORDER)."""
    x = _x((2, 8, 3, 4))
    for form in ("core", "dense"):
        block = _initial_scales(randomize(nonlocalnet.build_block(name, 8, dim=2, order=order))).eval()
        _force_form(block, form)
        xg = x.clone().requires_grad_(True)
        y = block(xg)
        assert_close(y, ref.forward(block, x))
        grads = torch.autograd.grad(y.square().sum(), [xg] + list(block.parameters()), allow_unused=True)
        assert all(torch.isfinite(g).all() for g in grads if g is not None), (form, order)
        y32 = block.float()(x.float())
        assert torch.isfinite(y32).all()
        assert float((y32.double() - y).abs().max() / y.abs().max()) < 1e-4


def test_heat_kernel_at_large_scales_does_not_overflow():
    """exp(−tL) at t = 2048 (a wavelet scale of order 12): e^{tS} alone overflows (the cause of the all-NaN
    wavelet of order 12); the shifted block exponential gives the dense matrix_exp's (tiny) values."""
    graph = _core(seed=2)
    s = sp.core_matrix(graph.u, graph.v)
    a = graph.dense()
    eye = torch.eye(12, dtype=torch.float64)
    for t in (1.0, 50.0, 2048.0, 2.0**15):  # up to the largest initial scale (wavelet J = 16: s_0 = 2^15)
        alpha, m = sp.heat(s, torch.tensor(t, dtype=torch.float64))
        dense = alpha * eye + graph.u @ m @ graph.v.transpose(1, 2)
        expected = torch.linalg.matrix_exp(-t * (eye - a))
        assert torch.isfinite(dense).all()
        assert torch.allclose(dense, expected, rtol=1e-8, atol=1e-12), (t, float((dense - expected).abs().max()))
    assert not torch.isfinite(sp.expm(s, 2048.0)[1]).all()  # the unshifted form: what the fix avoids


def test_order_and_approx_order_bounds():
    for name in SPECTRAL:
        with pytest.raises(ValueError, match=rf"order: expected an int in \[0, {sf.MAX_ORDER[name]}\]"):
            nonlocalnet.build_block(name, 8, order=sf.MAX_ORDER[name] + 1)
        for k in (0, sf.MAX_APPROX_ORDER + 1, 100000):
            with pytest.raises(ValueError, match=rf"approx_order: expected an int in \[1, {sf.MAX_APPROX_ORDER}\]"):
                nonlocalnet.build_block(name, 8, spectral_path="chebyshev", approx_order=k)
    with pytest.raises(ValueError, match="wavelet scales J.*float32"):
        nonlocalnet.build_block("wavelet", 8, order=200)
    # a coarse approximation is accepted with a warning that gives its measured error and a sufficient order
    with pytest.warns(UserWarning, match=r"approx_order=2: .*'heat'.* off by up to 0\.\d+ .*approx_order=7 is within"):
        nonlocalnet.build_block("heat", 8, spectral_path="chebyshev", approx_order=2)
    err = sf.approximation_error("heat", 2, sf.initial_scales("heat", 2).double(), 2)
    assert 1e-2 < err < 1  # the order-2 interpolant is off by a few percent
    assert sf.approximation_error("heat", 2, sf.initial_scales("heat", 2).double(), 24) < 1e-13
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nonlocalnet.build_block("heat", 8, approx_order=2)  # exact path: the approximation is not used, no warning
        nonlocalnet.build_block("heat", 8, spectral_path="chebyshev", approx_order=24)


def test_float32_exact_path():
    """Float32 factors, float64 core algebra: relative error of the output ~1e-7."""
    block = randomize(nonlocalnet.build_block("cayley", 16, dim=2, order=3))
    x = _x((2, 16, 12, 12))
    r = ref.forward(block, x)
    y = block.float()(x.float()).double()
    err = float(((y - r).abs().max() / r.abs().max()).detach())
    assert err < 1e-5, err


def test_exact_spectrum_from_the_core():
    for norm, sym in (("symmetric", True), ("row", False)):
        g = torch.Generator().manual_seed(4)
        p, q = torch.rand(2, 40, 3, generator=g, dtype=torch.float64), torch.rand(2, 40, 3, generator=g,
                                                                                  dtype=torch.float64)
        graph = LowRankGraph(p, q, norm)
        lam = sp.eigenvalues(graph.u, graph.v, symmetric=sym)
        a = graph.dense()
        if sym:
            assert torch.allclose(lam, torch.linalg.eigvalsh(a), atol=1e-12)
        else:
            dense = torch.linalg.eigvals(a)
            for b in range(2):
                got = sorted(lam[b].tolist(), key=lambda c: (round(c.real, 8), round(c.imag, 8)))
                want = sorted(dense[b].tolist(), key=lambda c: (round(c.real, 8), round(c.imag, 8)))
                assert max(abs(x - y) for x, y in zip(got, want)) < 1e-10


def test_graph_spectrum():
    block = randomize(nonlocalnet.build_block("snl", 8, dim=2))
    x = _x((2, 8, 5, 6))
    lam, real = sp.spectrum(block.build_graph(x))
    assert real and lam.shape == (2, 30)
    assert torch.allclose(lam, torch.linalg.eigvalsh(ref.affinity(block, x)), atol=1e-12)
    dense = nonlocalnet.build_block("snl", 8, dim=2, backend="dense").double()
    with pytest.raises(ValueError, match="factorizable"):
        sp.spectrum(dense.build_graph(x))


@pytest.mark.parametrize("name", SPECTRAL + ("snl", "gsnl", "cheby", "ns"))
def test_responses_are_the_gain_on_eigenvectors(name):
    """For every filter, B_t(A) u = B_t(λ) u on each eigenvector u of the symmetric A."""
    block = randomize(nonlocalnet.build_block(name, 8, dim=1, **({"kernel": "relu_dot",
                                                                   "normalization": "symmetric"}
                                                                  if name == "ns" else {})))
    x = _x((1, 8, 9))
    a = block.affinity(x)[0]
    lam, vec = torch.linalg.eigh(a)
    unit = block.units[0]
    gains = unit.responses(lam)
    graph = block.build_graph(x)
    basis_out = (unit.spectral(graph, vec.unsqueeze(0)) if unit.spectral is not None else
                 nonlocalnet.filters.apply_filter(graph.matmul, vec.unsqueeze(0), unit.coef_rows))
    for t, out in enumerate(basis_out):
        assert torch.allclose(out[0], vec * gains[t].detach(), atol=1e-10)


def test_responses_values():
    lam = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    heat = sf.responses("heat", 1, torch.tensor([2.0], dtype=torch.float64), lam)
    assert torch.allclose(heat[1], torch.exp(torch.tensor([-4.0, -2.0, 0.0], dtype=torch.float64)))
    cay = sf.responses("cayley", 1, torch.tensor([1.0], dtype=torch.float64), lam)
    # λ = 0: λ_L = 1, (1 − i)/(1 + i) = −i; λ = 1: λ_L = 0 → −1
    assert torch.allclose(cay[1:, 1], torch.tensor([0.0, -1.0], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(cay[1:, 2], torch.tensor([-1.0, 0.0], dtype=torch.float64), atol=1e-15)
    wav = sf.responses("wavelet", 1, torch.tensor([1.0, 1.0], dtype=torch.float64), lam)
    assert torch.allclose(wav[1], torch.tensor([2 * math.exp(-1), 1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("opts,match", [
    (dict(sub_sample=True), "sub_sample"),
    (dict(order=-1), "order"),
    (dict(approx_order=-2), "approx_order"),
    (dict(approx_order=0), "approx_order"),
    (dict(order=65), "order"),
    (dict(spectral_path="fast"), "spectral_path"),
    (dict(spectral_path="exact", kernel="embedded_gaussian", normalization="symmetric"), "spectral_path"),
    (dict(unary=True), "unary"),
])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        nonlocalnet.build_block("heat", 8, **opts)


def test_bad_options_other_blocks():
    with pytest.raises(ValueError, match="approx_order"):
        nonlocalnet.build_block("snl", 8, approx_order=4)
    with pytest.raises(ValueError, match="cgnl"):
        nonlocalnet.build_block("cgnl", 8, filter="heat")
