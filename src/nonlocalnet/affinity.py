"""Step 1 of every nonlocal block: the affinity ``A`` (the graph), as an operator.

A kernel gives ``M`` (per batch item, ``N × N'``), a normalization turns it into ``A``
(framework.md "Step 1"; Eq. 2 of L. Zhu, Q. She, L. Zhang, P. Guo, "A Spectral Nonlocal Block for Neural
Networks", ICLR 2020 submission, OpenReview rkgb9kSKwS; Eq. 5 of L. Zhu et al., "Unifying Nonlocal Blocks for
Neural Networks", ICCV 2021, arXiv:2108.02451, numbered as in its submitted version; "Zhu et al. 2021 (ICCV)"
below). Blocks never ask for ``A`` itself: they ask for products ``A @ V`` with ``V`` of shape ``(B, N', c)``.
Each backend answers that product differently, all exactly:

- :class:`LowRankGraph` — ``M = P Qᵀ`` (``dot_product``, ``relu_dot``, A²'s double attention):
  ``A V`` in ``O(N·r·c)``, no ``N × N'`` tensor (framework.md "Low rank").
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
- :class:`SumGraph` — a sum of graphs, ``A = Σ_i A_i`` (DNL: whitened pairwise + unary); each product
  ``A V = Σ_i A_i V`` runs on each term's own backend.

Degrees and normalizers are computed in float32 under autocast. Zero degrees give zero rows
(the official SNL code's convention), never NaN or inf.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


def _device_type(t: torch.Tensor) -> str:
    return t.device.type if t.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"


def _float32(t: torch.Tensor) -> torch.Tensor:
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

    framework.md "Low rank": ``M Z = P (Qᵀ Z)``, ``M̂ Z = (P(QᵀZ) + Q(PᵀZ))/2``,
    degrees ``M̂ 1 = (P(Qᵀ1) + Q(Pᵀ1))/2``, ``A Z = D̂^{-1/2} M̂ (D̂^{-1/2} Z)``.

    Every normalization is folded into the factors once, so ``A = U Vᵀ`` and each product
    ``A V`` costs two thin matmuls and nothing else:
    ``none``: ``U = P, V = Q``; ``count``: ``U = P/N'``; ``row``: ``U = D⁻¹P``;
    ``symmetric``: ``U = [SP, SQ]/√2``, ``V = [SQ, SP]/√2`` with ``S = D̂^{-1/2}``.
    """

    backend = "lowrank"

    def __init__(self, p: torch.Tensor, q: torch.Tensor, normalization: str):
        self.p, self.q, self.normalization = p, q, normalization
        self.n, self.n_keys = p.shape[1], q.shape[1]
        self.left: torch.Tensor | None = None  # (B, N, 1) degree scaling, float32 (for inspection)
        u, v = p, q
        if normalization == "count":
            u = p / self.n_keys
        elif normalization in ("row", "softmax"):
            with torch.autocast(_device_type(p), enabled=False):
                d = _float32(p) @ _float32(q).sum(1).unsqueeze(-1)  # M 1
            self.left = safe_reciprocal(d)
            u = self.left * p
        elif normalization == "symmetric":
            with torch.autocast(_device_type(p), enabled=False):
                pf, qf = _float32(p), _float32(q)
                d = 0.5 * (pf @ qf.sum(1).unsqueeze(-1) + qf @ pf.sum(1).unsqueeze(-1))
            self.left = safe_rsqrt(d)
            sp, sq = (self.left * math.sqrt(0.5)) * p, (self.left * math.sqrt(0.5)) * q
            u, v = torch.cat([sp, sq], -1), torch.cat([sq, sp], -1)
        self.u, self.v = u, v

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.u, self.v
        if u.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            u, v = u.to(x.dtype), v.to(x.dtype)
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
        with torch.autocast(k.device_type, enabled=False):
            shift = None
            if k.exp:
                maxes = [_float32(k.rows(i0, i1)).amax(dim=(1, 2)) for i0, i1 in self._blocks()]
                shift = torch.stack(maxes, 0).amax(0).view(-1, 1, 1).detach()
            rowsum, colsum = [], 0.0
            for i0, i1 in self._blocks():
                e = self._values(_float32(k.rows(i0, i1)), shift)
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
                r, c = self._values(_float32(r), self._shift), self._values(_float32(c), self._shift)
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
            with torch.autocast(_device_type(r), enabled=False):
                d = _float32(r).sum(-1, keepdim=True)
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

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scale: float):
        self.q, self.k, self.scale = q, k, scale
        self.n, self.n_keys = q.shape[1], k.shape[1]

    def matmul(self, v):
        q, k = self.q, self.k
        if q.dtype != v.dtype:
            v = v.to(q.dtype)
        # a head axis: the fused (flash) kernels only take (B, H, L, E); 3-D input falls back to math
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=self.scale)
        return out.squeeze(1)

    def dense(self):
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

    def matmul(self, v):
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
                 scale: bool | float, prefactor: str = "exact"):
        self.t, self.p, self.groups, self.kernel = t, p, groups, kernel
        self.order, self.gamma, self.normalization, self.scale = order, gamma, normalization, scale
        self.prefactor = prefactor
        self.n, self.n_keys = t.shape[1], p.shape[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, N, C, P+1)`` Taylor features (one feature for the dot kernel)."""
        if self.kernel == "dot_product":
            return x.unsqueeze(-1)
        g = self.gamma
        pref = torch.exp(-g * x * x) if self.prefactor == "exact" else math.exp(-g)  # exp(-γ) per side: exp(-2γ)
        feats = [pref * math.sqrt((2 * g) ** k / math.factorial(k)) * x**k for k in range(self.order + 1)]
        return torch.stack(feats, -1)

    def _norm_factor(self, n_nodes: int) -> float:
        f = 1.0
        if self.normalization == "count":
            f /= n_nodes
        if self.scale is True:
            f /= math.sqrt(n_nodes)
        elif not isinstance(self.scale, bool):
            f *= float(self.scale)
        return f

    def matmul(self, v):
        b, n_keys, c = v.shape
        n, cg = self.t.shape[1], c // self.groups
        # ⟨φ_k(p), g⟩ sums N'·C_g signed products into one number per group: like a degree, it is computed in
        # float32 under autocast (in bf16 it cancels catastrophically). Everything here is O(N·C·K).
        with torch.autocast(_device_type(v), enabled=False):
            t, p, vf = _float32(self.t), _float32(self.p), _float32(v)
            ft = self.features(t).reshape(b, n, self.groups, cg, -1)  # (B, N, G, C_g, K)
            fp = self.features(p).reshape(b, n_keys, self.groups, cg, -1)
            att = torch.einsum("bngck,bngc->bgk", fp, vf.reshape(b, n_keys, self.groups, cg))
            y = torch.einsum("bngck,bgk->bngc", ft, att) * self._norm_factor(n_keys * cg)
        return y.reshape(b, n, c)

    def channel_matrix(self) -> torch.Tensor:
        """The dense per-group matrix ``(B, G, N·C_g, N'·C_g)`` over (position, channel) nodes."""
        b, n, c = self.t.shape
        n_keys, cg = self.p.shape[1], c // self.groups
        ft = self.features(self.t).reshape(b, n, self.groups, cg, -1).permute(0, 2, 1, 3, 4)
        fp = self.features(self.p).reshape(b, n_keys, self.groups, cg, -1).permute(0, 2, 1, 3, 4)
        m = ft.reshape(b, self.groups, n * cg, -1) @ fp.reshape(b, self.groups, n_keys * cg, -1).transpose(-1, -2)
        return m * self._norm_factor(n_keys * cg)

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
        with torch.autocast(_device_type(logits), enabled=False):
            self.a = torch.softmax(_float32(logits), dim=-1)  # (B, N'): the pooling weights

    def matmul(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[1] != self.n_keys:  # a (B, 1, c) context broadcast over the positions
            v = v.expand(v.shape[0], self.n_keys, v.shape[2])
        ctx = mm(self.a.unsqueeze(1), v)  # (B, 1, c)
        return ctx.expand(ctx.shape[0], self.n, ctx.shape[2])

    def dense(self) -> torch.Tensor:
        return self.a[:, None, :].expand(self.a.shape[0], self.n, self.n_keys).clone()


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
                unary: torch.Tensor | None = None) -> Graph:
    """The affinity operator for projected queries ``q (B, N, c)`` and keys ``k (B, N', c)``.

    ``relu_dot`` expects ``q``, ``k`` already rectified; ``double_attention`` expects them already
    softmaxed (channels for ``q``, positions for ``k``). ``concat`` carries ``(a, b)`` of the
    concatenation kernel instead, ``unary`` the logits ``(B, N')`` of the unary kernel (``N = N'``).
    """
    if kernel == "unary":
        if normalization != "softmax":
            raise ValueError(f"normalization: the unary kernel takes 'softmax', got {normalization!r}")
        n = unary.shape[1]
        if backend in ("auto", "lowrank"):
            return UnaryGraph(unary, n)
        chunk = None if backend == "dense" else chunk_rows(unary.shape[0], n, max(unary.element_size(), 4),
                                                           budget_bytes)
        return PairwiseGraph(UnaryKernel(unary, n), "softmax", chunk=chunk)
    if kernel == "concatenation":
        a, b = concat
        batch, n, n_keys, el = a.shape[0], a.shape[1], b.shape[1], a.element_size()
    else:
        batch, n, n_keys, el = q.shape[0], q.shape[1], k.shape[1], q.element_size()
    if backend == "auto":
        rank = 0 if q is None else q.shape[-1] * (2 if normalization == "symmetric" else 1)
        backend = choose_backend(kernel, normalization, batch, n, n_keys, max(el, 4), budget_bytes, rank)
    if backend == "lowrank":
        return LowRankGraph(q, k, normalization)
    if backend == "sdpa":
        return SDPAGraph(q, k, scale)
    if kernel == "concatenation":
        pk: PairwiseKernel = ConcatKernel(*concat)
    else:
        exp = KERNELS[kernel].exp
        pk = BilinearKernel(q, k, exp=exp, scale=scale if exp else 1.0)  # `scale` belongs to the exp kernels
    if backend == "dense":
        return PairwiseGraph(pk, normalization, chunk=None)
    return PairwiseGraph(pk, normalization, chunk=chunk_rows(batch, n_keys, max(el, 4), budget_bytes))

