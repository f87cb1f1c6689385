"""Matrix functions of a factorizable affinity through its ``r × r`` core (docs/spectral.md).

On a factorizable graph ``A = U Vᵀ`` (``U, V: (B, N, r)``; :class:`~nonlocalnet.affinity.LowRankGraph`
folds every normalization into the factors) every power is ``A^k = U S^{k-1} Vᵀ`` with the core
``S = Vᵀ U`` (``r × r``). So the operators ``α I + U M Vᵀ`` form an algebra with ``r × r`` arithmetic::

    (α, M) · (β, N) = (α β,  α N + β M + M S N)

and any matrix function is one element of it: ``f(A) = f(0) I + U φ(S) Vᵀ`` with ``φ(x) = (f(x) − f(0))/x``.
Two closed forms give ``φ(S)`` exactly, without an eigendecomposition (so they are smooth in ``U, V`` even
where ``G = UᵀU`` is singular, at zero-degree rows, at ``N < r``):

- exponential: ``exp(tA) = I + U · t φ₁(tS) · Vᵀ``, ``φ₁(X) = Σ X^k/(k+1)!`` — the top-right block of
  ``expm([[X, I], [0, 0]])`` (:func:`torch.linalg.matrix_exp`, scaling and squaring);
- resolvent (Woodbury): ``(aI − A)⁻¹ = a⁻¹ I + a⁻¹ U (aI − S)⁻¹ Vᵀ`` for any complex ``a ∉ spec(S)``.

Applying an element to ``Z (B, N, c)`` costs ``O(N r c)``: ``α Z + U (M (Vᵀ Z))``; building it costs ``O(N r²)``
(the core) plus ``O(r³)``. The core algebra runs in float64 whatever the dtype of ``U, V``.

:func:`eigenvalues` gives the exact spectrum of a factorizable ``A`` from the same core in ``O(N r² + r³)``.
"""

from __future__ import annotations

import torch

from .affinity import LowRankGraph

# an element of the algebra: (alpha, M), alpha of shape (B,) or (), M of shape (B, r, r)
Element = tuple[torch.Tensor, torch.Tensor]

CORE_DTYPE = torch.float64


def core_matrix(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``S = Vᵀ U`` (B, r, r) in float64 (``O(N r²)``; the product is taken in the factors' dtype)."""
    if u.shape != v.shape or u.dim() != 3:
        raise ValueError(f"u, v: expected two (B, N, r) factors of a square A = U Vᵀ, got {tuple(u.shape)} and "
                         f"{tuple(v.shape)}")
    with torch.autocast(u.device.type if u.device.type in ("cuda", "cpu") else "cpu", enabled=False):
        return (v.transpose(1, 2) @ u).to(CORE_DTYPE)


def _eye(s: torch.Tensor) -> torch.Tensor:
    return torch.eye(s.shape[-1], dtype=s.dtype, device=s.device).expand_as(s)


def identity(s: torch.Tensor) -> Element:
    return torch.ones((), dtype=s.dtype, device=s.device), torch.zeros_like(s)


def affinity(s: torch.Tensor) -> Element:
    """``A`` itself: ``(0, I_r)``."""
    return torch.zeros((), dtype=s.dtype, device=s.device), _eye(s).clone()


def laplacian(s: torch.Tensor) -> Element:
    """``L = I − A``: ``(1, −I_r)``."""
    return torch.ones((), dtype=s.dtype, device=s.device), -_eye(s)


def _bcast(alpha: torch.Tensor) -> torch.Tensor:
    return alpha.reshape(alpha.shape + (1, 1)) if alpha.dim() else alpha


def mul(x: Element, y: Element, s: torch.Tensor) -> Element:
    """The product of two elements: ``(α, M)(β, N) = (αβ, αN + βM + M S N)``."""
    (a, m), (b, n) = x, y
    s = s.to(m.dtype)
    return a * b, _bcast(a) * n + _bcast(b) * m + m @ s @ n


def scale(x: Element, c: torch.Tensor | float) -> Element:
    c = torch.as_tensor(c, dtype=x[1].dtype, device=x[1].device)
    return x[0] * c, _bcast(c) * x[1]


def add(x: Element, y: Element) -> Element:
    return x[0] + y[0], x[1] + y[1]


def power(x: Element, k: int, s: torch.Tensor) -> list[Element]:
    """``[x⁰, x¹, ..., x^k]``."""
    out = [identity(s.to(x[1].dtype))]
    for _ in range(k):
        out.append(mul(out[-1], x, s))
    return out


def phi1(x: torch.Tensor) -> torch.Tensor:
    """``φ₁(X) = Σ_k X^k/(k+1)! = (e^X − I) X⁻¹`` (for any square ``X``, singular included): the top-right
    block of ``expm([[X, I], [0, 0]])``."""
    r = x.shape[-1]
    big = torch.zeros(*x.shape[:-2], 2 * r, 2 * r, dtype=x.dtype, device=x.device)
    big[..., :r, :r] = x
    big[..., :r, r:] = torch.eye(r, dtype=x.dtype, device=x.device)
    return torch.linalg.matrix_exp(big)[..., :r, r:]


def expm(s: torch.Tensor, t: torch.Tensor | float) -> Element:
    """``exp(t A) = I + U · t φ₁(t S) · Vᵀ`` (``t`` a real scalar; differentiable in ``t`` and ``S``)."""
    t = torch.as_tensor(t, dtype=s.dtype, device=s.device)
    return torch.ones((), dtype=s.dtype, device=s.device), t * phi1(t * s)


def heat(s: torch.Tensor, t: torch.Tensor | float) -> Element:
    """The heat kernel ``exp(−t L) = e^{−t} I + U · t e^{−t} φ₁(t S) · Vᵀ`` of the Laplacian ``L = I − A``.

    ``e^{−t} φ₁(tS)`` is the top-right block of ``expm([[t(S − I), I], [0, −t I]])`` (``∫₀¹ e^{(1−σ)t(S−I)}
    e^{−σt} dσ``): the shift is inside the exponential, so a large ``t`` (e.g. a wavelet scale of 2048) never
    forms ``e^{tS}`` (which overflows past ``t λ ≈ 709``) to multiply it by ``e^{−t}`` (which underflows)."""
    t = torch.as_tensor(t, dtype=s.dtype, device=s.device)
    r = s.shape[-1]
    eye = _eye(s)
    big = torch.zeros(*s.shape[:-2], 2 * r, 2 * r, dtype=s.dtype, device=s.device)
    big[..., :r, :r] = t * (s - eye)
    big[..., :r, r:] = eye
    big[..., r:, r:] = -t * eye
    return torch.exp(-t), t * torch.linalg.matrix_exp(big)[..., :r, r:]


def resolvent(s: torch.Tensor, a: torch.Tensor | complex) -> Element:
    """``(aI − A)⁻¹ = a⁻¹ I + a⁻¹ U (aI − S)⁻¹ Vᵀ`` (Woodbury); complex ``a`` gives a complex element."""
    a = torch.as_tensor(a, device=s.device)
    dtype = torch.promote_types(s.dtype, a.dtype)
    a, sc = a.to(dtype), s.to(dtype)
    inv = torch.linalg.solve(_bcast(a) * _eye(sc) - sc, _eye(sc))
    return 1 / a, _bcast(1 / a) * inv


def cayley(s: torch.Tensor, h: torch.Tensor | float) -> Element:
    """Levie et al.'s Cayley transform of the Laplacian, ``C(hL) = (hL − iI)(hL + iI)⁻¹``, ``L = I − A``.

    With ``a = 1 + i/h``: ``(hλ_L − i)/(hλ_L + i) = 1 − (2i/h)(a − λ)⁻¹``, one resolvent (complex element).
    """
    h = torch.as_tensor(h, dtype=s.dtype, device=s.device)
    a = torch.complex(torch.ones_like(h), 1 / h)
    ra, rm = resolvent(s, a)
    c = torch.complex(torch.zeros_like(h), -2 / h)  # −2i/h
    return 1 + c * ra, _bcast(c) * rm


def real_imag(x: Element) -> tuple[Element, Element]:
    """The real and imaginary parts of a complex element (``A`` real, so they are the operators'
    real and imaginary parts)."""
    return (x[0].real, x[1].real), (x[0].imag, x[1].imag)


def apply(u: torch.Tensor, v: torch.Tensor, elements: list[Element], z: torch.Tensor) -> list[torch.Tensor]:
    """``[α_t Z + U M_t (Vᵀ Z)]`` for every element, in ``O(N r c)`` each (one batched GEMM for ``U``)."""
    if not elements:
        return []
    dtype = z.dtype
    u, v = u.to(dtype), v.to(dtype)
    w = v.transpose(1, 2) @ z  # (B, r, c)
    b, r, c = w.shape
    ms = torch.stack([m.to(dtype).expand(b, r, r) for _, m in elements], 1)  # (B, T, r, r)
    mw = (ms @ w.unsqueeze(1)).permute(0, 2, 1, 3).reshape(b, r, -1)  # (B, r, T·c)
    uw = (u @ mw).reshape(b, -1, len(elements), c)
    out = []
    for i, (a, _) in enumerate(elements):
        a = a.to(dtype)
        a = a.reshape(-1, 1, 1) if a.dim() else a
        out.append(a * z + uw[:, :, i])
    return out


def dense_affinity(u: torch.Tensor, v: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """``A = U Vᵀ`` (B, N, N) in float64 (the product in the factors' dtype, as :func:`core_matrix`);
    ``symmetric``: ``(A + Aᵀ)/2`` (the symmetric normalization, where ``U Vᵀ`` is symmetric up to rounding)."""
    with torch.autocast(u.device.type if u.device.type in ("cuda", "cpu") else "cpu", enabled=False):
        a = (u @ v.transpose(1, 2)).to(CORE_DTYPE)
    return 0.5 * (a + a.transpose(1, 2)) if symmetric else a


class _SymmetricFunctions(torch.autograd.Function):
    """``[f_t(A) Z]`` for a symmetric ``A`` through one ``eigh``; backward by the Daleckii–Krein formula.

    Forward: ``A = Q Λ Qᵀ``, ``f_t(A) Z = Q (f_t(Λ) ∘ QᵀZ)``. Backward (``Ḡ_t = dY_t Zᵀ``, never formed):
    ``Qᵀ Ḡ_t Q = (Qᵀ dY_t)(QᵀZ)ᵀ``; ``∂/∂A = Q (Σ_t Γ_t ∘ Qᵀ Ḡ_t Q) Qᵀ`` with ``Γ_t[i, j] = f_t[λ_i, λ_j]``
    the divided differences (``f_t'(λ_i)`` where ``λ_i = λ_j``), which is the derivative of the matrix function
    itself, smooth at repeated eigenvalues (the eigenvectors' own gradient, which ``eigh``'s autograd uses, is
    not: it has ``1/(λ_i − λ_j)``); ``∂/∂Z = Q Σ_t f_t(Λ) ∘ (Qᵀ dY_t)``; the scales through
    ``diag(Qᵀ Ḡ_t Q)·∂f_t(λ)/∂scales``. ``values(scales, λ) -> (T, B, N)`` (differentiable in ``scales``) and
    ``divided(scales, λ) -> (T, B, N, N)`` come from the filter (:mod:`spectral_filters`)."""

    @staticmethod
    def forward(ctx, a, scales, z, values, divided):
        lam, q = torch.linalg.eigh(a)
        f = values(scales, lam)
        qz = q.to(z.dtype)
        w = qz.transpose(1, 2) @ z  # (B, N, c)
        y = qz.unsqueeze(0) @ (f.to(z.dtype).unsqueeze(-1) * w.unsqueeze(0))  # (T, B, N, c)
        ctx.save_for_backward(lam, q, scales, w)
        ctx.fns = values, divided
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        lam, q, scales, w = ctx.saved_tensors
        values, divided = ctx.fns
        qz = q.to(gy.dtype)
        gw = qz.transpose(1, 2).unsqueeze(0) @ gy  # Qᵀ dY_t, (T, B, N, c)
        with torch.enable_grad():
            sc = scales.detach().requires_grad_(True)
            f = values(sc, lam)
        ga = gs = gz = None
        if ctx.needs_input_grad[2]:
            gz = qz @ (f.detach().to(gy.dtype).unsqueeze(-1) * gw).sum(0)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            h = (gw @ w.transpose(1, 2).unsqueeze(0)).to(CORE_DTYPE)  # Qᵀ Ḡ_t Q, (T, B, N, N)
            if ctx.needs_input_grad[1]:
                gs = (torch.autograd.grad(f, sc, h.diagonal(dim1=-2, dim2=-1), allow_unused=True)[0]
                      if f.requires_grad else None)  # no term depends on the scales (e.g. Cayley of order 0)
                gs = torch.zeros_like(scales) if gs is None else gs
            if ctx.needs_input_grad[0]:
                ga = q @ (divided(scales, lam) * h).sum(0) @ q.transpose(1, 2)
        return ga, gs, gz, None, None


def symmetric_functions(a: torch.Tensor, scales: torch.Tensor, z: torch.Tensor, values, divided) -> torch.Tensor:
    """``[f_t(A) Z]`` (T, B, N, c) for a symmetric dense ``A`` (B, N, N, float64): one ``eigh`` for every term,
    ``O(N³ + T N² c)``, and a backward of ``O(N³ + T N² c)`` (:class:`_SymmetricFunctions`)."""
    return _SymmetricFunctions.apply(a, scales, z, values, divided)


def eigenvalues(u: torch.Tensor, v: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """All ``N`` eigenvalues of ``A = U Vᵀ`` per batch item, from the ``r × r`` core (``O(N r² + r³)``).

    The nonzero eigenvalues of ``U Vᵀ`` are those of ``S = Vᵀ U``; the rest are 0. ``symmetric``: ``A`` is
    symmetric (the symmetric normalization, ``V = U Π``), so the spectrum is real; it is then computed from the
    symmetric ``G^{1/2} Π G^{1/2}`` (``G = UᵀU``, pseudo square root: the null space of ``G`` only adds
    zeros) with ``eigvalsh``, sorted ascending. Otherwise complex (``eigvals`` of ``S``).
    """
    n, r = u.shape[1], u.shape[2]
    uu, vv = u.to(CORE_DTYPE), v.to(CORE_DTYPE)
    if symmetric:
        if n < r:  # fewer nodes than rank: the dense N × N problem is the smaller one
            return torch.linalg.eigvalsh(uu @ vv.transpose(1, 2))
        h = r // 2
        pi = torch.zeros(r, r, dtype=CORE_DTYPE, device=u.device)
        pi[:h, h:] = pi[h:, :h] = torch.eye(h, dtype=CORE_DTYPE, device=u.device)
        g = uu.transpose(1, 2) @ uu
        sig, e = torch.linalg.eigh(g)
        root = e @ torch.diag_embed(sig.clamp_min(0).sqrt()) @ e.transpose(1, 2)
        lam = torch.linalg.eigvalsh(root @ pi @ root)
        zeros = torch.zeros(u.shape[0], n - r, dtype=lam.dtype, device=lam.device)
        return torch.cat([lam, zeros], 1).sort(1).values
    if n < r:
        return torch.linalg.eigvals(uu @ vv.transpose(1, 2))
    lam = torch.linalg.eigvals(vv.transpose(1, 2) @ uu)
    zeros = torch.zeros(u.shape[0], n - r, dtype=lam.dtype, device=lam.device)
    return torch.cat([lam, zeros], 1)


def spectrum(graph) -> tuple[torch.Tensor, bool]:
    """All eigenvalues of a factorizable square graph's ``A`` (``(B, N)``) and whether they are real (the
    symmetric normalization), through the core: ``O(N r² + r³)``, no ``N × N`` matrix."""
    if not isinstance(graph, LowRankGraph) or not graph.square:
        raise ValueError(f"graph: the core spectrum needs a factorizable square graph (LowRankGraph, N' = N), got "
                         f"{type(graph).__name__} with backend {graph.backend!r}")
    sym = graph.normalization == "symmetric"
    return eigenvalues(graph.u, graph.v, symmetric=sym), sym
