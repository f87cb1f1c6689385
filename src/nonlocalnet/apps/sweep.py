"""``nonlocalnet sweep``: run several configs over several seeds, one run after another, each resumable.

Run ``k`` of config ``NAME.yaml`` with seed ``s`` goes to ``<out>/<NAME>/seed<s>`` (``train.seed = s``). A run
that finished all its epochs is skipped; one that was interrupted continues from its last checkpoint
(``--resume``), so re-running the same command after a kill finishes the sweep with the same numbers; one killed
before its first checkpoint (nothing saved) starts again (``train`` does that for any run).
``nonlocalnet summarize <out>/*/seed*`` then tables and plots it (:mod:`nonlocalnet.apps.summary`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from nonlocalnet.runs import ConfigError, load_config, read_metrics, require_directory
from nonlocalnet.runs.layout import LAST_WEIGHTS
from nonlocalnet.train import train

__all__ = ["plan_sweep", "run_sweep"]


def _log(msg: str) -> None:
    print(f"nonlocalnet sweep: {msg}", file=sys.stderr, flush=True)


def plan_sweep(configs: Sequence[str | Path], seeds: Sequence[int], out: str | Path,
               overrides: Sequence[str] = ()) -> list[tuple[str, int, object]]:
    """``[(name, seed, config)]`` of every run, validated before anything runs."""
    require_directory(out, "sweep: --out")
    names = [Path(c).stem for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"sweep: several configs share the name {dup[0]!r}; their runs would share "
                          f"{Path(out) / dup[0]}: rename one")
    plan = []
    for path, name in zip(configs, names):
        for s in seeds:
            cfg = load_config(path, [*overrides, f"train.seed={s}", f"run.out={Path(out) / name / f'seed{s}'}"])
            plan.append((name, s, cfg))
    return plan


def run_sweep(configs: Sequence[str | Path], seeds: Sequence[int], out: str | Path,
              overrides: Sequence[str] = ()) -> list[Path]:
    """Train every (config, seed) in turn; returns the run directories."""
    plan = plan_sweep(configs, seeds, out, overrides)
    dirs = []
    for i, (name, seed, cfg) in enumerate(plan, 1):
        run_dir = Path(cfg.run.out)
        dirs.append(run_dir)
        done = len(read_metrics(run_dir))
        if done >= cfg.train.epochs and (run_dir / LAST_WEIGHTS).is_file():
            _log(f"[{i}/{len(plan)}] {name} seed {seed}: done ({done} epochs) in {run_dir}; skipped")
            continue
        resume = (run_dir / LAST_WEIGHTS).is_file()
        _log(f"[{i}/{len(plan)}] {name} seed {seed}: {'resuming' if resume else 'training'} -> {run_dir}")
        t0 = time.perf_counter()
        cfg.run.overwrite = False  # a sweep never replaces a run; it resumes or skips it
        train(cfg, resume=resume)
        _log(f"[{i}/{len(plan)}] {name} seed {seed}: finished in {time.perf_counter() - t0:.0f} s")
    return dirs
