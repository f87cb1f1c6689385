"""The one table of affinity kernels and graph modes: which normalizations and backends go with which.

Option validation (:func:`nonlocalnet.presets.resolve_options`), the ``auto`` rule
(:func:`nonlocalnet.affinity.choose_backend`), the benchmarks and the tests all read this table; nothing
else lists kernels or backends.

A kernel gives ``M`` (``N × N'`` per batch item) from queries ``θ`` and keys ``φ`` after a
pre-transform; a normalization turns ``M`` into ``A`` (Wang et al., "Non-local Neural Networks",
CVPR 2018, Eq. 2–4; Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021, Eq. 5).
"""

from __future__ import annotations

from dataclasses import dataclass

NORMALIZATIONS = ("softmax", "count", "row", "symmetric", "none")
BACKENDS = ("auto", "dense", "lowrank", "sdpa", "chunked")
MODES = ("positions", "crisscross", "channels")


@dataclass(frozen=True)
class Kernel:
    """One affinity kernel.

    ``pretransform``: what is applied to the projected queries/keys before the product (``none``,
    ``relu``, ``softmax`` (A²: queries over channels, keys over positions), ``concat`` (a learned
    ``w·[θ_i; φ_j]``)). ``exp``: the kernel is ``exp`` of a bilinear form (log-domain evaluation,
    softmax, fused attention). ``factorizable``: ``M = P Qᵀ`` with thin factors (the ``lowrank`` path).
    ``projected``: ``θ``, ``φ`` are learned 1×1 projections (``gaussian`` uses ``X`` itself). ``unary``: the
    kernel depends on the key alone, ``M_ij = exp(m_j)``, ``m_j = w_m·x_j + b_m`` (GC's attention pooling, Cao et
    al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", ICCVW 2019, Eq. 2–3): with its
    one normalization, softmax, ``A = 1·aᵀ`` (rank 1).
    """

    name: str
    formula: str
    pretransform: str = "none"
    exp: bool = False
    factorizable: bool = False
    projected: bool = True
    natural_normalization: str = "count"
    unary: bool = False

    @property
    def normalizations(self) -> tuple[str, ...]:
        """``softmax`` is the row normalization of the exp kernels; every other one applies to all. The unary
        kernel takes softmax only."""
        if self.unary:
            return ("softmax",)
        return NORMALIZATIONS if self.exp else tuple(n for n in NORMALIZATIONS if n != "softmax")


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in [
        Kernel("embedded_gaussian", "exp(s·θ_i·φ_j)", exp=True, natural_normalization="softmax"),
        Kernel("gaussian", "exp(s·x_i·x_j)", exp=True, projected=False, natural_normalization="softmax"),
        Kernel("dot_product", "θ_i·φ_j", factorizable=True, natural_normalization="count"),
        Kernel("relu_dot", "relu(θ_i)·relu(φ_j)", pretransform="relu", factorizable=True,
               natural_normalization="symmetric"),
        Kernel("concatenation", "relu(w·[θ_i; φ_j])", pretransform="concat", natural_normalization="count"),
        Kernel("double_attention", "softmax_C(θ)_i·softmax_N(φ)_j", pretransform="softmax", factorizable=True,
               natural_normalization="none"),
        Kernel("unary", "exp(w_m·x_j + b_m)", factorizable=True, projected=False, natural_normalization="softmax",
               unary=True),
    ]
}
EXP_KERNELS = tuple(n for n, k in KERNELS.items() if k.exp)
LOWRANK_KERNELS = tuple(n for n, k in KERNELS.items() if k.factorizable)

# per graph mode: the kernels, normalizations and backends it takes (None: as the kernel says)
_MODE_KERNELS = {"positions": tuple(KERNELS), "crisscross": EXP_KERNELS, "channels": ("dot_product", "gaussian")}
_MODE_NORMALIZATIONS = {"positions": None, "crisscross": ("softmax", "row"), "channels": ("none", "count")}
_MODE_BACKENDS = {"crisscross": ("auto", "dense", "chunked"), "channels": ("auto", "dense", "lowrank")}


def mode_kernels(mode: str) -> tuple[str, ...]:
    return _MODE_KERNELS[mode]


def valid_normalizations(kernel: str, mode: str = "positions") -> tuple[str, ...]:
    return _MODE_NORMALIZATIONS[mode] or KERNELS[kernel].normalizations


def valid_backends(kernel: str, normalization: str, mode: str = "positions") -> tuple[str, ...]:
    """The backends that compute this graph exactly (``auto`` first, ``dense`` second).

    ``positions``: ``chunked`` for every kernel, ``lowrank`` for the factorizable ones, ``sdpa`` for an exp
    kernel with its softmax. ``crisscross``: its own ``O(N·ΣL_d)`` path (``auto``/``chunked``) or ``dense``.
    ``channels`` (CGNL): factorized (``auto``/``lowrank``) or ``dense``.
    """
    if mode in _MODE_BACKENDS:
        return _MODE_BACKENDS[mode]
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
        "lowrank": f"a factorizable kernel ({', '.join(LOWRANK_KERNELS)})",
        "sdpa": f"an exp kernel ({', '.join(EXP_KERNELS)}) with softmax normalization",
    }.get(backend, "another graph")
