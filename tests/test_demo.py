"""`nonlocalnet demo` (apps/demo.py): run directories per seed, and the report's sentence and table (mean ± std
over seeds, each seed's final top-1, how many solved), on tiny runs of the demo task."""

from __future__ import annotations

import html
import json
import re
import statistics

import pytest
import yaml

from nonlocalnet.apps.demo import SOLVED_TOP1, run_demo, write_demo_report
from nonlocalnet.runs import SHIPPED, load_config

TINY = {
    "data": {"name": "demo", "size": 16, "options": {"train_size": 32, "test_size": 16, "min_distance": 8}},
    "model": {"arch": "preresnet8", "blocks": []},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "schedule": "constant", "milestones": []},
    "run": {"out": "unused", "keep_epochs": False, "overwrite": True},
}


def _configs(tmp_path):
    d = tmp_path / "configs"
    d.mkdir()
    (d / "baseline.yaml").write_text(yaml.safe_dump(TINY))
    snl = {"base": "baseline.yaml", "model": {"blocks": [{"stage": 1, "after_block": 1, "block": "snl"}]}}
    (d / "snl.yaml").write_text(yaml.safe_dump(snl))
    return d


def _rows(page: str) -> list[list[str]]:
    rows = re.findall(r"<tr>(.*?)</tr>", page)
    return [[html.unescape(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r)] for r in rows]


def _finals(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]


def test_demo_with_several_seeds_reports_mean_and_each_seed(tmp_path):
    path = run_demo(tmp_path / "runs", _configs(tmp_path), runs=("baseline", "snl"), analyze=False, seeds=[3, 5])
    page = path.read_text()
    assert "You are looking at" in page and "chance = 50 %" in page
    rows = {r[0]: r for r in _rows(page)[1:]}
    assert set(rows) == {"baseline", "snl"}
    for name in ("baseline", "snl"):
        dirs = [tmp_path / "runs" / f"demo-{name}-seed{s}" for s in (3, 5)]
        assert [load_config(d / "config.yaml").train.seed for d in dirs] == [3, 5]
        final = [_finals(d)["top1"] for d in dirs]
        row = rows[name]
        assert row[2] == "2" and row[3] == "1"  # seeds, epochs
        assert row[5] == f"{statistics.fmean(final):.1f} ± {statistics.stdev(final):.1f}"
        assert row[6] == " / ".join(f"{v:.1f}" for v in final)
        assert row[8] == f"{sum(v >= SOLVED_TOP1 for v in final)}/2"
    assert rows["baseline"][1] == "none" and rows["snl"][1].startswith("snl")
    assert "mean over 2 seeds" in page and "top-5" not in page and "top5" not in page
    assert "You are looking at how well PreResNet-8 without" in page and "at stage 1, after_block 1;" in page
    assert "32 training images of 16×16 pixels" in page and "at least 8 px apart" in page and "--seeds" not in page
    assert (tmp_path / "runs" / "demo" / "curves.png").is_file()


def test_demo_with_one_seed_uses_the_configs_seed(tmp_path):
    path = run_demo(tmp_path / "runs", _configs(tmp_path), runs=("baseline",), analyze=False)
    run = tmp_path / "runs" / "demo-baseline"
    assert load_config(run / "config.yaml").train.seed == 0
    row = _rows(path.read_text())[1]
    assert row[0] == "baseline" and row[2] == "1" and row[5] == f"{_finals(run)['top1']:.1f}" and row[6] == ""
    assert "one seed" in path.read_text() and "--seeds 0 1 2" in path.read_text()


def test_demo_errors(tmp_path):
    configs = _configs(tmp_path)
    with pytest.raises(ValueError, match="seeds must be distinct"):
        run_demo(tmp_path, configs, runs=("baseline",), seeds=[1, 1])
    with pytest.raises(FileNotFoundError, match="nl.yaml"):
        run_demo(tmp_path, configs, runs=("baseline", "nl"))
    assert not list(tmp_path.glob("demo-*"))  # checked before anything trains


def test_report_of_a_run_without_metrics(tmp_path):
    page = write_demo_report(tmp_path / "demo", {"nl": [tmp_path / "missing"]}, {}, {}).read_text()
    assert _rows(page)[1][:3] == ["nl", "no metrics", "1"]


def test_shipped_demo_configs_share_one_task():
    base = load_config(SHIPPED / "demo" / "baseline.yaml")
    for name in ("nl", "snl"):
        cfg = load_config(SHIPPED / "demo" / f"{name}.yaml")
        assert (cfg.data, cfg.train, cfg.model.arch) == (base.data, base.train, base.model.arch)
        assert [b.block for b in cfg.model.blocks] == [name]
    assert base.model.blocks == []


def test_preresnet8_is_one_unit_per_stage():
    """docs/models.md: 77,850 parameters with 10 classes; the net of the demo trials in docs/results.md."""
    import torch

    from nonlocalnet.models import build_model

    model = build_model("preresnet8", 10)
    assert sum(p.numel() for p in model.parameters()) == 77_850
    assert [len(getattr(model, f"stage{k}")) for k in (1, 2, 3)] == [1, 1, 1]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
