"""``spectrum``: eigenvalues of the symmetric part of each block's weight products (Tao et al., "Nonlocal Neural
Networks, Nonlocal Diffusion and Nonlocal Modeling", NeurIPS 2018,
§3.1, Figs. 1–4; "A Spectral Nonlocal Block for Neural Networks" (Zhu et al., ICLR 2020 submission), Fig. 5).

For unit ``i`` of a block and filter term ``t``: ``W_g`` is g's weight (``C_v × C``), ``W_t`` the term's output
projection (``C × C_v``, block-diagonal for grouped convs, e.g. CGNL), ``W = W_t W_g`` (``C × C``, rank ≤ C_v)
and ``W̃ = (W + Wᵀ)/2``. The eigenvalues of ``W̃`` are sorted by magnitude and the top ``k`` (32) reported.
Blocks without output projection (``out_proj=False``, CC) use ``W = W_g`` (``C × C``) and say so; blocks
without value projection (``value_proj=False``) use ``W_g = I``. DNL is analyzed as NL (one ``W_g``, one ``W_z``
shared by its pairwise and unary terms). GC's output maps are GCNet's nonlinear bottleneck: no ``W_t``, so its
record says the analysis does not apply (``applies: false``, ``note``) and has no figure.

The output norm is not part of ``W`` (as in the papers); ``folded`` additionally gives the eigenvalues with
the norm's per-channel scale ``s`` folded in, ``sym(diag(s) W)``, where the norm is affine at inference
(BatchNorm: ``s = γ/sqrt(var + eps)``, before the ReLU of ``bn_relu``; CC's ``γ``); GroupNorm depends on the
input and is not folded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator
from safetensors import SafetensorError, safe_open

from nonlocalnet.runs import CheckpointError, Loaded

from .errors import require_blocks
from .matrices import block_matrices, graph_notes, nonlinear_reason, symmetric_eigenvalues
from .output import new_figure, safe_name, save_figure, write_json

__all__ = ["norm_scale", "read_tensors", "run_spectrum", "spectrum_of_state"]


def read_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Only ``keys`` of a safetensors file (an epoch checkpoint), without loading the rest."""
    try:
        with safe_open(str(path), framework="pt") as f:
            have = set(f.keys())
            missing = [k for k in keys if k not in have]
            if missing:
                raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing[:3])}"
                                      f"{' ...' if len(missing) > 3 else ''} (a different model?)")
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {e}") from None


def norm_scale(unit: torch.nn.Module) -> tuple[np.ndarray | None, str]:
    """The per-channel scale of the unit's output norm at inference, or ``None`` when it is not affine."""
    norm = unit.norm
    channels = unit.g.weight.shape[1] if unit.g is not None else unit.w[0].weight.shape[0]
    if norm.kind in ("bn", "bn_relu"):
        bn = norm.bn
        s = (bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)).cpu().numpy()
        return s, "BatchNorm scale gamma/sqrt(running_var+eps)" + (" (before the ReLU)" if norm.kind == "bn_relu"
                                                                   else "")
    if norm.kind == "gamma":
        return np.full(channels, float(norm.gamma.detach())), "CC scale gamma"
    if norm.kind == "none":
        return np.ones(channels), "no output norm"
    return None, f"output norm {norm.kind!r} depends on the input: not folded"


def _label(m: dict[str, Any]) -> str:
    if m["w_key"] is None:
        return "W_g"
    return f"W_{m['term']} W_g"


def spectrum_of_state(name: str, block, state: dict[str, torch.Tensor] | None, top: int) -> list[dict[str, Any]]:
    """One record per (unit, term) with the keys used and the eigenvalues (sorted by magnitude)."""
    records = []
    for m in block_matrices(name, block, state):
        if m["w"] is None:
            w = m["wg"]
            note = ("out_proj=False: the block has no W_z (F = A Z, Z = X W_g); W = W_g (C x C) alone is used. "
                    "Its output is scaled by the unit's gamma afterwards (see 'folded').")
        else:
            w = m["w"] @ m["wg"]
            note = None
            if m["groups"] > 1:
                note = (f"W_{m['term']} is a grouped conv ({m['groups']} groups): its dense C x C_v matrix is "
                        "block-diagonal")
        eig = symmetric_eigenvalues(w.numpy())
        rec = {"unit": m["unit"], "term": m["term"], "filter_term": m["poly"], "coef": m["coef"],
               "product": _label(m), "g_key": m["g_key"], "w_key": m["w_key"], "w_shape": list(w.shape),
               "value_channels": int(m["wg"].shape[0]), "groups": m["groups"], "rank_bound": int(
                   min(w.shape[0], 2 * m["wg"].shape[0])),
               "eigenvalues": eig[:top].tolist(), "num_eigenvalues": int(eig.size),
               "top_positive": int((eig[:top] > 0).sum()), "top_negative": int((eig[:top] < 0).sum()),
               "sum_top": float(eig[:top].sum())}
        if note:
            rec["note"] = note
        records.append(rec)
    return records


def _fold(block, records: list[dict[str, Any]], name: str, state, top: int) -> None:
    mats = block_matrices(name, block, state)
    for rec, m in zip(records, mats):
        unit = block.units[m["unit"]]
        s, how = norm_scale(unit)
        if s is None:
            rec["folded"] = {"how": how, "eigenvalues": None}
            continue
        w = m["wg"] if m["w"] is None else m["w"] @ m["wg"]
        rec["folded"] = {"how": how, "eigenvalues": symmetric_eigenvalues(np.diag(s) @ w.numpy())[:top].tolist()}


def _bar_panel(ax, eig: list[float], title: str) -> None:
    v = np.asarray(eig, dtype=float)
    x = np.arange(1, v.size + 1)
    colors = np.where(v < 0, "#3b6fb6", "#c8453c")
    ax.bar(x, v, color=colors, width=0.8)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("rank by |eigenvalue|", fontsize=8)
    ax.set_ylabel("eigenvalue", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlim(0.3, max(v.size, 1) + 0.7)
    ax.text(0.99, 0.02, f"+{int((v > 0).sum())} / -{int((v < 0).sum())}", transform=ax.transAxes, ha="right",
            va="bottom", fontsize=7, color="0.3")


def _plot_block(rec: dict[str, Any], out: Path, top: int) -> Path:
    mats = rec["matrices"]
    units = sorted({m["unit"] for m in mats})
    terms = max(m["term"] for m in mats) + 1
    fig = new_figure(max(6.4, 3.4 * terms + 0.3), 2.5 * len(units) + 0.5)
    axes = fig.subplots(len(units), terms, squeeze=False)
    for m in mats:
        ax = axes[units.index(m["unit"])][m["term"]]
        title = f"unit {m['unit']}: sym({m['product']})"
        if m["w_key"] is not None:
            title += f"  [term {m['filter_term']}]"
        _bar_panel(ax, m["eigenvalues"], title)
    fig.suptitle(f"{rec['block']} ({rec['preset']}): top {top} eigenvalues of the symmetric part", fontsize=10)
    return save_figure(fig, out / f"spectrum_{safe_name(rec['block'])}.png")


def _plot_evolution(name: str, evo: dict[str, Any], out: Path) -> Path:
    series = evo["series"]
    epochs = evo["epochs"]
    fig = new_figure(9.0, 2.6 * len(series) + 0.5)
    axes = fig.subplots(len(series), 2, squeeze=False, width_ratios=[1.4, 1])
    for row, s in enumerate(series):
        vals = np.array([[np.nan if v is None else v for v in e] for e in s["eigenvalues"]], dtype=float)
        ax = axes[row][0]
        lim = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
        im = ax.imshow(vals.T, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="upper",
                       extent=(epochs[0] - 0.5, epochs[-1] + 0.5, vals.shape[1] + 0.5, 0.5), interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.9).ax.tick_params(labelsize=7)
        ax.set_title(f"unit {s['unit']}: sym({s['product']}) per epoch", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("rank by |eigenvalue|", fontsize=8)
        ax.tick_params(labelsize=7)
        ax2 = axes[row][1]
        ax2.plot(epochs, np.nanmax(vals, 1), "-o", ms=3, color="#c8453c", label="largest")
        ax2.plot(epochs, np.nanmin(vals, 1), "-o", ms=3, color="#3b6fb6", label="smallest (most negative)")
        ax2.plot(epochs, np.nansum(vals, 1), "--", color="0.4", label="sum of top k")
        ax2.axhline(0, color="k", lw=0.6)
        ax2.set_xlabel("epoch", fontsize=8)
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.tick_params(labelsize=7)
        ax2.legend(fontsize=7)
    fig.suptitle(f"{name}: evolution of the top eigenvalues over training (Tao et al. 2018 Fig. 2)", fontsize=10)
    return save_figure(fig, out / f"spectrum_evolution_{safe_name(name)}.png")


def run_spectrum(loaded: Loaded, out: Path, *, top: int = 32, evolution: bool = True) -> dict[str, Any]:
    """Compute, plot and write ``spectrum.json``; returns the JSON data (with ``figures``)."""
    require_blocks(loaded)
    out = Path(out)
    blocks = []
    figures = []
    analyzed = {}
    for name, block in loaded.blocks.items():
        rec = {"block": name, "preset": block.name, "in_channels": block.in_channels, "units": len(block.units)}
        reason = nonlinear_reason(block)
        if reason is not None:
            blocks.append({**rec, "applies": False, "note": reason, "matrices": []})
            continue
        records = spectrum_of_state(name, block, loaded.state or None, top)
        _fold(block, records, name, loaded.state or None, top)
        rec.update(applies=True, matrices=records)
        notes = graph_notes(block)
        if notes:
            rec["notes"] = notes
        blocks.append(rec)
        analyzed[name] = block
        figures.append(_plot_block(rec, out, top))
    data: dict[str, Any] = {
        "analysis": "spectrum", "run": loaded.describe(), "top": top,
        "definition": "eigenvalues of (W + W^T)/2 with W = W_t W_g (C x C; W_g: g.weight C_v x C, W_t: "
                      "w.<t>.weight C x C_v, block-diagonal when grouped), sorted by |eigenvalue|, largest first",
        "blocks": blocks, "notes": list(loaded.notes)}
    if evolution and len(loaded.epochs) >= 2:
        epochs = [e for e, _ in loaded.epochs]
        keys = sorted({k for name, block in analyzed.items() for m in block_matrices(name, block)
                       for k in (m["g_key"], m["w_key"]) if k is not None})
        series: dict[str, list[dict[str, Any]]] = {}
        for _, path in loaded.epochs:  # one file at a time, only the tensors needed
            st = read_tensors(path, keys)
            for name, block in analyzed.items():
                recs = spectrum_of_state(name, block, st, top)
                if name not in series:
                    series[name] = [{"unit": r["unit"], "term": r["term"], "product": r["product"],
                                     "g_key": r["g_key"], "w_key": r["w_key"], "eigenvalues": []} for r in recs]
                for s_, r in zip(series[name], recs):
                    s_["eigenvalues"].append(r["eigenvalues"])
        per_block: dict[str, Any] = {}
        for name in analyzed:
            per_block[name] = {"epochs": epochs, "series": series[name]}
            figures.append(_plot_evolution(name, per_block[name], out))
        data["evolution"] = {"epochs": epochs, "checkpoints": [str(p) for _, p in loaded.epochs],
                             "blocks": per_block}
    elif evolution:
        data["evolution"] = None
        data["notes"].append("evolution over epochs needs >= 2 epoch_XXXX.safetensors files in the run dir "
                             f"({len(loaded.epochs)} found; run.keep_epochs=true keeps them)")
    data["figures"] = [str(f) for f in figures]
    write_json(out / "spectrum.json", data)
    return data
