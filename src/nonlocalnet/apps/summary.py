"""``nonlocalnet summarize``: a table and a plot over runs, grouped by config, with mean ± std over seeds.

Runs whose configs differ only in ``train.seed`` (and ``run.*``) form one group — e.g. the seeds of one config
of a ``nonlocalnet sweep``. Per group: the number of seeds; final and best test top-1 (mean ± sample std);
how many runs reached ``reach`` % and the mean epoch at which they first did; how many *solved* the task (final
top-1 >= ``reach``), that success rate with its 95 % Wilson score interval (:func:`wilson_interval`) and the mean
final top-1 of the solving runs; seconds per epoch; parameters
and FLOPs (counted on the model built from the config, one sample of the data's input shape); and, where the
config reproduces a paper's row (its ``paper`` key, docs/configs.md), the paper's number beside ours.
Writes ``summary.md``, ``summary.json`` and ``curves.png`` (test top-1 per epoch, mean with a ±1 std band).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nonlocalnet.analysis.output import new_figure, save_figure, write_json
from nonlocalnet.profiling import count_flops
from nonlocalnet.runs import (
    ConfigError,
    build_model_from_config,
    config_to_dict,
    input_shape_for,
    load_config,
    num_classes_for,
    read_metrics,
    require_directory,
)
from nonlocalnet.runs.layout import CONFIG_FILE

__all__ = ["fisher_exact", "group_runs", "holm", "summarize", "wilson_interval"]

#: the two-sided 95 % normal quantile, Phi^-1(0.975)
Z95 = 1.959963984540054


def _identity(cfg) -> str:
    d = config_to_dict(cfg)
    d.pop("run", None)
    d["train"].pop("seed", None)
    return json.dumps(d, sort_keys=True)


def _log(msg: str) -> None:
    print(f"nonlocalnet summarize: {msg}", file=sys.stderr, flush=True)


def group_runs(run_dirs: Sequence[str | Path], log: Callable[[str], None] = _log) -> list[dict[str, Any]]:
    """``[{"label", "config", "runs": [(seed, run_dir, metrics)]}]`` in order of first appearance. A run given
    twice (under any path) is counted once, with a note to ``log``."""
    groups: dict[str, dict[str, Any]] = {}
    seen: dict[Path, Path] = {}
    for d in map(Path, run_dirs):
        if not (d / CONFIG_FILE).is_file():
            raise ConfigError(f"summarize: {d} is not a run directory (no {CONFIG_FILE}); pass directories "
                              "written by `nonlocalnet train` or `nonlocalnet sweep`")
        real = d.resolve()
        if real in seen:
            log(f"{d} is given twice (also as {seen[real]}): counted once" if str(d) != str(seen[real])
                else f"{d} is given twice: counted once")
            continue
        seen[real] = d
        cfg = load_config(d / CONFIG_FILE)
        metrics = read_metrics(d, required=("epoch", "top1"))
        if not metrics:
            raise ConfigError(f"summarize: {d} has no completed epoch (empty or missing metrics.jsonl)")
        g = groups.setdefault(_identity(cfg), {"config": cfg, "runs": [], "parents": set()})
        g["runs"].append((cfg.train.seed, d, metrics))
        g["parents"].add(d.parent.name if d.name.startswith("seed") else d.name)
    out = []
    for g in groups.values():
        label = next(iter(g["parents"])) if len(g["parents"]) == 1 else (g["config"].description or "run")
        out.append({"label": label, "config": g["config"], "runs": sorted(g["runs"], key=lambda r: r[0])})
    return out


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (E. B. Wilson, "Probable inference, the law of succession, and statistical
    inference", JASA 22, 1927) for a binomial proportion: ``(low, high)`` in [0, 1].

    ``(p + z²/2n ± z·sqrt(p(1 − p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = successes / trials``; unlike the
    normal (Wald) interval it is never empty at 0 or n successes and stays inside [0, 1].
    """
    if isinstance(successes, bool) or not isinstance(successes, int) or isinstance(trials, bool) \
            or not isinstance(trials, int):
        raise TypeError(f"wilson_interval: successes and trials must be ints, got {successes!r}, {trials!r}")
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    if not (isinstance(z, int | float) and math.isfinite(z) and z > 0):
        raise ValueError(f"wilson_interval: z must be a positive finite number, got {z!r}")
    n, p = trials, successes / trials
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def fisher_exact(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of Fisher's exact test (R. A. Fisher, "The Design of Experiments", 1935, §2) that two
    success rates ``k1 / n1`` and ``k2 / n2`` are equal.

    Conditioned on the margins, the first group's successes follow the hypergeometric law; the p-value sums the
    probabilities of every table no more likely than the observed one (relative tolerance 1e-7, as R's
    ``fisher.test`` and SciPy's ``fisher_exact``). Exact, for the small seed counts of a sweep.
    """
    for name, v in (("k1", k1), ("n1", n1), ("k2", k2), ("n2", n2)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"fisher_exact: {name} must be an int, got {v!r}")
    if n1 <= 0 or n2 <= 0 or not 0 <= k1 <= n1 or not 0 <= k2 <= n2:
        raise ValueError(f"fisher_exact: need 0 <= k <= n and n > 0 for both groups, got {k1}/{n1} and {k2}/{n2}")
    total, k = n1 + n2, k1 + k2
    lo, hi = max(0, k - n2), min(k, n1)
    prob = {x: math.comb(n1, x) * math.comb(n2, k - x) / math.comb(total, k) for x in range(lo, hi + 1)}
    observed = prob[k1]
    return min(1.0, sum(p for p in prob.values() if p <= observed * (1 + 1e-7)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``m`` p-values for multiple comparisons (S. Holm, "A Simple Sequentially
    Rejective Multiple Test Procedure", Scand. J. Statist. 6, 1979), in the order given.

    The ``i``-th smallest p (``i = 1..m``) becomes ``max_{j <= i} min(1, (m - j + 1) · p_(j))``; rejecting every
    adjusted p below ``α`` keeps the family-wise error rate at ``α`` (R's ``p.adjust(p, "holm")``).
    """
    ps = list(p_values)
    for i, p in enumerate(ps):
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
            raise ValueError(f"holm: p_values[{i}] must be a number in [0, 1], got {p!r}")
    m, out, running = len(ps), [0.0] * len(ps), 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: ps[i])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def _cost(cfg) -> tuple[int, int]:
    nc, _ = num_classes_for(cfg)
    model = build_model_from_config(cfg, nc, load_pretrained_weights=False).eval()
    x = torch.zeros((1, *input_shape_for(cfg, model)))
    return sum(p.numel() for p in model.parameters()), count_flops(model, x)


def _group_stats(g: dict[str, Any], reach: float) -> dict[str, Any]:
    finals = [m[-1]["top1"] for _, _, m in g["runs"]]
    bests = [max(r["top1"] for r in m) for _, _, m in g["runs"]]
    reached = [next((r["epoch"] for r in m if r["top1"] >= reach), None) for _, _, m in g["runs"]]
    epoch_times = [r["time_s"] for _, _, m in g["runs"] for r in m if "time_s" in r]
    cfg = g["config"]
    params, flops = _cost(cfg)
    fm, fs = _mean_std(finals)
    bm, bs = _mean_std(bests)
    hit = [e for e in reached if e is not None]
    solving = [f for f in finals if f >= reach]
    low, high = wilson_interval(len(solving), len(finals))
    paper = None
    if cfg.paper is not None:
        ours = fm if cfg.paper.metric == "top1" else 100.0 - fm
        paper = {"source": cfg.paper.source, "metric": cfg.paper.metric, "paper": cfg.paper.value, "ours": ours}
    return {
        "label": g["label"], "description": cfg.description, "seeds": [s for s, _, _ in g["runs"]],
        "runs": [str(d) for _, d, _ in g["runs"]], "epochs": [len(m) for _, _, m in g["runs"]],
        "final_top1": finals, "final_top1_mean": fm, "final_top1_std": fs,
        "best_top1": bests, "best_top1_mean": bm, "best_top1_std": bs,
        "reach": reach, "epoch_reached": reached, "reached": len(hit),
        "epoch_reached_mean": statistics.fmean(hit) if hit else None,
        "solved": len(solving), "solve_rate": len(solving) / len(finals), "solve_rate_ci95": [low, high],
        "solved_top1_mean": statistics.fmean(solving) if solving else None,
        "time_per_epoch_s": statistics.fmean(epoch_times) if epoch_times else None,
        "params": params, "flops": flops, "paper": paper,
    }


def _pm(m: float | None, s: float | None, spec: str = ".1f") -> str:
    return "—" if m is None else f"{m:{spec}} ± {s:{spec}}"


def format_markdown(rows: list[dict[str, Any]]) -> str:
    reach = rows[0]["reach"] if rows else 0
    lines = [f"| run | seeds | final top-1 % | best top-1 % | reached {reach:g} % (mean epoch) | "
             f"solved (final ≥ {reach:g} %), 95 % CI | top-1 of solving runs | s / epoch | params (k) | MFLOPs | "
             "paper |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        p = r["paper"]
        paper = "—" if p is None else (f"{p['source']}: {p['metric']} {p['paper']:g} (ours {p['ours']:.2f})")
        ep = "—" if r["epoch_reached_mean"] is None else f"{r['epoch_reached_mean']:.1f}"
        tpe = "—" if r["time_per_epoch_s"] is None else f"{r['time_per_epoch_s']:.1f}"
        lo, hi = r["solve_rate_ci95"]
        solved = f"{r['solved']}/{len(r['seeds'])} [{100 * lo:.0f}–{100 * hi:.0f} %]"
        stop = "—" if r["solved_top1_mean"] is None else f"{r['solved_top1_mean']:.1f}"
        lines.append(f"| {r['label']} | {len(r['seeds'])} | {_pm(r['final_top1_mean'], r['final_top1_std'])} | "
                     f"{_pm(r['best_top1_mean'], r['best_top1_std'])} | {r['reached']}/{len(r['seeds'])} ({ep}) | "
                     f"{solved} | {stop} | {tpe} | {r['params'] / 1e3:.1f} | {r['flops'] / 1e6:.1f} | {paper} |")
    return "\n".join(lines) + "\n"


def _plot(groups: list[dict[str, Any]], path: Path) -> Path:
    fig = new_figure(7.5, 4.2)
    ax = fig.subplots()
    for g in groups:
        n = min(len(m) for _, _, m in g["runs"])
        acc = np.array([[r["top1"] for r in m[:n]] for _, _, m in g["runs"]])
        ep = np.arange(1, n + 1)
        mean = acc.mean(0)
        line = ax.plot(ep, mean, label=f"{g['label']} (n={len(acc)})", lw=1.4)[0]
        if len(acc) > 1:
            std = acc.std(0, ddof=1)
            ax.fill_between(ep, np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100), color=line.get_color(),
                            alpha=0.15, lw=0)  # accuracy is a percentage: the band is clipped to [0, 100]
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy, mean ± 1 std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, dpi=110)


def summarize(run_dirs: Sequence[str | Path], out: str | Path, *, reach: float = 90.0) -> dict[str, Any]:
    """Group, compute, write ``summary.md``, ``summary.json``, ``curves.png``; returns the JSON data."""
    if not run_dirs:
        raise ConfigError("summarize: no run directory given")
    if not (isinstance(reach, int | float) and math.isfinite(reach) and 0 < reach <= 100):
        raise ConfigError(f"summarize: --reach must be a percentage in (0, 100], got {reach!r}")
    out = require_directory(out, "summarize: --out")
    groups = group_runs(run_dirs)
    rows = [_group_stats(g, reach) for g in groups]
    figure = _plot(groups, out / "curves.png")
    data = {"reach": reach, "groups": rows, "figures": [str(figure)],
            "definition": {"final_top1": "test top-1 after the last epoch of each run",
                           "std": "sample standard deviation over seeds (0 for one seed)",
                           "solved": "runs whose final test top-1 is >= reach",
                           "solve_rate_ci95": "95 % Wilson score interval of solved / seeds",
                           "flops": "torch.utils.flop_counter, one sample, 2 FLOPs per multiply-add"}}
    write_json(out / "summary.json", data)
    (out / "summary.md").write_text(format_markdown(rows))
    return data
