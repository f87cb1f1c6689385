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
10; framework.md "Step 2")

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

from collections.abc import Callable, Sequence

import torch

FILTERS = ("nl", "ns", "snl", "gsnl", "cheby")


def filter_coefficients(name: str, order: int = 1) -> torch.Tensor:
    """The coefficient matrix ``coef[t, k]`` of a named filter (see module docstring)."""
    if name == "nl":
        return torch.tensor([[0.0, 1.0]])
    if name == "ns":
        return torch.tensor([[-1.0, 1.0]])
    if name == "snl":
        return torch.eye(2)
    if name == "gsnl":
        return torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 2.0]])
    if name == "cheby":
        if not isinstance(order, int) or order < 0:
            raise ValueError(f"order: expected an int >= 0 (Chebyshev K), got {order!r}")
        return torch.eye(order + 1)
    raise ValueError(f"filter: unknown filter {name!r}; valid filters: {', '.join(FILTERS)}")


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
    ``R Uᵀ``-sized product per block, whatever ``K``)."""
    rows = [list(r) for r in coef]
    order = highest_order(rows)

    def add(a, b, cb=1.0):
        if b is None:
            return a
        b = b if cb == 1 else cb * b
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
        for k, c in enumerate(row[: order + 1]):
            if c != 0:
                alpha += c * basis[k][0]
                r = add(r, basis[k][1], c)
        out.append((alpha, r))
    return out


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
