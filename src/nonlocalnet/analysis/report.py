"""``report``: one self-contained HTML page with every analysis of a run (images embedded as base64 data URIs).

:func:`write_report` runs ``spectrum``, ``affinity``, ``attention``, ``filter``, ``dynamics`` and ``cost`` into
sub-directories of ``out_dir`` (each with its PNGs and JSON) and writes ``out_dir/report.html``. The data is
loaded once; when it cannot be loaded, the data-based sections say what they need and the rest still
renders (``filter`` then shows the gain curves without the λ histogram).
"""

from __future__ import annotations

import html
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nonlocalnet.runs import Loaded, load_run, read_metrics

from .affinity_powers import run_affinity
from .attention import run_attention
from .capture import Batch, load_batch
from .cost import run_cost
from .dynamics import run_dynamics
from .errors import AnalysisError, DataError, require_blocks
from .graph_filter import run_filter
from .html import curves_figure, fmt, img, para, table, write_page
from .output import save_figure
from .spectrum import run_spectrum

__all__ = ["write_report"]


def log(msg: str) -> None:
    """Progress on stderr, a line per step (also when stderr is not a terminal)."""
    print(f"nonlocalnet: {msg}", file=sys.stderr, flush=True)

def _metrics_section(loaded: Loaded, out: Path) -> list[str]:
    recs = read_metrics(loaded.run_dir) if loaded.run_dir else []
    if not recs:
        return [para("no metrics.jsonl next to the checkpoint (or it is empty)", "muted")]
    png = save_figure(curves_figure({"": recs}), out / "metrics.png")
    last = recs[-1]
    rows = [[k, fmt(last.get(k))] for k in ("epoch", "train_loss", "test_loss", "train_top1", "top1", "best_top1",
                                           "best_epoch") if k in last]
    return [img(png, "training curves"), table(["last epoch", "value"], rows)]


def _spectrum_section(d: dict[str, Any]) -> list[str]:
    parts = [para("Eigenvalues of the symmetric part W̃ = (W + Wᵀ)/2 of W = W_t W_g (C×C) for every unit and filter "
                "term, top k by magnitude (Tao et al. 2018 §3.1, Figs. 1–4). Mostly negative: damping; large positive: "
                "possible blow-up when stacking.")]
    rows = []
    for b in d["blocks"]:
        if not b.get("applies", True):
            parts.append(para(b["note"], "note"))
        for m in b["matrices"]:
            ev = m["eigenvalues"]
            rows.append([b["block"], m["unit"], f"sym({m['product']}) [{m['filter_term']}]",
                         m["w_key"] or "— (no W_z)", m["top_positive"], m["top_negative"], fmt(ev[0] if ev else None),
                         fmt(m["sum_top"])])
    parts.append(table(["block", "unit", "matrix", "W key", "+", "−", "largest |λ|", "sum"], rows, left=4))
    figs = [f for f in d["figures"] if "evolution" not in Path(f).name]
    parts += [img(f, Path(f).stem) for f in figs]
    evo = [f for f in d["figures"] if "evolution" in Path(f).name]
    if evo:
        parts.append(f"<h3>Evolution over epochs {html.escape(str(d['evolution']['epochs']))}</h3>")
        parts += [img(f, Path(f).stem) for f in evo]
    for n in d.get("notes", []):
        parts.append(para(n, "note"))
    return parts


def _affinity_section(d: dict[str, Any]) -> list[str]:
    parts = [para("Histograms of the entries of A, A², A³, A⁴ over a batch (stable hypothesis A^k ≈ A, "
                "the ICLR 2020 spectral nonlocal submission, Fig. 2); rel_fro = ‖A^k − A‖_F/‖A‖_F (mean over "
                "images), TV = total variation between the normalized histograms, W1 = 1-Wasserstein distance "
                "between the entry distributions / mean|A|.")]
    rows = []
    for b in d["blocks"]:
        if "stats" not in b:
            parts.append(para(f"{b['block']}: {b.get('note', '')}", "note"))
            continue
        for k, v in b["stats"]["distance"].items():
            rows.append([b["block"], f"A^{k}", fmt(v["rel_fro"]), fmt(v["tv"]), fmt(v["w1_rel"])])
    if rows:
        parts.append(table(["block", "power", "rel_fro", "TV", "W1/mean|A|"], rows, left=2))
    parts += [img(f, Path(f).stem) for f in d["figures"]]
    return parts


def _cost_section(d: dict[str, Any]) -> list[str]:
    bb, tot = d["backbone"], d["total"]
    mib = 1 / 2**20

    def m(v):
        return "—" if v is None else f"{v * mib:.2f}"

    rows = [[f"backbone ({d['run']['arch']})", f"{bb['params'] / 1e6:.4f}", f"{bb['flops'] / 1e9:.4f}",
             f"{bb['flops'] / 2e9:.4f}", m(bb.get("peak_inference_bytes"))]]
    for b in d["blocks"]:
        rows.append([f"+ {b['block']} ({b['preset']}, {b['backend_auto']})", f"+{b['params'] / 1e6:.4f}",
                     f"+{b['flops_auto'] / 1e9:.4f}", f"+{b['flops_auto'] / 2e9:.4f}",
                     m(b.get("peak_inference_auto_bytes"))])
    rows.append(["total", f"{tot['params'] / 1e6:.4f}", f"{tot['flops'] / 1e9:.4f}", f"{tot['flops'] / 2e9:.4f}",
                 m(tot.get("peak_inference_bytes"))])
    measured = "peak memory measured" if "peak_inference_bytes" in tot else "peak memory not measured"
    parts = [para(f"Input batch {d['batch']} × {tuple(d['input_shape'])} on {d['device']}. FLOPs counted with "
                f"FlopCounterMode (2 per multiply-add; GMACs is Zhu et al. 2021 Table 6's 'Flops (G)'); {measured}."),
             table(["model", "params (M)", "GFLOPs", "GMACs", "peak inference MiB (block rows: block alone)"], rows)]
    rows2 = []
    for b in d["blocks"]:
        fd = b["flops_dense"]
        rows2.append([b["block"], b["n"], b["n_keys"], b["backend_auto"], f"{b['flops_auto'] / 1e6:.3f}",
                      "—" if fd is None else f"{fd / 1e6:.3f}", m(b.get("peak_inference_auto_bytes")),
                      m(b.get("peak_inference_dense_bytes")), m(b.get("peak_training_auto_bytes")),
                      m(b.get("peak_training_dense_bytes"))])
    parts.append(table(["block", "N", "N'", "auto path", "MFLOPs auto", "MFLOPs dense", "inf. MiB auto",
                         "inf. MiB dense", "train MiB auto", "train MiB dense"], rows2))
    return parts


def _figures(d: dict[str, Any]) -> list[str]:
    return [img(f, Path(f).stem) for f in d["figures"]]


def write_report(run_dir: str | Path | Loaded, out_dir: str | Path, data_root: str | None = None, *,
                 overrides: Sequence[str] = (), images: int = 8, iterations: int = 50, top: int = 32,
                 device: str = "cpu", memory: bool = True, batch: Batch | None = None) -> Path:
    """Run every analysis on ``run_dir`` (a run dir or a checkpoint, or a model given in Python:
    :meth:`~nonlocalnet.runs.Loaded.from_model`) and write ``out_dir/report.html``. ``batch``: the data the
    data-based sections look at, instead of the run's (:meth:`~nonlocalnet.analysis.Batch.from_tensor`).

    Returns the path of the HTML file. Raises :class:`~nonlocalnet.analysis.common.NoBlockError` for a model
    without nonlocal blocks; a dataset that cannot be loaded only skips the data-based sections.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    loaded = run_dir if isinstance(run_dir, Loaded) else load_run(run_dir, overrides, device=device)
    require_blocks(loaded)
    log(f"report: {loaded.source} ({len(loaded.blocks)} block(s)) -> {out}")
    sections: list[tuple[str, str, list[str]]] = []
    sections.append(("metrics", "Training", _metrics_section(loaded, out)))
    log("report: spectrum of the weights")
    sections.append(("spectrum", "Spectrum of the weights",
                     _spectrum_section(run_spectrum(loaded, out / "spectrum", top=top))))
    data_error = None
    if batch is not None:
        batch = batch.head(images)
    else:
        try:
            batch = load_batch(loaded.cfg, count=images, data_root=data_root, what="the report",
                               device=device)
        except DataError as e:
            data_error = str(e)

    def data_section(key: str, title: str, fn, render) -> None:
        log(f"report: {title.lower()}")
        if batch is None:
            sections.append((key, title, [para(f"skipped: {data_error}", "note")]))
            return
        try:
            sections.append((key, title, render(fn())))
        except AnalysisError as e:
            sections.append((key, title, [para(f"skipped: {e}", "note")]))

    data_section("affinity", "Affinity powers (stable hypothesis)",
                 lambda: run_affinity(loaded, out / "affinity", batch=batch), _affinity_section)
    data_section("attention", "Attention maps and feature maps",
                 lambda: run_attention(loaded, out / "attention", images=2, batch=batch),
                 lambda d: [para("Rows of A for the most salient query positions (largest ‖Y_q − X_q‖), upsampled "
                               "and overlaid on the image (Zhu et al. 2021, Fig. 3B); channel-norm feature maps "
                               "before and after the block (Fig. 3A).")] + _figures(d))
    log("report: graph filter in the spectral domain")
    filt = run_filter(loaded, out / "filter", images=min(images, 4), batch=batch, use_data=batch is not None)
    filt_parts = [para("Spectral response of each unit's graph filter: gain ‖Σ_t B_t(λ) W_t‖₂ (spectral norm of "
                     "the summed C×C_v matrices), ‖G(λ)‖₂ with G = Σ_t B_t(λ) W_t W_g, and the eigenvalue range "
                     "of sym G(λ); below, the eigenvalues λ of A on real inputs.")] + _figures(filt)
    filt_parts += [para(b["note"], "note") for b in filt["blocks"] if not b.get("applies", True)]
    if batch is None:
        filt_parts.insert(0, para(f"λ histograms skipped: {data_error}", "note"))
    sections.append(("filter", "Graph filter in the spectral domain", filt_parts))
    data_section("dynamics", "Dynamics (diffusion view)",
                 lambda: run_dynamics(loaded, out / "dynamics", batch=batch, iterations=iterations),
                 lambda d: [para("‖x_t‖/‖x_0‖ when a trained block is applied over and over to its real inputs "
                               "(Tao et al. 2018: decay = damping, growth = instability)."),
                            table(["block", "mode", "trend", "final ‖x_T‖/‖x_0‖"],
                                   [[b["block"], m, b["modes"][m]["trend"], fmt(b["modes"][m]["final_mean"])]
                                    for b in d["blocks"] for m in ("block", "fixed_graph")], left=3)]
                 + _figures(d))
    log("report: cost (parameters, FLOPs, memory)")
    sections.append(("cost", "Cost (parameters, FLOPs, memory)",
                     _cost_section(run_cost(loaded, out / "cost", memory=memory, device=device))))

    info = loaded.describe()
    head = table(["", ""], [["run", info["source"]], ["checkpoint", info["checkpoint"]],
                             ["config", info["config"]], ["epoch", info["epoch"]], ["arch", info["arch"]],
                             ["blocks", ", ".join(f"{k} ({v})" for k, v in info["blocks"].items())],
                             ["data", "—" if batch is None else batch.info["needs"]]], left=2)
    nav = "<nav>" + "".join(f'<a href="#{k}">{html.escape(t)}</a>' for k, t, _ in sections) + "</nav>"
    body = [f"<h1>nonlocalnet analysis: {html.escape(Path(info['source']).name)}</h1>", head, nav]
    for note in loaded.notes:
        body.append(para(note, "note"))
    for key, title, parts in sections:
        body.append(f'<h2 id="{key}">{html.escape(title)}</h2>')
        body.extend(parts)
    body.append(para(f"generated by nonlocalnet analyze report in {time.time() - t0:.1f} s; the numbers are in "
                   "the JSON files next to this page.", "muted"))
    return write_page(out / "report.html", f"nonlocalnet analysis: {info['source']}", body)
