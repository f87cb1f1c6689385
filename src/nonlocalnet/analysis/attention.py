"""``attention``: attention maps and feature maps (Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV
2021, Fig. 3).

For each block and image: the row ``A[q, :]`` of the block's affinity for a query position ``q`` — given as
image pixels (``--query y,x``, mapped to the feature cell that covers them) or, by default, the most salient
positions, i.e. the largest ``‖Y_q − X_q‖`` (the norm over channels of the block's response, ``Y`` its output
and ``X`` its input), at least two cells apart. The row is reshaped to the key grid (the pooled grid with
sub-sampling), upsampled bilinearly to the image size and overlaid on the image (Fig. 3B). Next to it, the
feature maps before and after the block as the channel norm ``‖X_i‖``, ``‖Y_i‖`` and ``‖Y_i − X_i‖``
(Fig. 3A).

3-D blocks (clips) use the query's frame: the key map of that frame, on the middle frame of the clip. 1-D
blocks and CGNL (no position graph) get the feature maps only. GC's unary graph has one row for every query
(``A = 1·aᵀ``: the map is GCNet's context attention ``a``); DNL's rows are those of the sum of its pairwise and
unary terms (each sums to 2); the JSON says so per block (``notes``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nonlocalnet.affinity import pooled_shape
from nonlocalnet.runs import Loaded

from .capture import capture_batch, dense_affinity
from .errors import AnalysisError, require_blocks
from .matrices import graph_notes, is_channel_graph
from .output import new_figure, safe_name, save_figure, write_result

__all__ = ["parse_query", "run_attention", "salient_positions"]


def parse_query(text: str) -> tuple[int, int]:
    try:
        y, x = (int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"--query expects 'y,x' (image pixels), got {text!r}") from None
    return y, x


def salient_positions(strength: np.ndarray, count: int, min_dist: int = 2) -> list[tuple[int, int]]:
    """The ``count`` largest cells of a 2-D map, greedily, at least ``min_dist`` cells apart (Chebyshev)."""
    order = np.argsort(-strength, axis=None, kind="stable")
    picked: list[tuple[int, int]] = []
    for flat in order:
        y, x = np.unravel_index(flat, strength.shape)
        if all(max(abs(y - py), abs(x - px)) >= min_dist for py, px in picked):
            picked.append((int(y), int(x)))
        if len(picked) >= count:
            break
    return picked


def _image_hw(img: torch.Tensor) -> tuple[int, int]:
    return int(img.shape[-2]), int(img.shape[-1])


def _display_image(img: torch.Tensor) -> np.ndarray:
    """uint8 ``(C, H, W)`` or ``(C, T, H, W)`` -> float RGB ``(H, W, 3)`` in [0, 1] (middle frame of a clip)."""
    if img.dim() == 4:
        img = img[:, img.shape[1] // 2]
    a = img.float().cpu().numpy() / 255.0
    if a.shape[0] == 1:
        a = np.repeat(a, 3, 0)
    return np.clip(a[:3].transpose(1, 2, 0), 0, 1)


def _upsample(m: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    t = torch.as_tensor(m, dtype=torch.float64)[None, None]
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def _key_grid(block, spatial: tuple[int, ...]) -> tuple[int, ...] | None:
    """The grid the key nodes lie on; ``None`` when they are not a grid (APNB's pyramid bins, External Attention's
    memory slots): their rows are then shown as a bar chart over the ``N'`` key nodes."""
    if block.edges.graph_mode.bipartite or getattr(block.edges, "pool_sizes", None) is not None:
        return None
    if block.edges.sub_sample:

        return pooled_shape(spatial)
    return spatial


def _feature_norm(t: torch.Tensor) -> np.ndarray:
    """``(C, *S)`` -> ``‖t_i‖`` over channels; a clip's middle frame; 1-D maps as a row."""
    n = t.double().norm(dim=0)
    if n.dim() == 3:
        n = n[n.shape[0] // 2]
    if n.dim() == 1:
        n = n[None]
    return n.cpu().numpy()


def run_attention(loaded: Loaded, out: Path, *, data_root: str | None = None, split: str = "test", images: int = 2,
                  queries: list[tuple[int, int]] | None = None, top: int = 2, batch=None) -> dict[str, Any]:
    require_blocks(loaded)
    out = Path(out)
    batch, io = capture_batch(loaded, batch, images=images, split=split, data_root=data_root,
                              what="`analyze attention`")
    img_hw = _image_hw(batch.images[0])
    bad = [(y, x) for y, x in (queries or []) if not (0 <= y < img_hw[0] and 0 <= x < img_hw[1])]
    if bad:
        raise AnalysisError(f"--query {bad[0][0]},{bad[0][1]} is outside the image: y must be in [0, {img_hw[0] - 1}] "
                            f"and x in [0, {img_hw[1] - 1}] (image pixels of the {img_hw[0]}x{img_hw[1]} input)")
    records, figures = [], []
    for name, block in loaded.blocks.items():
        xin, yout = io[name]
        spatial = tuple(int(s) for s in xin.shape[2:])
        keys = _key_grid(block, spatial)
        rec: dict[str, Any] = {"block": name, "preset": block.name, "feature_shape": list(spatial),
                               "key_shape": None if keys is None else list(keys), "images": []}
        has_graph = not is_channel_graph(block) and block.dim >= 2
        if not has_graph:
            rec["note"] = ("cgnl: no N x N' position graph (its graph is over positions x channels); feature maps "
                           "only" if is_channel_graph(block) else "1-D block: feature maps only")
        if graph_notes(block):
            rec["notes"] = list(graph_notes(block))
        a = None
        if has_graph:
            a = dense_affinity(block, xin)
        resp = (yout.double() - xin.double()).norm(dim=1).cpu().numpy()  # (B, *S)
        if not queries and float(resp.max()) == 0.0:
            rec.setdefault("notes", []).append(
                "the block's output equals its input (e.g. a zero-initialized output norm): no salient position; "
                "the queries shown are arbitrary")
        hf, wf = (spatial[-2], spatial[-1]) if len(spatial) >= 2 else (1, spatial[0])
        n_img = xin.shape[0]
        n_q = len(queries) if queries else top
        fig = new_figure(2.3 * (1 + (n_q if has_graph else 0) + 3) + 0.3, 2.4 * n_img + 0.4)
        axes = fig.subplots(n_img, 1 + (n_q if has_graph else 0) + 3, squeeze=False)
        for b in range(n_img):
            img = _display_image(batch.images[b])
            r = resp[b]
            t_mid = r.shape[0] // 2 if r.ndim == 3 else None
            r2 = r[t_mid] if t_mid is not None else (r[None] if r.ndim == 1 else r)
            if queries:
                cells = [(min(hf - 1, y * hf // img_hw[0]), min(wf - 1, x * wf // img_hw[1])) for y, x in queries]
                how = "given (image pixels)"
            else:
                cells = salient_positions(r2, top)
                how = "most salient: largest ||Y_q - X_q||"
            img_rec: dict[str, Any] = {"index": batch.indices[b], "label": int(batch.labels[b]), "queries": []}
            ax = axes[b][0]
            ax.imshow(img)
            ax.set_title(f"image {batch.indices[b]} (label {int(batch.labels[b])})", fontsize=8)
            colors = ["#ff2bd6", "#ff9900", "#00e5ff", "#7cff00", "#ffffff", "#ffe600"]
            col = 1
            for j, (qy, qx) in enumerate(cells):
                cy = (qy + 0.5) * img_hw[0] / hf - 0.5
                cx = (qx + 0.5) * img_hw[1] / wf - 0.5
                c = colors[j % len(colors)]
                ax.plot([cx], [cy], "o", ms=6, mfc=c, mec="k", mew=0.8)
                q_rec: dict[str, Any] = {"feature_yx": [qy, qx], "image_yx": [round(cy, 2), round(cx, 2)],
                                         "selected": how, "response_norm": float(r2[qy, qx])}
                if a is not None:
                    q = (t_mid * hf * wf if t_mid is not None else 0) + qy * wf + qx
                    row = a[b, q] if keys is None else a[b, q].reshape(keys)
                    if row.ndim == 3:
                        row = row[min(row.shape[0] - 1, t_mid * row.shape[0] // spatial[0])]
                    q_rec.update(query_index=int(q), row_sum=float(row.sum()), row_max=float(row.max()),
                                 row=np.round(row, 8).tolist())
                    axa = axes[b][col]
                    if keys is None:  # key nodes that are not a grid: the row over them
                        axa.bar(np.arange(row.shape[0]), row, width=1.0, color=c)
                    else:
                        axa.imshow(img)
                        axa.imshow(_upsample(row, img_hw), cmap="jet", alpha=0.5)
                        axa.plot([cx], [cy], "o", ms=7, mfc=c, mec="k", mew=1.0)
                    axa.set_title(f"A[q=({qy},{qx}), :]  max {row.max():.3g}", fontsize=8)
                    col += 1
                img_rec["queries"].append(q_rec)
            if a is not None:
                for k in range(col, 1 + n_q):  # fewer salient cells than asked (tiny maps)
                    axes[b][k].set_visible(False)
                col = 1 + n_q
            fx = _feature_norm(xin[b])
            fy = _feature_norm(yout[b])
            fd = _feature_norm(yout[b] - xin[b])
            vmax = max(fx.max(), fy.max())
            for ax_, m, title, vm in ((axes[b][col], fx, "||X|| before", vmax), (axes[b][col + 1], fy, "||Y|| after",
                                                                              vmax),
                                      (axes[b][col + 2], fd, "||Y - X|| (response)", None)):
                im = ax_.imshow(m, cmap="viridis", vmin=0, vmax=vm)
                ax_.set_title(title, fontsize=8)
                fig.colorbar(im, ax=ax_, shrink=0.8).ax.tick_params(labelsize=6)
            img_rec.update(feature_norm_before=np.round(fx, 6).tolist(), feature_norm_after=np.round(fy, 6).tolist(),
                           response_norm=np.round(fd, 6).tolist())
            rec["images"].append(img_rec)
        for row_axes in axes:
            for ax in row_axes:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle(f"{name} ({block.name}): attention rows of A (overlay) and channel-norm feature maps "
                     f"{hf}x{wf}", fontsize=9)
        figures.append(save_figure(fig, out / f"attention_{safe_name(name)}.png"))
        records.append(rec)
    return write_result(out / "attention.json", loaded, "attention", batch.info,
                        definition={"row": "A[q, :] on the key grid (over the N' key nodes when they are not a grid: "
                                           "pyramid bins, memory slots), from the block's input X (float64)",
                                    "saliency": "||Y_q - X_q|| over channels (the block's response at q)",
                                    "feature maps": "channel L2 norm ||X_i||, ||Y_i||, ||Y_i - X_i||"},
                        blocks=records, figures=figures)
