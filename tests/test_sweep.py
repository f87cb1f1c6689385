"""`nonlocalnet sweep` and `nonlocalnet summarize` on tiny runs of the demo task."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from nonlocalnet.apps.summary import fisher_exact, holm, summarize, wilson_interval
from nonlocalnet.apps.sweep import run_sweep
from nonlocalnet.cli import main
from nonlocalnet.runs import ConfigError, read_metrics

TINY = {
    "data": {"name": "demo", "size": 16, "options": {"train_size": 48, "test_size": 32}},
    "model": {"arch": "preresnet20", "blocks": []},
    "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "milestones": [1]},
    "run": {"device": "cpu", "progress": False},
}


def _configs(tmp_path: Path) -> list[Path]:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(TINY))
    snl = dict(TINY, model={"arch": "preresnet20", "blocks": [{"stage": 1, "after_block": 2, "block": "snl"}]},
               paper={"source": "a made-up table", "metric": "error", "value": 7.5})
    (tmp_path / "snl.yaml").write_text(yaml.safe_dump(snl))
    return [base, tmp_path / "snl.yaml"]


def test_sweep_runs_resumes_and_skips(tmp_path, capsys):
    configs = _configs(tmp_path)
    out = tmp_path / "runs"
    # an interrupted sweep: the first pass stops after one epoch of each run
    run_sweep(configs, [0, 1], out, ["train.epochs=1"])
    first = {p: read_metrics(p) for p in sorted(out.glob("*/seed*"))}
    assert len(first) == 4 and all(len(m) == 1 for m in first.values())
    dirs = run_sweep(configs, [0, 1], out)
    assert [d.relative_to(out).as_posix() for d in dirs] == ["base/seed0", "base/seed1", "snl/seed0", "snl/seed1"]
    for d in dirs:
        m = read_metrics(d)
        assert [r["epoch"] for r in m] == [1, 2]  # resumed, not restarted: epoch 1 is the one of the first pass
        assert m[0]["train_loss"] == first[d][0]["train_loss"]
        assert yaml.safe_load((d / "config.yaml").read_text())["train"]["seed"] == int(d.name[4:])
    before = {d: (d / "metrics.jsonl").read_text() for d in dirs}
    capsys.readouterr()
    assert main(["sweep", *map(str, configs), "--seeds", "2", "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().err
    assert all((d / "metrics.jsonl").read_text() == before[d] for d in dirs)  # finished runs untouched

    # seeds differ: the two seeds of one config did not train identically
    assert read_metrics(out / "base/seed0")[-1]["train_loss"] != read_metrics(out / "base/seed1")[-1]["train_loss"]

    summary = tmp_path / "summary"
    assert main(["summarize", *map(str, dirs), "--out", str(summary), "--reach", "50"]) == 0
    data = json.loads((summary / "summary.json").read_text())
    groups = {g["label"]: g for g in data["groups"]}
    assert set(groups) == {"base", "snl"}
    for label, g in groups.items():
        runs = [read_metrics(out / label / f"seed{s}") for s in (0, 1)]
        finals = [m[-1]["top1"] for m in runs]
        assert g["seeds"] == [0, 1]
        assert g["final_top1"] == finals
        assert g["final_top1_mean"] == pytest.approx(statistics.fmean(finals))
        assert g["final_top1_std"] == pytest.approx(statistics.stdev(finals))
        assert g["best_top1"] == [max(r["top1"] for r in m) for m in runs]
        assert g["epoch_reached"] == [next((r["epoch"] for r in m if r["top1"] >= 50), None) for m in runs]
        assert g["time_per_epoch_s"] == pytest.approx(statistics.fmean(r["time_s"] for m in runs for r in m))
        assert g["params"] > 0 and g["flops"] > 0
        solving = [f for f in finals if f >= 50]
        assert g["solved"] == len(solving) and g["solve_rate"] == len(solving) / 2
        assert g["solve_rate_ci95"] == list(wilson_interval(len(solving), 2))
        assert g["solved_top1_mean"] == (pytest.approx(statistics.fmean(solving)) if solving else None)
    assert groups["snl"]["params"] > groups["base"]["params"]
    paper = groups["snl"]["paper"]
    assert paper["paper"] == 7.5 and paper["ours"] == pytest.approx(100 - groups["snl"]["final_top1_mean"])
    assert groups["base"]["paper"] is None
    md = (summary / "summary.md").read_text()
    assert "| snl | 2 |" in md and "a made-up table: error 7.5" in md
    assert (summary / "curves.png").stat().st_size > 1000


def test_sweep_restarts_a_run_killed_before_its_first_checkpoint(tmp_path, capsys):
    """A kill during epoch 1 leaves config.yaml and an empty metrics.jsonl (nothing saved): the sweep starts that
    run again instead of stopping at it; a directory with results but no checkpoint is still never replaced."""
    base = _configs(tmp_path)[0]
    out = tmp_path / "runs"
    killed = out / "base" / "seed0"
    killed.mkdir(parents=True)
    (killed / "config.yaml").write_text(base.read_text())
    (killed / "metrics.jsonl").write_text("")
    run_sweep([base], [0], out, ["train.epochs=1"])
    assert f"(written to {out / 'base' / '.seed0.incoming'} until the first checkpoint replaces the previous run)" \
        in capsys.readouterr().err  # staged: the leftover files stayed until the new run's first epoch
    assert [r["epoch"] for r in read_metrics(killed)] == [1]
    assert (killed / "last.safetensors").is_file() and not (out / "base" / ".seed0.incoming").exists()

    odd = out / "base" / "seed1"  # metric rows without any checkpoint: not a run to throw away
    odd.mkdir()
    (odd / "metrics.jsonl").write_text((killed / "metrics.jsonl").read_text())
    with pytest.raises(Exception, match="already holds a run"):
        run_sweep([base], [1], out, ["train.epochs=1"])
    assert (odd / "metrics.jsonl").read_text() == (killed / "metrics.jsonl").read_text()


def test_summarize_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a run directory"):
        summarize([tmp_path], tmp_path / "s")
    assert main(["summarize", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    assert "nonlocalnet: error: summarize:" in capsys.readouterr().err
    configs = _configs(tmp_path)
    with pytest.raises(ConfigError, match="share the name"):
        run_sweep([configs[0], configs[0]], [0], tmp_path / "r")


def test_wilson_interval():
    # the worked examples of Newcombe, "Two-sided confidence intervals for the single proportion: comparison of
    # seven methods", Statistics in Medicine 17, 1998, method 3 (Wilson score, no continuity correction)
    for (k, n), (lo, hi) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                             (1, 29): (0.0061, 0.1718)}.items():
        assert wilson_interval(k, n) == (pytest.approx(lo, abs=5e-5), pytest.approx(hi, abs=5e-5))
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + 1.959963984540054 ** 2)), pytest.approx(1.0))
    assert wilson_interval(0, 10)[0] == 0.0
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.2366, abs=5e-5)  # symmetric about 1/2
    for bad in [(3, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="successes <= trials"):
            wilson_interval(*bad)
    with pytest.raises(TypeError, match="must be ints"):
        wilson_interval(1.5, 2)
    with pytest.raises(ValueError, match="z must be"):
        wilson_interval(1, 2, z=float("nan"))


def test_holm():
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") = 0.03 0.06 0.06 0.02 (the step-down keeps them monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == [] and holm([0.2]) == [0.2]
    assert holm([0.01, 0.01]) == pytest.approx([0.02, 0.02])  # ties: both get the larger multiplier's value
    with pytest.raises(ValueError, match=r"p_values\[1\] must be a number in \[0, 1\]"):
        holm([0.1, 1.5])


def test_fisher_exact():
    # Fisher's tea-tasting table (3 of 4 right against 1 of 4) and SciPy's documented example [[6, 2], [1, 4]]
    assert fisher_exact(3, 4, 1, 4) == pytest.approx(34 / 70)
    assert fisher_exact(6, 8, 1, 5) == pytest.approx(0.10256410256410256)
    # 9 / 10 against 4 / 10: the tables with 9 or 10 (or 4 or 3) of the 13 successes in the first group,
    # C(10, 9) C(10, 4) + C(10, 10) C(10, 3) twice, over C(20, 13)
    assert fisher_exact(9, 10, 4, 10) == pytest.approx(2 * (10 * 210 + 1 * 120) / 77520)
    assert fisher_exact(10, 10, 0, 10) == pytest.approx(2 / 184756)  # 2 / C(20, 10)
    assert fisher_exact(5, 10, 5, 10) == 1.0 and fisher_exact(0, 3, 0, 5) == 1.0
    assert fisher_exact(2, 7, 5, 9) == pytest.approx(fisher_exact(5, 9, 2, 7))  # symmetric in the groups
    with pytest.raises(ValueError, match="0 <= k <= n"):
        fisher_exact(4, 3, 1, 2)
    with pytest.raises(TypeError, match="k1 must be an int"):
        fisher_exact(1.0, 3, 1, 2)
