"""The main job on the bundled default: ``make demo`` / ``nonlocalnet demo``.

Trains PreResNet-8 without a nonlocal block, with one NL block and with one SNL block (same place,
same seed, same schedule) on the bundled "same glyph?" task with two glyph kinds, plus and cross (docs/data.md),
then writes
``<out>/report.html``: one sentence on what the page shows, the metrics table (mean ± sample standard
deviation over seeds when several run, and each seed's final top-1), the training curves (mean over seeds),
and links to the analysis report (spectra, k-hop affinities, attention maps, filter gains, dynamics, cost) of
each nonlocal model's first seed.

One seed per model by default (the configs' ``train.seed``, into ``<out_root>/demo-<name>``); ``seeds`` runs
each model with each seed (``<out_root>/demo-<name>-seed<s>``). On the shipped task the outcome was the same for
every seed measured (docs/results.md, "The demo"); on the four-glyph claims task one run's outcome can hinge on
its seed.
"""

from __future__ import annotations

import html
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from nonlocalnet.analysis.html import curves_figure, img, para, table, write_page
from nonlocalnet.analysis.output import save_figure
from nonlocalnet.analysis.report import write_report
from nonlocalnet.data.demo import GLYPH_NAMES
from nonlocalnet.runs import SHIPPED, checkpoint_config, load_config, read_metrics
from nonlocalnet.train import train

__all__ = ["DEFAULT_RUNS", "SOLVED_TOP1", "run_demo", "write_demo_report"]

DEFAULT_RUNS = ("baseline", "nl", "snl")
SOLVED_TOP1 = 90.0
"""A run "solved" the task when its final test top-1 is at least this (%), as in docs/results.md."""


def _blocks_of(run_dir: Path) -> str:
    try:
        cfg, _ = checkpoint_config(run_dir / "last.safetensors")
    except (OSError, ValueError, RuntimeError):
        return "?"
    return "; ".join(f"{b.block} {b.options or ''}".strip() for b in cfg.model.blocks) or "none"


def _mean_spread(values: Sequence[float], digits: int = 1) -> str:
    """``"m"`` for one value, ``"m ± s"`` (sample standard deviation) for several."""
    m = statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _mean_history(histories: Sequence[list[dict]]) -> list[dict]:
    """Per-epoch mean of ``train_loss`` and ``top1`` over runs (epochs that every run reached)."""
    n = min(len(h) for h in histories)
    return [{"epoch": histories[0][i]["epoch"],
             **{k: statistics.fmean(h[i][k] for h in histories) for k in ("train_loss", "top1")}}
            for i in range(n)]


def _arch_name(arch: str) -> str:
    return f"PreResNet-{arch[len('preresnet'):]}" if arch.startswith("preresnet") else arch


def _setup(run_dirs: Sequence[Path]) -> tuple[str, str, str]:
    """``(network, task, where the blocks sit)`` read from the runs' configs."""
    cfgs = []
    for d in run_dirs:
        try:
            cfgs.append(load_config(d / "config.yaml"))
        except (OSError, ValueError):
            continue
    if not cfgs:
        return "the network", "the bundled \"same glyph?\" task", "?"
    cfg = cfgs[0]
    opts, size = cfg.data.options, cfg.data.size or 32
    distance = opts.get("min_distance", size // 2)
    kinds = list(opts.get("glyphs") or GLYPH_NAMES)
    task = (f"{opts.get('train_size', 4000)} training images of {size}×{size} pixels, each with two 5×5 glyphs "
            f"(each a {', '.join(kinds[:-1])} or {kinds[-1]}) whose centers are at least {distance:g} px apart, "
            f"label = same glyph or not, {cfg.train.epochs} "
            f"epoch{'s' if cfg.train.epochs != 1 else ''}")
    places = {", ".join(f"{k} {v}" for k, v in b.to_dict().items()
                        if k not in ("block", "options") and not (k in ("units", "count") and v == 1))
              for c in cfgs for b in c.model.blocks}
    return _arch_name(cfg.model.arch), task, "; ".join(sorted(places)) or "none"


def write_demo_report(out: Path, runs: dict[str, list[Path]], timings: dict[str, list[float]],
                      analyses: dict[str, Path | str]) -> Path:
    """``out/report.html``: what it shows, the metrics table over seeds, mean curves (embedded PNG), links to
    the analysis reports. ``runs``/``timings``: per model, one run directory / seconds per seed."""
    rows, links, curves, finals = [], [], {}, {}
    for name, dirs in runs.items():
        hists = [read_metrics(d) for d in dirs]
        done = [h for h in hists if h]
        if not done:
            rows.append([name, "no metrics", len(dirs), "", "", "", "", "", ""])
            continue
        final = [h[-1]["top1"] for h in done]
        finals[name] = final
        best = [max(h, key=lambda r: r["top1"]) for h in done]
        solved = sum(v >= SOLVED_TOP1 for v in final)
        per_seed = " / ".join(f"{v:.1f}" for v in final) if len(final) > 1 else ""
        times = timings.get(name) or []
        rows.append([name, _blocks_of(dirs[0]), len(done), len(done[0]),
                     _mean_spread([h[-1]["train_top1"] for h in done]), _mean_spread(final), per_seed,
                     _mean_spread([b["top1"] for b in best]), f"{solved}/{len(done)}",
                     f"{statistics.fmean(times):.0f}" if times else ""])
        curves[f"{name} (mean of {len(done)})" if len(done) > 1 else name] = _mean_history(done)
        link = analyses.get(name)
        if isinstance(link, Path):
            target = Path("..") / link.relative_to(out.parent) if link.is_relative_to(out.parent) else link.resolve()
            links.append(f'<li>{html.escape(name)}: <a href="{html.escape(str(target))}">analysis report</a></li>')
        elif link:
            links.append(f"<li>{html.escape(name)}: {html.escape(str(link))}</li>")
    figure = save_figure(curves_figure(curves, chance=50.0), out / "curves.png") if curves else None
    network, task, where = _setup([d[0] for d in runs.values() if d])
    seeds = max((len(d) for d in runs.values()), default=0)
    over = f"mean over {seeds} seeds" if seeds > 1 else "one seed"
    measured = "; ".join(f"{n} {statistics.fmean(v):.1f} %" for n, v in finals.items())
    body = [
        "<h1>nonlocalnet demo: the bundled \"same glyph?\" task</h1>",
        para(f"You are looking at how well {network} without a nonlocal block (baseline) and with one nonlocal "
             "block (NL, SNL: the blocks column) tells whether two far-apart glyphs in an image are the same shape "
             "(test accuracy, chance = 50 %): a plain CNN must relate them through its deep layers, a nonlocal "
             "block relates them directly."),
        para(f"Here, final test top-1 ({over}): {measured}. A run counts as solving the task at ≥ "
             f"{SOLVED_TOP1:g} % test top-1. A run near 50 % test top-1 with a high training top-1 has "
             f"memorized its training images instead."),
        para(f"Setup: {task}; the blocks sit at {where}; every model has the same seed(s) and schedule (block "
             f"options as listed); docs/data.md describes the task."
             + (" This is one seed; docs/results.md (\"The demo\") lists the outcome for every seed measured, and "
                "`nonlocalnet demo --seeds 0 1 2 3 4` trains every model with several." if seeds <= 1 else "")),
        table(["model", "blocks (options)", "seeds", "epochs", "final train top-1 %", "final test top-1 %",
               "per seed", "best test top-1 %", f"solved (≥ {SOLVED_TOP1:g} %)", "time s / run"], rows, left=2),
        "<h2>Training curves</h2>", img(figure, "training curves") if figure else para("no metrics yet"),
        "<h2>Analyses</h2>", "<ul>" + "".join(links) + "</ul>",
    ]
    return write_page(out / "report.html", "nonlocalnet demo", body)


def run_demo(out_root: str | Path = "runs", configs: str | Path | None = None, runs=DEFAULT_RUNS,
             overrides: list[str] | tuple[str, ...] = (), analyze: bool = True,
             seeds: Sequence[int] | None = None) -> Path:
    """Train ``runs`` from ``configs`` (default: the shipped ``demo`` configs) into ``out_root/demo-<name>``,
    or, with several ``seeds``, into ``out_root/demo-<name>-seed<s>``; the analysis report covers the first
    seed of each model that has a nonlocal block."""
    out_root, configs = Path(out_root), SHIPPED / "demo" if configs is None else Path(configs)
    seeds = list(seeds) if seeds else []
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"demo: seeds must be distinct, got {seeds}")
    for name in runs:
        if not (configs / f"{name}.yaml").is_file():
            raise FileNotFoundError(f"demo config {configs / f'{name}.yaml'} not found (--configs DIR must hold "
                                    f"{', '.join(f'{r}.yaml' for r in runs)})")
    run_dirs, timings, analyses = {}, {}, {}
    for name in runs:
        run_dirs[name], timings[name] = [], []
        for i, seed in enumerate(seeds or [None]):
            out = out_root / (f"demo-{name}" if len(seeds) <= 1 else f"demo-{name}-seed{seed}")
            extra = [] if seed is None else [f"train.seed={seed}"]
            cfg = load_config(configs / f"{name}.yaml", [*overrides, *extra, f"run.out={out}"])
            print(f"== demo: training {name} seed {cfg.train.seed} ({cfg.train.epochs} epochs) -> {cfg.run.out}",
                  flush=True)
            t0 = time.perf_counter()
            train(cfg)
            timings[name].append(time.perf_counter() - t0)
            run_dirs[name].append(Path(cfg.run.out))
            if analyze and i == 0 and cfg.model.blocks:
                print(f"== demo: analysis report for {name}", flush=True)
                analyses[name] = write_report(out, out / "analysis")
            elif analyze and i == 0:
                analyses[name] = "baseline: no nonlocal block to analyze"
    path = write_demo_report(out_root / "demo", run_dirs, timings, analyses)
    print(f"== demo report: {path}", flush=True)
    return path
