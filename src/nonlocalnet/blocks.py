"""Thin ``nn.Module`` s over the functional core: :class:`Affinity` (the graph), :class:`NonlocalUnit`
(filter + output norm + residual) and :class:`NonlocalBlock` (a stage of units sharing one affinity).

Papers cited here (short form first):

- Tao et al. 2018: Y. Tao, Q. Sun, Q. Du, W. Liu, "Nonlocal Neural Networks, Nonlocal Diffusion and
  Nonlocal Modeling", NeurIPS 2018, arXiv:1806.00681.
- Zhu et al., ICLR 2020 submission: L. Zhu, Q. She, L. Zhang, P. Guo, "A Spectral Nonlocal Block for
  Neural Networks", OpenReview rkgb9kSKwS.
- Zhu et al. 2021 (ICCV): L. Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021,
  arXiv:2108.02451 (equation and section numbers as in its submitted version, "A Unified Framework to
  Analyze and Design the Nonlocal Blocks for Neural Networks"; code: the SNL_ICCV2021 repository).

A nonlocal block is (framework.md; Zhu et al., ICLR 2020 submission, Eq. 1; Zhu et al. 2021 (ICCV), Eq. 1;
Tao et al. 2018, Eq. 8)::

    A = normalize(kernel(θ(X), φ(X)))                    computed once from the stage input X
    Z⁰ = X;  Zⁿ⁺¹ = Zⁿ + out_n( Σ_t B_t(A) g_n(Zⁿ) W_tⁿ )   for each unit n

and, with ``recurrence = R`` (CCNet), the whole stage is applied ``R`` times with shared weights.
All projections are 1×1 convolutions (their weights are stored as ``ConvNd`` so state dicts match
convolutional code) applied as GEMMs; any ``dim`` in {1, 2, 3} works the same.

Layout (docs/benchmarks.md, "naive baseline"): a block works on the ``(B, C, N)`` view of its input, never a tokens
copy. The graph and the projections read its tokens view ``(B, N, C)`` in place (one GEMM per batch item, the
transposed operand handled by BLAS); the output maps are GEMMs ``W Tᵀ`` landing channels-first, so BatchNorm /
GroupNorm run on their native ``(B, C, L)`` layout and the residual is added there (γ·F fused by ``addcmul``). A
channels_last input is the transposed case: everything stays tokens-major, and the output is channels_last.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import affinity as aff
from .filters import apply_filter, lowrank_terms, polynomial_responses
from .kernels import KERNELS
from .spectral_filters import SpectralFilter

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv1x1(dim: int, cin: int, cout: int, bias: bool, groups: int = 1) -> nn.Module:
    return _CONV[dim](cin, cout, 1, bias=bias, groups=groups)


def project_weight(w: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens W ᵀ + b`` for a weight ``(C_out, C_in)``: contiguous tokens ``(B, N, C_out)``, one GEMM per batch
    item reading a tokens view in place (see :func:`project`)."""
    if tokens.dim() == 3 and not tokens.is_contiguous():
        wt = w.t().expand(tokens.shape[0], *w.t().shape)
        return torch.bmm(tokens, wt) if bias is None else torch.baddbmm(bias, tokens, wt)
    return F.linear(tokens, w, bias)


def project(conv: nn.Module, tokens: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
    """A 1×1 convolution on tokens ``(B, N, Cin) -> (B, N, Cout)`` (grouped convs included).

    ``channels_first=True`` computes it as ``W Tᵀ`` (:func:`project_cf`) and returns the tokens view of that
    ``(B, Cout, N)`` result — for consumers that read any layout (thin GEMMs of the low-rank graphs) or reduce
    over positions (softmax over N is then over contiguous rows). On channels-first input this orientation is
    the faster GEMM (measured: 0.96× the time at C_out = 32, 0.3× at C_out = 1, N = 4096), so a single output
    channel (GC's and DNL's unary logits) always takes it."""
    w = conv.weight.flatten(1)
    if conv.groups == 1 and tokens.dim() == 3 and (channels_first or w.shape[0] == 1):
        return project_cf(conv, tokens).transpose(1, 2)
    if conv.groups == 1:
        # a tokens view of a channels-first tensor: one GEMM per batch item reads it in place (F.linear would
        # fold the batch into the rows, and copy the whole input to do so)
        return project_weight(w, conv.bias, tokens)
    g = conv.groups
    b, n, cin = tokens.shape
    out = torch.einsum("bngi,goi->bngo", tokens.reshape(b, n, g, cin // g), w.reshape(g, -1, cin // g))
    out = out.reshape(b, n, -1)
    return out + conv.bias if conv.bias is not None else out


def project_cf(conv: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The same 1×1 convolution with its output channels first: tokens ``(B, N, Cin) -> (B, Cout, N)``, one GEMM
    ``W Tᵀ`` per batch item (the tokens read in place, transposed or not), so the output lands in the NCHW layout
    without a copy back."""
    b = tokens.shape[0]
    t = tokens.transpose(1, 2)
    if conv.groups != 1:
        w = conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1], 1)
        return F.conv1d(t, w, conv.bias, groups=conv.groups)
    w = conv.weight.flatten(1)
    w = w.expand(b, *w.shape)
    return torch.bmm(w, t) if conv.bias is None else torch.baddbmm(conv.bias[:, None], w, t)


OUT_NORMS = ("none", "bn", "bn_relu", "gn", "gamma")


class OutNorm(nn.Module):
    """The output normalization ``out(F)`` before the residual sum, on tokens ``(B, N, C)``.

    ``bn``: BatchNorm over C (Wang: scale zero-initialized so a new block is the identity);
    ``bn_relu``: ``relu(BN(F))`` (the official SNL/NS/NL units); ``gn``: GroupNorm (CGNL);
    ``gamma``: ``γ·F`` with a scalar ``γ`` initialized to 0 (CCNet); ``none``: ``F``.
    BatchNorm state-dict keys (``weight, bias, running_mean, running_var, num_batches_tracked``) are
    those of ``BatchNorm1d/2d/3d`` alike.
    """

    def __init__(self, kind: str, channels: int, zero_init: bool, groups: int = 1):
        super().__init__()
        self.kind = kind
        if kind in ("bn", "bn_relu"):
            self.bn = nn.BatchNorm1d(channels)
            if zero_init:
                nn.init.zeros_(self.bn.weight)
        elif kind == "gn":
            self.gn = nn.GroupNorm(groups, channels)
            if zero_init:
                nn.init.zeros_(self.gn.weight)
        elif kind == "gamma":
            self.gamma = nn.Parameter(torch.zeros(1) if zero_init else torch.ones(1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.kind in ("bn", "bn_relu"):
            b, n, c = f.shape
            y = self.bn(f.reshape(b * n, c)).reshape(b, n, c)
            return F.relu(y, inplace=True) if self.kind == "bn_relu" else y  # BN's output: fresh, not saved
        if self.kind == "gn":
            return self.gn(f.transpose(1, 2)).transpose(1, 2)
        if self.kind == "gamma":
            return self.gamma * f
        return f

    def forward_cf(self, f: torch.Tensor) -> torch.Tensor:
        """The same on channels-first ``(B, C, N)``: the norms' native layout (BatchNorm1d and GroupNorm take
        ``(B, C, L)`` as it is)."""
        if self.kind in ("bn", "bn_relu"):
            y = self.bn(f)
            return F.relu(y, inplace=True) if self.kind == "bn_relu" else y
        if self.kind == "gn":
            return self.gn(f)
        if self.kind == "gamma":
            return self.gamma * f
        return f


class Affinity(nn.Module):
    """Builds the graph ``A`` from a stage input (framework.md "Step 1").

    ``mode``: ``positions`` (the N × N' graph of NL/NS/SNL/A²), ``crisscross`` (CC's masked graph) or
    ``channels`` (CGNL's graph over positions × channels). Parameters: ``theta``, ``phi`` (1×1 convs
    ``C → C_k``; absent for the ``gaussian`` kernel, which uses ``X`` itself) and, for the
    concatenation kernel, ``concat`` (``2C_k → 1``, no bias).
    """

    def __init__(self, in_channels: int, key_channels: int, *, dim: int, kernel: str, normalization: str,
                 scale: bool | float, bias: bool, sub_sample: bool, backend: str, memory_budget: float,
                 mode: str = "positions", groups: int = 1, order: int = 0, rbf_gamma: float = 1e-4,
                 whiten: bool = False, unary: bool = False, temperature: float = 1.0, rbf_prefactor: str = "exact"):
        super().__init__()
        self.kernel, self.normalization, self.backend, self.mode = kernel, normalization, backend, mode
        self.sub_sample, self.dim, self.groups, self.order, self.rbf_gamma = sub_sample, dim, groups, order, rbf_gamma
        self.whiten, self.unary, self.temperature, self.rbf_prefactor = whiten, unary, temperature, rbf_prefactor
        self.memory_budget = memory_budget  # MiB
        uses_projection = not (kernel == "gaussian" and mode != "channels") and kernel != "unary"
        feat = key_channels if uses_projection else in_channels
        if isinstance(scale, bool):
            self.scale_value = 1.0 / math.sqrt(feat) if scale else 1.0
        else:
            self.scale_value = float(scale)
        self.scale_value /= temperature  # DNL's temperature: logits / (sqrt(C_s)·τ)
        self.scale = scale
        if uses_projection:
            self.theta = conv1x1(dim, in_channels, key_channels, bias)
            self.phi = conv1x1(dim, in_channels, key_channels, bias)
        if kernel == "concatenation":
            self.concat = conv1x1(dim, 2 * key_channels, 1, bias=False)
        if kernel == "unary" or unary:  # the unary logits m_j = w_m·x_j + b_m (GC's / DNL's conv_mask)
            self.mask = conv1x1(dim, in_channels, 1, bias=True)

    def queries_keys(self, x: torch.Tensor, spatial: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(θ(X), φ(X))`` as tokens, keys sub-sampled when asked (the raw ``X`` for ``gaussian``)."""
        if hasattr(self, "theta"):
            # the low-rank graphs read any layout; measured fastest (1 thread, N = 1024–4096): queries
            # channels-first (U Vᵀ's last GEMM reads Uᵀ row-major; the GEMM itself is faster), keys as contiguous
            # tokens (Vᵀ X is computed as X V, a plain GEMM: 0.3–0.55× the time of the transposed forms). Fused
            # attention wants contiguous tokens for both.
            cf = self.mode == "positions" and KERNELS[self.kernel].factorizable
            q, k = project(self.theta, x, cf), project(self.phi, x)
        else:
            q = k = x
        if self.sub_sample:
            k = aff.pool_tokens(k, spatial)
        if self.whiten:  # DNL's whitened pairwise term: queries and keys minus their means over positions
            q, k = q - q.mean(1, keepdim=True), k - k.mean(1, keepdim=True)
        return q, k

    def unary_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``m_j = w_m·x_j + b_m`` ``(B, N)``: the logits of the unary term (GC, DNL)."""
        return project(self.mask, x).squeeze(-1)

    def forward(self, x: torch.Tensor, spatial: tuple[int, ...]) -> aff.Graph:
        budget = int(self.memory_budget * aff.MiB)
        if self.kernel == "unary":  # GC: A = 1·aᵀ alone
            return aff.build_graph("unary", self.normalization, self.backend, q=None, k=None, budget_bytes=budget,
                                   unary=self.unary_logits(x))
        graph = self.pairwise(x, spatial, budget)
        if not self.unary:
            return graph
        # DNL: A = A_pairwise + 1·aᵀ; the unary term is rank 1 (formed only for backend="dense")
        unary = aff.build_graph("unary", "softmax", "dense" if self.backend == "dense" else "lowrank", q=None,
                                k=None, budget_bytes=budget, unary=self.unary_logits(x))
        return aff.SumGraph([graph, unary])

    def pairwise(self, x: torch.Tensor, spatial: tuple[int, ...], budget: int) -> aff.Graph:
        """The pairwise term of the graph (every kernel but ``unary``)."""
        if self.mode == "channels" and self.backend != "dense" and not self.sub_sample and not self.whiten and \
                self.theta.bias is None and self.phi.bias is None:
            # t and p formed only if asked for (NonlocalUnit takes the dot kernel through X's Gram matrix)
            return aff.ChannelGraph(None, None, self.groups, self.kernel, self.order, self.rbf_gamma,
                                    self.normalization, self.scale, self.rbf_prefactor,
                                    source=(x, self.theta.weight.flatten(1), self.phi.weight.flatten(1)))
        if self.mode == "positions" and self.normalization == "symmetric" and \
                self.kernel in ("dot_product", "relu_dot") and not self.sub_sample and not self.whiten:
            # θ and φ in one GEMM; the symmetric low-rank graph keeps them as one tensor (LowRankGraph `joint`)
            w = torch.cat([self.theta.weight.flatten(1), self.phi.weight.flatten(1)])
            bias = None if self.theta.bias is None else torch.cat([self.theta.bias, self.phi.bias])
            joint = project_weight(w, bias, x)
            if self.kernel == "relu_dot":
                joint = F.relu(joint, inplace=True)  # a fresh GEMM output (its backward does not need it)
            ck = w.shape[0] // 2
            return aff.build_graph(self.kernel, self.normalization, self.backend, q=joint[..., :ck],
                                   k=joint[..., ck:], scale=self.scale_value, budget_bytes=budget, joint=joint)
        q, k = self.queries_keys(x, spatial)
        if self.mode == "crisscross":
            if self.backend == "dense":
                return aff.PairwiseGraph(_CrissCrossDense(q, k, spatial, self.scale_value), "none")
            return aff.CrissCrossGraph(q, k, spatial, self.scale_value)
        if self.mode == "channels":
            cls = aff.DenseChannelGraph if self.backend == "dense" else aff.ChannelGraph
            return cls(q, k, self.groups, self.kernel, self.order, self.rbf_gamma, self.normalization,
                       self.scale, self.rbf_prefactor)
        if self.kernel == "relu_dot":
            q, k = F.relu(q), F.relu(k)
        elif self.kernel == "double_attention":  # A²: distribute (softmax over n), gather (softmax over N')
            q, k = _softmax(q, -1), _softmax(k, 1)
        elif self.kernel == "concatenation":
            kc = q.shape[-1]
            w = self.concat.weight.flatten()
            a, b = q @ w[:kc], k @ w[kc:]
            return aff.build_graph(self.kernel, self.normalization, self.backend, q=None, k=None,
                                   budget_bytes=budget, concat=(a, b))
        return aff.build_graph(self.kernel, self.normalization, self.backend, q=q, k=k,
                               scale=self.scale_value, budget_bytes=budget)


def _softmax(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``softmax(t, dim)`` for tokens ``(B, N, c)``; on the tokens view of a channels-first tensor it runs on
    that tensor (``torch.softmax`` would first copy a non-contiguous input) and returns the same view."""
    if t.dim() == 3 and not t.is_contiguous() and t.transpose(1, 2).is_contiguous():
        return torch.softmax(t.transpose(1, 2), dim=3 - (dim % 3)).transpose(1, 2)
    return torch.softmax(t, dim)


class _CrissCrossDense(aff.PairwiseKernel):
    """The criss-cross graph as a dense kernel: rows of the masked softmax (``backend="dense"``)."""

    def __init__(self, q, k, spatial, scale):
        super().__init__(q.shape[1], k.shape[1], q.shape[0], q.device.type)
        self._a = aff.CrissCrossGraph(q, k, spatial, scale).dense()

    def rows(self, i0, i1):
        return self._a[:, i0:i1]


OUT_MAPS = ("linear", "bottleneck")
FUSIONS = ("add", "mul", "add_mul")


class Bottleneck(nn.Module):
    """GCNet's transform as a per-term output map (Cao et al., ICCVW 2019, arXiv 1904.11492, Eq. 4):
    ``conv2(relu(LayerNorm(conv1(t))))``, 1×1 convs ``C_v → C_b → C``, LayerNorm over the ``C_b`` channels of
    each position. Everything is per position, so it commutes with broadcasting over positions."""

    def __init__(self, dim: int, cin: int, hidden: int, cout: int, bias: bool):
        super().__init__()
        self.conv1 = conv1x1(dim, cin, hidden, bias)
        self.norm = nn.LayerNorm(hidden)
        self.conv2 = conv1x1(dim, hidden, cout, bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return project(self.conv2, F.relu(self.norm(project(self.conv1, t))))


def _residual(h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``h + f`` for a fresh ``f`` of ``h``'s shape: added in place into ``f`` when no gradient is recorded
    (inference: one fresh output tensor less), out of place otherwise (``f`` may be saved for a backward, e.g.
    the ReLU's output)."""
    if not torch.is_grad_enabled() and f.shape == h.shape and f.dtype == h.dtype:
        return f.add_(h)
    return h + f


def _broadcast(t: torch.Tensor) -> bool:
    """``t`` ``(B, N, c)`` is one row expanded over the positions (a rank-1 graph's product, e.g. GC's context)."""
    return t.dim() == 3 and t.shape[1] > 1 and t.stride(1) == 0


class NonlocalUnit(nn.Module):
    """One unit: ``Y = X + out( Σ_t map_t(B_t(A) Z) )`` with ``Z = g(X)`` (filters.py for ``B_t``).

    The per-term output map ``map_t`` is ``out_map="linear"``: a 1×1 conv ``W_t`` (``C_v → C``; every block of the
    papers but GC), or ``"bottleneck"``: GCNet's ``conv → LayerNorm → ReLU → conv`` (:class:`Bottleneck`).
    ``fusion`` says how the filtered features meet the input (GCNet §4): ``add`` (the residual above), ``mul``
    (``Y = X ⊙ σ(Σ_t map'_t(B_t(A) Z))``, a sigmoid gate with its own maps ``map'_t``) or ``add_mul``
    (``Y = X ⊙ σ(F_mul) + out(F_add)``, as mmcv's ContextBlock applies them: gate first, then add).

    Parameters: ``g`` (1×1 conv ``C → C_v``; absent with ``value_proj=False``, where ``Z = X`` as in GC),
    ``w`` (one map per filter term, additive branch; empty when ``out_proj=False``, as in CC where ``F = A Z``),
    ``w_mul`` (one map per term, multiplicative branch), ``norm`` (:class:`OutNorm`, on the additive branch).
    ``zero_init`` with ``out_norm="none"`` zeroes the last layer of every map (GCNet's init: the additive branch
    starts at 0, the gate at σ(0) = 1/2). For the non-polynomial filters (Cayley, heat, wavelet), ``spectral``
    (:class:`~nonlocalnet.spectral_filters.SpectralFilter`) computes the terms; ``coef`` only gives their number.
    """

    def __init__(self, in_channels: int, value_channels: int, coef: torch.Tensor, *, dim: int, bias: bool,
                 out_norm: str, zero_init: bool, norm_groups: int = 1, out_proj: bool = True,
                 proj_groups: int = 1, sub_sample: bool = False, value_proj: bool = True, out_map: str = "linear",
                 bottleneck_channels: int = 1, fusion: str = "add", spectral: SpectralFilter | None = None):
        super().__init__()
        self.sub_sample, self.fusion, self.out_map = sub_sample, fusion, out_map
        self.spectral = spectral
        if value_proj:
            self.g = conv1x1(dim, in_channels, value_channels, bias)

        def maps() -> nn.ModuleList:
            if not out_proj:
                return nn.ModuleList()
            if out_map == "bottleneck":
                return nn.ModuleList([Bottleneck(dim, value_channels, bottleneck_channels, in_channels, bias)
                                      for _ in range(len(coef))])
            return nn.ModuleList([conv1x1(dim, value_channels, in_channels, bias, groups=proj_groups)
                                  for _ in range(len(coef))])

        self.w = maps() if "add" in fusion else nn.ModuleList()
        if "mul" in fusion:
            self.w_mul = maps()
        self.norm = OutNorm(out_norm, in_channels, zero_init, norm_groups)
        if zero_init and out_norm == "none":
            for m in [*self.w, *getattr(self, "w_mul", [])]:
                last = m.conv2 if isinstance(m, Bottleneck) else m
                nn.init.zeros_(last.weight)
                if last.bias is not None:
                    nn.init.zeros_(last.bias)
        self.register_buffer("coef", coef.clone(), persistent=False)
        self.coef_rows = tuple(tuple(float(c) for c in row) for row in coef.tolist())  # static for compile
        # B_t(0): the coefficient of Z itself in each term (the low-rank path's α_t)
        self.coef_at_zero = tuple(polynomial_responses(coef.double(), torch.zeros(1, dtype=torch.float64))[:, 0]
                                  .tolist())

    def values(self, x: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
        """``Z = g(X)`` (``X`` itself with ``value_proj=False``); ``channels_first``: see :func:`project`."""
        return project(self.g, x, channels_first) if hasattr(self, "g") else x

    def filter_terms(self, x: torch.Tensor, graph: aff.Graph, spatial: tuple[int, ...]) -> list[torch.Tensor]:
        z = self.values(x, channels_first=isinstance(graph, aff.LowRankGraph))
        if self.spectral is not None:
            return self.spectral(graph, z)
        z_keys = aff.pool_tokens(z, spatial) if self.sub_sample else None
        return apply_filter(graph.matmul, z, self.coef_rows, z_keys)

    def responses(self, lam: torch.Tensor) -> torch.Tensor:
        """The frequency response of each term, ``B_t(λ)`` ``(T, len(λ))`` at eigenvalues ``λ`` of ``A``."""
        if self.spectral is not None:
            return self.spectral.responses(torch.as_tensor(lam, dtype=self.spectral.log_scales.dtype))
        return polynomial_responses(self.coef.double(), torch.as_tensor(lam, dtype=torch.float64))

    def term_labels(self) -> list[str] | None:
        """Names of the terms of a spectral filter (``None`` for the polynomial ones: see ``coef``)."""
        return None if self.spectral is None else self.spectral.labels()

    @staticmethod
    def apply_maps(maps: nn.ModuleList, terms: list[torch.Tensor]) -> torch.Tensor:
        """``Σ_t map_t(term_t)``; terms that are one row broadcast over positions are mapped once per batch item."""
        if not len(maps):
            return terms[0]
        if all(_broadcast(t) for t in terms):  # e.g. GC: the context (B, 1, C), not N copies of it
            b, n = terms[0].shape[:2]
            f = NonlocalUnit.apply_maps(maps, [t[:, :1] for t in terms])
            return f.expand(b, n, f.shape[-1])
        if isinstance(maps[0], Bottleneck) or len(maps) == 1 or maps[0].groups != 1:
            return sum(m(t) if isinstance(m, Bottleneck) else project(m, t) for m, t in zip(maps, terms))
        # one GEMM over the concatenated terms: [T_0 Z, ..., T_K Z] [W_0; ...; W_K]
        weight = torch.cat([w.weight.flatten(1) for w in maps], 1)
        bias = sum(w.bias for w in maps) if maps[0].bias is not None else None
        return F.linear(torch.cat(terms, -1), weight, bias)

    def response(self, x: torch.Tensor, graph: aff.Graph, spatial: tuple[int, ...]) -> torch.Tensor:
        """``F(A, Z)`` of the additive branch before the output norm (of the gate with ``fusion="mul"``)."""
        terms = self.filter_terms(x, graph, spatial)
        return self.apply_maps(self.w if "add" in self.fusion else self.w_mul, terms)

    def forward(self, x: torch.Tensor, graph: aff.Graph, spatial: tuple[int, ...]) -> torch.Tensor:
        terms = self.filter_terms(x, graph, spatial)
        y = x
        if "mul" in self.fusion:
            y = y * torch.sigmoid(self.apply_maps(self.w_mul, terms)).to(x.dtype)
        if "add" in self.fusion:
            f = self.apply_maps(self.w, terms)
            if self.norm.kind in ("bn", "bn_relu", "gn") and _broadcast(f):
                f = f.contiguous()  # statistics over the positions: the N copies count
            y = y + self.norm(f).to(x.dtype)
        return y

    def _lowrank_cf(self, h: torch.Tensor, graph: aff.Graph) -> torch.Tensor | None:
        """:meth:`forward_cf` on a low-rank graph ``A = U Vᵀ`` with the output maps applied on the small side.

        Every term is ``α_t Z + U R_t`` (:func:`~nonlocalnet.filters.lowrank_terms`), so
        ``F = Σ_t W_t (α_t Zᵀ + R_tᵀ Uᵀ) = P Zᵀ + M Uᵀ + c`` with ``M = Σ_t W_t R_tᵀ`` ``(B, C, r)`` and
        ``P = Σ_t α_t W_t``: one GEMM over the positions per block instead of ``A Z`` and ``W`` over them, at
        any order. When cheaper (no ``Z`` term and ``r < C``), ``g`` is folded in too: ``VᵀZ = (VᵀX) W_gᵀ +
        (Vᵀ1) b_gᵀ``, so ``Z`` is never formed. With ``out_norm`` none or γ the residual is the GEMM's
        accumulator (``baddbmm(h, M, Uᵀ)``), and on A²'s graph (rows of ``U`` sum to 1) the bias is folded into
        ``M``. Returns ``None`` where this does not apply (sub-sampled keys, spectral filters, bottleneck or
        grouped maps, a gate, channels_last input)."""
        if type(graph) is not aff.LowRankGraph or self.spectral is not None or self.sub_sample or \
                self.fusion != "add" or not len(self.w) or self.out_map != "linear" or self.w[0].groups != 1 or \
                h.stride(-1) != 1:
            return None
        u, v = graph.factors(h.dtype, need_v=False)  # v is None when V = U with its halves swapped
        x = h.transpose(1, 2)  # tokens view (B, N, C)
        right = u if v is None else v  # Zᵀ V = swap_rows(Zᵀ U) when V is not formed (no-op otherwise)
        b, c, r = h.shape[0], h.shape[1], u.shape[-1]
        ws = [m.weight.flatten(1) for m in self.w]  # (C, C_v) each
        cv = ws[0].shape[1]
        alphas = self.coef_at_zero
        has_z = any(a != 0 for a in alphas)
        g = getattr(self, "g", None)
        # per position: forming Z (C_v·C) + VᵀZ (r·C_v) + P Zᵀ (C·C_v) vs VᵀX (r·C) + P W_g Xᵀ (C·C)
        fold = g is not None and r * c + (c * c if has_z else 0) < cv * c + r * cv + (c * cv if has_z else 0)
        # (VᵀZ)ᵀ = Zᵀ V as a plain GEMM on the channels-first operand (the fastest form, see Affinity)
        if g is None or fold:
            st = graph.swap_rows(torch.bmm(h, right))  # XᵀV (B, C, r)
            operand = h
            if g is not None:
                st = torch.matmul(g.weight.flatten(1), st)
                if g.bias is not None:
                    st = st + g.bias[:, None] * graph.swap_rows(right.sum(1)).unsqueeze(1)
        else:
            operand = project_cf(g, x)  # Zᵀ (B, C_v, N)
            st = graph.swap_rows(torch.bmm(operand, right))  # (B, C_v, r)
        terms = lowrank_terms(self.coef_rows, st.transpose(1, 2),
                              lambda: graph.swap_rows(right.transpose(1, 2) @ u, -2))  # VᵀU
        m = None
        for w, (_, rt) in zip(ws, terms):
            if rt is not None:
                wr = torch.matmul(w, rt.transpose(1, 2))  # (B, C, r)
                m = wr if m is None else m + wr
        bias = sum(w.bias for w in self.w) if self.w[0].bias is not None else None
        p = None
        if has_z:
            p = sum(a * w for a, w in zip(alphas, ws) if a != 0)  # (C, C_v)
            if g is not None and g.bias is not None:
                pb = p @ g.bias
                bias = pb if bias is None else bias + pb
            if fold:
                p = p @ g.weight.flatten(1)  # (C, C)
        if m is None:  # e.g. the zero-order filter: F = Z W
            m = torch.zeros(b, c, r, dtype=st.dtype, device=st.device)
        ut = u.transpose(1, 2)  # (B, r, N)
        fuse = self.norm.kind in ("none", "gamma") and not torch.is_autocast_enabled(h.device.type)
        # accumulations in place into the fresh GEMM outputs (their backward does not need them): on this kind
        # of machine a fresh (B, C, N) tensor costs more in page faults than the pass that fills it
        if not fuse:
            f = torch.bmm(m, ut)
            if p is not None:
                f = f.baddbmm_(p.expand(b, *p.shape).to(f.dtype), operand.to(f.dtype))  # in place: no autocast
            if bias is not None:
                f = f.add_(bias[:, None])
            return _residual(h, self.norm.forward_cf(f).to(h.dtype))
        if self.norm.kind == "gamma":
            gamma = self.norm.gamma
            m = m * gamma
            p = None if p is None else p * gamma
            bias = None if bias is None else bias * gamma
        if bias is not None and graph.unit_rows:
            m, bias = m + bias[:, None], None
        y = torch.baddbmm(h, m, ut)
        if p is not None:
            y = y.baddbmm_(p.expand(b, *p.shape), operand)
        return y if bias is None else y.add_(bias[:, None])

    def _channels_cf(self, h: torch.Tensor, graph: aff.Graph) -> torch.Tensor | None:
        """:meth:`forward_cf` for CGNL's dot kernel in two GEMMs over the positions, ``t``, ``p`` and ``g`` never
        formed (Yue et al. 2018's block is ``F = W(t·⟨p, g⟩)`` per group).

        ``⟨p, g⟩`` over a group's ``N·C_g`` nodes is ``Σ_{c∈group} (W_φ G W_gᵀ)_cc`` with ``G = X Hᵀ`` ``(C × C)``
        (``X`` the stage input, ``H`` this unit's: ``X`` for the first unit; bias-free projections); then
        ``F = W diag(att) W_θ X = P X`` with ``P`` ``(B, C, C)`` formed on the small
        side (``W`` grouped as a block-diagonal matrix). Same GEMM work as the authors' three projections and
        output conv, none of their ``(B, C_s, N)`` intermediates or the scaling pass. ``None`` where this does not
        apply (Gaussian kernel, biases, sub-sampled keys)."""
        if type(graph) is not aff.ChannelGraph or graph.source is None or graph.kernel != "dot_product" or \
                self.spectral is not None or self.sub_sample or self.fusion != "add" or self.out_map != "linear" or \
                len(self.w) != 1 or self.coef_rows != ((0.0, 1.0),) or not hasattr(self, "g") or \
                self.g.bias is not None or h.stride(-1) != 1:
            return None
        x_tokens, w_theta, w_phi = graph.source
        x = x_tokens.transpose(1, 2)  # the stage input X (B, C, N); h is this unit's input (X for the first)
        if x.stride(-1) != 1:
            return None
        b, c, n = h.shape
        groups, ck = graph.groups, w_theta.shape[0]
        with aff.full_precision(h.device.type):  # the group sums in float32, as ChannelGraph computes them
            gram = torch.bmm(aff.float32(x), aff.float32(h).transpose(1, 2))  # Σ_n x_n h_nᵀ (B, C, C)
            att = (torch.matmul(aff.float32(w_phi), gram) * aff.float32(self.g.weight.flatten(1))).sum(-1)
            att = att.reshape(b, groups, ck // groups).sum(-1) * graph.norm_factor(n * (ck // groups))
        w = self.w[0]
        wd = w.weight.flatten(1)  # (C, C_s / groups_w)
        if w.groups != 1:
            gw = w.groups
            wd = torch.block_diag(*wd.reshape(gw, c // gw, ck // gw))  # (C, C_s)
        scale = att.to(wd.dtype).repeat_interleave(ck // groups, 1).unsqueeze(1)  # (B, 1, C_s)
        proj = torch.matmul(wd * scale, w_theta)  # (B, C, C)
        f = torch.bmm(proj.to(h.dtype), x)
        if w.bias is not None:
            f = f.add_(w.bias[:, None])
        return _residual(h, self.norm.forward_cf(f).to(h.dtype))

    def _unary_cf(self, h: torch.Tensor, graph: aff.Graph) -> torch.Tensor | None:
        """:meth:`forward_cf` on the unary graph ``A = 1·aᵀ`` alone (GC): the context ``c = aᵀZ`` ``(B, 1, C_v)``
        is mapped once per batch item and broadcast in the residual sum; ``g`` (if any) is applied to ``aᵀX``
        (``a`` sums to 1, so ``aᵀ g(X) = g(aᵀX)``). The pooling is ``aᵀXᵀ``-oriented (one row times the tokens
        view: 0.4× the time of ``X a`` at N = 4096). ``None`` for the other filters and BN/GN output norms
        (their statistics count the N broadcast copies: the generic path handles them)."""
        if type(graph) is not aff.UnaryGraph or self.spectral is not None or self.sub_sample or \
                self.coef_rows != ((0.0, 1.0),) or self.norm.kind not in ("none", "gamma"):
            return None
        a = graph.a
        if a.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
            a = a.to(h.dtype)
        ctx = aff.pool(a, h).unsqueeze(1)  # (B, 1, C)
        if hasattr(self, "g"):
            ctx = project(self.g, ctx)

        def mapped(maps: nn.ModuleList) -> torch.Tensor:  # (B, C, 1)
            if not len(maps):
                return ctx.transpose(1, 2)
            m = maps[0]
            return (m(ctx) if isinstance(m, Bottleneck) else project(m, ctx)).transpose(1, 2)

        y = h
        if "mul" in self.fusion:
            y = y * torch.sigmoid(mapped(self.w_mul)).to(h.dtype)
        if "add" in self.fusion:
            f = mapped(self.w)
            y = y + (self.norm.gamma * f if self.norm.kind == "gamma" else f).to(h.dtype)
        return y

    def forward_cf(self, h: torch.Tensor, graph: aff.Graph, spatial: tuple[int, ...]) -> torch.Tensor:
        """:meth:`forward` on channels-first ``h`` ``(B, C, N)`` (a view of the NCHW input or of a previous unit's
        output), returning ``(B, C, N)``: the unit reads ``h`` through the tokens view ``hᵀ`` (no copy), and
        produces the output maps ``W_t`` directly channels-first when ``h`` is (GEMMs ``W Tᵀ``), normalizes there
        and adds the residual in place of the copy back; for a channels_last ``h`` it works on tokens, which
        are then ``h``'s own layout."""
        fast = self._lowrank_cf(h, graph)
        if fast is None:
            fast = self._unary_cf(h, graph)
        if fast is None:
            fast = self._channels_cf(h, graph)
        if fast is not None:
            return fast
        x = h.transpose(1, 2)
        terms = self.filter_terms(x, graph, spatial)
        y = h
        if "mul" in self.fusion:
            y = y * torch.sigmoid(self.apply_maps(self.w_mul, terms)).to(h.dtype).transpose(1, 2)
        if "add" not in self.fusion:
            return y
        channels_first = h.stride(-1) == 1 and not (len(self.w) and isinstance(self.w[0], Bottleneck)) and \
            not all(_broadcast(t) for t in terms)
        if not channels_first:
            f = self.apply_maps(self.w, terms)
            if self.norm.kind in ("bn", "bn_relu", "gn") and _broadcast(f):
                f = f.contiguous()
            return y + self.norm(f).to(h.dtype).transpose(1, 2)
        if not len(self.w):
            f = terms[0].transpose(1, 2)
        elif len(self.w) == 1 or self.w[0].groups != 1:
            f = None
            for m, t in zip(self.w, terms):
                f = project_cf(m, t) if f is None else f + project_cf(m, t)
        else:  # one GEMM over the concatenated terms: [W_0, ..., W_K] [T_0 Z; ...; T_K Z]ᵀ
            weight = torch.cat([w.weight.flatten(1) for w in self.w], 1)
            bias = sum(w.bias for w in self.w) if self.w[0].bias is not None else None
            cat = torch.cat(terms, -1).transpose(1, 2)
            weight = weight.expand(cat.shape[0], *weight.shape)
            f = torch.bmm(weight, cat) if bias is None else torch.baddbmm(bias[:, None], weight, cat)
        if self.norm.kind == "gamma":  # the residual fused: h + γ·F in one pass
            return torch.addcmul(y, f.to(h.dtype), self.norm.gamma)
        return y + self.norm.forward_cf(f).to(h.dtype)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S) -> (B, N, C)``, contiguous: one copy for NCHW inputs, free for channels_last inputs (for
    analysis and :meth:`NonlocalUnit.forward`; the block's own forward works on the channels-first view)."""
    return aff.movedim(x, 1, -1).reshape(x.shape[0], -1, x.shape[1]).contiguous()


def from_tokens(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_tokens`, in the memory format of ``like``."""
    out = aff.movedim(t.reshape(like.shape[0], *like.shape[2:], like.shape[1]), -1, 1)
    return out.contiguous() if like.is_contiguous() else out


class NonlocalBlock(nn.Module):
    """A nonlocal stage: one :class:`Affinity` (``.edges``) and ``units`` :class:`NonlocalUnit` s
    (Tao et al. 2018, Eq. 8).

    Maps ``(B, C, *S)`` to the same shape. ``block.affinity(x)`` returns the dense ``A``
    ``(B, N, N')`` computed from ``x`` (for analysis). Built by :func:`nonlocalnet.build_block`.

    Under ``torch.fx`` symbolic tracing (torchvision's ``create_feature_extractor``, ...) the block is a leaf:
    one ``call_module`` node, whatever the tracer's leaf rule (its forward depends on the input's sizes).
    """

    def __init__(self, name: str, in_channels: int, dim: int, edges: Affinity, units: list[NonlocalUnit],
                 recurrence: int = 1, options: dict | None = None):
        super().__init__()
        self.name, self.in_channels, self.dim, self.recurrence = name, in_channels, dim, recurrence
        self.edges = edges  # not `graph`: that name is taken by fx.GraphModule (torch.export)
        self.units = nn.ModuleList(units)
        self.options = dict(options or {})

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.name!r}, in_channels={self.in_channels}, dim={self.dim}, {opts}"

    def _first_parameter(self) -> nn.Parameter | None:
        """The block's first parameter, by a name found once (``next(self.parameters())`` walks every submodule:
        ~20 µs per call)."""
        name = self.__dict__.get("_first_param_name")
        if name is None:
            name = next((n for n, _ in self.named_parameters()), "")
            self.__dict__["_first_param_name"] = name
        try:
            return self.get_parameter(name) if name else None
        except AttributeError:  # the module tree was changed after the first call
            self.__dict__.pop("_first_param_name")
            return next(self.parameters(), None)

    def check_input(self, x: torch.Tensor) -> tuple[int, ...]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        param = self._first_parameter()
        if param is not None and x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x: dtype {x.dtype} does not match the block's parameters ({param.dtype}); convert "
                            f"one to the other (block.to({x.dtype}) or x.to({param.dtype})), or run under "
                            "torch.autocast for mixed precision")
        if x.dim() != 2 + self.dim:
            layout = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}[self.dim]
            raise ValueError(f"x: expected a {2 + self.dim}-D tensor {layout} for a dim={self.dim} block, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels (dim 1), got {x.shape[1]} "
                             f"(shape {tuple(x.shape)})")
        spatial = tuple(int(s) for s in x.shape[2:])
        if x.shape[0] == 0 or any(s == 0 for s in spatial):
            raise ValueError(f"x: batch and spatial sizes must be positive, got shape {tuple(x.shape)}")
        if self.training and math.prod((x.shape[0], *spatial)) == 1 and \
                any(getattr(u.norm, "kind", None) in ("bn", "bn_relu") for u in self.units):
            raise ValueError(f"x: shape {tuple(x.shape)} gives BatchNorm a single value per channel (batch x positions "
                             "= 1), which has no batch statistics in training mode; use a larger batch or block.eval()")
        if self.edges.sub_sample:
            pooled = aff.pooled_shape(spatial)
            if any(p == 0 for p in pooled):
                raise ValueError(
                    f"x: spatial size {spatial} is too small for sub_sample=True (max-pool by "
                    f"{'(1, 2, 2)' if self.dim == 3 else 2} needs >= 2 along each pooled axis)"
                )
        return spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing: the block is one leaf node (shapes drive its code)
            return x.tracer.create_proxy("call_module", x.tracer.path_of_module(self), (x,), {})
        spatial = self.check_input(x)
        # channels-first (B, C, N): a view of NCHW and of channels_last inputs alike (no tokens round trip)
        h = x.reshape(x.shape[0], x.shape[1], -1)
        for _ in range(self.recurrence):
            graph = self.edges(h.transpose(1, 2), spatial)
            for unit in self.units:
                h = unit.forward_cf(h, graph, spatial)
        return h.reshape(x.shape)

    def build_graph(self, x: torch.Tensor) -> aff.Graph:
        """The graph operator of the first (or only) application, from the stage input ``x``."""
        return self.edges(to_tokens(x), self.check_input(x))

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """The dense affinity ``A`` (B, N, N') the block uses on ``x`` (CC: the masked matrix)."""
        return self.build_graph(x).dense()
