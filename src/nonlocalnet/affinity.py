"""Step 1 of every nonlocal block: the affinity ``A`` (the graph), as an operator.

A kernel gives ``M`` (per batch item, ``N × N'``), a normalization turns it into ``A``
(docs/framework.md "Step 1"; Eq. 2 of L. Zhu, Q. She, L. Zhang, P. Guo, "A Spectral Nonlocal Block for Neural
Networks", ICLR 2020 submission, OpenReview rkgb9kSKwS; Eq. 5 of L. Zhu et al., "Unifying Nonlocal Blocks for
Neural Networks", ICCV 2021, arXiv:2108.02451, numbered as in its submitted version; "Zhu et al. 2021 (ICCV)"
below). Blocks never ask for ``A`` itself: they ask for products ``A @ V`` with ``V`` of shape ``(B, N', c)``.
Each backend answers that product differently, all exactly:

- :class:`LowRankGraph` — ``M = P Qᵀ`` (``dot_product``, ``relu_dot``, A²'s double attention):
  ``A V`` in ``O(N·r·c)``, no ``N × N'`` tensor (docs/framework.md "Low rank").
- :class:`PairwiseGraph` — any kernel, evaluated in blocks of query rows (``chunked``) or all at once
  (``dense``). Exp kernels are evaluated in the log domain: softmax per row, and a global shift for
  the symmetric normalization (which is invariant to scaling ``M``).
- :class:`SDPAGraph` — exp kernels with the softmax normalization through
  :func:`torch.nn.functional.scaled_dot_product_attention`.
- :class:`CrissCrossGraph` — CCNet's masked softmax over the positions that differ from the query
  in at most one coordinate, ``O(N·ΣL_d)``.
- :class:`ChannelGraph` — CGNL's graph over positions × channels (Yue et al. 2018), factorized.
- :class:`UnaryGraph` — the query-independent graph ``A = 1·aᵀ``, ``a = softmax(w_m·x_j + b_m)`` (GC's
  attention pooling, DNL's unary term; kernel ``unary``): rank 1, ``O(N·c)``, never ``N × N'``.
- :class:`BipartiteGraph` — a graph from the positions to ``N'`` other nodes (External Attention's memory slots),
  held as its thin ``N × N'`` matrix.
- :class:`SumGraph` — a sum of graphs, ``A = Σ_i A_i`` (DNL: whitened pairwise + unary); each product
  ``A V = Σ_i A_i V`` runs on each term's own backend.
- :class:`ScaledGraph` — ``γ·A`` with a learnable scalar ``γ`` (the DNL authors' scale of the pairwise term).
- :class:`AxisGraph` — softmax along one spatial axis (a factor of axial attention), ``O(N·L_axis)``.
- :class:`ProductGraph` — a product of graphs, ``A = G_m ··· G_1`` (axial attention: ``A = A_W A_H``); each
  product ``A V = G_m(··· G_1 V)`` runs on each factor's own backend.
- :class:`HeadsGraph` — ``h`` graphs on ``h`` channel groups of the values (multi-head attention; the
  ``sdpa`` backend does the heads natively in :class:`SDPAGraph`).
- :class:`NeighborhoodGraph` — softmax over a ``k^d`` window around each position, shifted inward at the
  borders (NAT), ``O(N·k^d)``: keys gathered by index arithmetic.

Not exact, and only where a block asks for it (``approx``, docs/approximations.md): :func:`performer_graph`
(positive orthogonal random features) and :func:`nystrom_graph` (segment-mean landmarks) approximate the softmax
graph of an exp kernel by a :class:`LowRankGraph` of rank ``m``; exact is then the approximation itself, against
:mod:`nonlocalnet.reference`'s literal formulas.

Degrees and normalizers are computed in float32 under autocast. Zero degrees give zero rows
(the official SNL code's convention), never NaN or inf.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .kernels import KERNELS

MiB = 2**20


# --------------------------------------------------------------------------------------- helpers
def safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    """``1/d`` where ``d ≠ 0``, else 0 (a node with no edges gets a zero row)."""
    nz = d != 0
    return torch.where(nz, 1.0 / torch.where(nz, d, torch.ones_like(d)), torch.zeros_like(d))


def safe_rsqrt(d: torch.Tensor) -> torch.Tensor:
    """``d^{-1/2}`` where ``d > 0``, else 0 (official SNL convention; non-positive degrees only occur
    with signed kernels and are treated as isolated nodes)."""
    pos = d > 0
    return torch.where(pos, torch.where(pos, d, torch.ones_like(d)).rsqrt(), torch.zeros_like(d))


def movedim(t: torch.Tensor, src: int, dst: int) -> torch.Tensor:
    """``t.movedim`` with non-negative axes (the ONNX exporter mistranslates negative ones)."""
    return t.movedim(src % t.dim(), dst % t.dim())


def mm(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``a @ v``; outside autocast, ``a`` (possibly float32 from the normalizers) follows ``v``'s dtype."""
    if a.dtype != v.dtype and not torch.is_autocast_enabled(a.device.type):
        a = a.to(v.dtype)
    return a @ v


def full_precision(device_type: str):
    """A context with autocast off on ``device_type`` (sums and degrees in float32); a no-op context when
    autocast is not on (entering ``torch.autocast`` costs ~10 µs per call, a sizable share of a small block)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _Pool(torch.autograd.Function):
    """``c = X a`` for channels-first ``X`` ``(B, C, N)`` and weights ``a`` ``(B, N)``, each direction in its fast
    orientation: forward ``aᵀXᵀ`` (one row times the tokens view; 0.4× the time of ``X a`` at N = 4096, 1 thread),
    backward ``∂X = ∂c aᵀ`` as one broadcast product (autograd through the transposed view would hand back a
    transposed gradient, whose accumulation with the residual's is a strided add) and ``∂a = ∂cᵀ X``."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, x)
        return torch.bmm(a.unsqueeze(1), x.transpose(1, 2)).squeeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, x = ctx.saved_tensors  # under autocast the forward ran in low precision: the gradient may differ
        grad_a = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.bmm(grad.unsqueeze(1).to(x.dtype), x).squeeze(1).to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_x = (grad.unsqueeze(2) * a.unsqueeze(1)).to(x.dtype)
        return grad_a, grad_x


def pool(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Σ_j a_j x_j``: weights ``a`` ``(B, N)`` over the positions of channels-first ``x`` ``(B, C, N)`` → ``(B, C)``
    (GC's attention pooling)."""
    if x.dim() != 3 or x.stride(-1) != 1:
        return torch.bmm(x, a.unsqueeze(2)).squeeze(2)
    return _Pool.apply(a, x)


def _device_type(t: torch.Tensor) -> str:
    return t.device.type if t.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"


def float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 (float64 stays float64): for sums and degrees."""
    return t if t.dtype == torch.float64 else t.float()


def pool_tokens(t: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Wang et al.'s sub-sampling: max-pool tokens ``(B, N, c)`` laid out on ``spatial`` with kernel 2
    (1-D), (2, 2) (2-D) or (1, 2, 2) (3-D); floor mode like the public code."""
    dim = len(spatial)
    b, _, c = t.shape
    grid = movedim(t.reshape(b, *spatial, c), -1, 1)
    if dim == 1:
        pooled = F.max_pool1d(grid, 2)
    elif dim == 2:
        pooled = F.max_pool2d(grid, (2, 2))
    else:
        pooled = F.max_pool3d(grid, (1, 2, 2))
    return movedim(pooled, 1, -1).reshape(b, -1, c)


def pooled_shape(spatial: tuple[int, ...]) -> tuple[int, ...]:
    if len(spatial) == 3:
        return (spatial[0], spatial[1] // 2, spatial[2] // 2)
    return tuple(s // 2 for s in spatial)


def adaptive_bins(length: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """The ``(size, length)`` averaging matrix of PyTorch's adaptive pooling bins along one axis: bin ``i`` is the
    mean over ``[floor(i·L/s), ceil((i+1)·L/s))``, built from tensor ops (what ONNX export traces)."""
    i = torch.arange(size, device=like.device)
    start, end = (i * length) // size, ((i + 1) * length + size - 1) // size
    j = torch.arange(length, device=like.device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


_ADAPTIVE_AVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def adaptive_pool_tokens(t: torch.Tensor, spatial: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling of tokens ``(B, N, c)`` laid out on ``spatial`` to ``grid`` bins (row-major):
    ``F.adaptive_avg_pool{d}d`` on the channels-last view; under ONNX export (which has no adaptive pooling for
    sizes that do not divide the input) the same means as per-axis bin matrices (:func:`adaptive_pool_matrices`)."""
    if torch.onnx.is_in_onnx_export():
        return adaptive_pool_matrices(t, spatial, grid)
    b, _, c = t.shape
    pooled = _ADAPTIVE_AVG[len(spatial)](movedim(t.reshape(b, *spatial, c), -1, 1), tuple(grid))
    return movedim(pooled, 1, -1).reshape(b, -1, c)


def adaptive_pool_matrices(t: torch.Tensor, spatial: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """:func:`adaptive_pool_tokens` as one small matrix product per axis (:func:`adaptive_bins`): the mean over a
    product of per-axis bins is the product of per-axis means."""
    b, _, c = t.shape
    g = t.reshape(b, *spatial, c)
    for axis, (length, size) in enumerate(zip(spatial, grid)):
        g = movedim(torch.matmul(adaptive_bins(length, size, g), movedim(g, 1 + axis, -2)), -2, 1 + axis)
    return g.reshape(b, -1, c)


def pyramid_pool_tokens(t: torch.Tensor, spatial: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    """APNB's pyramid sampling (Zhu, Xu, Huang, Bai, "Asymmetric Non-local Neural Networks for Semantic
    Segmentation", ICCV 2019): tokens ``(B, N, c)`` laid out on ``spatial`` average-pooled adaptively
    to ``s^d`` bins for each ``s`` in ``sizes`` (PyTorch's adaptive bins, as the authors' ``PSPModule``), the bins
    concatenated in that order: ``(B, N', c)`` with ``N' = Σ_s s^d`` (110 for 1, 3, 6, 8 in 2-D)."""
    return torch.cat([adaptive_pool_tokens(t, spatial, (s,) * len(spatial)) for s in sizes], 1)


def sample_keys(t: torch.Tensor, spatial: tuple[int, ...], pool_sizes: tuple[int, ...] | None) -> torch.Tensor:
    """The key side of a sub-sampled graph: Wang et al.'s 2× max-pool (:func:`pool_tokens`, ``pool_sizes=None``)
    or APNB's pyramid of adaptive average pools (:func:`pyramid_pool_tokens`)."""
    return pool_tokens(t, spatial) if pool_sizes is None else pyramid_pool_tokens(t, spatial, pool_sizes)


# --------------------------------------------------------------------------------------- graphs
class Graph:
    """An affinity operator ``A`` of shape ``(B, N, N')``. Subclasses implement :meth:`matmul`."""

    backend = "abstract"
    n: int
    n_keys: int

    def matmul(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def dense(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def square(self) -> bool:
        return self.n == self.n_keys


class LowRankGraph(Graph):
    """``M = P Qᵀ`` with ``P: (B, N, r)``, ``Q: (B, N', r)``, normalized without forming ``M``.

    docs/framework.md "Low rank": ``M Z = P (Qᵀ Z)``, ``M̂ Z = (P(QᵀZ) + Q(PᵀZ))/2``,
    degrees ``M̂ 1 = (P(Qᵀ1) + Q(Pᵀ1))/2``, ``A Z = D̂^{-1/2} M̂ (D̂^{-1/2} Z)``.

    Every normalization is folded into the factors once, so ``A = U Vᵀ`` and each product
    ``A V`` costs two thin matmuls and nothing else:
    ``none``: ``U = P, V = Q``; ``count``: ``U = P/N'``; ``row``: ``U = D⁻¹P``;
    ``symmetric``: ``U = [SP, SQ]/√2``, ``V = [SQ, SP]/√2`` with ``S = D̂^{-1/2}``.
    """

    backend = "lowrank"

    def __init__(self, p: torch.Tensor, q: torch.Tensor, normalization: str, unit_rows: bool = False,
                 joint: torch.Tensor | None = None):
        """``joint``: ``[P, Q]`` as one tensor ``(B, N, 2r)`` whose halves are ``p`` and ``q`` (θ and φ projected
        by one GEMM). With the symmetric normalization ``U = S·joint/√2`` is then formed by one scaling pass and
        ``V = [SQ, SP]/√2`` is ``U`` with its halves swapped: :attr:`swap` says so, and ``V`` is only formed if
        asked for (the unit's low-rank path swaps the rows of ``UᵀZ`` instead)."""
        self.p, self.q, self.normalization = p, q, normalization
        self.swap = 0
        self._v: torch.Tensor | None = None
        # every row of U sums to 1 (A²: U = softmax over channels, no normalization), so a constant c per
        # output channel is c 1ᵀ Uᵀ: the unit folds its bias into the small factor (NonlocalUnit)
        self.unit_rows = unit_rows and normalization == "none"
        self.n, self.n_keys = p.shape[1], q.shape[1]
        self.left: torch.Tensor | None = None  # (B, N, 1) degree scaling, float32 (for inspection)
        u, v = p, q
        if normalization == "count":
            u = p / self.n_keys
        elif normalization in ("row", "softmax"):
            with full_precision(_device_type(p)):
                d = float32(p) @ float32(q).sum(1).unsqueeze(-1)  # M 1
            self.left = safe_reciprocal(d)
            u = self.left * p
        elif normalization == "symmetric" and joint is not None:
            r = p.shape[-1]
            with full_precision(_device_type(p)):
                jf = float32(joint)
                sums = jf.sum(1)  # [Pᵀ1, Qᵀ1]
                d = 0.5 * (jf @ torch.cat([sums[:, r:], sums[:, :r]], -1).unsqueeze(-1))  # P(Qᵀ1) + Q(Pᵀ1)
            self.left = safe_rsqrt(d)
            self.swap = r
            u, v = joint * (self.left * math.sqrt(0.5)), None  # V: see the property
        elif normalization == "symmetric":
            with full_precision(_device_type(p)):
                pf, qf = float32(p), float32(q)
                d = 0.5 * (pf @ qf.sum(1).unsqueeze(-1) + qf @ pf.sum(1).unsqueeze(-1))
            self.left = safe_rsqrt(d)
            sp, sq = (self.left * math.sqrt(0.5)) * p, (self.left * math.sqrt(0.5)) * q
            u, v = torch.cat([sp, sq], -1), torch.cat([sq, sp], -1)
        self.u, self._v = u, v

    @property
    def v(self) -> torch.Tensor:
        if self._v is None:  # swap: V = U with its two halves exchanged
            self._v = torch.cat([self.u[..., self.swap:], self.u[..., :self.swap]], -1)
        return self._v

    def swap_rows(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``t`` with its two halves along ``dim`` exchanged when :attr:`swap` (``VᵀZ = Π UᵀZ``), else ``t``."""
        if not self.swap:
            return t
        r = self.swap
        return torch.cat([t.narrow(dim, r, r), t.narrow(dim, 0, r)], dim)

    def factors(self, dtype: torch.dtype, need_v: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(U, V)``; outside autocast in ``dtype`` (the normalizers' degrees are float32). ``need_v=False``:
        ``V`` is ``None`` when :attr:`swap` (not formed)."""
        u = self.u
        v = self.v if need_v or not self.swap else None
        if u.dtype != dtype and not torch.is_autocast_enabled(u.device.type):
            u, v = u.to(dtype), None if v is None else v.to(dtype)
        return u, v

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.factors(x.dtype)
        return u @ (v.transpose(1, 2) @ x)

    def dense(self) -> torch.Tensor:
        return self.u @ self.v.transpose(1, 2)


class PairwiseKernel:
    """A kernel evaluated on blocks of rows: ``rows(i0, i1)`` gives ``M[:, i0:i1, :]`` and
    ``cols(i0, i1)`` gives ``M[:, :, i0:i1]ᵀ``; for exp kernels both return logits (``log M``)."""

    exp = False

    def __init__(self, n: int, n_keys: int, batch: int, device_type: str = "cpu"):
        self.n, self.n_keys, self.batch, self.device_type = n, n_keys, batch, device_type

    def rows(self, i0: int, i1: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def cols(self, i0: int, i1: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class BilinearKernel(PairwiseKernel):
    """``M_ij = p_i · q_j`` (dot kernels) or ``exp(s · p_i · q_j)`` (exp kernels, ``exp=True``)."""

    def __init__(self, p: torch.Tensor, q: torch.Tensor, exp: bool, scale: float = 1.0):
        super().__init__(p.shape[1], q.shape[1], p.shape[0], _device_type(p))
        self.p, self.q, self.exp, self.scale = p, q, exp, scale

    def rows(self, i0, i1):
        s = self.p[:, i0:i1] @ self.q.transpose(1, 2)
        return s * self.scale if self.scale != 1.0 else s

    def cols(self, i0, i1):
        s = self.q[:, i0:i1] @ self.p.transpose(1, 2)
        return s * self.scale if self.scale != 1.0 else s


class ConcatKernel(PairwiseKernel):
    """Wang et al.'s concatenation kernel ``M_ij = relu(w_f·[θ_i; φ_j]) = relu(a_i + b_j)``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__(a.shape[1], b.shape[1], a.shape[0], _device_type(a))
        self.a, self.b = a, b  # (B, N), (B, N')

    def rows(self, i0, i1):
        return F.relu(self.a[:, i0:i1, None] + self.b[:, None, :])

    def cols(self, i0, i1):
        return F.relu(self.b[:, i0:i1, None] + self.a[:, None, :])


class PairwiseGraph(Graph):
    """Any kernel and normalization, evaluated ``chunk`` query rows at a time.

    ``chunk >= N`` is the ``dense`` backend (``A`` is formed once and cached, then reused for every
    product of the stage). Otherwise the ``chunked`` backend: peak extra memory is about
    ``B · chunk · N'`` elements, and under autograd each chunk is recomputed in backward
    (activation checkpointing), so training memory stays bounded too.
    """

    def __init__(self, kernel: PairwiseKernel, normalization: str, chunk: int | None = None):
        self.kernel, self.normalization = kernel, normalization
        self.n, self.n_keys = kernel.n, kernel.n_keys
        self.chunk = self.n if chunk is None else max(1, min(int(chunk), self.n))
        self.backend = "dense" if self.chunk >= self.n else "chunked"
        self._dense: torch.Tensor | None = None
        self._shift: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None  # D̂^{-1/2} for the symmetric normalization
        if normalization == "symmetric":
            self._prepare_symmetric()

    # -- the symmetric normalization needs the degrees (and, for exp kernels, a global shift) first
    def _blocks(self):
        for i0 in range(0, self.n, self.chunk):
            yield i0, min(i0 + self.chunk, self.n)

    def _prepare_symmetric(self) -> None:
        k = self.kernel
        with full_precision(k.device_type):
            shift = None
            if k.exp:
                maxes = [float32(k.rows(i0, i1)).amax(dim=(1, 2)) for i0, i1 in self._blocks()]
                shift = torch.stack(maxes, 0).amax(0).view(-1, 1, 1).detach()
            rowsum, colsum = [], 0.0
            for i0, i1 in self._blocks():
                e = self._values(float32(k.rows(i0, i1)), shift)
                rowsum.append(e.sum(-1))
                colsum = colsum + e.sum(1)
            d = 0.5 * (torch.cat(rowsum, 1) + colsum)
        self._shift = shift
        self._scale = safe_rsqrt(d).unsqueeze(-1)

    @staticmethod
    def _values(logits: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        return torch.exp(logits - shift) if shift is not None else logits

    def _rows_normalized(self, i0: int, i1: int) -> torch.Tensor:
        """Rows ``i0:i1`` of ``A`` (dense block)."""
        k, norm = self.kernel, self.normalization
        r = k.rows(i0, i1)
        if norm == "symmetric":
            c = k.cols(i0, i1)
            if k.exp:
                r, c = self._values(float32(r), self._shift), self._values(float32(c), self._shift)
            m = 0.5 * (r + c)
            s = self._scale
            return s[:, i0:i1] * m * s.transpose(1, 2)
        if k.exp:
            if norm in ("softmax", "row"):
                return torch.softmax(r, dim=-1)
            r = torch.exp(r)
        if norm == "count":
            return r / self.n_keys
        if norm == "row":
            with full_precision(_device_type(r)):
                d = float32(r).sum(-1, keepdim=True)
            return r * safe_reciprocal(d).to(r.dtype)
        return r

    def _apply_block(self, i0: int, i1: int, v: torch.Tensor) -> torch.Tensor:
        return mm(self._rows_normalized(i0, i1), v)

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = torch.cat([self._rows_normalized(i0, i1) for i0, i1 in self._blocks()], 1)
        return self._dense

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        if self.backend == "dense":
            return mm(self.dense(), v)
        outs = []
        for i0, i1 in self._blocks():
            if torch.is_grad_enabled():  # recompute the block in backward: memory stays bounded
                outs.append(checkpoint(self._apply_block, i0, i1, v, use_reentrant=False))
            else:
                outs.append(self._apply_block(i0, i1, v))
        return torch.cat(outs, 1)


class SDPAGraph(Graph):
    """Exp kernel with softmax normalization via fused attention (O(N) memory)."""

    backend = "sdpa"

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scale: float, heads: int = 1):
        """``heads``: ``h`` graphs, head ``i`` on the ``i``-th of ``h`` equal channel groups of ``q``, ``k`` and of
        every ``V`` (multi-head attention, Vaswani et al., "Attention Is All You Need", NeurIPS 2017, Eq. 1 and
        §3.2.2), in one fused call ``(B, h, N, c/h)``."""
        self.q, self.k, self.scale, self.heads = q, k, scale, heads
        self.n, self.n_keys = q.shape[1], k.shape[1]

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, N, c) -> (B, h, N, c/h)``."""
        return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

    def _matmul_heads(self, v: torch.Tensor) -> torch.Tensor:
        q, k = self.q, self.k
        if q.dtype != v.dtype:
            v = v.to(q.dtype)
        q, k, v = self._split(q), self._split(k), self._split(v)
        cv, ck = v.shape[-1], q.shape[-1]
        if cv < ck:  # one width for queries, keys and values (the fused kernel; see matmul)
            v = F.pad(v, (0, ck - cv))
        elif ck < cv:
            q, k = F.pad(q, (0, cv - ck)), F.pad(k, (0, cv - ck))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out[..., :cv] if cv < ck else out
        return out.transpose(1, 2).reshape(out.shape[0], self.n, -1)

    def head_dense(self) -> torch.Tensor:
        """``(B, h, N, N')``: each head's softmax graph."""
        return torch.softmax(self.scale * (self._split(self.q) @ self._split(self.k).transpose(-1, -2)), dim=-1)

    def matmul(self, v):
        if self.heads > 1:
            return self._matmul_heads(v)
        q, k = self.q, self.k
        if q.dtype != v.dtype:
            v = v.to(q.dtype)
        # The fused (flash) CPU kernel takes (B, H, L, E) with one E for queries, keys and values; otherwise (a
        # 3-D call, or e.g. Wang et al.'s Gaussian: E = C for the raw-feature queries, C/2 for the values) it falls
        # back to the math path, which forms the N × N' softmax. Zero channels make the widths equal and change
        # nothing: q·k is unchanged by zero columns, and a zero value column is a zero output column, sliced off
        # (measured here, N = 4096, E = 64 vs 32: ~4x faster than the fallback).
        # it also needs unit-stride channels: a tokens view of a channels-first tensor (the Gaussian's raw X) is
        # made contiguous once (q and k are then one tensor)
        same = k is q
        if q.stride(-1) != 1:
            q = q.contiguous()
            k = q if same else k
        k = k.contiguous() if k.stride(-1) != 1 else k
        v = v.contiguous() if v.stride(-1) != 1 else v
        cv, ck = v.shape[-1], q.shape[-1]
        if cv < ck:
            v = F.pad(v, (0, ck - cv))
        elif ck < cv:
            q, k = F.pad(q, (0, cv - ck)), F.pad(k, (0, cv - ck))
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=self.scale)
        out = out.squeeze(1)
        return out[..., :cv] if cv < ck else out

    def dense(self):
        if self.heads > 1:  # for analysis: the mean of the heads' graphs (HeadsGraph's convention)
            return self.head_dense().mean(1)
        return torch.softmax(self.scale * (self.q @ self.k.transpose(1, 2)), dim=-1)


class CrissCrossGraph(Graph):
    """Criss-cross attention (Huang et al. 2019; Zhu et al. 2021 (ICCV), §B.5): softmax of ``q_i·k_j`` over the
    positions ``j`` that differ from ``i`` in at most one coordinate, the query itself counted once.

    Generalized to any ``dim``: 1-D is global attention, 2-D is CCNet's row+column, 3-D adds the
    time axis. Cost ``O(N · Σ_d L_d)``; never an ``N × N`` tensor (but :meth:`dense`, for analysis).
    """

    backend = "crisscross"

    def __init__(self, q: torch.Tensor, k: torch.Tensor, spatial: tuple[int, ...], scale: float):
        self.q, self.k, self.spatial, self.scale = q, k, tuple(spatial), scale
        self.n = self.n_keys = q.shape[1]
        self._weights: list[torch.Tensor] | None = None

    def _grid(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], *self.spatial, t.shape[-1])

    def weights(self) -> list[torch.Tensor]:
        """Per axis ``d``: attention weights ``(B, *S, L_d)`` of the joint softmax."""
        if self._weights is None:
            q, k = self._grid(self.q), self._grid(self.k)
            energies = []
            for d, length in enumerate(self.spatial):
                qd, kd = movedim(q, 1 + d, -2), movedim(k, 1 + d, -2)  # (B, ..., L_d, c)
                e = (qd @ kd.transpose(-1, -2)) * self.scale  # (B, ..., L_i, L_j)
                if d > 0:  # the query itself is already counted on axis 0
                    eye = torch.eye(length, dtype=torch.bool, device=e.device)
                    e = e.masked_fill(eye, float("-inf"))
                energies.append(movedim(e, -2, 1 + d))  # (B, *S, L_j)
            att = torch.softmax(torch.cat(energies, -1), dim=-1)
            self._weights = list(att.split(list(self.spatial), dim=-1))
        return self._weights

    def _weights_2d(self) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D: the row weights ``(B, H, W, W)`` and the column weights laid out column-major, ``(B, W, H, H)``,
        so that both products are one plain ``bmm`` over contiguous batches. The joint softmax over a query's row
        and column is :class:`_JointSoftmax2d` (shared shift, two exps, one sum, its own backward) instead of a
        ``cat`` + softmax + split."""
        if self._weights is None:
            b, c = self.q.shape[0], self.q.shape[-1]
            hh, ww = self.spatial
            q, k = self._grid(self.q), self._grid(self.k)  # (B, H, W, c)
            e_row = q.reshape(b * hh, ww, c) @ k.reshape(b * hh, ww, c).transpose(1, 2)  # (B·H, W, W)
            qt, kt = q.transpose(1, 2).reshape(b * ww, hh, c), k.transpose(1, 2).reshape(b * ww, hh, c)
            e_col = qt @ kt.transpose(1, 2)  # (B·W, H, H): column energies, queries column-major
            self._weights = list(_JointSoftmax2d.apply(e_row.reshape(b, hh, ww, ww), e_col.reshape(b, ww, hh, hh),
                                                       float(self.scale), hh))
        return self._weights[0], self._weights[1]

    def _matmul_2d(self, v: torch.Tensor) -> torch.Tensor:
        b, n, c = v.shape
        hh, ww = self.spatial
        a_row, a_col = self._weights_2d()
        vg = v.reshape(b, hh, ww, c)
        out = mm(a_row.reshape(b * hh, ww, ww), vg.reshape(b * hh, ww, c)).reshape(b, hh, ww, c)
        col = mm(a_col.reshape(b * ww, hh, hh), vg.transpose(1, 2).reshape(b * ww, hh, c)).reshape(b, ww, hh, c)
        return out.add_(col.transpose(1, 2)).reshape(b, n, c)  # in place: no product saves its output

    def matmul(self, v):
        if len(self.spatial) == 2:
            return self._matmul_2d(v)
        grid = self._grid(v)
        out = 0
        for d, a in enumerate(self.weights()):
            ad = movedim(a, 1 + d, -2)  # (B, ..., L_i, L_j)
            vd = movedim(grid, 1 + d, -2)  # (B, ..., L_j, c)
            out = out + movedim(mm(ad, vd), -2, 1 + d)
        return out.reshape(v.shape)

    def dense(self):
        b = self.q.shape[0]
        coords = torch.stack(
            torch.meshgrid(*[torch.arange(s, device=self.q.device) for s in self.spatial], indexing="ij"), -1
        ).reshape(-1, len(self.spatial))
        differ = (coords[:, None, :] != coords[None, :, :]).sum(-1)
        mask = differ <= 1
        s = (self.q @ self.k.transpose(1, 2)) * self.scale
        s = s.masked_fill(~mask.expand(b, -1, -1), float("-inf"))
        return torch.softmax(s, dim=-1)


class _JointSoftmax2d(torch.autograd.Function):
    """CCNet's softmax over a query's row and column at once (Huang et al., "CCNet: Criss-Cross Attention for
    Semantic Segmentation", ICCV 2019, Eq. 1-2): from the row energies ``e_row`` ``(B, H, W, W)`` and the column
    energies laid out column-major ``e_col`` ``(B, W, H, H)`` (both unscaled; ``height`` = H as a Python int,
    so that a traced export holds a constant mask), the weights
    ``a = softmax(scale·[e_row, e_col])`` with the query's own entry counted once (on its row: the column
    diagonal is set to 0 after the exp, which is ``exp(-inf)``).

    The shift ``m`` is the largest scaled energy of the row and column; the column diagonal equals the row entry
    of the query itself, so including it does not change ``m``. Forward: one allocation per part (shift, exp,
    normalize in place). Backward (the softmax's): ``∂e = scale·a ⊙ (g − Σ_j a_j g_j)``, the sum over the row
    and column together; the masked entries have ``a = 0`` and get 0. Once differentiable (double backward
    raises)."""

    @staticmethod
    def forward(ctx, e_row, e_col, scale, height):
        with torch.no_grad():
            m = torch.maximum(e_row.amax(-1), e_col.amax(-1).transpose(1, 2))  # (B, H, W), unscaled
            if scale < 0:  # the largest scaled energy is then the smallest one
                m = torch.minimum(e_row.amin(-1), e_col.amin(-1).transpose(1, 2))
            m = m * scale
            a_row = torch.add(-m.unsqueeze(-1), e_row, alpha=scale).exp_()
            a_col = torch.add(-m.transpose(1, 2).unsqueeze(-1), e_col, alpha=scale).exp_()
            # the query itself: counted on its row (masked_fill_ on the whole tensor, not zero_ on a diagonal view,
            # which the ONNX tracer drops)
            a_col.masked_fill_(torch.eye(height, dtype=torch.bool, device=a_col.device), 0.0)
            r = (a_row.sum(-1) + a_col.sum(-1).transpose(1, 2)).reciprocal_()  # (B, H, W)
            a_row.mul_(r.unsqueeze(-1))
            a_col.mul_(r.transpose(1, 2).unsqueeze(-1))
        ctx.scale = scale
        ctx.save_for_backward(a_row, a_col)
        return a_row, a_col

    @staticmethod
    @once_differentiable  # its weights are saved without history: a second derivative is refused, not wrong
    def backward(ctx, g_row, g_col):
        a_row, a_col = ctx.saved_tensors
        if g_row is None:
            g_row = torch.zeros_like(a_row)
        if g_col is None:
            g_col = torch.zeros_like(a_col)
        s = (g_row * a_row).sum(-1) + (g_col * a_col).sum(-1).transpose(1, 2)  # (B, H, W)
        d_row = (g_row - s.unsqueeze(-1)).mul_(a_row)
        d_col = (g_col - s.transpose(1, 2).unsqueeze(-1)).mul_(a_col)
        if ctx.scale != 1.0:
            d_row.mul_(ctx.scale)
            d_col.mul_(ctx.scale)
        return d_row, d_col, None, None


class ChannelGraph(Graph):
    """CGNL's graph (Yue et al. 2018; Zhu et al. 2021 (ICCV), §B.4): nodes are (position, channel) pairs of each group,
    ``y = Σ_p φ_p(t) · ⟨φ_p(p), g⟩`` with the inner product over all positions and channels of the group.

    ``dot_product``: one feature ``t`` itself. ``gaussian``: the RBF ``exp(-γ (t - p)²)`` expanded to
    Taylor order ``P``: ``exp(-γt²) exp(-γp²) Σ_{k≤P} (2γ)^k/k! t^k p^k`` (``prefactor="exact"``: exact per-node
    prefactors); ``prefactor="constant"``: the CGNL authors' code, which replaces them with the constant
    ``exp(-2γ)``. ``scale``: ``True`` divides by ``sqrt(N'·C_g)`` (the authors' ``use_scale``), a float multiplies.
    """

    backend = "lowrank"

    def __init__(self, t, p, groups: int, kernel: str, order: int, gamma: float, normalization: str,
                 scale: bool | float, prefactor: str = "exact",
                 source: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """``t``, ``p``: the projected queries and keys ``(B, N, C_s)``; or ``None`` with ``source = (x, W_θ,
        W_φ)`` (tokens ``(B, N, C)`` and bias-free weights ``(C_s, C)``, keys not sub-sampled): ``t`` and ``p``
        are then formed on first use only, so that :class:`~nonlocalnet.blocks.NonlocalUnit` can take the dot
        kernel through the Gram matrix of ``x`` without them."""
        self._t, self._p, self.source, self.groups, self.kernel = t, p, source, groups, kernel
        self.order, self.gamma, self.normalization, self.scale = order, gamma, normalization, scale
        self.prefactor = prefactor
        self.n = (source[0] if t is None else t).shape[1]
        self.n_keys = self.n if p is None else p.shape[1]

    @property
    def t(self) -> torch.Tensor:
        if self._t is None:
            self._t = self.source[0] @ self.source[1].t()
        return self._t

    @property
    def p(self) -> torch.Tensor:
        if self._p is None:
            self._p = self.source[0] @ self.source[2].t()
        return self._p

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, N, C, P+1)`` Taylor features (one feature for the dot kernel)."""
        if self.kernel == "dot_product":
            return x.unsqueeze(-1)
        g = self.gamma
        pref = torch.exp(-g * x * x) if self.prefactor == "exact" else math.exp(-g)  # exp(-γ) per side: exp(-2γ)
        y = math.sqrt(2 * g) * x  # (√(2γ) x)^k / √k!: no k! as a float (it overflows past k = 170), no bare x^k
        feats = [pref * math.exp(-0.5 * math.lgamma(k + 1)) * y**k for k in range(self.order + 1)]
        return torch.stack(feats, -1)

    def norm_factor(self, n_nodes: int) -> float:
        f = 1.0
        if self.normalization == "count":
            f /= n_nodes
        if self.scale is True:
            f /= math.sqrt(n_nodes)
        elif not isinstance(self.scale, bool):
            f *= float(self.scale)
        return f

    def matmul(self, v):
        if self.kernel == "dot_product" and type(self) is ChannelGraph:
            return self._matmul_dot(v)
        b, n_keys, c = v.shape
        n, cg = self.t.shape[1], c // self.groups
        # ⟨φ_k(p), g⟩ sums N'·C_g signed products into one number per group: like a degree, it is computed in
        # float32 under autocast (in bf16 it cancels catastrophically). Everything here is O(N·C·K).
        with full_precision(_device_type(v)):
            t, p, vf = float32(self.t), float32(self.p), float32(v)
            ft = self.features(t).reshape(b, n, self.groups, cg, -1)  # (B, N, G, C_g, K)
            fp = self.features(p).reshape(b, n_keys, self.groups, cg, -1)
            att = torch.einsum("bngck,bngc->bgk", fp, vf.reshape(b, n_keys, self.groups, cg))
            y = torch.einsum("bngck,bgk->bngc", ft, att) * self.norm_factor(n_keys * cg)
        return y.reshape(b, n, c)

    def _matmul_dot(self, v: torch.Tensor) -> torch.Tensor:
        """The dot kernel, as the CGNL authors compute it: one number per group ``⟨p, g⟩`` (a dot product over
        the group's ``N'·C_g`` nodes), then ``y = t · ⟨p, g⟩`` — one reduction and one scaling pass, in the
        tokens' own layout (no feature axis, no einsum copies)."""
        b, n_keys, c = v.shape
        groups = self.groups
        with full_precision(_device_type(v)):  # the group sums in float32 (see below)
            p, vf = float32(self.p), float32(v)
            if groups == 1:
                att = torch.bmm(p.reshape(b, 1, -1), vf.reshape(b, -1, 1)).reshape(b, 1, 1)
            else:
                att = (p * vf).reshape(b, n_keys, groups, -1).sum((1, 3)).repeat_interleave(c // groups, 1)[:, None]
            att = att * self.norm_factor(n_keys * (c // groups))
            t = self.t
            return t * att.to(t.dtype) if t.dtype != torch.float64 else t * att

    def channel_matrix(self) -> torch.Tensor:
        """The dense per-group matrix ``(B, G, N·C_g, N'·C_g)`` over (position, channel) nodes."""
        b, n, c = self.t.shape
        n_keys, cg = self.p.shape[1], c // self.groups
        ft = self.features(self.t).reshape(b, n, self.groups, cg, -1).permute(0, 2, 1, 3, 4)
        fp = self.features(self.p).reshape(b, n_keys, self.groups, cg, -1).permute(0, 2, 1, 3, 4)
        m = ft.reshape(b, self.groups, n * cg, -1) @ fp.reshape(b, self.groups, n_keys * cg, -1).transpose(-1, -2)
        return m * self.norm_factor(n_keys * cg)

    def dense(self):
        raise ValueError(
            "CGNL's graph is over positions x channels (N*C_s nodes per group), not over positions: "
            "block.affinity(x) has no (B, N, N) matrix for 'cgnl'. Use reference.cgnl_channel_affinity "
            "for the (N*C_g x N*C_g) matrix of one group."
        )


class DenseChannelGraph(ChannelGraph):
    """CGNL with its ``N·C_g × N'·C_g`` matrices formed (the ``dense`` backend)."""

    backend = "dense"

    def matmul(self, v):
        b, n_keys, c = v.shape
        n, cg = self.t.shape[1], c // self.groups
        vg = v.reshape(b, n_keys, self.groups, cg).permute(0, 2, 1, 3).reshape(b, self.groups, n_keys * cg, 1)
        y = mm(self.channel_matrix(), vg).reshape(b, self.groups, n, cg).permute(0, 2, 1, 3)
        return y.reshape(b, n, c)


class UnaryKernel(PairwiseKernel):
    """The unary kernel ``M_ij = exp(m_j)`` with ``m_j = w_m·x_j + b_m`` (logits), the same for every query ``i``:
    its rows are the logits broadcast, so the dense and chunked backends form ``A = 1·aᵀ`` for testing."""

    exp = True

    def __init__(self, logits: torch.Tensor, n: int):
        super().__init__(n, logits.shape[1], logits.shape[0], _device_type(logits))
        self.logits = logits  # (B, N')

    def rows(self, i0, i1):
        return self.logits[:, None, :].expand(self.batch, i1 - i0, self.n_keys)

    def cols(self, i0, i1):
        return self.logits[:, i0:i1, None].expand(self.batch, i1 - i0, self.n)


class UnaryGraph(Graph):
    """``A = 1·aᵀ`` with ``a = softmax_j(m_j)`` (GCNet's attention pooling, Cao et al., ICCVW 2019, arXiv
    1904.11492, Eq. 2–3; DNL's unary term, Yin et al., ECCV 2020, arXiv 2006.06668, Eq. 12).

    ``A V = 1·(aᵀ V)``: one weighted sum per batch item, ``O(N'·c)``; the product is returned as an expanded
    (stride-0) view of the ``(B, 1, c)`` context, so per-position maps after it (1×1 convs, LayerNorm over
    channels) can run once per batch item (:class:`~nonlocalnet.blocks.NonlocalUnit` does). No ``N × N'`` tensor
    but :meth:`dense`, for analysis.
    """

    backend = "lowrank"

    def __init__(self, logits: torch.Tensor, n: int):
        self.logits, self.n, self.n_keys = logits, n, logits.shape[1]
        with full_precision(_device_type(logits)):
            self.a = torch.softmax(float32(logits), dim=-1)  # (B, N'): the pooling weights

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[1] != self.n_keys:  # a (B, 1, c) context broadcast over the positions
            v = v.expand(v.shape[0], self.n_keys, v.shape[2])
        ctx = mm(self.a.unsqueeze(1), v)  # (B, 1, c)
        return ctx.expand(ctx.shape[0], self.n, ctx.shape[2])

    def dense(self) -> torch.Tensor:
        return self.a[:, None, :].expand(self.a.shape[0], self.n, self.n_keys).clone()


class BipartiteGraph(Graph):
    """A graph between the ``N`` positions and ``N'`` other nodes (External Attention's ``S`` learned memory slots),
    held as its ``(B, N, N')`` matrix: with ``N' = S`` fixed and small it is the thin factor itself (``A V`` costs
    ``O(N·S·c)``, no ``N × N`` tensor). Built by the ``memory`` graph mode (:mod:`nonlocalnet.blocks`)."""

    backend = "bipartite"

    def __init__(self, a: torch.Tensor):
        self.a = a
        self.n, self.n_keys = a.shape[1], a.shape[2]

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        return mm(self.a, v)

    def dense(self) -> torch.Tensor:
        return self.a


class SumGraph(Graph):
    """``A = Σ_i A_i`` (DNL: ``A = A_pairwise + 1·aᵀ``). Each product is the sum of the terms' products, so every
    term keeps its own backend (fused attention for the pairwise term, rank 1 for the unary one)."""

    def __init__(self, graphs: list[Graph]):  # built by Affinity from one input: the terms share (N, N')
        self.graphs = list(graphs)
        self.n, self.n_keys = graphs[0].n, graphs[0].n_keys
        self.backend = "+".join(g.backend for g in graphs)

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        out = None
        for g in self.graphs:
            y = g.matmul(v)
            out = y if out is None else out + y
        return out

    def dense(self) -> torch.Tensor:
        return sum(g.dense() for g in self.graphs)


class ScaledGraph(Graph):
    """``γ·A`` with ``γ`` a learnable scalar (a 1-element tensor): the DNL authors' scale of the pairwise term (Yin
    et al., "Disentangled Non-Local Neural Networks", ECCV 2020; their code's ``gamma``, zero at init). Products and
    the dense form are the wrapped graph's times ``γ``, so the wrapped graph keeps its backend."""

    def __init__(self, graph: Graph, gamma: torch.Tensor):
        self.graph, self.gamma = graph, gamma
        self.n, self.n_keys = graph.n, graph.n_keys
        self.backend = graph.backend

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        y = self.graph.matmul(v)
        return self.gamma.to(y.dtype) * y

    def dense(self) -> torch.Tensor:
        a = self.graph.dense()
        return self.gamma.to(a.dtype) * a


class AxisGraph(Graph):
    """Softmax attention along one spatial axis (one factor of axial attention): each position attends to the
    positions that share all its coordinates but the one on ``axis``, ``A_ij = softmax_j(s·q_i·k_j)`` over those
    ``L_axis`` keys (Ho, Kalchbrenner, Weissenborn, Salimans, "Axial Attention in Multidimensional Transformers",
    arXiv 1912.12180, 2019; Wang et al., "Axial-DeepLab", ECCV 2020). ``O(N·L_axis·c)``: the weights are
    ``(B, *S, L_axis)``, never ``N × N`` (but :meth:`dense`, for analysis)."""

    backend = "axial"

    def __init__(self, q: torch.Tensor, k: torch.Tensor, spatial: tuple[int, ...], axis: int, scale: float):
        self.q, self.k, self.spatial, self.axis, self.scale = q, k, tuple(spatial), axis, scale
        self.n = self.n_keys = q.shape[1]
        self._weights: torch.Tensor | None = None

    def _line(self, t: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, c)`` as ``(B, ..., L_axis, c)``: the axis second to last."""
        return movedim(t.reshape(t.shape[0], *self.spatial, t.shape[-1]), 1 + self.axis, -2)

    def weights(self) -> torch.Tensor:
        """``(B, ..., L_i, L_j)`` (the other axes first): the softmax along the axis."""
        if self._weights is None:
            e = self._line(self.q) @ self._line(self.k).transpose(-1, -2)
            self._weights = torch.softmax(e * self.scale if self.scale != 1.0 else e, dim=-1)
        return self._weights

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        out = mm(self.weights(), self._line(v))  # (B, ..., L_i, c)
        return movedim(out, -2, 1 + self.axis).reshape(v.shape)

    def dense(self) -> torch.Tensor:
        eye = torch.eye(self.n, dtype=self.q.dtype, device=self.q.device).expand(self.q.shape[0], -1, -1)
        return self.matmul(eye)  # A I, column by column (analysis only)


class ProductGraph(Graph):
    """``A = G_m ··· G_2 G_1``: the graphs in the order they are applied, ``A V = G_m(··· G_1(V))`` (axial
    attention: along the first axis, then the next on its output). Each product runs on each factor's own
    backend; the graph is never formed (but :meth:`dense`, for analysis). A product of row-stochastic graphs is
    row-stochastic, and not symmetric."""

    def __init__(self, graphs: list[Graph]):
        self.graphs = list(graphs)
        self.n, self.n_keys = graphs[-1].n, graphs[0].n_keys
        self.backend = "*".join(g.backend for g in graphs)

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        for g in self.graphs:
            v = g.matmul(v)
        return v

    def dense(self) -> torch.Tensor:
        out = self.graphs[0].dense()
        for g in self.graphs[1:]:
            out = g.dense() @ out
        return out


def neighborhood_index(spatial: tuple[int, ...], kernel_size: int, device=None) -> torch.Tensor:
    """``(N, k^d)`` flat indices of the keys of each query: the ``k`` positions per axis around it, the window
    shifted inward at the borders so that it always holds ``k^d`` keys (Hassani et al., "Neighborhood Attention
    Transformer", CVPR 2023: start ``clamp(i − ⌊k/2⌋, 0, L − k)``). Index arithmetic, no mask."""
    flat = None
    offsets = torch.arange(kernel_size, device=device)
    for length in spatial:
        start = (torch.arange(length, device=device) - kernel_size // 2).clamp(0, length - kernel_size)
        idx = start[:, None] + offsets  # (L, k)
        flat = idx if flat is None else flat[:, None, :, None] * length + idx[None, :, None, :]
        flat = flat.reshape(-1, flat.shape[-1] if flat.dim() == 2 else flat.shape[2] * flat.shape[3])
    return flat


class NeighborhoodGraph(Graph):
    """Neighborhood attention (Hassani, Walton, Li, Li, Shi, "Neighborhood Attention Transformer", CVPR 2023;
    Ramachandran et al., "Stand-Alone Self-Attention in Vision Models", NeurIPS 2019): softmax of ``s·q_i·k_j``
    over the ``k^d`` keys of a window of ``k`` positions per axis around ``i`` (:func:`neighborhood_index`; at the
    borders the window is shifted inward, as NAT does). A banded graph: keys and values are gathered,
    ``(B, N, k^d, c)``; weights ``(B, N, k^d)``; ``O(N·k^d·c)``, never ``N × N`` (but :meth:`dense`)."""

    backend = "neighborhood"

    def __init__(self, q: torch.Tensor, k: torch.Tensor, spatial: tuple[int, ...], kernel_size: int, scale: float):
        self.q, self.k, self.spatial, self.kernel_size, self.scale = q, k, tuple(spatial), kernel_size, scale
        self.n = self.n_keys = q.shape[1]
        self.index = neighborhood_index(self.spatial, kernel_size, q.device)  # (N, K)
        self._weights: torch.Tensor | None = None

    def weights(self) -> torch.Tensor:
        """``(B, N, K)``: the softmax over each query's window."""
        if self._weights is None:
            # elementwise products and sums over the gathered windows: 0.5-0.6x the time of B·N batched
            # (K × c)(c × 1) products (forward + backward, N = 4096, K = 9, c = 32, 1 thread)
            e = (self.k[:, self.index] * self.q.unsqueeze(2)).sum(-1)  # (B, N, K)
            self._weights = torch.softmax(e * self.scale if self.scale != 1.0 else e, dim=-1)
        return self._weights

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        if w.dtype != v.dtype and not torch.is_autocast_enabled(w.device.type):
            w = w.to(v.dtype)
        return (w.unsqueeze(-1) * v[:, self.index]).sum(2)  # Σ_K w_nK v_idx(n,K): (B, N, c)

    def dense(self) -> torch.Tensor:
        w = self.weights()
        out = torch.zeros(w.shape[0], self.n, self.n_keys, dtype=w.dtype, device=w.device)
        return out.scatter(2, self.index.expand(w.shape[0], -1, -1), w)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Tokens ``(B, N, c) -> (B·h, N, c/h)``: head ``i`` of item ``b`` (row ``b·h + i``) takes channels
    ``[i·c/h, (i+1)·c/h)``."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2).reshape(b * heads, n, c // heads)


def merge_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`split_heads`: ``(B·h, N, c/h) -> (B, N, c)``, the heads' channels concatenated."""
    bh, n, ch = t.shape
    return t.reshape(bh // heads, heads, n, ch).transpose(1, 2).reshape(bh // heads, n, heads * ch)


class HeadsGraph(Graph):
    """``h`` graphs on ``h`` equal channel groups (multi-head attention: Vaswani et al., "Attention Is All You
    Need", NeurIPS 2017, §3.2.2; Zhu, Cheng, Zhang, Lin, Dai, "An Empirical Study of Spatial Attention Mechanisms
    in Deep Networks", ICCV 2019): ``(A V)[:, :, group i] = A_i V[:, :, group i]``, i.e. the block-diagonal
    operator ``diag(A_1, ..., A_h)`` on the channel groups of ``V``. The heads are one ``graph`` over ``B·h``
    batch items (built from :func:`split_heads` of ``θ``, ``φ``), so every head runs in the same batched calls. A
    filter ``p(A)`` on it is ``p(A_i)`` on each head (the same filter per head). :meth:`dense` is the mean of the
    heads' graphs ``(B, N, N')`` (for analysis: the attention maps averaged over heads); :meth:`head_dense` gives
    each ``(B, h, N, N')``."""

    def __init__(self, graph: Graph, heads: int):
        self.graph, self.heads = graph, heads
        self.n, self.n_keys = graph.n, graph.n_keys
        self.backend = graph.backend

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        return merge_heads(self.graph.matmul(split_heads(v, self.heads)), self.heads)

    def head_dense(self) -> torch.Tensor:
        a = self.graph.dense()
        return a.reshape(a.shape[0] // self.heads, self.heads, *a.shape[1:])

    def dense(self) -> torch.Tensor:
        return self.head_dense().mean(1)


# --------------------------------------------------------------------------------------- dispatch
def chunk_rows(batch: int, n_keys: int, element_size: int, budget_bytes: int, temporaries: int = 3) -> int:
    """Query rows per chunk so that ``temporaries`` tensors of ``(batch, rows, n_keys)`` fit the budget."""
    per_row = max(1, batch * n_keys * element_size * temporaries)
    return max(1, budget_bytes // per_row)


def choose_backend(kernel: str, normalization: str, batch: int, n: int, n_keys: int, element_size: int,
                   budget_bytes: int, rank: int = 0) -> str:
    """The exact path ``backend="auto"`` takes. Rule measured on 2 CPU cores (docs/benchmarks.md):

    - factorizable kernels (dot, relu-dot, double attention): ``lowrank``, except when the graph is
      smaller than its rank (``N' < r``, e.g. ResNet-50's res4 at 14×14 with C_s = 512) and the dense
      matrix fits the budget: then forming ``A`` is cheaper (measured 0.68–0.85× → dense);
    - exp kernel + softmax: ``sdpa`` — the fused kernel beat the materialized softmax at every size
      measured (1.1–1.7× forward+backward at N = 256–4096, 2–5× forward), with O(N) memory;
    - the rest (concatenation, symmetric/none/count exp kernels): ``dense`` if it fits, else ``chunked``.
    """
    fits = batch * n * n_keys * element_size * 3 <= budget_bytes
    k = KERNELS[kernel]
    if k.unary:  # rank 1: never worth forming
        return "lowrank"
    if k.factorizable:
        return "dense" if fits and n_keys < rank else "lowrank"
    if k.exp and normalization in ("softmax", "row"):
        return "sdpa"
    return "dense" if fits else "chunked"


def build_graph(kernel: str, normalization: str, backend: str, *, q: torch.Tensor | None, k: torch.Tensor | None,
                scale: float = 1.0, budget_bytes: int = 256 * MiB,
                concat: tuple[torch.Tensor, torch.Tensor] | None = None,
                unary: torch.Tensor | None = None, joint: torch.Tensor | None = None) -> Graph:
    """The affinity operator for projected queries ``q (B, N, c)`` and keys ``k (B, N', c)``.

    ``relu_dot`` expects ``q``, ``k`` already rectified; ``double_attention`` expects them already
    softmaxed (channels for ``q``, positions for ``k``). ``concat`` carries ``(a, b)`` of the
    concatenation kernel instead, ``unary`` the logits ``(B, N')`` of the unary kernel (``N = N'``). ``joint``:
    ``q`` and ``k`` as the two halves of one tensor (see :class:`LowRankGraph`).
    """
    spec = KERNELS[kernel]
    if spec.unary:
        if normalization != "softmax":
            raise ValueError(f"normalization: the unary kernel takes 'softmax', got {normalization!r}")
        n = unary.shape[1]
        if backend in ("auto", "lowrank"):
            return UnaryGraph(unary, n)
        chunk = None if backend == "dense" else chunk_rows(unary.shape[0], n, max(unary.element_size(), 4),
                                                           budget_bytes)
        return PairwiseGraph(UnaryKernel(unary, n), "softmax", chunk=chunk)
    if concat is not None:
        a, b = concat
        batch, n, n_keys, el = a.shape[0], a.shape[1], b.shape[1], a.element_size()
    else:
        batch, n, n_keys, el = q.shape[0], q.shape[1], k.shape[1], q.element_size()
    if backend == "auto":
        rank = 0 if q is None else q.shape[-1] * (2 if normalization == "symmetric" else 1)
        backend = choose_backend(kernel, normalization, batch, n, n_keys, max(el, 4), budget_bytes, rank)
    if backend == "lowrank":
        return LowRankGraph(q, k, normalization, unit_rows=spec.unit_rows, joint=joint)
    if backend == "sdpa":
        return SDPAGraph(q, k, scale)
    if concat is not None:
        pk: PairwiseKernel = ConcatKernel(*concat)
    else:
        pk = BilinearKernel(q, k, exp=spec.exp, scale=scale if spec.exp else 1.0)  # `scale`: the exp kernels'
    if backend == "dense":
        return PairwiseGraph(pk, normalization, chunk=None)
    return PairwiseGraph(pk, normalization, chunk=chunk_rows(batch, n_keys, max(el, 4), budget_bytes))



# --------------------------------------------------------------------------------------- softmax approximations
# Two linear-time approximations of the softmax graph A = softmax(s θ φᵀ) of the exp kernels (docs/approximations.md).
# Each gives a factorized A = U Vᵀ, returned as a LowRankGraph, so every filter runs on it as on the other low-rank
# graphs (the structured path of the polynomial filters, the r x r core of the spectral ones).
#
# - Choromanski et al., "Rethinking Attention with Performers", ICLR 2021 (FAVOR+): positive random features,
#   exp(xᵀy) = E_w[φ(x)ᵀφ(y)], φ(x) = exp(Wx − ‖x‖²/2)/√m, w ~ N(0, I_d), with orthogonal random features
#   (the rows of W drawn as blocks of d orthogonal directions, each row's length that of a Gaussian vector);
#   A ≈ D⁻¹ φ(Q) φ(K)ᵀ, D = diag(φ(Q) φ(K)ᵀ 1).
# - Xiong et al., "Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention", AAAI 2021: landmarks
#   Q̃, K̃ = segment means of the queries and keys (m segments of consecutive positions), A ≈ softmax(s Q K̃ᵀ)
#   pinv(softmax(s Q̃ K̃ᵀ)) softmax(s Q̃ Kᵀ), the pseudo-inverse by the paper's iteration (Razavi et al. 2014),
#   6 iterations from Z₀ = Aᵀ/(‖A‖₁‖A‖_∞) (‖A‖_∞ = 1 for a softmax: the authors' "exact" initial coefficient).
APPROXIMATIONS = ("performer", "nystrom")
PINV_ITERATIONS = 6


def orthogonal_gaussian(m: int, d: int, dtype: torch.dtype | None = None, device=None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``(m, d)`` orthogonal random features (Choromanski et al., ICLR 2021): stacked blocks of ``d`` orthogonal
    directions (the Q of a QR of a Gaussian ``d × d``), each row scaled by the norm of an independent Gaussian
    ``d``-vector, so every row is marginally ``N(0, I_d)`` and the rows of a block are orthogonal (Q's columns
    sign-corrected by ``R``'s diagonal, so that Q is Haar-distributed). Drawn in float64
    on the CPU from ``generator`` (torch's default generator when ``None``)."""
    blocks = []
    for _ in range(-(-m // d)):
        g = torch.randn(d, d, dtype=torch.float64, generator=generator)
        qm, r = torch.linalg.qr(g)
        # columns times sign(diag R): Q Haar-distributed (Mezzadri, "How to generate random matrices from the
        # classical compact groups", Notices AMS 2007). Without it the first coordinate of LAPACK's first column
        # is never positive and the estimate of exp(xᵀy) is biased (measured: no convergence in m)
        blocks.append((qm * torch.sign(torch.diagonal(r)).unsqueeze(0)).T)
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, dtype=torch.float64, generator=generator).norm(dim=1, keepdim=True)
    return (norms * w).to(dtype=dtype or torch.get_default_dtype(), device=device)


def positive_features(x: torch.Tensor, w: torch.Tensor, scale: float, queries: bool) -> torch.Tensor:
    """``φ(√s x) ∝ exp(√s W x − s‖x‖²/2)`` ``(B, N, m)`` for tokens ``x`` ``(B, N, d)`` and features ``w`` ``(m, d)``.

    The constant ``1/√m`` and a stabilizer are left out, both cancelling in the row normalization: queries lose
    their row maximum (a factor per row of ``D⁻¹ φ(Q)``), keys their maximum over the positions and features of
    each batch item (one factor for all of ``φ(K)``), so the largest entry is 1 and nothing overflows (the
    Performer code's stabilizer). The maxima are constants to autograd: the function does not depend on them."""
    ws = w.to(x.dtype) * math.sqrt(scale)
    proj = torch.matmul(x, ws.t())  # (B, N, m), fresh
    proj = proj.sub_((0.5 * scale) * (x * x).sum(-1, keepdim=True))
    shift = proj.detach().amax(-1, keepdim=True) if queries else proj.detach().amax((1, 2), keepdim=True)
    return proj.sub_(shift).exp_()


def performer_graph(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, scale: float) -> LowRankGraph:
    """``A ≈ D⁻¹ φ(Q) φ(K)ᵀ`` (FAVOR+) as a row-normalized :class:`LowRankGraph` of rank ``m``: ``O(N m d)``."""
    return LowRankGraph(positive_features(q, w, scale, True), positive_features(k, w, scale, False), "row")


def segment_means(t: torch.Tensor, m: int) -> torch.Tensor:
    """``(B, N, c) -> (B, m, c)``: the means of ``m`` segments of consecutive positions (Nyströmformer's landmarks).
    When ``m`` does not divide ``N`` the segments are as the authors' code extends segment-means: the first
    ``(⌊N/m⌋ + 1)·m − N`` of length ``⌊N/m⌋``, the rest one longer. Needs ``1 <= m <= N``."""
    b, n, c = t.shape
    seg = n // m
    if n % m == 0:
        return t.reshape(b, m, seg, c).mean(2)
    short = (seg + 1) * m - n
    return torch.cat([t[:, :short * seg].reshape(b, short, seg, c).mean(2),
                      t[:, short * seg:].reshape(b, m - short, seg + 1, c).mean(2)], 1)


def iterative_pinv(a: torch.Tensor, iterations: int = PINV_ITERATIONS) -> torch.Tensor:
    """Nyströmformer's Moore-Penrose pseudo-inverse of the ``(B, m, m)`` softmax matrices ``a``:
    ``Z_{j+1} = ¼ Z_j (13I − a Z_j (15I − a Z_j (7I − a Z_j)))`` from ``Z_0 = aᵀ / max_j Σ_i a_ij``."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    z = a.transpose(1, 2) / a.sum(1).amax(-1)[:, None, None]
    for _ in range(iterations):
        az = a @ z
        z = (0.25 * z) @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_graph(q: torch.Tensor, k: torch.Tensor, m: int, scale: float) -> LowRankGraph:
    """``A ≈ softmax(s Q K̃ᵀ) pinv(softmax(s Q̃ K̃ᵀ)) softmax(s Q̃ Kᵀ)`` as a :class:`LowRankGraph` of rank ``m``
    (normalization ``none``): ``U = softmax(s Q K̃ᵀ)`` ``(B, N, m)``, ``V = (Z softmax(s Q̃ Kᵀ))ᵀ`` ``(B, N', m)``;
    ``O(N m (d + m))``. The ``m × m`` part (landmark softmax, pseudo-inverse) runs in float32 under autocast."""
    n, n_keys = q.shape[1], k.shape[1]
    if m > min(n, n_keys):
        raise ValueError(f"approx_features: approx='nystrom' takes m = {m} landmarks as segment means of the "
                         f"{n} query and {n_keys} key positions and needs m <= {min(n, n_keys)}; use a smaller "
                         f"approx_features or a larger input")
    ql, kl = segment_means(q, m), segment_means(k, m)
    u = torch.softmax(torch.matmul(q, kl.transpose(1, 2)) * scale, -1)  # (B, N, m)
    with full_precision(_device_type(q)):
        f2 = torch.softmax(float32(torch.matmul(ql, kl.transpose(1, 2))) * scale, -1)
        z = iterative_pinv(f2)
    f3 = torch.softmax(torch.matmul(ql, k.transpose(1, 2)) * scale, -1)  # (B, m, N')
    v = torch.matmul(f3.transpose(1, 2), z.transpose(1, 2).to(f3.dtype))  # (B, N', m), contiguous
    return LowRankGraph(u, v, "none")
