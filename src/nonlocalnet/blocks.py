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
convolutional code) applied to tokens ``(B, N, C)``; any ``dim`` in {1, 2, 3} works the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import affinity as aff
from .filters import apply_filter

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv1x1(dim: int, cin: int, cout: int, bias: bool, groups: int = 1) -> nn.Module:
    return _CONV[dim](cin, cout, 1, bias=bias, groups=groups)


def project(conv: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution on tokens ``(B, N, Cin) -> (B, N, Cout)`` (grouped convs included)."""
    w = conv.weight.flatten(1)
    if conv.groups == 1:
        return F.linear(tokens, w, conv.bias)
    g = conv.groups
    b, n, cin = tokens.shape
    out = torch.einsum("bngi,goi->bngo", tokens.reshape(b, n, g, cin // g), w.reshape(g, -1, cin // g))
    out = out.reshape(b, n, -1)
    return out + conv.bias if conv.bias is not None else out


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
            return F.relu(y) if self.kind == "bn_relu" else y
        if self.kind == "gn":
            return self.gn(f.transpose(1, 2)).transpose(1, 2)
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
                 mode: str = "positions", groups: int = 1, order: int = 0, rbf_gamma: float = 1e-4):
        super().__init__()
        self.kernel, self.normalization, self.backend, self.mode = kernel, normalization, backend, mode
        self.sub_sample, self.dim, self.groups, self.order, self.rbf_gamma = sub_sample, dim, groups, order, rbf_gamma
        self.memory_budget = memory_budget  # MiB
        uses_projection = not (kernel == "gaussian" and mode != "channels")
        feat = key_channels if uses_projection else in_channels
        if isinstance(scale, bool):
            self.scale_value = 1.0 / math.sqrt(feat) if scale else 1.0
        else:
            self.scale_value = float(scale)
        self.scale = scale
        if uses_projection:
            self.theta = conv1x1(dim, in_channels, key_channels, bias)
            self.phi = conv1x1(dim, in_channels, key_channels, bias)
        if kernel == "concatenation":
            self.concat = conv1x1(dim, 2 * key_channels, 1, bias=False)

    def queries_keys(self, x: torch.Tensor, spatial: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(θ(X), φ(X))`` as tokens, keys sub-sampled when asked (the raw ``X`` for ``gaussian``)."""
        if hasattr(self, "theta"):
            q, k = project(self.theta, x), project(self.phi, x)
        else:
            q = k = x
        if self.sub_sample:
            k = aff.pool_tokens(k, spatial)
        return q, k

    def forward(self, x: torch.Tensor, spatial: tuple[int, ...]) -> aff.Graph:
        q, k = self.queries_keys(x, spatial)
        budget = int(self.memory_budget * aff.MiB)
        if self.mode == "crisscross":
            if self.backend == "dense":
                return aff.PairwiseGraph(_CrissCrossDense(q, k, spatial, self.scale_value), "none")
            return aff.CrissCrossGraph(q, k, spatial, self.scale_value)
        if self.mode == "channels":
            cls = aff.DenseChannelGraph if self.backend == "dense" else aff.ChannelGraph
            return cls(q, k, self.groups, self.kernel, self.order, self.rbf_gamma, self.normalization,
                       bool(self.scale))
        if self.kernel == "relu_dot":
            q, k = F.relu(q), F.relu(k)
        elif self.kernel == "double_attention":  # A²: distribute (softmax over n), gather (softmax over N')
            q, k = torch.softmax(q, dim=-1), torch.softmax(k, dim=1)
        elif self.kernel == "concatenation":
            kc = q.shape[-1]
            w = self.concat.weight.flatten()
            a, b = q @ w[:kc], k @ w[kc:]
            return aff.build_graph(self.kernel, self.normalization, self.backend, q=None, k=None,
                                   budget_bytes=budget, concat=(a, b))
        return aff.build_graph(self.kernel, self.normalization, self.backend, q=q, k=k,
                               scale=self.scale_value, budget_bytes=budget)


class _CrissCrossDense(aff.PairwiseKernel):
    """The criss-cross graph as a dense kernel: rows of the masked softmax (``backend="dense"``)."""

    def __init__(self, q, k, spatial, scale):
        super().__init__(q.shape[1], k.shape[1], q.shape[0], q.device.type)
        self._a = aff.CrissCrossGraph(q, k, spatial, scale).dense()

    def rows(self, i0, i1):
        return self._a[:, i0:i1]


class NonlocalUnit(nn.Module):
    """One unit: ``Y = X + out( Σ_t B_t(A) Z W_t )`` with ``Z = g(X)`` (filters.py for ``B_t``).

    Parameters: ``g`` (1×1 conv ``C → C_v``), ``w`` (one 1×1 conv ``C_v → C`` per filter term; empty
    when ``out_proj=False``, as in CC where ``F = A Z``), ``norm`` (:class:`OutNorm`).
    """

    def __init__(self, in_channels: int, value_channels: int, coef: torch.Tensor, *, dim: int, bias: bool,
                 out_norm: str, zero_init: bool, norm_groups: int = 1, out_proj: bool = True,
                 proj_groups: int = 1, sub_sample: bool = False):
        super().__init__()
        self.sub_sample = sub_sample
        self.g = conv1x1(dim, in_channels, value_channels, bias)
        self.w = nn.ModuleList(
            [conv1x1(dim, value_channels, in_channels, bias, groups=proj_groups) for _ in range(len(coef))]
            if out_proj else []
        )
        self.norm = OutNorm(out_norm, in_channels, zero_init, norm_groups)
        self.register_buffer("coef", coef.clone(), persistent=False)
        self.coef_rows = tuple(tuple(float(c) for c in row) for row in coef.tolist())  # static for compile

    def filter_terms(self, x: torch.Tensor, graph: aff.Graph, spatial: tuple[int, ...]) -> list[torch.Tensor]:
        z = project(self.g, x)
        z_keys = aff.pool_tokens(z, spatial) if self.sub_sample else None
        return apply_filter(graph.matmul, z, self.coef_rows, z_keys)

    def response(self, x: torch.Tensor, graph: aff.Graph, spatial: tuple[int, ...]) -> torch.Tensor:
        """``F(A, Z)`` before the output norm."""
        terms = self.filter_terms(x, graph, spatial)
        if not len(self.w):
            return terms[0]
        if len(self.w) == 1 or self.w[0].groups != 1:
            return sum(project(w, t) for w, t in zip(self.w, terms))
        # one GEMM over the concatenated terms: [T_0 Z, ..., T_K Z] [W_0; ...; W_K]
        weight = torch.cat([w.weight.flatten(1) for w in self.w], 1)
        bias = sum(w.bias for w in self.w) if self.w[0].bias is not None else None
        return F.linear(torch.cat(terms, -1), weight, bias)

    def forward(self, x: torch.Tensor, graph: aff.Graph, spatial: tuple[int, ...]) -> torch.Tensor:
        f = self.response(x, graph, spatial)
        return x + self.norm(f).to(x.dtype)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, *S) -> (B, N, C)``, contiguous: one copy for NCHW inputs (otherwise every projection would
    copy the strided view again), free for channels_last inputs."""
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

    def check_input(self, x: torch.Tensor) -> tuple[int, ...]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
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
        h = to_tokens(x)
        for _ in range(self.recurrence):
            graph = self.edges(h, spatial)
            for unit in self.units:
                h = unit(h, graph, spatial)
        return from_tokens(h, x)

    def build_graph(self, x: torch.Tensor) -> aff.Graph:
        """The graph operator of the first (or only) application, from the stage input ``x``."""
        return self.edges(to_tokens(x), self.check_input(x))

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """The dense affinity ``A`` (B, N, N') the block uses on ``x`` (CC: the masked matrix)."""
        return self.build_graph(x).dense()
