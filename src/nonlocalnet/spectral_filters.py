"""Graph filters beyond polynomials: Cayley, heat, wavelets (docs/spectral.md).

Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021 (Remark 1 after Theorem 1): a
nonlocal block is a graph filter on a fully connected graph, so other graph filters give other blocks.
Each filter here is a list of terms ``B_t``, each with its own output projection ``W_t``:
``F(A, Z) = Σ_t B_t(A) Z W_t``, as for the polynomial filters (filters.py). With ``L = I − A`` (the
normalized Laplacian for the symmetric normalization; eigenvalue ``λ_L = 1 − λ``):

=========== ==================================================================== ======================
filter      terms ``B_t(λ)``                                                      spectral parameters
=========== ==================================================================== ======================
``heat``    ``1``, ``exp(−t_j λ_L)`` for ``j = 1..n`` (diffusion, one term per     ``t_j > 0``
            scale)
``cayley``  ``1``, ``Re c^j``, ``Im c^j`` for ``j = 1..R``,                       zoom ``h > 0``
            ``c = (hλ_L − i)/(hλ_L + i)`` (Levie et al., "CayleyNets", IEEE TSP
            2018, Eq. 8: ``c_0 + 2 Re Σ_j c_j c^j`` with complex ``c_j``; the real
            and imaginary parts of ``c_j`` are the two real weights ``W``)
``wavelet`` scaling ``exp(−s_0 λ_L)`` (low-pass) and ``J`` band-pass terms            ``s_0..s_J > 0``
            ``g(s_j λ_L)``, ``g(x) = x e^{1−x}`` (peak 1 at ``λ_L = 1/s_j``)
=========== ==================================================================== ======================

The wavelet is Hammond, Vandergheynst and Gribonval's spectral graph wavelet transform ("Wavelets on
graphs via spectral graph theory", ACHA 2011): ``ψ_s = g(sL)`` band-pass with ``g(0) = 0`` and a low-pass
scaling function ``h(L)``. Their experiments use a cubic-spline ``g``; it is piecewise, so no exact
``r × r`` form exists. We use instead the analytic kernel ``g(x) = x e^{1−x}``, which meets their
admissibility condition (``g(0) = 0``, ``∫ g(x)²/x dx < ∞``), and the heat kernel ``e^{−s_0 x}`` as ``h``.

Scales are parametrized as ``exp(ρ)`` (``ρ`` the stored parameter), so they stay positive under any update.

Every filter is defined as the matrix function ``f(A)`` for any square ``A`` (``exp``, resolvent), so it is
defined for every normalization; only for the symmetric one is its spectrum real and the response
``B_t(λ)`` the gain on an eigenvector. On factorizable graphs :mod:`spectral` computes it exactly through
the ``r × r`` core; on the other graphs a Chebyshev expansion of order ``K`` of ``B_t`` on ``[−1, 1]``
approximates it (the error is measured in tests/test_spectral.py and docs/spectral.md).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from . import spectral as sp
from .affinity import Graph, LowRankGraph
from .filters import Filter, chebyshev_interpolation, chebyshev_terms, register_filter
from .registry import Option, one_of

SPECTRAL_FILTERS = ("cayley", "heat", "wavelet")
DEFAULT_ORDER = {"cayley": 2, "heat": 2, "wavelet": 3}
PATHS = ("auto", "exact", "chebyshev")


# the largest accepted order: wavelet scales double per band (peaks at λ_L = 2^(2−j) for the j-th), so the finest
# band narrows with J and float32 rounding of A moves its output more and more (measured, the float32 block vs
# float64: 2e-6 at J = 12, 7e-5 at 16, 2.5e-4 at 20, 5e-3 at 24); J ≤ 16 keeps it under 1e-4. Heat and Cayley terms
# stay finite and exact at any order tried (tests/test_spectral.py::test_every_order_is_finite_and_exact); 64
# bounds their number of output projections (2R + 1 for Cayley)
MAX_ORDER = {"cayley": 64, "heat": 64, "wavelet": 16}
# the largest Chebyshev order K: Cayley at zoom h = 4 (its pole 0.25 from the spectrum) reaches 1e-16 at K ≈ 75,
# heat and wavelet at the initial scales by K ≈ 20 (docs/spectral.md); K + 1 products with A are kept
MAX_APPROX_ORDER = 128
APPROX_WARN = 1e-3  # warn when the approximation's error at the initial scales is above this


def check_order(name: str, order) -> int:
    if name not in SPECTRAL_FILTERS:
        raise ValueError(f"filter: unknown spectral filter {name!r}; valid: {', '.join(SPECTRAL_FILTERS)}")
    if order is None:
        return DEFAULT_ORDER[name]
    what = {"cayley": "Cayley order R", "heat": "number of heat scales", "wavelet": "number of wavelet scales J"}
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_ORDER[name]:
        why = {"wavelet": "; past 16 the finest band (peak at λ_L = 2^(2-J)) is narrower than "
                           "float32 resolves: the float32 output moves by > 1e-4",
               "heat": "", "cayley": ""}[name]
        raise ValueError(f"order: expected an int in [0, {MAX_ORDER[name]}] ({what[name]} of filter {name!r}{why}), "
                         f"got {order!r}")
    return order


def approximation_error(name: str, order: int, scales: torch.Tensor, k: int, points: int = 2001) -> float:
    """Max over the terms and over ``λ ∈ [−1, 1]`` of ``|B_t(λ) − Σ_{k'≤K} c_{t,k'} T_{k'}(λ)|``: the error of
    the Chebyshev approximation of order ``K`` (:func:`chebyshev_coefficients`) on the real spectrum."""
    scales = scales.detach().to(torch.float64)
    lam = torch.linspace(-1, 1, points, dtype=torch.float64)
    coef = chebyshev_coefficients(name, order, scales, k)
    basis = torch.cos(torch.arange(k + 1, dtype=torch.float64)[:, None] * torch.arccos(lam)[None, :])
    return float((responses(name, order, scales, lam) - coef @ basis).abs().max())


def check_approx_order(name: str, order: int, k, used: bool) -> int:
    """Validate ``approx_order`` (``None``: 24); ``used``: the block will take the approximation (a
    non-factorizable graph, or ``spectral_path='chebyshev'``), then a :class:`UserWarning` gives its measured error
    at the initial scales when that is above ``APPROX_WARN``, and the smallest order that is not."""
    k = 24 if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_APPROX_ORDER:
        raise ValueError(f"approx_order: expected an int in [1, {MAX_APPROX_ORDER}] (Chebyshev order K of the "
                         f"approximation; K = 0 is a constant, and past {MAX_APPROX_ORDER} no response of "
                         f"filter {name!r} at a sensible scale gains accuracy), got {k!r}")
    if used:
        scales = initial_scales(name, order).double()
        err = approximation_error(name, order, scales, k)
        if err > APPROX_WARN:
            better = next((j for j in range(k + 1, MAX_APPROX_ORDER + 1)
                           if approximation_error(name, order, scales, j) <= APPROX_WARN), None)
            hint = f"; approx_order={better} is within {APPROX_WARN:g}" if better else ""
            warnings.warn(f"approx_order={k}: the Chebyshev approximation of filter {name!r} (order {order}) is off by "
                          f"up to {err:.2g} on the spectrum [-1, 1] at the initial scales{hint}", stacklevel=3)
    return k


def n_terms(name: str, order: int) -> int:
    """How many terms (output projections ``W_t``) the filter has."""
    return 2 * order + 1 if name == "cayley" else order + 1


def term_labels(name: str, order: int) -> list[str]:
    if name == "heat":
        return ["1"] + [f"exp(-t{j} L)" for j in range(1, order + 1)]
    if name == "cayley":
        return ["1"] + [f"{p} C(hL)^{j}" for j in range(1, order + 1) for p in ("Re", "Im")]
    return ["exp(-s0 L)"] + [f"g(s{j} L)" for j in range(1, order + 1)]


def initial_scales(name: str, order: int) -> torch.Tensor:
    """Positive initial scales: heat ``t`` log-spaced in [0.5, 4]; Cayley ``h = 1``; wavelet scales with peaks
    at ``λ_L = 2, 1, 1/2, ...`` and the scaling function's scale twice the largest."""
    if name == "heat":
        return torch.logspace(math.log10(0.5), math.log10(4.0), order) if order > 1 else torch.ones(order)
    if name == "cayley":
        return torch.ones(1)
    s = [0.5 * 2.0**j for j in range(order)]
    return torch.tensor([2.0 * (s[-1] if s else 0.5)] + s)


def responses(name: str, order: int, scales: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``B_t(λ)`` for each term ``t``, ``(T, len(λ))``, real; differentiable in ``scales``."""
    lam = torch.as_tensor(lam, dtype=scales.dtype, device=scales.device)
    lam_l = 1 - lam
    one = torch.ones_like(lam)
    if name == "heat":
        return torch.stack([one] + [torch.exp(-scales[j] * lam_l) for j in range(order)])
    if name == "cayley":
        x = scales[0] * lam_l
        c = torch.complex(x, -one) / torch.complex(x, one)
        rows, p = [one], torch.ones_like(c)
        for _ in range(order):
            p = p * c
            rows += [p.real, p.imag]
        return torch.stack(rows)
    rows = [torch.exp(-scales[0] * lam_l)]
    rows += [scales[j] * lam_l * torch.exp(1 - scales[j] * lam_l) for j in range(1, order + 1)]
    return torch.stack(rows)


def elements(name: str, order: int, scales: torch.Tensor, s: torch.Tensor) -> list[sp.Element]:
    """The terms as exact elements ``(α, M)`` of the core algebra of ``S`` (:mod:`spectral`), all real."""
    scales = scales.to(s.dtype)
    if name == "heat":
        return [sp.identity(s)] + [sp.heat(s, scales[j]) for j in range(order)]
    if name == "cayley":
        out = [sp.identity(s)]
        if order:
            c = sp.cayley(s, scales[0])
            for p in sp.power(c, order, s)[1:]:
                out += list(sp.real_imag(p))
        return out
    out = [sp.heat(s, scales[0])]
    lap = sp.laplacian(s)
    for j in range(1, order + 1):
        out.append(sp.scale(sp.mul(lap, sp.heat(s, scales[j]), s), math.e * scales[j]))
    return out


def chebyshev_coefficients(name: str, order: int, scales: torch.Tensor, k: int) -> torch.Tensor:
    """``(T, K+1)``: the Chebyshev interpolant of order ``K`` of each ``B_t`` on ``[−1, 1]`` (at the ``K+1``
    Chebyshev nodes), so that ``B_t(λ) ≈ Σ_k coef[t, k] T_k(λ)``; differentiable in ``scales``."""
    return chebyshev_interpolation(lambda lam: responses(name, order, scales, lam), k, scales.dtype, scales.device)


def _heat_divided(t: torch.Tensor, li: torch.Tensor, lj: torch.Tensor) -> torch.Tensor:
    """``[e^{−t(1−λ)}](λ_i, λ_j) = t e^{−t(1−max(λ_i, λ_j))} (1 − e^{−t|λ_i−λ_j|})/(t|λ_i−λ_j|)``: no
    cancellation (``expm1``) and no overflow at any ``t``; ``t e^{−t(1−λ)}`` where ``λ_i = λ_j``."""
    d = t * (li - lj).abs()
    ratio = torch.where(d > 0, -torch.expm1(-d) / torch.where(d > 0, d, torch.ones_like(d)), torch.ones_like(d))
    return t * torch.exp(-t * (1 - torch.maximum(li, lj))) * ratio


def divided_differences(name: str, order: int, scales: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``Γ_t[..., i, j] = B_t[λ_i, λ_j] = (B_t(λ_i) − B_t(λ_j))/(λ_i − λ_j)`` (``B_t'(λ_i)`` where equal) for
    every term, ``(T, *lam.shape, N)`` from ``lam (..., N)``: the Daleckii–Krein kernel of the derivative of
    ``B_t(A)`` at a symmetric ``A`` (:func:`spectral.symmetric_functions`). Each in a form without cancellation:
    heat through ``expm1``; Cayley ``c = 1 − 2i/(hλ_L + i)`` has ``[c] = −2ih/((hλ_{L,i} + i)(hλ_{L,j} + i))``
    and powers by the product rule ``[pq] = p_i [q] + [p] q_j``; the wavelet ``e s λ_L e^{−s λ_L}`` by the same
    rule over the heat kernel."""
    li, lj = lam[..., :, None], lam[..., None, :]
    zero = torch.zeros_like(li - lj)
    if name == "heat":
        return torch.stack([zero] + [_heat_divided(scales[j], li, lj) for j in range(order)])
    if name == "cayley":
        rows = [zero]
        if order:
            h = scales[0]
            den_i, den_j = torch.complex(h * (1 - li), torch.ones_like(li)), torch.complex(h * (1 - lj),
                                                                                         torch.ones_like(lj))
            c_i = torch.complex(h * (1 - li), -torch.ones_like(li)) / den_i
            c_j = torch.complex(h * (1 - lj), -torch.ones_like(lj)) / den_j
            dc = torch.complex(torch.zeros_like(h), -2 * h) / (den_i * den_j)
            p_i, dp = c_i, dc
            rows += [dp.real, dp.imag]
            for _ in range(order - 1):
                p_i, dp = p_i * c_i, p_i * dc + dp * c_j
                rows += [dp.real, dp.imag]
        return torch.stack(rows)
    rows = [_heat_divided(scales[0], li, lj)]
    for j in range(1, order + 1):
        heat_j = torch.exp(-scales[j] * (1 - lj))
        rows.append(math.e * scales[j] * ((1 - li) * _heat_divided(scales[j], li, lj) - heat_j))
    return torch.stack(rows)


# flops per n³ of one n×n float64 `torch.linalg.matrix_exp` forward + backward (its backward is the exponential
# of a 2n×2n block matrix) and of one `eigh` with vectors; measured with GEMM flops as the unit
# (docs/spectral.md, "Choosing the form")
EXPM_COST, EIGH_COST = 300.0, 40.0


def core_cost(name: str, order: int, n: int, r: int, c: int) -> float:
    """GEMM-equivalent flops of the exact path through the ``r × r`` core, forward + backward."""
    t = n_terms(name, order)
    exps = {"heat": order, "cayley": 0, "wavelet": order + 1}[name]
    algebra = exps * EXPM_COST * (2 * r) ** 3  # one 2r×2r matrix_exp per exponential term
    if name == "cayley" and order:
        algebra += 3 * (11 + 64 * (order - 1)) * r**3  # one complex r×r solve, complex r×r products
    if name == "wavelet":
        algebra += 12 * order * r**3
    return 6 * n * r * r + algebra + 3 * (2 * n * r * c * (1 + t) + 2 * t * r * r * c)


def dense_cost(name: str, order: int, n: int, r: int, c: int) -> float:
    """GEMM-equivalent flops of the exact path through the dense symmetric ``A`` (N × N), forward + backward."""
    t = n_terms(name, order)
    return 6 * n * n * r + (EIGH_COST + 4) * n**3 + 2 * n * n * c * (3 * t + 2)


def exact_form(name: str, order: int, n: int, r: int, c: int, symmetric: bool) -> str:
    """Which exact form costs less for ``N`` nodes, factor rank ``r`` and ``c`` value channels: ``"core"`` (the
    ``r × r`` algebra of :mod:`spectral`) or ``"dense"`` (the ``N × N`` matrix ``A``). Both are exact; ``A`` has
    rank ≤ min(N, r), so for ``N < r`` the dense form is the smaller one. A symmetric ``A`` (the symmetric
    normalization) takes one ``eigh`` for all terms with a cheap backward; another one the same algebra on
    ``N × N`` (``U = I``, ``V = Aᵀ``), chosen where ``N < r``. The dense form is only considered for ``N ≤ 4r``,
    where its ``N × N`` matrices are no larger than those of the core's exponentials (``2r × 2r``, and ``4r × 4r``
    in their backward)."""
    if n > 4 * r:
        return "core"
    if not symmetric:
        return "dense" if n < r else "core"
    return "dense" if dense_cost(name, order, n, r, c) < core_cost(name, order, n, r, c) else "core"


def exact_available(graph: Graph) -> bool:
    """Whether the exact path applies: a factorizable, square graph."""
    return isinstance(graph, LowRankGraph) and graph.square


def _exact_terms(name: str, order: int, scales: torch.Tensor, graph: LowRankGraph, z: torch.Tensor,
                 form: str | None) -> list[torch.Tensor]:
    u, v = graph.u, graph.v
    symmetric = graph.normalization == "symmetric"
    if form is None:
        # under torch.compile the core form (the dense symmetric form's custom backward calls autograd.grad, which
        # dynamo does not trace); both are exact
        form = "core" if torch.compiler.is_compiling() else \
            exact_form(name, order, u.shape[1], u.shape[2], z.shape[-1], symmetric)
    with torch.autocast(z.device.type if z.device.type in ("cuda", "cpu") else "cpu", enabled=False):
        if form == "core":
            s = sp.core_matrix(u, v)  # the r x r algebra in float64, never under autocast
            return sp.apply(u, v, elements(name, order, scales, s), z)
        a = sp.dense_affinity(u, v, symmetric)
        if symmetric:
            sc = scales.to(sp.CORE_DTYPE)
            return list(sp.symmetric_functions(
                a, sc, z, lambda s_, lam: responses(name, order, s_, lam),
                lambda s_, lam: divided_differences(name, order, s_, lam)).unbind(0))
        eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device).expand_as(a)
        return sp.apply(eye, a.transpose(1, 2), elements(name, order, scales, a), z)  # A = I·(Aᵀ)ᵀ, core S = A


def filter_terms(name: str, order: int, scales: torch.Tensor, graph: Graph, z: torch.Tensor, path: str = "auto",
                 approx_order: int = 24, form: str | None = None) -> list[torch.Tensor]:
    """``[B_t(A) Z]`` for every term: exact on factorizable graphs, else the Chebyshev expansion of order
    ``approx_order`` (``path`` forces one: ``exact`` raises where it does not apply). ``form`` (``core`` or
    ``dense``) fixes the exact form; by default :func:`exact_form` chooses it by cost."""
    exact = exact_available(graph)
    if path == "exact" and not exact:
        raise ValueError(f"spectral_path='exact' needs a factorizable square graph (kernel dot_product, relu_dot or "
                         f"double_attention on the lowrank backend), got the {graph.backend!r} backend")
    if form not in (None, "core", "dense"):
        raise ValueError(f"form: expected None, 'core' or 'dense', got {form!r}")
    if exact and path != "chebyshev":
        return _exact_terms(name, order, scales, graph, z, form)
    coef = chebyshev_coefficients(name, order, scales.to(torch.float64), approx_order).to(z.dtype)
    basis = torch.stack(chebyshev_terms(graph.matmul, z, approx_order), 0)
    return list(torch.einsum("tk,k...->t...", coef, basis).unbind(0))


class SpectralFilter(Filter):
    """A spectral filter (a matrix function of ``A``, not a polynomial) and its learnable part: ``log_scales``
    (``ρ``, scales ``exp(ρ)``).

    ``path``: ``auto`` (exact where the graph factorizes, else Chebyshev), ``exact`` or ``chebyshev``;
    ``approx_order``: the Chebyshev order ``K`` of the approximation.
    """

    exact_lowrank = True  # the r x r core gives every term exactly on a factorizable graph

    def __init__(self, name: str, order: int, path: str = "auto", approx_order: int = 24):
        super().__init__(name)
        self.name, self.order, self.path, self.approx_order = name, order, path, approx_order
        self.form: str | None = None  # the exact form (None: by cost, exact_form); "core" / "dense" for tests, bench
        self.log_scales = nn.Parameter(initial_scales(name, order).log())

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_scales.copy_(initial_scales(self.name, self.order).log())

    @property
    def n_terms(self) -> int:
        return n_terms(self.name, self.order)

    def scales(self) -> torch.Tensor:
        return self.log_scales.exp()

    def responses(self, lam: torch.Tensor) -> torch.Tensor:
        return responses(self.name, self.order, self.scales(), lam)

    def labels(self) -> list[str]:
        return term_labels(self.name, self.order)

    def terms(self, graph: Graph, z: torch.Tensor, z_keys: torch.Tensor | None = None) -> list[torch.Tensor]:
        return filter_terms(self.name, self.order, self.scales(), graph, z, self.path, self.approx_order, self.form)

    def extra_repr(self) -> str:
        return f"{self.name!r}, order={self.order}, path={self.path!r}, approx_order={self.approx_order}"


def _register(name: str, reference: str) -> None:
    what = {"cayley": "Cayley order R (2R+1 terms)", "heat": "number of heat scales",
            "wavelet": "number of wavelet scales J"}[name]
    register_filter(name, lambda order, spectral_path, approx_order: SpectralFilter(name, order, spectral_path,
                                                                                     approx_order),
                    options={"order": Option(DEFAULT_ORDER[name], what, lambda k, v: check_order(name, v)),
                             "spectral_path": Option("auto", "auto (exact where the graph factorizes, else "
                                                     "Chebyshev), exact or chebyshev", one_of(*PATHS)),
                             "approx_order": Option(24, "Chebyshev order K of the approximation off factorizable "
                                                    f"graphs (1 to {MAX_APPROX_ORDER})",
                                                    lambda k, v: check_approx_order(name, 0, v, used=False))},
                    reference=reference)


_register("cayley", 'Levie et al., "CayleyNets", IEEE TSP 2018, Eq. 8 (Zhu et al., ICCV 2021, Remark 1)')
_register("heat", "heat diffusion exp(-t L) (Zhu et al., ICCV 2021, Remark 1)")
_register("wavelet", 'Hammond, Vandergheynst, Gribonval, "Wavelets on graphs via spectral graph theory", ACHA 2011')
