"""``report``: one self-contained HTML page with every analysis of a run (images embedded as base64 data URIs).

:func:`write_report` runs ``spectrum``, ``affinity``, ``attention``, ``filter``, ``dynamics`` and ``cost`` into
sub-directories of ``out_dir`` (each with its PNGs and JSON) and writes ``out_dir/report.html``. The data is
loaded once; when it cannot be loaded, the data-based sections say what they need and the rest still
renders (``filter`` then shows the gain curves without the λ histogram).
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from .common import AnalysisError, DataError, Loaded, load_batch, load_run, new_figure, save_figure

__all__ = ["write_report"]

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 12px 20px 40px; color: #1d1d1f; background: #fff; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 3px;
margin-top: 1.8em; } h3 { font-size: 1.02em; margin-bottom: 0.3em; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0 14px; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 0.86em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; } th { background: #f3f3f3; }
td.l, th.l { text-align: left; } .note { color: #7a4b00; background: #fff6e0; padding: 6px 10px;
border-left: 3px solid #e0a000; } .muted { color: #666; font-size: 0.9em; } code { font-size: 0.92em; }
nav a { margin-right: 12px; }
"""


def _img(path: str | Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _p(text: str, cls: str | None = None) -> str:
    c = f' class="{cls}"' if cls else ""
    return f"<p{c}>{html.escape(text)}</p>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    def cell(tag, v, i):
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(str(v))}</{tag}>"

    out = ["<table><tr>" + "".join(cell("th", h, i) for i, h in enumerate(header)) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(r)) + "</tr>")
    return "".join(out) + "</table>"


def _g(v: Any, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec)


def _metrics_section(loaded: Loaded, out: Path) -> list[str]:
    path = loaded.run_dir / "metrics.jsonl" if loaded.run_dir else None
    if path is None or not path.is_file():
        return [_p("no metrics.jsonl next to the checkpoint", "muted")]
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not recs:
        return [_p("metrics.jsonl is empty", "muted")]
    ep = [r.get("epoch") for r in recs]
    fig = new_figure(9.0, 2.8)
    ax1, ax2 = fig.subplots(1, 2)
    for key, style in (("train_loss", "-o"), ("test_loss", "--s")):
        ax1.plot(ep, [r.get(key, np.nan) for r in recs], style, ms=3, label=key)
    for key, style in (("train_top1", "-o"), ("top1", "--s")):
        ax2.plot(ep, [r.get(key, np.nan) for r in recs], style, ms=3, label=key)
    for ax, t in ((ax1, "loss"), (ax2, "top-1 (%)")):
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(t, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    png = save_figure(fig, out / "metrics.png")
    last = recs[-1]
    rows = [[k, _g(last.get(k))] for k in ("epoch", "train_loss", "test_loss", "train_top1", "top1", "best_top1",
                                           "best_epoch") if k in last]
    return [_img(png, "training curves"), _table(["last epoch", "value"], rows)]


def _spectrum_section(d: dict[str, Any]) -> list[str]:
    parts = [_p("Eigenvalues of the symmetric part W̃ = (W + Wᵀ)/2 of W = W_t W_g (C×C) for every unit and filter "
                "term, top k by magnitude (seed 000 §3.1, Figs. 1–4). Mostly negative: damping; large positive: "
                "possible blow-up when stacking.")]
    rows = []
    for b in d["blocks"]:
        if not b.get("applies", True):
            parts.append(_p(b["note"], "note"))
        for m in b["matrices"]:
            ev = m["eigenvalues"]
            rows.append([b["block"], m["unit"], f"sym({m['product']}) [{m['filter_term']}]",
                         m["w_key"] or "— (no W_z)", m["top_positive"], m["top_negative"], _g(ev[0] if ev else None),
                         _g(m["sum_top"])])
    parts.append(_table(["block", "unit", "matrix", "W key", "+", "−", "largest |λ|", "sum"], rows, left=4))
    figs = [f for f in d["figures"] if "evolution" not in Path(f).name]
    parts += [_img(f, Path(f).stem) for f in figs]
    evo = [f for f in d["figures"] if "evolution" in Path(f).name]
    if evo:
        parts.append(f"<h3>Evolution over epochs {html.escape(str(d['evolution']['epochs']))}</h3>")
        parts += [_img(f, Path(f).stem) for f in evo]
    for n in d.get("notes", []):
        parts.append(_p(n, "note"))
    return parts


def _affinity_section(d: dict[str, Any]) -> list[str]:
    parts = [_p("Histograms of the entries of A, A², A³, A⁴ over a batch (stable hypothesis A^k ≈ A, seed 002 "
                "Fig. 2); rel_fro = ‖A^k − A‖_F/‖A‖_F (mean over images), TV = total variation between the "
                "normalized histograms, W1 = 1-Wasserstein distance between the entry distributions / mean|A|.")]
    rows = []
    for b in d["blocks"]:
        if "stats" not in b:
            parts.append(_p(f"{b['block']}: {b.get('note', '')}", "note"))
            continue
        for k, v in b["stats"]["distance"].items():
            rows.append([b["block"], f"A^{k}", _g(v["rel_fro"]), _g(v["tv"]), _g(v["w1_rel"])])
    if rows:
        parts.append(_table(["block", "power", "rel_fro", "TV", "W1/mean|A|"], rows, left=2))
    parts += [_img(f, Path(f).stem) for f in d["figures"]]
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
    parts = [_p(f"Input batch {d['batch']} × {tuple(d['input_shape'])} on {d['device']}. FLOPs counted with "
                f"FlopCounterMode (2 per multiply-add; GMACs is seed 003 Table 6's 'Flops (G)'); {measured}."),
             _table(["model", "params (M)", "GFLOPs", "GMACs", "peak inference MiB (block rows: block alone)"], rows)]
    rows2 = []
    for b in d["blocks"]:
        fd = b["flops_dense"]
        rows2.append([b["block"], b["n"], b["n_keys"], b["backend_auto"], f"{b['flops_auto'] / 1e6:.3f}",
                      "—" if fd is None else f"{fd / 1e6:.3f}", m(b.get("peak_inference_auto_bytes")),
                      m(b.get("peak_inference_dense_bytes")), m(b.get("peak_training_auto_bytes")),
                      m(b.get("peak_training_dense_bytes"))])
    parts.append(_table(["block", "N", "N'", "auto path", "MFLOPs auto", "MFLOPs dense", "inf. MiB auto",
                         "inf. MiB dense", "train MiB auto", "train MiB dense"], rows2))
    return parts


def _figures(d: dict[str, Any]) -> list[str]:
    return [_img(f, Path(f).stem) for f in d["figures"]]


def write_report(run_dir: str | Path, out_dir: str | Path, data_root: str | None = None, *,
                 overrides: Sequence[str] = (), images: int = 8, iterations: int = 50, top: int = 32,
                 device: str = "cpu", memory: bool = True) -> Path:
    """Run every analysis on ``run_dir`` (a run dir or a checkpoint) and write ``out_dir/report.html``.

    Returns the path of the HTML file. Raises :class:`~nonlocalnet.analysis.common.NoBlockError` for a model
    without nonlocal blocks; a dataset that cannot be loaded only skips the data-based sections.
    """
    from .affinity_powers import run_affinity
    from .attention import run_attention
    from .cost import run_cost
    from .dynamics import run_dynamics
    from .graph_filter import run_filter
    from .spectrum import run_spectrum

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    loaded = load_run(run_dir, overrides, device=device)
    sections: list[tuple[str, str, list[str]]] = []
    sections.append(("metrics", "Training", _metrics_section(loaded, out)))
    sections.append(("spectrum", "Spectrum of the weights",
                     _spectrum_section(run_spectrum(loaded, out / "spectrum", top=top))))
    batch = None
    data_error = None
    try:
        batch = load_batch(loaded.cfg, count=images, data_root=data_root, what="the report",
                           device=device)
    except DataError as e:
        data_error = str(e)

    def data_section(key: str, title: str, fn, render) -> None:
        if batch is None:
            sections.append((key, title, [_p(f"skipped: {data_error}", "note")]))
            return
        try:
            sections.append((key, title, render(fn())))
        except AnalysisError as e:
            sections.append((key, title, [_p(f"skipped: {e}", "note")]))

    data_section("affinity", "Affinity powers (stable hypothesis)",
                 lambda: run_affinity(loaded, out / "affinity", batch=batch), _affinity_section)
    data_section("attention", "Attention maps and feature maps",
                 lambda: run_attention(loaded, out / "attention", images=2, batch=batch),
                 lambda d: [_p("Rows of A for the most salient query positions (largest ‖Y_q − X_q‖), upsampled "
                               "and overlaid on the image (seed 003 Fig. 3B); channel-norm feature maps before and "
                               "after the block (Fig. 3A).")] + _figures(d))
    filt = run_filter(loaded, out / "filter", images=min(images, 4), batch=batch, use_data=batch is not None)
    filt_parts = [_p("Spectral response of each unit's graph filter: gain ‖Σ_t B_t(λ) W_t‖₂ (spectral norm of "
                     "the summed C×C_v matrices), ‖G(λ)‖₂ with G = Σ_t B_t(λ) W_t W_g, and the eigenvalue range "
                     "of sym G(λ); below, the eigenvalues λ of A on real inputs.")] + _figures(filt)
    filt_parts += [_p(b["note"], "note") for b in filt["blocks"] if not b.get("applies", True)]
    if batch is None:
        filt_parts.insert(0, _p(f"λ histograms skipped: {data_error}", "note"))
    sections.append(("filter", "Graph filter in the spectral domain", filt_parts))
    data_section("dynamics", "Dynamics (diffusion view)",
                 lambda: run_dynamics(loaded, out / "dynamics", batch=batch, iterations=iterations),
                 lambda d: [_p("‖x_t‖/‖x_0‖ when a trained block is applied over and over to its real inputs "
                               "(seed 000: decay = damping, growth = instability)."),
                            _table(["block", "mode", "trend", "final ‖x_T‖/‖x_0‖"],
                                   [[b["block"], m, b["modes"][m]["trend"], _g(b["modes"][m]["final_mean"])]
                                    for b in d["blocks"] for m in ("block", "fixed_graph")], left=3)]
                 + _figures(d))
    sections.append(("cost", "Cost (parameters, FLOPs, memory)",
                     _cost_section(run_cost(loaded, out / "cost", memory=memory, device=device))))

    info = loaded.describe()
    head = _table(["", ""], [["run", info["source"]], ["checkpoint", info["checkpoint"]],
                             ["config", info["config"]], ["epoch", info["epoch"]], ["arch", info["arch"]],
                             ["blocks", ", ".join(f"{k} ({v})" for k, v in info["blocks"].items())],
                             ["data", "—" if batch is None else batch.info["needs"]]], left=2)
    nav = "<nav>" + "".join(f'<a href="#{k}">{html.escape(t)}</a>' for k, t, _ in sections) + "</nav>"
    body = [f"<h1>nonlocalnet analysis: {html.escape(Path(info['source']).name)}</h1>", head, nav]
    for note in loaded.notes:
        body.append(_p(note, "note"))
    for key, title, parts in sections:
        body.append(f'<h2 id="{key}">{html.escape(title)}</h2>')
        body.extend(parts)
    body.append(_p(f"generated by nonlocalnet analyze report in {time.time() - t0:.1f} s; the numbers are in "
                   "the JSON files next to this page.", "muted"))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>nonlocalnet analysis: {html.escape(info['source'])}</title><style>{_CSS}</style></head>"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
