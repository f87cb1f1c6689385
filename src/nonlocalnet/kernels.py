"""Affinity kernels and graph modes: each one object that says what it is and does its part.

A **kernel** gives ``M`` (``N × N'`` per batch item) from queries ``θ`` and keys ``φ`` after a pre-transform; a
normalization turns ``M`` into ``A`` (Wang et al., "Non-local Neural Networks", CVPR 2018, Eq. 2–4; Zhu et al.,
"Unifying Nonlocal Blocks for Neural Networks", ICCV 2021, Eq. 5; docs/framework.md "Step 1"). A :class:`Kernel`
owns its pre-transform (:meth:`Kernel.transform`, what the fast paths run), its literal formula
(:meth:`Kernel.literal`, what :mod:`nonlocalnet.reference` forms), its natural normalization and whether it
factorizes (``M = P Qᵀ``: the linear-time ``lowrank`` backend, no ``N × N'`` matrix).

A **graph mode** (:class:`GraphMode`) says which graph over the positions a block builds — ``positions`` (the full
``N × N'`` graph), ``crisscross`` (CCNet's row + column), ``channels`` (CGNL's graph over positions × channels),
``axial`` (the product of per-axis softmax graphs), ``neighborhood`` (a softmax over a window: a banded graph) —
which kernels, normalizations and backends go with it, its own options, and how it builds its graph operator
(the built-in modes' builders are in :mod:`nonlocalnet.blocks`, beside the module whose parameters they read).

Both kinds are registered (:data:`KERNELS`, :data:`GRAPH_MODES`; :func:`register_kernel`,
:func:`register_graph`), the library's own exactly as a user's. Option validation, the ``auto`` rule
(:func:`nonlocalnet.affinity.choose_backend`), the benchmarks and the tests read these registries; nothing else
lists kernels or backends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .registry import Option, Registry

if TYPE_CHECKING:  # pragma: no cover
    from .affinity import Graph

NORMALIZATIONS = ("softmax", "count", "row", "symmetric", "none", "double")
# External Attention's double normalization (Guo, Liu, Mu, Hu, "Beyond Self-attention: External Attention using Two
# Linear Layers for Visual Tasks", TPAMI 2022; their code's 1e-9): softmax over the N positions (the queries),
# then each row l1-normalized over the N' keys, A_ij = C_ij / (DOUBLE_NORM_EPS + Σ_j' C_ij'). Only the graph modes
# that declare it take it (the bipartite ``memory`` mode); the position graphs do not.
MODE_ONLY_NORMALIZATIONS = ("double",)
DOUBLE_NORM_EPS = 1e-9
BACKENDS = ("auto", "dense", "lowrank", "sdpa", "chunked")
PRETRANSFORMS = ("none", "relu", "softmax", "concat", "custom")


def softmax_tokens(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``softmax(t, dim)`` for tokens ``(B, N, c)``; on the tokens view of a channels-first tensor it runs on
    that tensor (``torch.softmax`` would first copy a non-contiguous input) and returns the same view."""
    if t.dim() == 3 and not t.is_contiguous() and t.transpose(1, 2).is_contiguous():
        return torch.softmax(t.transpose(1, 2), dim=3 - (dim % 3)).transpose(1, 2)
    return torch.softmax(t, dim)


@dataclass(frozen=True)
class Kernel:
    """One affinity kernel.

    ``pretransform``: what is applied to the projected queries/keys before the product: ``none``, ``relu``,
    ``softmax`` (A²: queries over channels, keys over positions), ``concat`` (a learned ``w·[θ_i; φ_j]``), or
    ``custom`` (a subclass overrides :meth:`transform` and :meth:`literal`). ``exp``: the kernel is ``exp`` of a
    bilinear form (log-domain evaluation, softmax, fused attention). ``factorizable``: ``M = P Qᵀ`` with thin
    factors (the ``lowrank`` path). ``projected``: ``θ``, ``φ`` are learned 1×1 projections (``gaussian`` uses ``X``
    itself). ``unary``: the kernel depends on the key alone, ``M_ij = exp(m_j)``, ``m_j = w_m·x_j + b_m`` (GC's
    attention pooling, Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", ICCVW
    2019, Eq. 2–3): with its one normalization, softmax, ``A = 1·aᵀ`` (rank 1). ``unit_rows``: every row of the
    transformed queries sums to 1 (a softmax over channels), so with normalization ``none`` every row of ``A``'s
    left factor does (the low-rank path folds a bias into the small factor). ``pointwise``: the pre-transform acts
    on each entry alone, so queries and keys can be transformed as one tensor (SNL's joint θ/φ GEMM).
    ``multihead``: a kernel that is not ``exp`` also forms ``heads`` graphs (the common option ``heads``), its
    pre-transform applied to each head's channel group on its own (A²'s softmax over the head's channels: the
    Efficient Attention authors' ``head_count``); the exp kernels always take ``heads``.
    """

    name: str
    formula: str
    pretransform: str = "none"
    exp: bool = False
    factorizable: bool = False
    projected: bool = True
    natural_normalization: str = "count"
    unary: bool = False
    unit_rows: bool = False
    multihead: bool = False
    reference: str = ""

    def __post_init__(self):
        if self.pretransform not in PRETRANSFORMS:
            raise ValueError(f"pretransform: expected one of {', '.join(PRETRANSFORMS)}, got {self.pretransform!r}")
        if self.natural_normalization not in NORMALIZATIONS:
            raise ValueError(f"natural_normalization: expected one of {', '.join(NORMALIZATIONS)}, got "
                             f"{self.natural_normalization!r}")
        if self.pretransform == "custom" and type(self).transform is Kernel.transform:
            raise ValueError(f"kernel {self.name!r}: pretransform='custom' needs a subclass of Kernel that "
                             f"overrides transform(q, k) (and literal(q, k) for the reference)")

    @property
    def normalizations(self) -> tuple[str, ...]:
        """``softmax`` is the row normalization of the exp kernels; every other one applies to all. The unary
        kernel takes softmax only."""
        if self.unary:
            return ("softmax",)
        common = tuple(n for n in NORMALIZATIONS if n not in MODE_ONLY_NORMALIZATIONS)
        return common if self.exp else tuple(n for n in common if n != "softmax")

    @property
    def takes_heads(self) -> bool:
        """Whether the kernel forms ``heads > 1`` graphs: the exp kernels and those declared ``multihead``."""
        return (self.exp or self.multihead) and not self.unary

    @property
    def pointwise(self) -> bool:
        return self.pretransform in ("none", "relu")

    def transform(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-transform on projected tokens ``q (B, N, c)``, ``k (B, N', c)`` (any layout: the tokens views of
        channels-first tensors are kept as they are). ``concat`` is handled by its graph mode (it needs ``w``)."""
        if self.pretransform == "relu":
            return F.relu(q), F.relu(k)
        if self.pretransform == "softmax":  # A²: distribute (softmax over channels), gather (softmax over N')
            return softmax_tokens(q, -1), softmax_tokens(k, 1)
        return q, k

    def transform_joint(self, joint: torch.Tensor) -> torch.Tensor:
        """:meth:`transform` of ``[q, k]`` as one fresh tensor (``pointwise`` kernels only; in place)."""
        return F.relu(joint, inplace=True) if self.pretransform == "relu" else joint

    def literal(self, q: torch.Tensor, k: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``M`` ``(B, N, N')`` formed literally from the (untransformed) projected ``q`` and ``k`` — the reference's
        formula (:mod:`nonlocalnet.reference`); ``scale`` multiplies the logits of the exp kernels."""
        if self.exp:
            return torch.exp(scale * q @ k.transpose(1, 2))
        if self.pretransform == "relu":
            return F.relu(q) @ F.relu(k).transpose(1, 2)
        if self.pretransform == "softmax":
            return torch.softmax(q, dim=-1) @ torch.softmax(k, dim=1).transpose(1, 2)
        if self.pretransform == "none":
            return q @ k.transpose(1, 2)
        raise NotImplementedError(f"kernel {self.name!r}: no literal formula (subclass Kernel and define literal)")


KERNELS: Registry[Kernel] = Registry("kernel")


def register_kernel(kernel: Kernel, *, replace: bool = False) -> Kernel:
    """Make ``kernel`` available by name everywhere a kernel is taken (``build_block(..., kernel=NAME)``, configs,
    presets). A factorizable kernel gets the linear-time ``lowrank`` backend and the exact spectral filters."""
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel: expected a nonlocalnet.kernels.Kernel, got {type(kernel).__name__}")
    return KERNELS.register(kernel.name, kernel, replace=replace)


for _k in [
    Kernel("embedded_gaussian", "exp(s·θ_i·φ_j)", exp=True, natural_normalization="softmax",
           reference='Wang et al., "Non-local Neural Networks", CVPR 2018, Eq. 3'),
    Kernel("gaussian", "exp(s·x_i·x_j)", exp=True, projected=False, natural_normalization="softmax",
           reference='Wang et al., "Non-local Neural Networks", CVPR 2018, Eq. 2'),
    Kernel("dot_product", "θ_i·φ_j", factorizable=True, natural_normalization="count",
           reference='Wang et al., "Non-local Neural Networks", CVPR 2018, Eq. 4'),
    Kernel("relu_dot", "relu(θ_i)·relu(φ_j)", pretransform="relu", factorizable=True,
           natural_normalization="symmetric",
           reference='Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021, Eq. 5'),
    Kernel("concatenation", "relu(w·[θ_i; φ_j])", pretransform="concat", natural_normalization="count",
           reference='Wang et al., "Non-local Neural Networks", CVPR 2018, Eq. 5'),
    Kernel("double_attention", "softmax_C(θ)_i·softmax_N(φ)_j", pretransform="softmax", factorizable=True,
           natural_normalization="none", unit_rows=True, multihead=True,
           reference='Chen et al., "A²-Nets: Double Attention Networks", NeurIPS 2018'),
    Kernel("unary", "exp(w_m·x_j + b_m)", factorizable=True, projected=False, natural_normalization="softmax",
           unary=True, reference='Cao et al., "GCNet", ICCVW 2019, Eq. 2-3'),
]:
    register_kernel(_k)


def exp_kernels() -> tuple[str, ...]:
    return tuple(n for n, k in KERNELS.items() if k.exp)


def multihead_kernels() -> tuple[str, ...]:
    return tuple(n for n, k in KERNELS.items() if k.takes_heads)


def lowrank_kernels() -> tuple[str, ...]:
    return tuple(n for n, k in KERNELS.items() if k.factorizable)


# --------------------------------------------------------------------------------------- graph modes
@dataclass(frozen=True)
class GraphMode:
    """A kind of graph over the positions: what goes with it and how it is built.

    ``kernels``: the kernel names it takes (``None``: every registered kernel; ``"exp"``: every exp kernel);
    ``normalizations`` and ``backends``: ``None`` for "as the kernel says" (the rule of :func:`valid_backends`);
    ``options``: the options only this mode takes (CGNL's ``groups``, ...), as :class:`~nonlocalnet.registry.Option`
    specs. A mode's :meth:`build` turns the :class:`~nonlocalnet.blocks.Affinity` module's parameters and a stage
    input into a :class:`~nonlocalnet.affinity.Graph` operator; ``pairwise_only``: the mode has no unary term
    (DNL's) and no whitening. ``bipartite``: the key nodes are not positions (External Attention's learned memory
    slots): ``A`` is ``N × N'`` with ``N'`` set by the mode, so, as with sub-sampled keys, only filters of order ≤ 1
    apply, with the values at the key nodes given by the unit (its ``memory``). ``doc``: one line for
    ``nonlocalnet blocks`` and error messages. A subclass that sets the class attribute ``multihead = True``
    builds ``heads`` graphs on channel groups for the kernels that take them (:attr:`Kernel.takes_heads`; the
    common option ``heads``; its ``build`` reads ``edges.heads``).
    """

    name: str
    doc: str
    kernels: tuple[str, ...] | str | None = None
    normalizations: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None
    options: Mapping[str, Option] = field(default_factory=dict)
    pairwise_only: bool = False
    bipartite: bool = False
    multihead = False  # a class attribute (not a field): subclasses that build multi-head graphs set it

    def kernel_names(self) -> tuple[str, ...]:
        if self.kernels is None:
            return tuple(KERNELS)
        if self.kernels == "exp":
            return exp_kernels()
        return tuple(self.kernels)

    def projects(self, kernel: Kernel) -> bool:
        """Whether this mode's graph reads learned projections ``θ, φ`` (else ``X`` itself) for ``kernel``."""
        return kernel.projected

    def build(self, edges: Any, x: torch.Tensor, spatial: tuple[int, ...], budget: int) -> Graph:
        """The graph operator from the stage input ``x`` (tokens ``(B, N, C)``) and the module ``edges``."""
        raise NotImplementedError(f"graph mode {self.name!r} has no build()")


GRAPH_MODES: Registry[GraphMode] = Registry("graph mode", "mode")


def register_graph(mode: GraphMode, *, replace: bool = False) -> GraphMode:
    """Make a graph mode available to presets (``Preset(..., mode=NAME)``)."""
    if not isinstance(mode, GraphMode):
        raise TypeError(f"mode: expected a nonlocalnet.kernels.GraphMode, got {type(mode).__name__}")
    return GRAPH_MODES.register(mode.name, mode, replace=replace)


def mode_kernels(mode: str) -> tuple[str, ...]:
    return GRAPH_MODES[mode].kernel_names()


def valid_normalizations(kernel: str, mode: str = "positions") -> tuple[str, ...]:
    return GRAPH_MODES[mode].normalizations or KERNELS[kernel].normalizations


def valid_backends(kernel: str, normalization: str, mode: str = "positions") -> tuple[str, ...]:
    """The backends that compute this graph exactly (``auto`` first, ``dense`` second).

    ``positions``: ``chunked`` for every kernel, ``lowrank`` for the factorizable ones, ``sdpa`` for an exp
    kernel with its softmax. ``crisscross``: its own ``O(N·ΣL_d)`` path (``auto``/``chunked``) or ``dense``.
    ``channels`` (CGNL): factorized (``auto``/``lowrank``) or ``dense``. ``axial``, ``neighborhood``: their own
    ``O(N·ΣL_d)`` / ``O(N·k^d)`` path (``auto``) or ``dense``.
    """
    fixed = GRAPH_MODES[mode].backends
    if fixed is not None:
        return fixed
    k = KERNELS[kernel]  # unary: rank 1 (lowrank, the auto path), or formed (dense/chunked); no fused attention
    out = ["auto", "dense", "chunked"]
    if k.factorizable:
        out.append("lowrank")
    if k.exp and normalization in ("softmax", "row"):
        out.append("sdpa")
    return tuple(out)


def backend_requirement(backend: str) -> str:
    """Why a backend was refused: what it needs (for error messages)."""
    return {
        "lowrank": f"a factorizable kernel ({', '.join(lowrank_kernels())})",
        "sdpa": f"an exp kernel ({', '.join(exp_kernels())}) with softmax normalization",
    }.get(backend, "another graph")
