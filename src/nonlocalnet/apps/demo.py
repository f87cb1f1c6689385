"""The main job on the bundled default: ``make demo`` / ``nonlocalnet demo``.

Trains PreResNet-20 without a nonlocal block, with one NL block and with one SNL block (same place,
same seed, same schedule) on the bundled "same glyph?" task (docs/data.md), then writes
``<out>/report.html``: the metrics table, the training curves, and links to each nonlocal run's
analysis report (spectra, k-hop affinities, attention maps, filter gains, dynamics, cost).
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from nonlocalnet.analysis.html import curves_figure, img, para, table, write_page
from nonlocalnet.analysis.output import save_figure
from nonlocalnet.analysis.report import write_report
from nonlocalnet.runs import SHIPPED, checkpoint_config, load_config, read_metrics
from nonlocalnet.train import train

__all__ = ["DEFAULT_RUNS", "run_demo", "write_demo_report"]

DEFAULT_RUNS = ("baseline", "nl", "snl")


def _blocks_of(run_dir: Path) -> str:
    try:
        cfg, _ = checkpoint_config(run_dir / "last.safetensors")
    except (OSError, ValueError, RuntimeError):
        return "?"
    return "; ".join(f"{b.block} {b.options or ''}".strip() for b in cfg.model.blocks) or "none"


def write_demo_report(out: Path, runs: dict[str, Path], timings: dict[str, float],
                      analyses: dict[str, Path | str]) -> Path:
    """``out/report.html``: metrics table, curves (embedded PNG), links to the per-run analysis reports."""
    histories = {name: read_metrics(d) for name, d in runs.items()}
    rows, links = [], []
    for name, hist in histories.items():
        if not hist:
            rows.append([name, "no metrics", "", "", "", "", ""])
            continue
        last, best = hist[-1], max(hist, key=lambda h: h["top1"])
        rows.append([name, _blocks_of(runs[name]), len(hist), f"{last['train_loss']:.4f}", f"{last['top1']:.2f}",
                     f"{best['top1']:.2f} (epoch {best['epoch']})", f"{timings.get(name, float('nan')):.0f}"])
        link = analyses.get(name)
        if isinstance(link, Path):
            target = Path("..") / link.relative_to(out.parent) if link.is_relative_to(out.parent) else link.resolve()
            links.append(f'<li>{html.escape(name)}: <a href="{html.escape(str(target))}">analysis report</a></li>')
        elif link:
            links.append(f"<li>{html.escape(name)}: {html.escape(str(link))}</li>")
    curves = save_figure(curves_figure({n: h for n, h in histories.items() if h}, chance=50.0), out / "curves.png")
    body = [
        "<h1>nonlocalnet demo: the bundled \"same glyph?\" task</h1>",
        para("PreResNet-20 (baseline) and the same network with one NL or one SNL block after the 2nd residual "
             "block of stage 1, same seed and schedule (block options as listed). Two 5×5 glyphs at least 16 px "
             "apart; label = same glyph or not (chance = 50%). A local CNN must grow a receptive field spanning "
             "both glyphs; a nonlocal block relates them directly. See docs/data.md."),
        table(["model", "blocks (options)", "epochs", "final train loss", "final top-1 %", "best top-1 %",
               "time s"], rows, left=2),
        "<h2>Training curves</h2>", img(curves, "training curves"),
        "<h2>Analyses</h2>", "<ul>" + "".join(links) + "</ul>",
    ]
    return write_page(out / "report.html", "nonlocalnet demo", body)


def run_demo(out_root: str | Path = "runs", configs: str | Path | None = None, runs=DEFAULT_RUNS,
             overrides: list[str] | tuple[str, ...] = (), analyze: bool = True) -> Path:
    """Train ``runs`` from ``configs`` (default: the shipped ``demo`` configs) into ``out_root/demo-<name>``."""
    out_root, configs = Path(out_root), SHIPPED / "demo" if configs is None else Path(configs)
    run_dirs, timings, analyses = {}, {}, {}
    for name in runs:
        cfg_path = configs / f"{name}.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"demo config {cfg_path} not found (--configs DIR must hold "
                                    f"{', '.join(f'{r}.yaml' for r in runs)})")
        cfg = load_config(cfg_path, [*overrides, f"run.out={out_root / f'demo-{name}'}"])
        print(f"== demo: training {name} ({cfg.train.epochs} epochs) -> {cfg.run.out}", flush=True)
        t0 = time.perf_counter()
        train(cfg)
        timings[name] = time.perf_counter() - t0
        run_dirs[name] = Path(cfg.run.out)
        if analyze and cfg.model.blocks:
            print(f"== demo: analysis report for {name}", flush=True)
            analyses[name] = write_report(run_dirs[name], run_dirs[name] / "analysis")
        elif analyze:
            analyses[name] = "baseline: no nonlocal block to analyze"
    path = write_demo_report(out_root / "demo", run_dirs, timings, analyses)
    print(f"== demo report: {path}", flush=True)
    return path
