"""Step 2: graph filters, polynomials in ``A`` applied to the node features ``Z``.

Papers cited here (short form first):

- Wang et al. 2018: X. Wang, R. Girshick, A. Gupta, K. He, "Non-local Neural Networks", CVPR 2018,
  arXiv:1711.07971.
- Tao et al. 2018: Y. Tao, Q. Sun, Q. Du, W. Liu, "Nonlocal Neural Networks, Nonlocal Diffusion and
  Nonlocal Modeling", NeurIPS 2018, arXiv:1806.00681.
- Zhu et al., ICLR 2020 submission: L. Zhu, Q. She, L. Zhang, P. Guo, "A Spectral Nonlocal Block for
  Neural Networks", OpenReview rkgb9kSKwS.
- Zhu et al. 2021 (ICCV): L. Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021,
  arXiv:2108.02451 (equation and section numbers as in its submitted version, "A Unified Framework to
  Analyze and Design the Nonlocal Blocks for Neural Networks"; code: the SNL_ICCV2021 repository).

Every block of the family is (Zhu et al. 2021 (ICCV), Eq. 3–4; Zhu et al., ICLR 2020 submission, Eq. 7 and
10; docs/framework.md "Step 2")

    F(A, Z) = Σ_t  B_t(A) Z W_t,      B_t(A) = Σ_k coef[t, k] T_k(A)

with the Chebyshev basis ``T_0 Z = Z``, ``T_1 Z = A Z``, ``T_k Z = 2 A T_{k-1} Z − T_{k-2} Z``.
A filter is therefore just a coefficient matrix ``coef`` (terms × (K+1)); the presets differ only there:

=========  =======================================  ===================================
name       terms                                    coef
=========  =======================================  ===================================
``nl``     ``A Z W``                                ``[[0, 1]]``
``ns``     ``(A − I) Z W``                          ``[[-1, 1]]`` (one shared ``W``)
``snl``    ``Z W_1 + A Z W_2``                      ``[[1, 0], [0, 1]]``
``gsnl``   ``Z W_1 + A Z W_2 + (2A − I) Z W_3``     ``[[1, 0], [0, 1], [-1, 2]]``
``cheby``  ``Σ_{k≤K} T_k(A) Z W_k``                 identity of size K+1
=========  =======================================  ===================================

Sources: ``nl`` Wang et al. 2018; ``ns`` Tao et al. 2018, Eq. 8; ``snl`` Zhu et al., ICLR 2020 submission,
Eq. 8 and Zhu et al. 2021 (ICCV), Eq. 5; ``gsnl`` Zhu et al., ICLR 2020 submission, Eq. 10; ``cheby``
Zhu et al. 2021 (ICCV), Eq. 3.

Only products ``A @ (N × c)`` are needed, so every filter runs on any :class:`~nonlocalnet.affinity.Graph`.
The non-polynomial filters (heat, Cayley, wavelets) are in :mod:`nonlocalnet.spectral_filters`; every filter
has a frequency response, the gain ``B_t(λ)`` of each term on an eigenvector of ``A`` with eigenvalue ``λ``
(:func:`polynomial_responses` here, :func:`~nonlocalnet.spectral_filters.responses` there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .registry import Option, Registry, check_options, int_at_least, int_between


def filter_coefficients(name: str, order: int = 1) -> torch.Tensor:
    """The coefficient matrix ``coef[t, k]`` of a registered polynomial filter (see module docstring)."""
    spec = FILTERS[name]
    filt = spec.make(**({"order": order} if "order" in spec.options else {}))
    rows = filt.chebyshev()
    if not isinstance(rows, tuple):
        raise ValueError(f"filter: {name!r} has no fixed coefficients (it is learnable or not a polynomial)")
    return torch.tensor(rows)


def chebyshev_terms(matmul: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, order: int,
                    z_keys: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[T_0(A) Z, ..., T_K(A) Z]`` by the three-term recursion (Zhu et al. 2021 (ICCV), Eq. 3).

    ``z_keys`` is ``Z`` on the key positions when they differ (sub-sampling): then only ``K ≤ 1``
    is defined, since ``A`` is not square.
    """
    terms = [z]
    if order >= 1:
        terms.append(matmul(z if z_keys is None else z_keys))
    for _ in range(2, order + 1):
        terms.append(2 * matmul(terms[-1]) - terms[-2])
    return terms


def apply_filter(matmul: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
                 coef: torch.Tensor | Sequence[Sequence[float]],
                 z_keys: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The filter's terms ``B_t(A) Z`` for each row ``t`` of ``coef`` (before the weights ``W_t``).

    ``coef`` may be a plain nested list (what modules pass, so ``torch.compile`` sees constants).
    """
    if isinstance(coef, torch.Tensor) and coef.requires_grad:  # learnable coefficients: keep them in the graph
        basis = chebyshev_terms(matmul, z, coef.shape[1] - 1, z_keys)
        c = coef.to(z.dtype)
        return [sum(c[t, k] * b for k, b in enumerate(basis)) for t in range(c.shape[0])]
    rows = coef.tolist() if isinstance(coef, torch.Tensor) else [list(r) for r in coef]
    order = highest_order(rows)
    basis = chebyshev_terms(matmul, z, order, z_keys)
    out = []
    for row in rows:
        acc = None
        for k, c in enumerate(row[: order + 1]):
            if c == 0:
                continue
            term = basis[k] if c == 1 else c * basis[k]
            acc = term if acc is None else acc + term
        out.append(acc if acc is not None else torch.zeros_like(z))
    return out


def lowrank_terms(coef: Sequence[Sequence[float]], s: torch.Tensor,
                  core: Callable[[], torch.Tensor]) -> list[tuple[float, torch.Tensor | None]]:
    """The filter's terms on a low-rank graph ``A = U Vᵀ``, in the graph's own coordinates.

    Every power ``A^k Z = U (VᵀU)^{k-1} VᵀZ`` (``k ≥ 1``) lies in the span of ``U``, so each term is
    ``B_t(A) Z = α_t Z + U R_t`` with a scalar ``α_t`` (the constant coefficient) and a small ``R_t``
    ``(B, r, c)``. Returned as ``[(α_t, R_t)]`` (``R_t`` is ``None`` when zero). ``s = VᵀZ`` ``(B, r, c)``;
    ``core()`` gives ``VᵀU`` ``(B, r, r)``, asked for only when ``K ≥ 2``. The Chebyshev recursion
    ``T_k = 2 A T_{k-1} − T_{k-2}`` becomes ``α_k = −α_{k-2}``, ``R_k = 2(α_{k-1} S + VᵀU R_{k-1}) − R_{k-2}``:
    every order costs ``O(r²c)`` and no product over the ``N`` positions (the unit then needs one GEMM
    ``R Uᵀ``-sized product per block, whatever ``K``). ``coef`` may be a tensor (a learnable filter): then every
    coefficient counts, and the ``α_t`` are tensors."""
    learnable = isinstance(coef, torch.Tensor) and coef.requires_grad
    rows = list(coef.to(s.dtype).unbind(0)) if learnable else [list(r) for r in coef]
    order = coef.shape[1] - 1 if learnable else highest_order(rows)

    def add(a, b, cb=1.0):
        if b is None:
            return a
        b = b if not isinstance(cb, torch.Tensor) and cb == 1 else cb * b
        return b if a is None else a + b

    basis: list[tuple[float, torch.Tensor | None]] = [(1.0, None)]
    if order >= 1:
        basis.append((0.0, s))
    k_mat = core() if order >= 2 else None
    for _ in range(2, order + 1):
        (a1, r1), (a2, r2) = basis[-1], basis[-2]
        r = add(None, s, 2 * a1) if a1 != 0 else None
        r = add(r, None if r1 is None else k_mat @ r1, 2.0)
        basis.append((-a2, add(r, r2, -1.0)))
    out = []
    for row in rows:
        alpha, r = 0.0, None
        for k in range(order + 1):
            c = row[k]
            if learnable or c != 0:
                alpha = alpha + c * basis[k][0]
                r = add(r, basis[k][1], c)
        out.append((alpha, r))
    return out


def chebyshev_interpolation(fn: Callable[[torch.Tensor], torch.Tensor], k: int, dtype: torch.dtype = torch.float64,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """``(T, K+1)``: the Chebyshev interpolant of order ``K`` on ``[−1, 1]`` of each row of ``fn(λ)`` ``(T, len(λ))``,
    from its values at the ``K+1`` Chebyshev nodes, so that ``fn(λ) ≈ Σ_k coef[t, k] T_k(λ)`` — exactly when
    ``fn`` is a polynomial of degree ``≤ K`` (a learnable polynomial filter); differentiable through ``fn``."""
    theta = math.pi * (torch.arange(k + 1, dtype=dtype, device=device) + 0.5) / (k + 1)
    f = fn(torch.cos(theta))  # (T, K+1)
    basis = torch.cos(torch.arange(k + 1, dtype=dtype, device=device)[:, None] * theta[None, :])
    coef = (2.0 / (k + 1)) * f.to(dtype) @ basis.T
    return torch.cat([coef[:, :1] / 2, coef[:, 1:]], 1)


def highest_order(coef: torch.Tensor | Sequence[Sequence[float]]) -> int:
    """The largest ``k`` with a nonzero coefficient (how many powers of ``A`` are needed).

    Plain Python on a nested list, so ``torch.compile`` sees a constant.
    """
    rows = coef.tolist() if isinstance(coef, torch.Tensor) else coef
    return max([0] + [k for r in rows for k, c in enumerate(r) if c != 0])


def polynomial_responses(coef: torch.Tensor | Sequence[Sequence[float]], lam: torch.Tensor) -> torch.Tensor:
    """The frequency response ``B_t(λ) = Σ_k coef[t, k] T_k(λ)`` of each term, ``(T, len(λ))``."""
    coef = torch.as_tensor(coef, dtype=torch.float64) if not isinstance(coef, torch.Tensor) else coef
    lam = torch.as_tensor(lam, dtype=coef.dtype)
    basis = [torch.ones_like(lam), lam]
    for _ in range(2, coef.shape[1]):
        basis.append(2 * lam * basis[-1] - basis[-2])
    return coef @ torch.stack(basis[: coef.shape[1]])


# --------------------------------------------------------------------------------------- filters as parts
class Filter(nn.Module):
    """A graph filter: ``T`` terms ``B_t(A) Z``, each mapped by its own output map ``W_t`` in the unit.

    What a filter says about itself drives the unit's paths (``NonlocalUnit``): :meth:`chebyshev` gives the
    Chebyshev coefficients when every term is a polynomial in ``A`` — then the filter runs in the graph's own
    coordinates on every factorizable graph (linear time, exact) and on any graph through ``A @ V`` products;
    :attr:`max_power` says how many powers of ``A`` the terms need (``≥ 2``: a square graph); :attr:`exact_lowrank`
    says the filter has an exact form on a factorizable graph that it computes itself (the spectral filters'
    ``r × r`` core). Anything a filter does not declare goes to the generic path, :meth:`terms` on
    ``graph.matmul``, which is always correct.

    Subclasses set :attr:`n_terms` and implement :meth:`terms` and :meth:`responses`; parameters they own are
    stored in the unit as ``units.<i>.spectral.<name>``.
    """

    n_terms: int = 1
    max_power: int | None = None  # None: not a polynomial (a matrix function; needs a square A)
    exact_lowrank: bool = False

    def __init__(self, name: str = ""):
        super().__init__()
        self.name = name or type(self).__name__.lower()

    def chebyshev(self) -> tuple[tuple[float, ...], ...] | torch.Tensor | None:
        """``coef[t, k]`` with ``B_t(A) = Σ_k coef[t, k] T_k(A)``: fixed (a tuple of rows of floats, which
        ``torch.compile`` sees as constants) or a tensor (learnable); ``None`` when the terms are not polynomials."""
        return None

    @property
    def learnable(self) -> bool:
        return any(True for _ in self.parameters())

    def reset_parameters(self) -> None:
        """Re-initialize the filter's own parameters (none for a fixed filter)."""

    def terms(self, graph, z: torch.Tensor, z_keys: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``[B_t(A) Z]`` on any graph operator (``graph.matmul``); ``z_keys``: ``Z`` on sub-sampled keys."""
        coef = self.chebyshev()
        if coef is None:  # pragma: no cover - interface
            raise NotImplementedError(f"filter {self.name!r}: terms() is not implemented")
        return apply_filter(graph.matmul, z, coef, z_keys)

    def forward(self, graph, z: torch.Tensor, z_keys: torch.Tensor | None = None) -> list[torch.Tensor]:
        return self.terms(graph, z, z_keys)

    def responses(self, lam: torch.Tensor) -> torch.Tensor:
        """The frequency response ``B_t(λ)`` of each term at eigenvalues ``λ`` of ``A``, ``(T, len(λ))``."""
        coef = self.chebyshev()
        if coef is None:  # pragma: no cover - interface
            raise NotImplementedError(f"filter {self.name!r}: responses() is not implemented")
        coef = coef if isinstance(coef, torch.Tensor) else torch.tensor(coef, dtype=torch.float64)
        lam = torch.as_tensor(lam)
        return polynomial_responses(coef.to(lam.dtype if lam.is_floating_point() else torch.float64), lam)

    def labels(self) -> list[str] | None:
        """Names of the terms for plots (``None``: the polynomial's coefficients describe them)."""
        return None

    def literal(self, a: torch.Tensor) -> list[torch.Tensor]:
        """The dense ``B_t(A)`` ``(B, N, N)`` of each term from a formed square ``A`` (for the reference and
        :mod:`nonlocalnet.testing`): by default from :meth:`chebyshev`, as matrices."""
        coef = self.chebyshev()
        if coef is None:
            raise NotImplementedError(f"filter {self.name!r}: no literal form (define literal(a))")
        coef = coef if isinstance(coef, torch.Tensor) else torch.tensor(coef, dtype=a.dtype)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
        mats = [eye, a]
        for _ in range(2, coef.shape[1]):
            mats.append(2 * a @ mats[-1] - mats[-2])
        c = coef.to(a.dtype)
        return [sum(c[t, k] * mats[k] for k in range(coef.shape[1])) for t in range(coef.shape[0])]


class Polynomial(Filter):
    """A fixed polynomial filter ``B_t(A) = Σ_k coef[t, k] T_k(A)`` (every filter of the papers but the spectral
    ones): no parameters, the coefficients plain Python floats."""

    def __init__(self, coef: torch.Tensor | Sequence[Sequence[float]], name: str = ""):
        super().__init__(name or "polynomial")
        rows = coef.tolist() if isinstance(coef, torch.Tensor) else coef
        self.coef_rows = tuple(tuple(float(c) for c in row) for row in rows)
        self.n_terms = len(self.coef_rows)
        self.max_power = highest_order(self.coef_rows)

    def chebyshev(self) -> tuple[tuple[float, ...], ...]:
        return self.coef_rows

    def extra_repr(self) -> str:
        return f"{self.name!r}, coef={[list(r) for r in self.coef_rows]}"


class ResponsePolynomial(Filter):
    """A learnable polynomial filter given by its frequency response.

    A subclass sets ``degree`` ``K`` and defines :meth:`response` ``λ → (T, len(λ))``, a polynomial of degree
    ``≤ K`` in the eigenvalue ``λ`` of ``A`` (differentiable in the subclass's parameters). The Chebyshev
    coefficients are its interpolant at ``K+1`` Chebyshev nodes — exact for such a polynomial — so the filter is
    exact on every graph, in linear time on the factorizable ones, with no code of its own for either.
    """

    def __init__(self, name: str = "", *, degree: int, n_terms: int = 1):
        super().__init__(name)
        self.degree, self.n_terms, self.max_power = int(degree), int(n_terms), int(degree)

    def response(self, lam: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def chebyshev(self) -> torch.Tensor:
        p = next(self.parameters(), None)
        dtype = torch.float64 if p is None or p.dtype == torch.float64 else torch.float32
        return chebyshev_interpolation(self.response, self.degree, dtype, None if p is None else p.device)

    def responses(self, lam: torch.Tensor) -> torch.Tensor:
        return self.response(torch.as_tensor(lam))

    def labels(self) -> list[str]:
        return [self.name] if self.n_terms == 1 else [f"{self.name} {t}" for t in range(self.n_terms)]

    def extra_repr(self) -> str:
        return f"{self.name!r}, degree={self.degree}, n_terms={self.n_terms}"


class Bernstein(ResponsePolynomial):
    """He, Wei, Huang, Xu, "BernNet: Learning Arbitrary Graph Spectral Filters via Bernstein Approximation",
    NeurIPS 2021: ``h(L) = Σ_k relu(θ_k) C(K,k) (L/2)^k (I - L/2)^(K-k)`` on ``L = I - A`` (eigenvalues in
    [0, 2]); the non-negative weights keep the response in the cone of non-negative filters. ``θ_k = 1`` at init:
    the Bernstein basis sums to 1, so the block starts as ``Z W`` (BernNet's all-pass initialisation)."""

    def __init__(self, order: int):
        super().__init__("bernstein", degree=order)
        self.theta = torch.nn.Parameter(torch.ones(order + 1))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.theta.fill_(1.0)

    def response(self, lam: torch.Tensor) -> torch.Tensor:  # (1, len(λ)), x = λ_L / 2 = (1 - λ) / 2
        k = torch.arange(self.degree + 1, dtype=lam.dtype, device=lam.device)[:, None]
        comb = torch.tensor([math.comb(self.degree, j) for j in range(self.degree + 1)], dtype=lam.dtype,
                            device=lam.device)[:, None]
        x = (1 - lam) / 2
        return (self.theta.relu().to(lam.dtype) @ (comb * x**k * (1 - x) ** (self.degree - k)))[None]


class GeneralizedPageRank(ResponsePolynomial):
    """Chien, Peng, Li, Milenkovic, "Adaptive Universal Generalized PageRank Graph Neural Network", ICLR 2021:
    ``h(A) = Σ_k γ_k A^k`` with learnable ``γ`` (signs free: low- and high-pass), initialised as personalized
    PageRank, ``γ_k = α(1-α)^k`` for ``k < K`` and ``γ_K = (1-α)^K``, ``α = 0.1`` (the paper's PPR
    initialisation; the weights sum to 1)."""

    alpha = 0.1

    def __init__(self, order: int):
        super().__init__("gpr", degree=order)
        self.gamma = torch.nn.Parameter(torch.empty(order + 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        a, k = self.alpha, torch.arange(self.degree + 1, dtype=torch.float64)
        init = a * (1 - a) ** k
        init[-1] = (1 - a) ** self.degree
        with torch.no_grad():
            self.gamma.copy_(init)

    def response(self, lam: torch.Tensor) -> torch.Tensor:  # (1, len(λ)): Σ_k γ_k λ^k
        k = torch.arange(self.degree + 1, dtype=lam.dtype, device=lam.device)[:, None]
        return (self.gamma.to(lam.dtype) @ lam[None] ** k)[None]


@dataclass(frozen=True)
class FilterSpec:
    """A registered filter: ``build(**options) -> Filter`` and the options it takes (``order`` for the Chebyshev
    filter, ``spectral_path`` for the spectral ones, ...), each an :class:`~nonlocalnet.registry.Option` that
    checks itself. ``reference``: the paper (authors, title, venue, equation)."""

    name: str
    build: Callable[..., Filter]
    options: Mapping[str, Option] = field(default_factory=dict)
    reference: str = ""

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        return check_options(f"filter {self.name!r}", self.options, given)

    def make(self, **given: Any) -> Filter:
        filt = self.build(**self.resolve(given))
        if not isinstance(filt, Filter):
            raise TypeError(f"filter {self.name!r}: its factory returned {type(filt).__name__}, not a "
                            f"nonlocalnet.filters.Filter")
        return filt


FILTERS: Registry[FilterSpec] = Registry("filter")


def register_filter(name: str, build: Callable[..., Filter], *, options: Mapping[str, Option] | None = None,
                    reference: str = "", replace: bool = False) -> FilterSpec:
    """Make a filter available by name (``build_block(..., filter=NAME)``, configs, presets). ``build`` is a
    :class:`Filter` subclass or any callable returning one, called with the resolved ``options``; ``options``
    defaults to ``build.options`` when ``build`` has that attribute."""
    if options is None:
        options = getattr(build, "options", {})
    return FILTERS.register(name, FilterSpec(name, build, dict(options), reference), replace=replace)


def filter_options() -> dict[str, list[str]]:
    """Every option some registered filter takes → the filters that take it (block options are their union)."""
    out: dict[str, list[str]] = {}
    for name, spec in FILTERS.items():
        for opt in spec.options:
            out.setdefault(opt, []).append(name)
    return out


def _fixed(name: str, rows: Sequence[Sequence[float]], reference: str) -> None:
    register_filter(name, lambda: Polynomial(rows, name), reference=reference)


_fixed("nl", [[0.0, 1.0]], 'Wang et al., "Non-local Neural Networks", CVPR 2018: A Z W')
_fixed("ns", [[-1.0, 1.0]], 'Tao et al., "Nonlocal Neural Networks, Nonlocal Diffusion and Nonlocal Modeling", '
                            'NeurIPS 2018, Eq. 8: (A - I) Z W')
_fixed("snl", [[1.0, 0.0], [0.0, 1.0]], 'Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021, '
                                        'Eq. 5: Z W_1 + A Z W_2')
_fixed("gsnl", [[1.0, 0.0], [0.0, 1.0], [-1.0, 2.0]], 'Zhu et al., "A Spectral Nonlocal Block for Neural Networks", '
                                                      'ICLR 2020 submission, Eq. 10')
register_filter("cheby", lambda order: Polynomial(torch.eye(order + 1), "cheby"),
                options={"order": Option(1, "the Chebyshev order K (K+1 terms T_k(A) Z W_k)",
                                         int_at_least(0, "Chebyshev K"))},
                reference='Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021, Eq. 3-4')
_LEARNED_ORDER = Option(3, "the degree K of the learned polynomial response (K+1 weights)",
                        int_between(1, 32, "the polynomial degree K"))
register_filter("bernstein", Bernstein, options={"order": _LEARNED_ORDER},
                reference='He et al., "BernNet", NeurIPS 2021')
register_filter("gpr", GeneralizedPageRank, options={"order": _LEARNED_ORDER},
                reference='Chien et al., "Adaptive Universal Generalized PageRank Graph Neural Network", ICLR 2021')
