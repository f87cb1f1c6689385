"""The main job on the bundled default: ``make demo`` / ``nonlocalnet demo``.

Trains PreResNet-20 without a nonlocal block, with one NL block and with one SNL block (same place,
same seed, same schedule) on the bundled "same glyph?" task (docs/data.md), then writes
``<out>/report.html``: the metrics table, the training curves, and links to each nonlocal run's
analysis report (spectra, k-hop affinities, attention maps, filter gains, dynamics, cost).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import time
from pathlib import Path

DEFAULT_RUNS = ("baseline", "nl", "snl")


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _blocks_of(run_dir: Path) -> str:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return "?"
    blocks = (yaml.safe_load(path.read_text()).get("model") or {}).get("blocks") or []
    return "; ".join(f"{b.get('block')} {b.get('options') or ''}".strip() for b in blocks) or "none"


def _curves_png(histories: dict[str, list[dict]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, hist in histories.items():
        if not hist:
            continue
        ep = [h["epoch"] for h in hist]
        axes[0].plot(ep, [h["train_loss"] for h in hist], marker="o", ms=3, label=name)
        axes[1].plot(ep, [h["top1"] for h in hist], marker="o", ms=3, label=name)
    axes[0].set(xlabel="epoch", ylabel="train loss", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    axes[1].axhline(50, color="gray", lw=0.8, ls="--")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_demo_report(out: Path, runs: dict[str, Path], timings: dict[str, float],
                      analyses: dict[str, Path | str]) -> Path:
    """``out/report.html``: metrics table, curves (embedded PNG), links to the per-run analysis reports."""
    histories = {name: _metrics(d) for name, d in runs.items()}
    rows = []
    for name, hist in histories.items():
        if not hist:
            rows.append(f"<tr><td>{name}</td><td colspan=7>no metrics</td></tr>")
            continue
        last, best = hist[-1], max(hist, key=lambda h: h["top1"])
        link = analyses.get(name)
        if isinstance(link, Path):
            target = Path("..") / link.relative_to(out.parent) if link.is_relative_to(out.parent) else link.resolve()
            cell = f'<a href="{html.escape(str(target))}">analysis report</a>'
        else:
            cell = html.escape(str(link or ""))
        rows.append(
            f"<tr><td>{name}</td><td>{html.escape(_blocks_of(runs[name]))}</td><td>{len(hist)}</td><td>{last['train_loss']:.4f}</td><td>{last['top1']:.2f}</td>"
            f"<td>{best['top1']:.2f} (epoch {best['epoch']})</td><td>{timings.get(name, float('nan')):.0f}</td>"
            f"<td>{cell}</td></tr>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>nonlocalnet demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>nonlocalnet demo: the bundled "same glyph?" task</h1>
<p>PreResNet-20 (baseline) and the same network with one NL or one SNL block after the 2nd residual block of
stage 1, same seed and schedule (block options as listed). Two 5&times;5 glyphs at least 16 px apart;
label = same glyph or not (chance = 50%). A local CNN must grow a receptive field spanning both glyphs;
a nonlocal block relates them directly. See docs/data.md.</p>
<table><tr><th>model</th><th>blocks (options)</th><th>epochs</th><th>final train loss</th><th>final top-1 %</th>
<th>best top-1 %</th><th>time s</th><th>analysis</th></tr>
{''.join(rows)}</table>
<h2>Training curves</h2><img alt="training curves" src="data:image/png;base64,{_curves_png(histories)}">
</body></html>"""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(page)
    return path


def run_demo(out_root: str | Path = "runs", configs: str | Path = "configs/demo", runs=DEFAULT_RUNS,
             overrides: list[str] | tuple[str, ...] = (), analyze: bool = True) -> Path:
    from nonlocalnet.analysis.report import write_report
    from nonlocalnet.train import load_config, train

    out_root, configs = Path(out_root), Path(configs)
    run_dirs, timings, analyses = {}, {}, {}
    for name in runs:
        cfg_path = configs / f"{name}.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"demo config {cfg_path} not found (run from the repository root, or pass "
                                    f"--configs DIR)")
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


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train baseline / +NL / +SNL on the bundled task and write a report")
    p.add_argument("--out", default="runs", help="root of the run directories (default: runs)")
    p.add_argument("--configs", default="configs/demo", help="directory with baseline.yaml, nl.yaml, snl.yaml")
    p.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="which configs to train")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--no-analysis", action="store_true", help="skip the per-run analysis reports")
    p.set_defaults(func=lambda a: (run_demo(a.out, a.configs, a.runs, a.set, not a.no_analysis), 0)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nonlocalnet-demo")
    add_demo_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["demo", *(argv or [])])
    return args.func(args)
