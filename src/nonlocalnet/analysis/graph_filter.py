"""``filter``: the learned graph filter in the spectral domain (Zhu et al., "Unifying Nonlocal Blocks for Neural
Networks", ICCV 2021,
Eq. 3–4; "A Spectral Nonlocal Block for Neural Networks" (Zhu et al., ICLR 2020 submission), Eq. 7).

A unit computes ``F(A, Z) = Σ_t B_t(A) Z W_t`` with the frequency response ``B_t(λ)`` of each term
(``unit.responses``): ``Σ_k coef[t, k] T_k(λ)`` for the polynomial filters, the rational / exponential
responses of the Cayley, heat and wavelet filters (docs/spectral.md), with the learned scales. On a
graph signal along an eigenvector ``u`` of ``A`` (``A u = λ u``) with channel vector ``x`` (``X = u xᵀ``), the
unit's response is ``u (G(λ) x)ᵀ`` where

    G_z(λ) = Σ_t B_t(λ) W_t            (C × C_v; W_t the dense output projections)
    G(λ)   = G_z(λ) W_g                (C × C; the whole channel map, value projection included)

Reported per λ: ``gain = ‖G_z(λ)‖₂`` (spectral norm, the largest singular value), ``gain_full = ‖G(λ)‖₂`` and
``sym_max``, ``sym_min``, the extreme eigenvalues of ``(G(λ) + G(λ)ᵀ)/2`` (their sign says whether the
residual ``X + F`` amplifies or damps along the most affected channel direction, as in the spectrum
analysis). Blocks without output projection (CC) use ``W_t = I``. The output norm is not included.

Underneath, the histogram of the eigenvalues λ of the real inputs' ``A``. On a factorizable graph (``A = U Vᵀ``,
rank r) they come exactly from the r × r core in ``O(N r²)`` (:func:`nonlocalnet.spectral.spectrum`; real for
the symmetric normalization); otherwise from the dense ``A``: ``eigh`` when it is symmetric, else the real parts
of its (complex) eigenvalues. The JSON says which. Non-square ``A`` (sub-sampling) and CGNL have no such
spectrum. The responses are the eigenvector gains only where ``A`` is symmetric (the JSON notes it otherwise).
DNL's ``A`` is a sum (pairwise + unary, row sums 2): its λ reach 2. GC's output maps are nonlinear (GCNet's
bottleneck): no gain curve, the block's record says so (``applies: false``, ``note``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.polynomial import chebyshev

from nonlocalnet import spectral
from nonlocalnet.affinity import LowRankGraph
from nonlocalnet.runs import Loaded

from .capture import capture_batch, dense_affinity, float64_block
from .errors import require_blocks
from .matrices import block_matrices, graph_notes, is_channel_graph, nonlinear_reason, poly_label
from .output import new_figure, safe_name, save_figure, write_result

__all__ = ["affinity_eigenvalues", "affinity_spectrum", "filter_response", "run_filter", "term_responses"]


def filter_response(coef: np.ndarray | None, ws: list[np.ndarray | None], wg: np.ndarray, lams: np.ndarray,
                    gains: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``gain``, ``gain_full``, ``sym_max``, ``sym_min`` at each λ (see module docstring).

    ``coef``: terms × (K+1) (polynomial filters), or ``gains``: ``B_t(λ)``, terms × len(λ) (any filter);
    ``ws``: the dense ``W_t`` (``C × C_v``) or ``None`` (no output projection: I).
    """
    if gains is None:
        coef = np.asarray(coef, dtype=np.float64)
        gains = np.stack([chebyshev.chebval(np.asarray(lams, dtype=np.float64), row) for row in coef])
    gains = np.asarray(gains, dtype=np.float64)
    c = wg.shape[1] if ws[0] is None else ws[0].shape[0]
    mats = [np.eye(c) if w is None else np.asarray(w, dtype=np.float64) for w in ws]
    wg = np.asarray(wg, dtype=np.float64)
    out = {k: np.empty(len(lams)) for k in ("gain", "gain_full", "sym_max", "sym_min")}
    for i in range(len(lams)):
        b = [float(gains[t, i]) for t in range(len(gains))]
        gz = sum(bt * m for bt, m in zip(b, mats))
        g = gz @ wg
        out["gain"][i] = np.linalg.norm(gz, 2)
        out["gain_full"][i] = np.linalg.norm(g, 2)
        ev = np.linalg.eigvalsh(0.5 * (g + g.T))
        out["sym_max"][i], out["sym_min"][i] = ev[-1], ev[0]
    return out


def affinity_eigenvalues(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """Eigenvalues of each ``A`` in a batch ``(B, N, N)``: real (``eigh``) when every ``A`` is symmetric, else
    the real parts of ``eigvals``; returns ``(values, symmetric)``."""
    sym = all(np.abs(m - m.T).max() <= 1e-9 * max(np.abs(m).max(), 1e-300) for m in a)
    if sym:
        return np.concatenate([np.linalg.eigvalsh(0.5 * (m + m.T)) for m in a]), True
    return np.concatenate([np.linalg.eigvals(m).real for m in a]), False


def learned_filter(name: str, index: int, unit, state: dict[str, torch.Tensor] | None = None):
    """Unit ``index``'s filter in float64, with its parameters (``{name}.units.{index}.spectral.*``) read from
    ``state`` when it has them (a checkpoint of another epoch), else the unit's own; ``None`` for a fixed filter."""
    spec = unit.spectral
    if spec is None:
        return None
    prefix = f"{name}.units.{index}.spectral."
    own = {k[len(prefix):]: v for k, v in (state or {}).items() if k.startswith(prefix)}
    filt = copy.deepcopy(spec).double()
    if own:
        filt.load_state_dict({k: v.double() for k, v in own.items()})
    return filt


def learned_scales(name: str, index: int, unit, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
    """A spectral unit's positive scales (``exp`` of ``{name}.units.{index}.spectral.log_scales``, read from ``state``
    when it has the key, else from the unit), float64; ``None`` for a filter without scales."""
    filt = learned_filter(name, index, unit, state)
    if filt is None or not hasattr(filt, "log_scales"):
        return None
    return filt.log_scales.detach().cpu().exp()


def term_responses(name: str, index: int, unit, lams: np.ndarray, state: dict[str, torch.Tensor] | None = None
                   ) -> np.ndarray:
    """``B_t(λ)`` (terms × len(λ)) of unit ``index`` of block ``name``, with the parameters of
    :func:`learned_filter`."""
    lam = torch.as_tensor(np.asarray(lams, dtype=np.float64))
    filt = learned_filter(name, index, unit, state)
    with torch.no_grad():
        if filt is not None:
            return filt.responses(lam).double().cpu().numpy()
        return unit.responses(lam).double().cpu().numpy()


def affinity_spectrum(block, x: torch.Tensor) -> tuple[np.ndarray, bool, str] | str:
    """All eigenvalues of the block's ``A`` on input ``x`` (concatenated over the batch), whether they are real,
    and how they were computed; or a note why there is no spectrum (non-square ``A``)."""
    with torch.no_grad():
        graph = float64_block(block).build_graph(x.double())
        if isinstance(graph, LowRankGraph) and graph.square:
            lam, real = spectral.spectrum(graph)
            lam = lam.numpy()
            source = ("r x r core (exact, O(N r^2)): A symmetric" if real else
                      "r x r core (exact, O(N r^2)): A not symmetric, real parts of its eigenvalues")
            return (lam.reshape(-1) if real else lam.real.reshape(-1)), real, source
    a = dense_affinity(block, x)
    if a.shape[1] != a.shape[2]:
        return (f"A is {a.shape[1]} x {a.shape[2]} (keys are not the positions: sub-sampled or memory slots): "
                "no eigenvalues")
    lam, sym = affinity_eigenvalues(a)
    return lam, sym, ("dense eigh: A symmetric" if sym else "dense: A not symmetric, real parts of its eigenvalues")


def _plot(rec: dict[str, Any], out: Path) -> Path:
    units = rec["units"]
    fig = new_figure(6.4, 5.6 * len(units) + 0.4)
    gs = fig.add_gridspec(3 * len(units), 1, height_ratios=[2.2, 1.5, 1] * len(units))
    lam_hist = rec.get("lambda_histogram")
    for i, u in enumerate(units):
        ax = fig.add_subplot(gs[3 * i])
        lam = np.asarray(rec["lambda"])
        ax.plot(lam, u["gain"], color="#4c78a8", lw=1.8, label="gain ||Σ B_t(λ) W_t||₂")
        ax.plot(lam, u["gain_full"], color="#f58518", lw=1.4, ls="--", label="||G(λ)||₂, G = Σ B_t(λ) W_t W_g")
        ax.fill_between(lam, u["sym_min"], u["sym_max"], color="#54a24b", alpha=0.18,
                        label="eig range of sym G(λ)")
        ax.axhline(0, color="k", lw=0.5)
        for v in (-1, 1):
            ax.axvline(v, color="0.6", lw=0.6, ls=":")
        ax.set_title(f"unit {u['unit']}: F = " + " + ".join(f"[{p}] Z W_{t}" for t, p in enumerate(u["terms"])),
                     fontsize=8)
        ax.set_ylabel("gain", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6.5, loc="best")
        axr = fig.add_subplot(gs[3 * i + 1], sharex=ax)
        for t, (label, row) in enumerate(zip(u["terms"], u["responses"])):
            axr.plot(lam, row, lw=1.2, label=f"B_{t}(λ) = {label}")
        axr.axhline(0, color="k", lw=0.5)
        scales = f" (learned scales {', '.join(f'{v:.3g}' for v in u['scales'])})" if u.get("scales") else ""
        axr.set_title(f"response of each term{scales}", fontsize=7.5)
        axr.set_ylabel("B_t(λ)", fontsize=8)
        axr.tick_params(labelsize=7)
        axr.legend(fontsize=6, loc="best", ncol=2)
        axh = fig.add_subplot(gs[3 * i + 2], sharex=ax)
        if lam_hist is not None:
            e = np.asarray(lam_hist["bin_edges"])
            axh.bar(e[:-1], lam_hist["counts"], width=np.diff(e), align="edge", color="0.45")
            axh.set_yscale("log")
            axh.set_ylabel("count", fontsize=8)
            axh.set_title(f"eigenvalues λ of A over {rec['images']} images ({lam_hist['source']})", fontsize=7.5)
        else:
            axh.text(0.5, 0.5, rec.get("lambda_note", "no eigenvalues"), ha="center", va="center", fontsize=7,
                     transform=axh.transAxes, wrap=True)
            axh.set_yticks([])
        axh.set_xlabel("λ (eigenvalue of A)", fontsize=8)
        axh.tick_params(labelsize=7)
    fig.suptitle(f"{rec['block']} ({rec['preset']}): graph filter response", fontsize=9)
    return save_figure(fig, out / f"filter_{safe_name(rec['block'])}.png")


def run_filter(loaded: Loaded, out: Path, *, data_root: str | None = None, split: str = "test", images: int = 4,
               points: int | None = None, bins: int = 60, use_data: bool = True, batch=None) -> dict[str, Any]:
    require_blocks(loaded)
    out = Path(out)
    io = None
    data_info = None
    if use_data:
        batch, io = capture_batch(loaded, batch, images=images, split=split, data_root=data_root,
                                  what="`analyze filter`")
        data_info = batch.info
    records, figures = [], []
    for name, block in loaded.blocks.items():
        rec: dict[str, Any] = {"block": name, "preset": block.name}
        reason = nonlinear_reason(block)
        if reason is not None:
            rec.update(applies=False, note=reason, notes=graph_notes(block))
            records.append(rec)
            continue
        rec["applies"] = True
        if graph_notes(block):
            rec["notes"] = graph_notes(block)
        lams_data = None
        if io is None:
            rec["lambda_note"] = "no data: λ histogram not computed (--no-data)"
        elif is_channel_graph(block):
            rec["lambda_note"] = "cgnl: the graph is over positions x channels; no N x N position spectrum"
        else:
            found = affinity_spectrum(block, io[name][0])
            if isinstance(found, str):
                rec["lambda_note"] = found
            else:
                lams_data, sym, source = found
                rec["images"] = int(io[name][0].shape[0])
                if not sym:
                    rec["response_note"] = ("A is not symmetric: its eigenvalues are complex and B_t(λ) is the "
                                            "filter's response on the real axis only")
                lo_d, hi_d = float(lams_data.min()), float(lams_data.max())
                edges = np.linspace(min(lo_d, -1.0), max(hi_d, 1.0), bins + 1)
                rec["lambda_histogram"] = {"source": source, "bin_edges": edges.tolist(),
                                           "counts": np.histogram(lams_data, edges)[0].tolist(),
                                           "min": lo_d, "max": hi_d, "count": int(lams_data.size)}
        lo = -1.0 if lams_data is None else min(-1.0, float(lams_data.min()))
        hi = 1.0 if lams_data is None else max(1.0, float(lams_data.max()))
        n_points = points or (101 if block.in_channels <= 256 else 41)  # an SVD of C x C per point
        lam = np.unique(np.concatenate([np.linspace(lo, hi, n_points), [-1.0, 0.0, 1.0]]))
        rec["lambda"] = lam.tolist()
        mats = block_matrices(name, block, loaded.state or None)
        units = []
        for i, unit in enumerate(block.units):
            ms = [m for m in mats if m["unit"] == i]
            labels = unit.term_labels()
            coef = None if labels is not None else np.asarray(unit.coef.tolist(), dtype=np.float64)
            gains = term_responses(name, i, unit, lam, loaded.state or None)
            ws = [None if m["w"] is None else m["w"].numpy() for m in ms]
            resp = filter_response(None, ws, ms[0]["wg"].numpy(), lam, gains=gains)
            at = {}
            for v in (-1.0, 0.0, 1.0):
                j = int(np.argmin(np.abs(lam - v)))
                at[f"{v:g}"] = {k: float(resp[k][j]) for k in resp}
            scales = learned_scales(name, i, unit, loaded.state or None)
            extra = {} if unit.spectral is None else {"filter": unit.filter.name}
            if scales is not None:
                extra["scales"] = scales.tolist()
            units.append({"unit": i, "coef": None if coef is None else coef.tolist(),
                          "terms": labels if labels is not None else [poly_label(r) for r in coef],
                          "responses": gains.tolist(), **extra,
                          "g_key": ms[0]["g_key"], "w_keys": [m["w_key"] for m in ms],
                          **{k: v.tolist() for k, v in resp.items()}, "at": at})
        if not len(block.units[0].w):
            rec["note"] = "out_proj=False: W_t = I (C x C); G(λ) = B(λ) W_g; the output scale gamma is not included"
        rec["units"] = units
        figures.append(_plot(rec, out))
        records.append(rec)
    return write_result(
        out / "filter.json", loaded, "filter", data_info,
        definition={
            "B_t": "B_t(λ): the response of term t (unit.responses): Σ_k coef[t,k] T_k(λ) (Chebyshev T_k, "
                   "coef = unit.coef) for the polynomial filters; heat exp(-t(1-λ)), Cayley Re/Im ((h(1-λ)-i)/"
                   "(h(1-λ)+i))^j, wavelet g(s(1-λ)) for the spectral ones (docs/spectral.md)",
            "responses": "B_t(λ) per term at each λ",
            "gain": "||Σ_t B_t(λ) W_t||_2: spectral norm (largest singular value) of the summed C x C_v matrices",
            "gain_full": "||G(λ)||_2 with G(λ) = Σ_t B_t(λ) W_t W_g (C x C)",
            "sym_max/sym_min": "largest/smallest eigenvalue of (G(λ) + G(λ)^T)/2"},
        blocks=records, figures=figures)
