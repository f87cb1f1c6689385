"""``affinity``: the stable hypothesis of
"A Spectral Nonlocal Block for Neural Networks" (Zhu et al., ICLR 2020 submission), §3.3, Fig. 2: histograms of the
entries of ``A, A², A³, A⁴``
over a batch of the run's data, and how far ``A^k`` is from ``A``.

Each block's input is captured with a forward hook during one eval-mode pass of the model; ``A`` is the dense
affinity the block computes from it (``block.affinity(x)``, float64), per image ``(N × N')``. Numbers, per
block and per power ``k ≥ 2``:

- ``rel_fro``: ``‖A^k − A‖_F / ‖A‖_F`` per image, and its mean over the images;
- ``tv``: total variation ``½ Σ_b |p_k(b) − p_1(b)|`` between the normalized histograms of the entries of
  ``A^k`` and ``A`` on shared bins (0: same histogram, 1: disjoint);
- ``w1``: the 1-Wasserstein distance between the entry distributions (mean ``|sort(A^k) − sort(A)|`` over
  the N·N' entries), per image, and ``w1_rel = w1 / mean|A|``.

Powers need a square ``A`` (``N' = N``): with sub-sampling only ``A`` is shown. CGNL has no position graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nonlocalnet.runs import Loaded

from .capture import capture_blocks, dense_affinity, load_batch
from .errors import require_blocks
from .matrices import graph_notes, is_channel_graph
from .output import new_figure, safe_name, save_figure, write_result

__all__ = ["affinity_powers", "power_statistics", "run_affinity"]


def affinity_powers(a: np.ndarray, max_power: int) -> list[np.ndarray]:
    """``[A, A², ..., A^K]`` of one square ``N × N`` matrix (float64)."""
    out = [a]
    for _ in range(2, max_power + 1):
        out.append(out[-1] @ a)
    return out


def power_statistics(mats: list[np.ndarray], max_power: int, bins: int) -> dict[str, Any]:
    """Histograms and distances of ``A^k`` vs ``A`` for a list of per-image affinities ``A`` (``N × N'``)."""
    square = all(a.shape[0] == a.shape[1] for a in mats)
    k_max = max_power if square else 1
    lo, hi = np.inf, -np.inf
    for a in mats:  # pass 1: the shared bin range
        for p in affinity_powers(a, k_max):
            lo, hi = min(lo, float(p.min())), max(hi, float(p.max()))
    if not hi > lo:
        hi = lo + 1e-12
    edges = np.linspace(lo, hi, bins + 1)
    counts = {k: np.zeros(bins, dtype=np.int64) for k in range(1, k_max + 1)}
    rel_fro = {k: [] for k in range(2, k_max + 1)}
    w1 = {k: [] for k in range(2, k_max + 1)}
    w1_rel = {k: [] for k in range(2, k_max + 1)}
    for a in mats:  # pass 2: histograms and distances
        powers = affinity_powers(a, k_max)
        a_sorted = np.sort(a, axis=None)
        na = float(np.linalg.norm(a))
        mean_abs = float(np.abs(a).mean())
        for k, p in enumerate(powers, start=1):
            counts[k] += np.histogram(p, bins=edges)[0]
            if k >= 2:
                rel_fro[k].append(float(np.linalg.norm(p - a)) / max(na, 1e-300))
                d = float(np.abs(np.sort(p, axis=None) - a_sorted).mean())
                w1[k].append(d)
                w1_rel[k].append(d / max(mean_abs, 1e-300))
    p1 = counts[1] / max(counts[1].sum(), 1)
    distance = {}
    for k in range(2, k_max + 1):
        pk = counts[k] / max(counts[k].sum(), 1)
        distance[str(k)] = {"rel_fro": float(np.mean(rel_fro[k])), "rel_fro_per_image": rel_fro[k],
                            "tv": float(0.5 * np.abs(pk - p1).sum()), "w1": float(np.mean(w1[k])),
                            "w1_rel": float(np.mean(w1_rel[k])), "w1_per_image": w1[k]}
    return {"square": square, "powers": list(range(1, k_max + 1)), "bin_edges": edges.tolist(),
            "counts": {str(k): c.tolist() for k, c in counts.items()}, "distance": distance}


def _plot(rec: dict[str, Any], out: Path) -> Path:
    st = rec["stats"]
    powers = st["powers"]
    edges = np.asarray(st["bin_edges"])
    fig = new_figure(max(6.4, 3.0 * len(powers) + 0.4), 2.9)
    axes = fig.subplots(1, len(powers), squeeze=False, sharey=True)[0]
    c1 = np.asarray(st["counts"]["1"], dtype=float)
    for ax, k in zip(axes, powers):
        c = np.asarray(st["counts"][str(k)], dtype=float)
        ax.bar(edges[:-1], c, width=np.diff(edges), align="edge", color="#4c78a8", alpha=0.85,
               label=f"A^{k}" if k > 1 else "A")
        if k > 1:
            ax.step(edges[:-1], c1, where="post", color="#e45756", lw=1.0, label="A")
            d = st["distance"][str(k)]
            ax.set_title(f"A^{k}: ‖A^{k}−A‖/‖A‖={d['rel_fro']:.3f}\nTV={d['tv']:.3f}  W1/mean|A|={d['w1_rel']:.3f}",
                         fontsize=8)
        else:
            ax.set_title("A", fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("entry value", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("number of entries", fontsize=8)
    fig.suptitle(f"{rec['block']} ({rec['preset']}): entries of A^k over {rec['images']} images, "
                 f"N={rec['n']}, N'={rec['n_keys']}", fontsize=9)
    return save_figure(fig, out / f"affinity_{safe_name(rec['block'])}.png")


def run_affinity(loaded: Loaded, out: Path, *, data_root: str | None = None, split: str = "test", images: int = 8,
                 max_power: int = 4, bins: int = 50, batch=None) -> dict[str, Any]:
    require_blocks(loaded)
    out = Path(out)
    if batch is None:
        batch = load_batch(loaded.cfg, count=images, split=split, data_root=data_root, what="`analyze affinity`")
    io = capture_blocks(loaded.model, loaded.blocks, batch.x)
    blocks, figures = [], []
    for name, block in loaded.blocks.items():
        rec: dict[str, Any] = {"block": name, "preset": block.name, "images": int(batch.x.shape[0])}
        if is_channel_graph(block):
            rec["note"] = ("cgnl: the graph is over positions x channels per group (N*C_g nodes), there is no "
                           "N x N position affinity; skipped")
            blocks.append(rec)
            continue
        a = dense_affinity(block, io[name][0])
        rec.update(n=int(a.shape[1]), n_keys=int(a.shape[2]))
        if graph_notes(block):
            rec["notes"] = graph_notes(block)
        mats = list(a)
        sym = float(max(np.abs(m - m.T).max() / max(np.abs(m).max(), 1e-300) for m in mats)) \
            if a.shape[1] == a.shape[2] else None
        rec["symmetric"] = sym is not None and sym < 1e-10
        rec["stats"] = power_statistics(mats, max_power, bins)
        if not rec["stats"]["square"]:
            rec["note"] = (f"A is N x N' = {a.shape[1]} x {a.shape[2]} (keys are not the positions: sub-sampled "
                           "or memory slots): powers undefined, only A shown")
        rec["row_sums"] = {"min": float(a.sum(-1).min()), "max": float(a.sum(-1).max())}
        figures.append(_plot(rec, out))
        blocks.append(rec)
    return write_result(out / "affinity.json", loaded, "affinity", batch.info, max_power=max_power, bins=bins,
                        definition={
                            "rel_fro": "||A^k - A||_F / ||A||_F per image (mean and per image)",
                            "tv": "0.5 * sum_b |p_k(b) - p_1(b)|, normalized histograms on shared bins",
                            "w1": "mean |sort(A^k) - sort(A)| over the N*N' entries (1-Wasserstein), per image, "
                                  "mean",
                            "w1_rel": "w1 / mean|A|"},
                        blocks=blocks, figures=figures)
