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

A nonlocal block is (docs/framework.md; Zhu et al., ICLR 2020 submission, Eq. 1; Zhu et al. 2021 (ICCV), Eq. 1;
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
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import affinity as aff
from .filters import Filter, Polynomial, lowrank_terms, polynomial_responses
from .kernels import DOUBLE_NORM_EPS, GRAPH_MODES, KERNELS, GraphMode, Kernel, register_graph
from .registry import Option, boolean, one_of, positive_int, positive_number

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv1x1(dim: int, cin: int, cout: int, bias: bool, groups: int = 1, device=None, dtype=None) -> nn.Module:
    return _CONV[dim](cin, cout, 1, bias=bias, groups=groups, device=device, dtype=dtype)


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

    def __init__(self, kind: str, channels: int, zero_init: bool, groups: int = 1, device=None, dtype=None):
        super().__init__()
        self.kind, self.zero_init = kind, zero_init
        fk = dict(device=device, dtype=dtype)
        self.bn = nn.BatchNorm1d(channels, **fk) if kind in ("bn", "bn_relu") else None
        self.gn = nn.GroupNorm(groups, channels, **fk) if kind == "gn" else None
        self.register_parameter("gamma", nn.Parameter(torch.empty(1, **fk)) if kind == "gamma" else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialize, zero-init included (a zero scale, so a new block starts as the identity)."""
        for norm in (self.bn, self.gn):
            if norm is not None:
                norm.reset_parameters()
                if self.zero_init:
                    nn.init.zeros_(norm.weight)
        if self.gamma is not None:
            with torch.no_grad():
                self.gamma.fill_(0.0 if self.zero_init else 1.0)

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
    """Builds the graph ``A`` from a stage input (docs/framework.md "Step 1").

    ``mode``: a registered graph mode (:data:`~nonlocalnet.kernels.GRAPH_MODES`): ``positions`` (the N × N' graph
    of NL/NS/SNL/A²), ``crisscross`` (CC's masked graph), ``channels`` (CGNL's graph over positions × channels),
    ``axial`` (a product of per-axis graphs) or ``neighborhood`` (a window around each position; ``kernel_size``).
    ``heads``: ``h`` graphs on channel groups of ``θ``, ``φ`` and the values (the kernels that take heads:
    ``Kernel.takes_heads``).
    ``kernel``: a registered :class:`~nonlocalnet.kernels.Kernel`. Parameters: ``theta``, ``phi`` (1×1 convs
    ``C → C_k``; ``None`` for a kernel that uses ``X`` itself, e.g. ``gaussian``), ``concat`` (``2C_k → 1``, no
    bias; the concatenation kernel) and ``mask`` (``C → 1``: the unary logits of GC and DNL), each ``None`` where the
    graph has no such part. ``approx`` (``None``, ``"performer"``, ``"nystrom"``; docs/approximations.md): the softmax
    graph approximated with ``approx_features`` random features or landmarks; Performer's features are the buffer
    ``random_features`` ``(m, C_k)``, drawn here and saved in the state dict (``reset_parameters`` keeps them).
    """

    def __init__(self, in_channels: int, key_channels: int, *, dim: int, kernel: str, normalization: str,
                 scale: bool | float, bias: bool, sub_sample: bool, backend: str, memory_budget: float,
                 mode: str = "positions", groups: int = 1, order: int = 0, rbf_gamma: float = 1e-4,
                 whiten: bool = False, unary: bool = False, temperature: float = 1.0, rbf_prefactor: str = "exact",
                 pool_sizes: tuple[int, ...] | None = None, memory_size: int = 0,
                 agents: int | tuple[int, ...] | None = None, pairwise_gamma: bool = False, kernel_size: int = 1,
                 heads: int = 1, approx: str | None = None, approx_features: int = 64,
                 mode_options: Mapping[str, Any] | None = None, device=None, dtype=None):
        super().__init__()
        # every option of the graph mode by its option name (the built-in modes' also arrive as the keywords above):
        # a registered mode's build() reads its own options here
        self.mode_options = dict(mode_options or {})
        self.kernel, self.normalization, self.backend, self.mode = kernel, normalization, backend, mode
        self.agent_grid = None if agents is None else agent_grid(agents, dim)  # Agent Attention's pooled grid
        self.pool_sizes = None if pool_sizes is None else tuple(pool_sizes)  # APNB's pyramid (sub_sample's pooling)
        self.sub_sample, self.dim, self.groups, self.order, self.rbf_gamma = sub_sample, dim, groups, order, rbf_gamma
        self.whiten, self.unary, self.temperature, self.rbf_prefactor = whiten, unary, temperature, rbf_prefactor
        self.memory_budget = memory_budget  # MiB
        self.kernel_size = kernel_size  # the neighborhood graph's window (positions per axis)
        self.graph_mode = GRAPH_MODES[mode]
        self.kernel_spec = kern = KERNELS[kernel]
        uses_projection = self.graph_mode.projects(kern)
        feat = key_channels if uses_projection else in_channels
        self.heads = heads  # h graphs on h channel groups of θ, φ and the values (Kernel.takes_heads)
        if isinstance(scale, bool):  # 1/sqrt of the channels each graph's logits sum over (per head)
            self.scale_value = 1.0 / math.sqrt(feat // heads) if scale else 1.0
        else:
            self.scale_value = float(scale)
        self.scale_value /= temperature  # DNL's temperature: logits / (sqrt(C_s)·τ)
        self.scale = scale
        fk = dict(device=device, dtype=dtype)
        self.theta = conv1x1(dim, in_channels, key_channels, bias, **fk) if uses_projection else None
        # External Attention: the keys are a learned memory M_k (S × C_k, a 1×1 conv on the queries), not positions
        self.phi = conv1x1(dim, in_channels, key_channels, bias, **fk) if uses_projection and not memory_size else None
        self.memory = conv1x1(dim, key_channels, memory_size, False, **fk) if memory_size else None
        self.concat = conv1x1(dim, 2 * key_channels, 1, False, **fk) if kern.pretransform == "concat" else None
        # the unary logits m_j = w_m·x_j + b_m (GC's / DNL's conv_mask)
        self.mask = conv1x1(dim, in_channels, 1, True, **fk) if kern.unary or unary else None
        # the DNL authors' learnable scale of the pairwise term, A = γ·A_pairwise + 1·aᵀ (zero at init, as theirs)
        self.gamma = nn.Parameter(torch.zeros(1, **fk)) if pairwise_gamma else None
        # a softmax approximation (docs/approximations.md): Performer's random features are drawn once, here, from
        # torch's generator and saved with the block (`random_features`), so a reloaded block is the same function
        self.approx, self.approx_features = approx, approx_features
        if approx == "performer":
            self.register_buffer("random_features", aff.orthogonal_gaussian(approx_features, feat, **fk))

    def reset_parameters(self) -> None:
        for m in (self.theta, self.phi, self.concat, self.mask, self.memory):
            if m is not None:
                m.reset_parameters()
        if self.gamma is not None:
            with torch.no_grad():
                self.gamma.zero_()

    def queries_keys(self, x: torch.Tensor, spatial: tuple[int, ...],
                     queries_channels_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(θ(X), φ(X))`` as tokens, keys sub-sampled when asked (the raw ``X`` without projections).

        ``queries_channels_first``: the queries as the tokens view of a channels-first tensor — measured fastest
        for the low-rank graphs (1 thread, N = 1024–4096: U Vᵀ's last GEMM reads Uᵀ row-major); keys are always
        contiguous tokens (Vᵀ X is computed as X V, a plain GEMM: 0.3–0.55× the time of the transposed forms).
        Fused attention wants contiguous tokens for both."""
        if self.theta is not None:
            q, k = project(self.theta, x, queries_channels_first), project(self.phi, x)
        else:
            q = k = x
        if self.sub_sample:
            k = aff.sample_keys(k, spatial, self.pool_sizes)
        if self.whiten:  # DNL's whitened pairwise term: queries and keys minus their means over positions
            q, k = q - q.mean(1, keepdim=True), k - k.mean(1, keepdim=True)
        return q, k

    def unary_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``m_j = w_m·x_j + b_m`` ``(B, N)``: the logits of the unary term (GC, DNL)."""
        return project(self.mask, x).squeeze(-1)

    def forward(self, x: torch.Tensor, spatial: tuple[int, ...]) -> aff.Graph:
        return self.graph_mode.build(self, x, spatial, int(self.memory_budget * aff.MiB))


class PositionsMode(GraphMode):
    """The graph over all positions (``N × N'``): every kernel; DNL's unary term is added as a rank-1 graph
    (:class:`~nonlocalnet.affinity.SumGraph`), GC's unary kernel is that term alone. ``heads > 1``:
    one graph per channel group (:meth:`heads_graph`)."""

    multihead = True

    def build(self, edges: Affinity, x: torch.Tensor, spatial: tuple[int, ...], budget: int) -> aff.Graph:
        kern = edges.kernel_spec
        if kern.unary:  # GC: A = 1·aᵀ alone
            return aff.build_graph(edges.kernel, edges.normalization, edges.backend, q=None, k=None,
                                   budget_bytes=budget, unary=edges.unary_logits(x))
        graph = self.pairwise(edges, kern, x, spatial, budget)
        if edges.gamma is not None:  # the DNL authors' γ·A_pairwise
            graph = aff.ScaledGraph(graph, edges.gamma)
        if not edges.unary:
            return graph
        # DNL: A = A_pairwise + 1·aᵀ; the unary term is rank 1 (formed only for backend="dense")
        unary = aff.build_graph("unary", "softmax", "dense" if edges.backend == "dense" else "lowrank", q=None,
                                k=None, budget_bytes=budget, unary=edges.unary_logits(x))
        return aff.SumGraph([graph, unary])

    @staticmethod
    def pairwise(edges: Affinity, kern: Kernel, x: torch.Tensor, spatial: tuple[int, ...], budget: int) -> aff.Graph:
        if edges.approx is not None:
            return PositionsMode.approximate(edges, x, spatial)
        if edges.normalization == "symmetric" and kern.factorizable and kern.pointwise and kern.projected and \
                not edges.sub_sample and not edges.whiten and edges.heads == 1:
            # θ and φ in one GEMM; the symmetric low-rank graph keeps them as one tensor (LowRankGraph `joint`)
            w = torch.cat([edges.theta.weight.flatten(1), edges.phi.weight.flatten(1)])
            bias = None if edges.theta.bias is None else torch.cat([edges.theta.bias, edges.phi.bias])
            joint = kern.transform_joint(project_weight(w, bias, x))  # a fresh GEMM output
            ck = w.shape[0] // 2
            return aff.build_graph(edges.kernel, edges.normalization, edges.backend, q=joint[..., :ck],
                                   k=joint[..., ck:], scale=edges.scale_value, budget_bytes=budget, joint=joint)
        q, k = edges.queries_keys(x, spatial, queries_channels_first=kern.factorizable)
        if kern.pretransform == "concat":
            kc = q.shape[-1]
            w = edges.concat.weight.flatten()
            return aff.build_graph(edges.kernel, edges.normalization, edges.backend, q=None, k=None,
                                   budget_bytes=budget, concat=(q @ w[:kc], k @ w[kc:]))
        if edges.heads > 1 and not kern.exp:  # each head's channel group pre-transformed on its own (A²'s softmax)
            h = edges.heads
            q, k = kern.transform(aff.split_heads(q, h), aff.split_heads(k, h))
            return aff.HeadsGraph(aff.build_graph(edges.kernel, edges.normalization, edges.backend, q=q, k=k,
                                                  scale=edges.scale_value, budget_bytes=budget), h)
        q, k = kern.transform(q, k)
        if edges.heads > 1:
            return PositionsMode.heads_graph(edges, q, k, budget)
        return aff.build_graph(edges.kernel, edges.normalization, edges.backend, q=q, k=k,
                               scale=edges.scale_value, budget_bytes=budget)

    @staticmethod
    def approximate(edges: Affinity, x: torch.Tensor, spatial: tuple[int, ...]) -> aff.LowRankGraph:
        """The softmax graph of an exp kernel approximated (``approx``: Performer's random features or Nyström's
        landmarks, :mod:`~nonlocalnet.affinity`), factorized ``A ≈ U Vᵀ`` of rank ``approx_features``."""
        q, k = edges.queries_keys(x, spatial)
        if edges.approx == "performer":
            return aff.performer_graph(q, k, edges.random_features, edges.scale_value)
        return aff.nystrom_graph(q, k, edges.approx_features, edges.scale_value)

    @staticmethod
    def heads_graph(edges: Affinity, q: torch.Tensor, k: torch.Tensor, budget: int) -> aff.Graph:
        """``heads`` graphs on channel groups of ``q``, ``k`` (and of the values): fused attention does them
        natively (:class:`~nonlocalnet.affinity.SDPAGraph`), every other backend the heads as one batch
        (:class:`~nonlocalnet.affinity.HeadsGraph`)."""
        h, backend = edges.heads, edges.backend
        if backend == "auto":
            backend = aff.choose_backend(edges.kernel, edges.normalization, q.shape[0], q.shape[1], k.shape[1],
                                         max(q.element_size(), 4), budget)
        if backend == "sdpa":
            return aff.SDPAGraph(q, k, edges.scale_value, heads=h)
        return aff.HeadsGraph(aff.build_graph(edges.kernel, edges.normalization, backend, q=aff.split_heads(q, h),
                                              k=aff.split_heads(k, h), scale=edges.scale_value, budget_bytes=budget),
                              h)


def _approx(name: str, value: Any) -> str | None:
    if value is not None and value not in aff.APPROXIMATIONS:
        raise ValueError(f"{name}: expected None (the exact softmax) or one of "
                         f"{', '.join(map(repr, aff.APPROXIMATIONS))}, got {value!r}")
    return value


POSITIONS_OPTIONS = {
    "approx": Option(None, "None (exact), 'performer' (positive orthogonal random features, Choromanski et al., "
                           "ICLR 2021) or 'nystrom' (segment-mean landmarks, Xiong et al., AAAI 2021): a linear-time "
                           "approximation of the exp kernels' softmax graph", _approx),
    "approx_features": Option(64, "m: random features (performer) or landmarks (nystrom) of approx", positive_int),
}


class CrissCrossMode(GraphMode):
    """CCNet's graph: each position attends to the positions that differ from it in at most one coordinate."""

    def build(self, edges: Affinity, x: torch.Tensor, spatial: tuple[int, ...], budget: int) -> aff.Graph:
        if edges.theta is not None and not edges.whiten and x.stride(1) == 1:
            # on a tokens view of channels-first input, θ and φ as W Xᵀ (channels first): for CC's narrow
            # C_s = C/8 outputs this GEMM took 1-4 ms against 25-30 ms for the tokens-layout one (B = 2, C = 64,
            # N = 64², 1 thread); the energies' reshapes copy the small (B, N, C_s) results either way
            q, k = project(edges.theta, x, True), project(edges.phi, x, True)
        else:
            q, k = edges.queries_keys(x, spatial)
        if edges.backend == "dense":
            return aff.PairwiseGraph(_CrissCrossDense(q, k, spatial, edges.scale_value), "none")
        return aff.CrissCrossGraph(q, k, spatial, edges.scale_value)


class ChannelsMode(GraphMode):
    """CGNL's graph over (position, channel) nodes of each channel group (always projected)."""

    def projects(self, kernel: Kernel) -> bool:
        return True

    def build(self, edges: Affinity, x: torch.Tensor, spatial: tuple[int, ...], budget: int) -> aff.Graph:
        if edges.backend != "dense" and not edges.sub_sample and not edges.whiten and \
                edges.theta.bias is None and edges.phi.bias is None:
            # t and p formed only if asked for (NonlocalUnit takes the dot kernel through X's Gram matrix)
            return aff.ChannelGraph(None, None, edges.groups, edges.kernel, edges.order, edges.rbf_gamma,
                                    edges.normalization, edges.scale, edges.rbf_prefactor,
                                    source=(x, edges.theta.weight.flatten(1), edges.phi.weight.flatten(1)))
        q, k = edges.queries_keys(x, spatial)
        cls = aff.DenseChannelGraph if edges.backend == "dense" else aff.ChannelGraph
        return cls(q, k, edges.groups, edges.kernel, edges.order, edges.rbf_gamma, edges.normalization,
                   edges.scale, edges.rbf_prefactor)


class MemoryMode(GraphMode):
    """External Attention's bipartite graph (Guo, Liu, Mu, Hu, "Beyond Self-attention: External Attention using Two
    Linear Layers for Visual Tasks", TPAMI 2022, external attention with double normalization): the ``N`` positions
    against ``S`` learned memory slots
    ``M_k`` (``edges.memory``, ``S × C_k``), ``M_ij = exp(s·θ_i·m_j)`` normalized by ``double``: softmax over the
    positions, then each row l1-normalized over the slots. The values at the slots are each unit's ``memory``
    (``M_v``, ``S × C_v``), so ``F = A M_v W``; ``O(N·S·C)``, the ``N × S`` matrix is the graph itself.

    ``normalization="softmax"`` is a softmax over the slots of each position alone (the self-attention style
    normalization External Attention's double normalization replaces): every position then reads the memory
    independently of the others, a position-wise block with no coupling between positions."""

    def build(self, edges: Affinity, x: torch.Tensor, spatial: tuple[int, ...], budget: int) -> aff.Graph:
        q = project(edges.theta, x)
        logits = project(edges.memory, q)  # θ M_kᵀ (B, N, S)
        if edges.scale_value != 1.0:
            logits = logits * edges.scale_value
        with aff.full_precision(x.device.type):  # the normalizers in float32 under autocast
            if edges.normalization == "softmax":  # each position over the S slots: no coupling between positions
                a = torch.softmax(aff.float32(logits), dim=-1)
            else:
                a = torch.softmax(aff.float32(logits), dim=1)  # over the N positions
                a = a / (a.sum(-1, keepdim=True) + DOUBLE_NORM_EPS)  # each row over the S slots
        return aff.BipartiteGraph(a)


def agent_grid(agents: int | tuple[int, ...], dim: int) -> tuple[int, ...]:
    """The grid the agents are pooled to: a tuple is the grid itself (``dim`` sizes); ``n`` agents are ``(n,)`` in
    1-D, ``k × k`` in 2-D (``k² = n``: the authors' ``AdaptiveAvgPool2d((√n, √n))``), ``k × k × k`` in 3-D when ``n``
    is a cube, else ``1 × k × k`` (a ``k × k`` grid pooled over the whole clip)."""
    if isinstance(agents, tuple):
        if len(agents) != dim:
            raise ValueError(f"agents: a grid of {len(agents)} sizes {agents} for a dim={dim} block; give {dim} sizes "
                             f"or a number of agents")
        return agents
    if dim == 1:
        return (agents,)
    for grid in [(round(agents ** (1 / dim)),) * dim] + ([(1, round(agents ** 0.5), round(agents ** 0.5))]
                                                          if dim == 3 else []):
        if math.prod(grid) == agents:
            return grid
    raise ValueError(f"agents: {agents} agents do not form a {dim}-D grid (k^{dim}"
                     f"{' or 1 x k x k' if dim == 3 else ''} agents, e.g. {4 ** dim}); give such a number or the grid "
                     f"as a tuple of {dim} sizes")


def _agents_option(name: str, value: Any) -> int | tuple[int, ...]:
    if isinstance(value, list):
        value = tuple(value)
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
        isinstance(value, tuple) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                   for v in value))
    if not ok:
        raise ValueError(f"{name}: expected a positive int (the number of agents, pooled to a grid) or a tuple of "
                         f"positive ints (the grid), got {value!r}")
    return value


class AgentsMode(GraphMode):
    """Agent Attention's graph (Han, Ye, Han, Xia, Pan, Wan, Song, Huang, "Agent Attention: On the Integration of
    Softmax and Linear Attention", ECCV 2024): ``n`` agent tokens ``Ag`` pooled from the queries (adaptive
    average pooling of the query map to :func:`agent_grid`), then ``A = softmax(s·θ Agᵀ) softmax(s·Ag φᵀ)``, each
    factor the embedded Gaussian with its row softmax: ``A = P Vᵀ`` with ``P`` ``(N × n)`` softmax over the agents
    and ``V`` ``(N' × n)`` softmax over the positions — A²'s low-rank structure (rows of ``P`` sum to 1), so the
    low-rank path and the exact r × r filters apply, never an ``N × N`` tensor."""

    def build(self, edges: Affinity, x: torch.Tensor, spatial: tuple[int, ...], budget: int) -> aff.Graph:
        q, k = edges.queries_keys(x, spatial)
        agents = aff.adaptive_pool_tokens(q, spatial, edges.agent_grid).transpose(1, 2)  # (B, C_s, n)
        s = edges.scale_value
        p = torch.softmax(torch.matmul(q, agents) * s, -1)  # (B, N, n): each query over the agents
        v = torch.softmax(torch.matmul(k, agents) * s, 1)  # (B, N', n): each agent over the key positions
        return aff.LowRankGraph(p, v, "none", unit_rows=True)


RBF_PREFACTORS = ("exact", "constant")
MAX_TAYLOR_ORDER = 32  # CGNL's Gaussian kernel


def _taylor_order(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TAYLOR_ORDER:
        raise ValueError(f"taylor_order: expected an int in [0, {MAX_TAYLOR_ORDER}] (the Taylor order P of the "
                         f"Gaussian kernel; its k-th term carries (2γ)^k/k!, 3e-73 at k = 16 for the default "
                         f"γ = 1e-4), got {value!r}")
    return value


register_graph(PositionsMode(
    "positions", "the graph over all N x N' positions (NL, NS, SNL, A², GC, DNL, ...)",
    options={"pairwise_gamma": Option(False, "a learnable scalar γ on the pairwise term of a pairwise + unary graph "
                                             "(unary=True): A = γ·A_pairwise + 1·aᵀ, γ = 0 at init (the DNL "
                                             "authors' code)", boolean), **POSITIONS_OPTIONS}))
register_graph(CrissCrossMode("crisscross", "each position and its row and column, masked softmax (CCNet)",
                              kernels="exp", normalizations=("softmax", "row"), backends=("auto", "dense", "chunked"),
                              pairwise_only=True))
register_graph(ChannelsMode(
    "channels", "a graph over positions x channels per channel group (CGNL)", kernels=("dot_product", "gaussian"),
    normalizations=("none", "count"), backends=("auto", "dense", "lowrank"), pairwise_only=True,
    options={"groups": Option(1, "channel groups, each its own graph", positive_int),
             "taylor_order": Option(3, f"Taylor order P of the Gaussian RBF kernel (0 to {MAX_TAYLOR_ORDER})",
                                    lambda k, v: _taylor_order(v)),
             "rbf_gamma": Option(1e-4, "γ of the RBF exp(-γ(t-p)²)", positive_number),
             "rbf_prefactor": Option("exact", "exact per-node prefactors, or the CGNL authors' constant exp(-2γ)",
                                     one_of(*RBF_PREFACTORS))}))


register_graph(MemoryMode(
    "memory", "the positions against S learned memory slots, softmax over positions then l1 over slots (External "
    "Attention; normalization softmax: over the slots of each position alone): a bipartite N x S graph",
    kernels=("embedded_gaussian",), normalizations=("double", "softmax"),
    backends=("auto",), pairwise_only=True, bipartite=True,
    options={"memory_size": Option(64, "S, the number of learned memory slots (the graph is N x S)", positive_int)}))


register_graph(AgentsMode(
    "agents", "queries and keys through n agents pooled from the queries, softmax(θ Agᵀ) softmax(Ag φᵀ) (Agent "
    "Attention): rank n", kernels=("embedded_gaussian",), normalizations=("softmax",), backends=("auto", "lowrank"),
    pairwise_only=True,
    options={"agents": Option(49, "the number of agent tokens n (a k^d grid; 1 x k x k in 3-D), or the grid",
                              _agents_option)}))


class _CrissCrossDense(aff.PairwiseKernel):
    """The criss-cross graph as a dense kernel: rows of the masked softmax (``backend="dense"``)."""

    def __init__(self, q, k, spatial, scale):
        super().__init__(q.shape[1], k.shape[1], q.shape[0], q.device.type)
        self._a = aff.CrissCrossGraph(q, k, spatial, scale).dense()

    def rows(self, i0, i1):
        return self._a[:, i0:i1]


class _Formed(aff.PairwiseKernel):
    """A graph operator formed as a dense matrix: its rows (``backend="dense"`` of the axial and neighborhood
    graphs, for testing and small inputs)."""

    def __init__(self, graph: aff.Graph, q: torch.Tensor):
        super().__init__(graph.n, graph.n_keys, q.shape[0], q.device.type)
        self._a = graph.dense()

    def rows(self, i0, i1):
        return self._a[:, i0:i1]


def _per_head(edges: Affinity, q: torch.Tensor, k: torch.Tensor, one) -> aff.Graph:
    """``one(q, k)``, or with ``heads > 1`` one graph per channel group, all heads as one batch
    (:class:`~nonlocalnet.affinity.HeadsGraph`)."""
    h = edges.heads
    return one(q, k) if h == 1 else aff.HeadsGraph(one(aff.split_heads(q, h), aff.split_heads(k, h)), h)


class AxialMode(GraphMode):
    """Axial attention (Ho et al. 2019; Wang et al., "Axial-DeepLab", ECCV 2020): softmax along the first spatial
    axis, then along the next on its output: the product graph ``A = A_{d-1} ··· A_1 A_0`` of per-axis graphs
    (:class:`~nonlocalnet.affinity.ProductGraph` of :class:`~nonlocalnet.affinity.AxisGraph`), all from the stage
    input's ``θ``, ``φ``. ``O(N·ΣL_d·c)``; in 1-D it is the full softmax graph (NL's)."""

    multihead = True

    def build(self, edges: Affinity, x: torch.Tensor, spatial: tuple[int, ...], budget: int) -> aff.Graph:
        q, k = edges.kernel_spec.transform(*edges.queries_keys(x, spatial))
        return _per_head(edges, q, k, lambda qh, kh: self.one(edges, qh, kh, spatial))

    @staticmethod
    def one(edges: Affinity, q: torch.Tensor, k: torch.Tensor, spatial: tuple[int, ...]) -> aff.Graph:
        graph = aff.ProductGraph([aff.AxisGraph(q, k, spatial, d, edges.scale_value) for d in range(len(spatial))])
        graph.backend = "axial"
        return aff.PairwiseGraph(_Formed(graph, q), "none") if edges.backend == "dense" else graph


class NeighborhoodMode(GraphMode):
    """Neighborhood attention (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023): softmax over the
    ``kernel_size^d`` keys of a window around each position, shifted inward at the borders
    (:class:`~nonlocalnet.affinity.NeighborhoodGraph`). ``O(N·k^d·c)``."""

    multihead = True

    def build(self, edges: Affinity, x: torch.Tensor, spatial: tuple[int, ...], budget: int) -> aff.Graph:
        ks = edges.kernel_size
        if ks > min(spatial):
            fits = min(spatial) - 1 + min(spatial) % 2  # the largest odd size that fits
            raise ValueError(f"x: spatial size {spatial} is smaller than kernel_size={ks} along axis "
                             f"{min(range(len(spatial)), key=lambda d: spatial[d])} (the window holds kernel_size "
                             f"positions per axis); use an odd kernel_size <= {fits} or a larger input")
        q, k = edges.kernel_spec.transform(*edges.queries_keys(x, spatial))

        def one(qh: torch.Tensor, kh: torch.Tensor) -> aff.Graph:
            graph = aff.NeighborhoodGraph(qh, kh, spatial, ks, edges.scale_value)
            return aff.PairwiseGraph(_Formed(graph, qh), "none") if edges.backend == "dense" else graph

        return _per_head(edges, q, k, one)


def _kernel_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd int >= 1 (positions per axis of the window around each "
                         f"query), got {value!r}")
    return value


register_graph(AxialMode(
    "axial", "softmax along each spatial axis in turn: the product graph A = A_W A_H (axial attention)",
    kernels="exp", normalizations=("softmax", "row"), backends=("auto", "dense"), pairwise_only=True))
register_graph(NeighborhoodMode(
    "neighborhood", "softmax over a k^d window around each position, shifted inward at borders (NAT)",
    kernels="exp", normalizations=("softmax", "row"), backends=("auto", "dense"), pairwise_only=True,
    options={"kernel_size": Option(3, "window size k per axis (odd, <= the smallest spatial size; NAT uses 7)",
                                   lambda k, v: _kernel_size(v))}))


OUT_MAPS = ("linear", "bottleneck")
FUSIONS = ("add", "mul", "add_mul")


class Bottleneck(nn.Module):
    """GCNet's transform as a per-term output map (Cao et al., ICCVW 2019, arXiv 1904.11492, Eq. 4):
    ``conv2(relu(LayerNorm(conv1(t))))``, 1×1 convs ``C_v → C_b → C``, LayerNorm over the ``C_b`` channels of
    each position. Everything is per position, so it commutes with broadcasting over positions."""

    def __init__(self, dim: int, cin: int, hidden: int, cout: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.conv1 = conv1x1(dim, cin, hidden, bias, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(hidden, device=device, dtype=dtype)
        self.conv2 = conv1x1(dim, hidden, cout, bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        for m in (self.conv1, self.norm, self.conv2):
            m.reset_parameters()

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


@dataclass(frozen=True)
class UnitConfig:
    """What a unit is made of, as the structured paths see it (:data:`STRUCTURED_PATHS`).

    ``filter``: ``"A"`` (the one-term filter ``A Z W``), ``"fixed"`` (another fixed polynomial), ``"learnable"``
    (a polynomial with learnable coefficients), ``"function"`` (not a polynomial: a spectral filter, a user's
    matrix function). ``sub_sample``: the key nodes are not the query positions — sub-sampled keys (Wang et al.'s
    max-pool, APNB's pyramid) or a bipartite graph's learned slots (External Attention). A new way of building units
    adds a field here; until a structured path declares the
    values it handles for that field, no unit is taken off the generic path by it."""

    fusion: str
    out_map: str
    map_groups: int
    maps: bool
    value_proj: bool
    value_bias: bool
    sub_sample: bool
    norm: str
    filter: str

    def handled_by(self, supports: dict[str, Any]) -> bool:
        """Whether every field of this unit has a value that ``supports`` (a path's declaration) lists; a field
        the declaration does not name is not handled."""
        return all(f.name in supports and (supports[f.name] is ANY or getattr(self, f.name) in supports[f.name])
                   for f in fields(self))


ANY = object()  # a path handles every value of this field
# Each structured path of NonlocalUnit and what it handles, field by field (UnitConfig). Each path is exact
# algebra on the same parameters (tests/test_fastpaths.py); every unit and graph it does not declare goes to the
# generic path (filter terms on graph.matmul, then the maps), which is always correct.
STRUCTURED_PATHS: dict[str, dict[str, Any]] = {
    "_lowrank_cf": dict(fusion={"add"}, out_map={"linear"}, map_groups={1}, maps={True}, value_proj=ANY,
                        value_bias=ANY, sub_sample={False}, norm=ANY, filter={"A", "fixed", "learnable"}),
    "_unary_cf": dict(fusion=ANY, out_map=ANY, map_groups=ANY, maps=ANY, value_proj=ANY, value_bias=ANY,
                      sub_sample={False}, norm={"none", "gamma"}, filter={"A"}),
    "_channels_cf": dict(fusion={"add"}, out_map={"linear"}, map_groups=ANY, maps={True}, value_proj={True},
                         value_bias={False}, sub_sample={False}, norm=ANY, filter={"A"}),
}


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

    def __init__(self, in_channels: int, value_channels: int, filter: Filter | torch.Tensor, *, dim: int,
                 bias: bool, out_norm: str, zero_init: bool, norm_groups: int = 1, out_proj: bool = True,
                 proj_groups: int = 1, sub_sample: bool = False, value_proj: bool = True, out_map: str = "linear",
                 bottleneck_channels: int = 1, fusion: str = "add", spectral: Filter | None = None,
                 pool_sizes: tuple[int, ...] | None = None, memory_size: int = 0, device=None, dtype=None):
        super().__init__()
        self.pool_sizes = None if pool_sizes is None else tuple(pool_sizes)
        if not isinstance(filter, Filter):  # a coefficient matrix (T, K+1) of a fixed polynomial, or (T, 1) beside
            filter = spectral if spectral is not None else Polynomial(filter)  # a spectral filter (older callers)
        self.sub_sample, self.fusion, self.out_map, self.zero_init = sub_sample, fusion, out_map, zero_init
        n_terms = filter.n_terms
        fk = dict(device=device, dtype=dtype)
        # a filter with parameters is a submodule, at `spectral` (its keys: units.<i>.spectral.<name>)
        self.spectral = filter if any(True for _ in filter.parameters()) else None
        if self.spectral is None:
            object.__setattr__(self, "_fixed_filter", filter)  # not a submodule: nothing to save or move
        self.g = conv1x1(dim, in_channels, value_channels, bias, **fk) if value_proj else None
        # the values at the key nodes of a bipartite graph: External Attention's M_v (S × C_v, as a 1×1 conv S → C_v)
        self.memory = conv1x1(dim, memory_size, value_channels, False, **fk) if memory_size else None

        def maps() -> nn.ModuleList:
            if not out_proj:
                return nn.ModuleList()
            if out_map == "bottleneck":
                return nn.ModuleList([Bottleneck(dim, value_channels, bottleneck_channels, in_channels, bias, **fk)
                                      for _ in range(n_terms)])
            return nn.ModuleList([conv1x1(dim, value_channels, in_channels, bias, groups=proj_groups, **fk)
                                  for _ in range(n_terms)])

        self.w = maps() if "add" in fusion else nn.ModuleList()
        self.w_mul = maps() if "mul" in fusion else None
        self.norm = OutNorm(out_norm, in_channels, zero_init, norm_groups, **fk)
        self._zero_last_maps()
        rows = filter.chebyshev()
        fixed = isinstance(rows, tuple)
        coef = torch.tensor(rows, dtype=torch.float32) if fixed else torch.zeros(n_terms, 1)
        self.register_buffer("coef", coef, persistent=False)
        self.coef_rows = tuple(tuple(float(c) for c in row) for row in coef.tolist())  # static for compile
        # B_t(0): the coefficient of Z itself in each term (the low-rank path's α_t; fixed polynomials)
        self.coef_at_zero = tuple(polynomial_responses(coef.double(), torch.zeros(1, dtype=torch.float64))[:, 0]
                                  .tolist())
        self.config = UnitConfig(
            fusion=fusion, out_map=out_map, map_groups=proj_groups, maps=bool(out_proj), value_proj=value_proj,
            value_bias=bool(value_proj and bias), sub_sample=sub_sample or bool(memory_size), norm=out_norm,
            filter="A" if fixed and self.coef_rows == ((0.0, 1.0),) else "fixed" if fixed
            else "learnable" if rows is not None else "function")
        # the structured paths that handle this unit (by what each declares it handles; docs/design.md)
        self._paths = tuple(name for name, supports in STRUCTURED_PATHS.items() if self.config.handled_by(supports))

    @property
    def filter(self) -> Filter:
        """The unit's filter (:class:`~nonlocalnet.filters.Filter`)."""
        return self.spectral if self.spectral is not None else self._fixed_filter

    def _zero_last_maps(self) -> None:
        """``zero_init`` with ``out_norm="none"``: the last layer of every map starts at 0 (GCNet's init)."""
        if self.zero_init and self.norm.kind == "none":
            for m in [*self.w, *(self.w_mul or [])]:
                last = m.conv2 if isinstance(m, Bottleneck) else m
                nn.init.zeros_(last.weight)
                if last.bias is not None:
                    nn.init.zeros_(last.bias)

    def reset_parameters(self) -> None:
        """Re-initialize every parameter as a new unit's (the zero-init of the output included)."""
        for m in [self.g, self.memory, *self.w, *(self.w_mul or [])]:
            if m is not None:
                m.reset_parameters()
        self.norm.reset_parameters()
        self._zero_last_maps()
        if self.spectral is not None:
            self.spectral.reset_parameters()

    def values(self, x: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
        """``Z = g(X)`` (``X`` itself with ``value_proj=False``); ``channels_first``: see :func:`project`."""
        return project(self.g, x, channels_first) if self.g is not None else x

    def filter_terms(self, x: torch.Tensor, graph: aff.Graph, spatial: tuple[int, ...]) -> list[torch.Tensor]:
        """The generic path: ``[B_t(A) Z]`` from the filter on ``graph.matmul`` (always correct)."""
        z = self.values(x, channels_first=isinstance(graph, aff.LowRankGraph))
        z_keys = aff.sample_keys(z, spatial, self.pool_sizes) if self.sub_sample else None
        if self.memory is not None:  # the key nodes are memory slots: their values are learned (M_v)
            # (S, C_v), a fresh copy: a view of the weight made under no_grad would carry requires_grad but no grad_fn
            mv = self.memory.weight.flatten(1).t().to(z.dtype, memory_format=torch.contiguous_format, copy=True)
            z_keys = mv.expand(z.shape[0], *mv.shape)
        return self.filter(graph, z, z_keys)

    def responses(self, lam: torch.Tensor) -> torch.Tensor:
        """The frequency response of each term, ``B_t(λ)`` ``(T, len(λ))`` at eigenvalues ``λ`` of ``A``."""
        if self.spectral is not None:
            p = next(self.spectral.parameters())
            return self.spectral.responses(torch.as_tensor(lam, dtype=p.dtype, device=p.device))
        return self.filter.responses(torch.as_tensor(lam, dtype=torch.float64))

    def term_labels(self) -> list[str] | None:
        """Names of the terms of a spectral filter (``None`` for the polynomial ones: see ``coef``)."""
        return self.filter.labels()

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
        ``M``. A learnable polynomial filter's coefficients are tensors: then every term has its ``α_t Z``. Taken
        for the units :data:`STRUCTURED_PATHS` says it handles, on a :class:`~nonlocalnet.affinity.LowRankGraph`
        and a channels-first input; ``None`` otherwise."""
        if type(graph) is not aff.LowRankGraph or h.stride(-1) != 1:
            return None
        u, v = graph.factors(h.dtype, need_v=False)  # v is None when V = U with its halves swapped
        x = h.transpose(1, 2)  # tokens view (B, N, C)
        right = u if v is None else v  # Zᵀ V = swap_rows(Zᵀ U) when V is not formed (no-op otherwise)
        b, c, r = h.shape[0], h.shape[1], u.shape[-1]
        ws = [m.weight.flatten(1) for m in self.w]  # (C, C_v) each
        cv = ws[0].shape[1]
        coef = self.coef_rows if self.config.filter != "learnable" else self.filter.chebyshev()
        alphas = self.coef_at_zero if self.config.filter != "learnable" else None  # tensors: from the terms
        has_z = alphas is None or any(a != 0 for a in alphas)
        g = self.g
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
        terms = lowrank_terms(coef, st.transpose(1, 2),
                              lambda: graph.swap_rows(right.transpose(1, 2) @ u, -2))  # VᵀU
        if alphas is None:
            alphas = [a.to(ws[0].dtype) for a, _ in terms]
        m = None
        for w, (_, rt) in zip(ws, terms):
            if rt is not None:
                wr = torch.matmul(w, rt.transpose(1, 2))  # (B, C, r)
                m = wr if m is None else m + wr
        bias = sum(w.bias for w in self.w) if self.w[0].bias is not None else None
        p = None
        if has_z:
            p = sum(a * w for a, w in zip(alphas, ws) if isinstance(a, torch.Tensor) or a != 0)  # (C, C_v)
            if fold:  # P Zᵀ = (P W_g) Xᵀ + P b_g (unfolded, the operand Zᵀ = g(X)ᵀ already has the bias)
                if g.bias is not None:
                    pb = p @ g.bias
                    bias = pb if bias is None else bias + pb
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
        output conv, none of their ``(B, C_s, N)`` intermediates or the scaling pass. Taken for the units
        :data:`STRUCTURED_PATHS` says it handles, on a :class:`~nonlocalnet.affinity.ChannelGraph` of the dot kernel
        that kept its source (bias-free projections, keys not sub-sampled); ``None`` otherwise."""
        if type(graph) is not aff.ChannelGraph or graph.source is None or graph.kernel != "dot_product" or \
                h.stride(-1) != 1:
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
        view: 0.4× the time of ``X a`` at N = 4096). Taken for the units :data:`STRUCTURED_PATHS` says it handles
        (not BN/GN output norms: their statistics count the N broadcast copies), on a
        :class:`~nonlocalnet.affinity.UnaryGraph`; ``None`` otherwise."""
        if type(graph) is not aff.UnaryGraph:
            return None
        a = graph.a
        if a.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
            a = a.to(h.dtype)
        ctx = aff.pool(a, h).unsqueeze(1)  # (B, 1, C)
        if self.g is not None:
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
        for path in self._paths:  # the structured paths that declared they handle this unit (STRUCTURED_PATHS)
            fast = getattr(self, path)(h, graph)
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

    def reset_parameters(self) -> None:
        """Re-initialize every parameter as :func:`~nonlocalnet.build_block` does (zero-init included: a zero-init
        block is the identity again)."""
        self.edges.reset_parameters()
        for unit in self.units:
            unit.reset_parameters()

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
        if self.edges.sub_sample and self.edges.pool_sizes is None:  # APNB's adaptive pools take any size
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
