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

import torch
import torch.nn as nn

from . import spectral as sp
from .affinity import Graph, LowRankGraph
from .filters import Filter, chebyshev_terms, register_filter
from .registry import Option, int_at_least, one_of

SPECTRAL_FILTERS = ("cayley", "heat", "wavelet")
DEFAULT_ORDER = {"cayley": 2, "heat": 2, "wavelet": 3}
PATHS = ("auto", "exact", "chebyshev")


def check_order(name: str, order) -> int:
    if name not in SPECTRAL_FILTERS:
        raise ValueError(f"filter: unknown spectral filter {name!r}; valid: {', '.join(SPECTRAL_FILTERS)}")
    if order is None:
        return DEFAULT_ORDER[name]
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        what = {"cayley": "Cayley order R", "heat": "number of heat scales", "wavelet": "number of wavelet scales J"}
        raise ValueError(f"order: expected an int >= 0 ({what[name]}), got {order!r}")
    return order


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
    theta = math.pi * (torch.arange(k + 1, dtype=scales.dtype, device=scales.device) + 0.5) / (k + 1)
    f = responses(name, order, scales, torch.cos(theta))  # (T, K+1)
    basis = torch.cos(torch.arange(k + 1, dtype=scales.dtype, device=scales.device)[:, None] * theta[None, :])
    coef = (2.0 / (k + 1)) * f @ basis.T
    coef[:, 0] = coef[:, 0] / 2
    return coef


def exact_available(graph: Graph) -> bool:
    """Whether :mod:`spectral`'s exact ``r × r`` path applies: a factorizable, square graph."""
    return isinstance(graph, LowRankGraph) and graph.square


def filter_terms(name: str, order: int, scales: torch.Tensor, graph: Graph, z: torch.Tensor, path: str = "auto",
                 approx_order: int = 24) -> list[torch.Tensor]:
    """``[B_t(A) Z]`` for every term: exact on factorizable graphs, else the Chebyshev expansion of order
    ``approx_order`` (``path`` forces one: ``exact`` raises where it does not apply)."""
    exact = exact_available(graph)
    if path == "exact" and not exact:
        raise ValueError(f"spectral_path='exact' needs a factorizable square graph (kernel dot_product, relu_dot or "
                         f"double_attention on the lowrank backend), got the {graph.backend!r} backend")
    if exact and path != "chebyshev":
        with torch.autocast(z.device.type if z.device.type in ("cuda", "cpu") else "cpu", enabled=False):
            s = sp.core_matrix(graph.u, graph.v)  # the r x r algebra in float64, never under autocast
            els = elements(name, order, scales, s)
        return sp.apply(graph.u, graph.v, els, z)
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
        return filter_terms(self.name, self.order, self.scales(), graph, z, self.path, self.approx_order)

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
                                                    "graphs", int_at_least(0, "Chebyshev order K of the "
                                                                              "approximation"))},
                    reference=reference)


_register("cayley", 'Levie et al., "CayleyNets", IEEE TSP 2018, Eq. 8 (Zhu et al., ICCV 2021, Remark 1)')
_register("heat", "heat diffusion exp(-t L) (Zhu et al., ICCV 2021, Remark 1)")
_register("wavelet", 'Hammond, Vandergheynst, Gribonval, "Wavelets on graphs via spectral graph theory", ACHA 2011')
