"""``dynamics``: the diffusion view of Tao et al., "Nonlocal Neural Networks, Nonlocal Diffusion and Nonlocal
Modeling", NeurIPS 2018, §4: iterate a trained block as a map on features.

Starting from the block's real inputs ``x_0`` (captured with a hook during an eval-mode forward pass of the
model), two iterations, in float64 and eval mode (BatchNorm with its running statistics):

- ``block``: ``x_{t+1} = block(x_t)`` — the whole block (a stage: every unit), its affinity recomputed from
  ``x_t`` each time;
- ``fixed_graph``: the affinity ``A`` computed once from ``x_0`` and the units applied over and over,
  ``z ← unit_n(z; A)`` for ``n = 1..units``, one iteration per pass — the nonlocal-stage view
  (Tao et al. 2018 Eq. 8) of diffusion on a fixed graph.

Reported: ``‖x_t‖ / ‖x_0‖`` per image (Frobenius norm over channels and positions) for ``t = 0..T``; its mean,
min and max over the images. Decay means damping, growth means instability; the run stops early (the
remaining values are ``null``) if the features stop being finite. ``trend`` summarizes the last value:
``decays`` (< 0.9), ``grows`` (> 1.1) or ``stable``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from nonlocalnet.blocks import from_tokens, to_tokens
from nonlocalnet.runs import Loaded

from .capture import capture_batch, float64_block
from .errors import require_blocks
from .output import new_figure, save_figure, write_result

__all__ = ["iterate_block", "run_dynamics"]


def _norms(x: torch.Tensor) -> np.ndarray:
    return x.flatten(1).norm(dim=1).cpu().numpy()


@torch.no_grad()
def iterate_block(block: torch.nn.Module, x0: torch.Tensor, iterations: int, fixed_graph: bool = False
                  ) -> np.ndarray:
    """``‖x_t‖ / ‖x_0‖`` per image, shape ``(iterations + 1, B)``; NaN after the features stop being finite."""
    b64 = float64_block(block)
    x = x0.double()
    n0 = np.maximum(_norms(x), 1e-300)
    out = np.full((iterations + 1, x.shape[0]), np.nan)
    out[0] = 1.0
    graph = spatial = None
    if fixed_graph:
        spatial = b64.check_input(x)
        graph = b64.build_graph(x)
        h = to_tokens(x)
    for t in range(1, iterations + 1):
        if fixed_graph:
            for unit in b64.units:
                h = unit(h, graph, spatial)
            x = from_tokens(h, x0)
        else:
            x = b64(x)
        r = _norms(x) / n0
        if not np.isfinite(r).all():
            out[t] = np.where(np.isfinite(r), r, np.nan)
            break
        out[t] = r
    return out


def _rowstat(r: np.ndarray, fn) -> list[float | None]:
    """``fn`` over the finite values of each row (iteration), ``None`` where there are none."""
    out = []
    for row in r:
        v = row[np.isfinite(row)]
        out.append(float(fn(v)) if v.size else None)
    return out


def _trend(last: float) -> str:
    return "decays" if last < 0.9 else ("grows" if last > 1.1 else "stable")


def run_dynamics(loaded: Loaded, out: Path, *, data_root: str | None = None, split: str = "test", images: int = 8,
                 iterations: int = 50, batch=None) -> dict[str, Any]:
    require_blocks(loaded)
    out = Path(out)
    batch, io = capture_batch(loaded, batch, images=images, split=split, data_root=data_root,
                              what="`analyze dynamics`")
    records = []
    names = list(loaded.blocks)
    fig = new_figure(5.2 * 2 + 0.3, 3.2 * len(names) + 0.4)
    axes = fig.subplots(len(names), 2, squeeze=False)
    for row, name in enumerate(names):
        block = loaded.blocks[name]
        x0 = io[name][0]
        rec: dict[str, Any] = {"block": name, "preset": block.name, "units": len(block.units),
                               "recurrence": block.recurrence, "input_norm": _norms(x0.double()).tolist(),
                               "modes": {}}
        for col, mode in enumerate(("block", "fixed_graph")):
            ax = axes[row][col]
            if mode == "fixed_graph" and block.recurrence != 1:
                note = f"recurrence={block.recurrence}: one pass of the units on a fixed graph per iteration"
                rec.setdefault("notes", []).append(note)
            r = iterate_block(block, x0, iterations, fixed_graph=(mode == "fixed_graph"))
            mean = _rowstat(r, np.mean)
            ts = np.arange(iterations + 1)
            valid = [v for v in mean if v is not None]
            diverged = bool(np.isnan(r[-1]).any())
            last = float(valid[-1]) if valid and not diverged else None
            rec["modes"][mode] = {
                "ratio_mean": mean, "ratio_min": _rowstat(r, np.min), "ratio_max": _rowstat(r, np.max),
                "per_image": r.T.tolist(), "final_mean": last, "trend": "diverged" if diverged else _trend(last)}
            for i in range(r.shape[1]):
                ax.plot(ts, r[:, i], color="#4c78a8", alpha=0.25, lw=0.8)
            ax.plot(ts, [np.nan if v is None else v for v in mean], color="#d62728", lw=2, label="mean over images")
            ax.axhline(1.0, color="k", lw=0.6, ls=":")
            positive = r[np.isfinite(r)]
            if positive.size and positive.max() / max(positive.min(), 1e-300) > 50:
                ax.set_yscale("log")
            title = ("x ← block(x) (A recomputed)" if mode == "block" else "z ← units(z; A(x₀)) (fixed graph)")
            ax.set_title(f"{name} ({block.name}): {title}\ntrend: {rec['modes'][mode]['trend']}", fontsize=8)
            ax.set_xlabel("iteration t", fontsize=8)
            ax.set_ylabel("‖x_t‖ / ‖x_0‖", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
        records.append(rec)
    fig.suptitle(f"feature norm under repeated application, eval mode, {batch.x.shape[0]} images", fontsize=9)
    figure = save_figure(fig, out / "dynamics.png")
    return write_result(
        out / "dynamics.json", loaded, "dynamics", batch.info, iterations=iterations,
        definition={"ratio": "||x_t|| / ||x_0|| per image (norm over channels and positions), float64, eval",
                    "block": "x_{t+1} = block(x_t) (affinity recomputed from x_t)",
                    "fixed_graph": "A from x_0 once; z <- unit_n(z; A) for every unit, per iteration"},
        blocks=records, figures=[figure])
