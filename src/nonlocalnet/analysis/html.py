"""One HTML writer for the pages people look at (the analysis report, the demo and sweep summaries):
self-contained pages with embedded PNGs, tables, and training curves."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from .output import new_figure

__all__ = ["CSS", "curves_figure", "fmt", "img", "para", "table", "write_page"]

CSS = """
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


def img(path: str | Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def para(text: str, cls: str | None = None) -> str:
    c = f' class="{cls}"' if cls else ""
    return f"<p{c}>{html.escape(text)}</p>"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    def cell(tag, v, i):
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{html.escape(str(v))}</{tag}>"

    out = ["<table><tr>" + "".join(cell("th", h, i) for i, h in enumerate(header)) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(r)) + "</tr>")
    return "".join(out) + "</table>"


def fmt(v: Any, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec)


def write_page(path: Path, title: str, body: Sequence[str]) -> Path:
    """A self-contained HTML page (``body``: HTML fragments) written to ``path``."""
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def curves_figure(histories: dict[str, list[dict[str, Any]]], chance: float | None = None):
    """Loss and top-1 against epoch for one or more runs (``{label: metrics records}``; label "" for one run:
    then train and test curves are both drawn)."""
    fig = new_figure(9.0, 2.8)
    ax1, ax2 = fig.subplots(1, 2)
    for label, recs in histories.items():
        ep = [r.get("epoch") for r in recs]
        if label:  # several runs: one training-loss and one test-accuracy curve each
            series = ((ax1, "train_loss", "-o", label), (ax2, "top1", "-o", label))
        else:
            series = ((ax1, "train_loss", "-o", "train_loss"), (ax1, "test_loss", "--s", "test_loss"),
                      (ax2, "train_top1", "-o", "train_top1"), (ax2, "top1", "--s", "top1"))
        for ax, key, style, name in series:
            ax.plot(ep, [r.get(key, np.nan) for r in recs], style, ms=3, label=name)
    if chance is not None:
        ax2.axhline(chance, color="gray", lw=0.8, ls="--")
    for ax, t in ((ax1, "loss (train)" if len(histories) > 1 else "loss"),
                  (ax2, "test top-1 (%)" if len(histories) > 1 else "top-1 (%)")):
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(t, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return fig
