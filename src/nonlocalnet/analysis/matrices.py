"""Linear algebra on trained blocks: the weight matrices of each filter term, symmetric spectra, labels."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from numpy.polynomial import chebyshev

from nonlocalnet.blocks import NonlocalBlock
from nonlocalnet.reference import conv_matrix

from .errors import AnalysisError

__all__ = ["block_matrices", "graph_notes", "is_channel_graph", "nonlinear_reason", "poly_label", "sorted_by_magnitude",
           "symmetric_eigenvalues"]


def is_channel_graph(block: NonlocalBlock) -> bool:
    """CGNL: a graph over positions × channels, no ``N × N'`` position affinity."""
    return block.edges.mode == "channels"


def nonlinear_reason(block: NonlocalBlock) -> str | None:
    """Why the analyses of the linear maps ``W_t W_g`` (spectrum, filter gains) do not apply to ``block``, or
    ``None`` when they do."""
    unit = block.units[0]
    if unit.out_map != "linear":
        return (f"{block.name}: each output map is GCNet's bottleneck conv -> LayerNorm -> ReLU -> conv (Cao et al., "
                '"GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", ICCVW 2019, Eq. 4), not '
                "a linear W_t: there is no C x C matrix W_t W_g, so its eigenvalues (spectrum) and the filter gain "
                "||Σ_t B_t(λ) W_t|| are not defined; not analyzed")
    if "add" not in unit.fusion:
        return f"{block.name}: fusion='mul' gates X by sigmoid(F) and has no additive W_t W_g; not analyzed"
    return None


def graph_notes(block: NonlocalBlock) -> list[str]:
    """What the block's graph is, where it differs from one pairwise affinity (GC's unary graph, DNL's sum)."""
    e = block.edges
    notes = []
    if e.kernel == "unary":
        notes.append("unary graph (GC): A = 1·aᵀ with a = softmax(w_m X): every row of A is the same a "
                     "(query-independent attention), rank 1, A^k = A; its eigenvalues are 1 (once, eigenvector 1) "
                     "and 0 (N - 1 times)")
    elif e.unary:
        gamma = getattr(e, "gamma", None)  # pairwise_gamma=True: the DNL authors' A = γ·A_pair + 1·aᵀ
        if gamma is None:
            pair, sums = "softmax of the whitened pairwise term", "each row sums to 2 (A 1 = 2·1)"
        else:
            g = float(gamma.detach())
            pair, sums = (f"γ·(softmax of the whitened pairwise term) with the learned γ = {g:.4g}",
                          f"each row sums to 1 + γ = {1 + g:.4g}")
        notes.append('sum graph (DNL; Yin et al., "Disentangled Non-Local Neural Networks", ECCV 2020, Eq. 12): '
                     f"A = {pair} + 1·aᵀ (the unary term); {sums}, A is not symmetric; rows, powers and eigenvalues "
                     "shown are those of the sum")
    if e.whiten and not e.unary:
        notes.append("whitened pairwise term: queries and keys minus their means over positions")
    unit = block.units[0]
    if unit.g is None:
        notes.append("value_proj=False: Z = X (no W_g; W_g = I in the matrices)")
    if unit.fusion == "add_mul":
        notes.append("fusion='add_mul': Y = X ⊙ sigmoid(F_mul) + F_add; only the additive branch (w.*) is analyzed")
    return notes


def poly_label(coef_row: Sequence[float]) -> str:
    """``B_t(A) = Σ_k coef[k] T_k(A)`` in the power basis, e.g. ``[-1, 2] -> "2A - I"``."""
    p = chebyshev.cheb2poly(np.asarray(coef_row, dtype=float))
    parts = []
    for k in range(len(p) - 1, -1, -1):
        c = float(p[k])
        if abs(c) < 1e-12:
            continue
        mono = "I" if k == 0 else ("A" if k == 1 else f"A^{k}")
        mag = abs(c)
        body = mono if mag == 1 else f"{mag:g}{mono}"
        sign = "-" if c < 0 else "+"
        parts.append((sign, body))
    if not parts:
        return "0"
    s = ("-" if parts[0][0] == "-" else "") + parts[0][1]
    for sign, body in parts[1:]:
        s += f" {sign} {body}"
    return s


def block_matrices(name: str, block: NonlocalBlock, state: dict[str, torch.Tensor] | None = None
                   ) -> list[dict[str, Any]]:
    """For each unit ``i`` and filter term ``t``: the keys and matrices of ``W_t`` (``C × C_v``) and ``W_g``
    (``C_v × C``), read from ``state`` (default: the block's own weights) by state-dict key.

    ``out_proj=False`` (CC): no ``W_t``; the entry has ``w_key=None`` and ``w=None``. ``value_proj=False``: no
    ``W_g``; ``g_key=None`` and ``W_g = I``. Nonlinear output maps (GC): :class:`AnalysisError` (see
    :func:`nonlinear_reason`).
    """
    own = {f"{name}.{k}": v for k, v in block.state_dict().items()}
    state = own if state is None else state
    reason = nonlinear_reason(block)
    if reason is not None:
        raise AnalysisError(reason)
    out = []
    for i, unit in enumerate(block.units):
        g_key = f"{name}.units.{i}.g.weight"
        if unit.g is None:  # value_proj=False: Z = X
            g_key = None
            wg = torch.eye(block.in_channels, dtype=torch.float64)
        elif g_key not in state:
            raise AnalysisError(f"state dict has no {g_key}")
        else:
            wg = state[g_key].detach().cpu().double().reshape(state[g_key].shape[0], -1)  # C_v × C
        coef = unit.coef.tolist()
        labels = unit.term_labels()  # spectral and learnable filters: named terms
        if labels is not None:
            coef = [None] * len(labels)
        if not len(unit.w):
            out.append({"unit": i, "term": 0, "coef": coef[0], "poly": poly_label(coef[0]), "g_key": g_key,
                        "w_key": None, "wg": wg, "w": None, "groups": 1})
            continue
        for t, conv in enumerate(unit.w):
            w_key = f"{name}.units.{i}.w.{t}.weight"
            if w_key not in state:
                raise AnalysisError(f"state dict has no {w_key}")
            w = conv_matrix(state[w_key].detach().cpu().double(), wg.shape[0])  # C × C_v
            out.append({"unit": i, "term": t, "coef": coef[t],
                        "poly": labels[t] if labels is not None else poly_label(coef[t]), "g_key": g_key,
                        "w_key": w_key, "wg": wg, "w": w, "groups": int(conv.groups)})
    return out


def symmetric_eigenvalues(w: torch.Tensor | np.ndarray) -> np.ndarray:
    """Eigenvalues of ``(W + Wᵀ)/2`` sorted by magnitude, largest first."""
    w = np.asarray(w, dtype=np.float64)
    return sorted_by_magnitude(np.linalg.eigvalsh(0.5 * (w + w.T)))


def sorted_by_magnitude(values: Iterable[float]) -> np.ndarray:
    v = np.asarray(list(values), dtype=np.float64)
    order = np.argsort(-np.abs(v), kind="stable")
    return v[order]
