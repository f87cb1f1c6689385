"""The configs shipped as package data (issue 23): every one loads by its name through the config loader and builds
its model, blocks inserted where it says, at a tiny input size; ``nonlocalnet configs`` lists them all, ``--copy``
writes one out equal to the shipped one. (tests/test_train.py validates every file's schema and placements; the
built wheel itself is smoke-tested from an empty directory by .ci/test-wheel, `make test-wheel`.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from nonlocalnet import NonlocalBlock
from nonlocalnet.cli import main
from nonlocalnet.runs import SHIPPED, ConfigError, config_to_dict, load_config
from nonlocalnet.runs.build import build_model_from_config, input_shape_for, num_classes_for
from nonlocalnet.runs.config import resolve_config, shipped_names
from nonlocalnet.runs.shipped import PAPERS, copy_config, format_configs, shipped_configs

ROOT = Path(__file__).resolve().parents[1]
NAMES = shipped_names()
PACKAGE = ROOT / "src" / "nonlocalnet" / "configs"


def test_shipped_names_are_the_package_files():
    files = sorted(p.relative_to(PACKAGE).with_suffix("").as_posix() for p in PACKAGE.rglob("*.yaml"))
    assert NAMES == files and len(NAMES) > 40
    assert SHIPPED.resolve() == PACKAGE.resolve() == (ROOT / "configs").resolve()  # configs/ links to the package
    assert {n.split("/")[0] for n in NAMES} == set(PAPERS)
    # the wheel's package data pattern (pyproject.toml) matches every shipped file: <paper>/<name>.yaml
    assert all(n.count("/") == 1 for n in NAMES)


def _tiny(cfg_name: str):
    """The shipped config with its data shrunk: file datasets at 32 px (4 frames for video); CIFAR is 32 px."""
    cfg = load_config(cfg_name)
    over = ["data.size=32"] if cfg.data.name != "demo" and cfg.data.size else []
    if cfg.data.name == "ucf101":
        over.append("data.frames=4")
    return load_config(cfg_name, over) if over else cfg


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_config_loads_by_name_and_builds_its_model(name):
    path = resolve_config(name)
    assert path == SHIPPED / f"{name}.yaml" and resolve_config(f"{name}.yaml") == path
    cfg = load_config(name)
    assert config_to_dict(cfg) == config_to_dict(load_config(path))  # by name = by path
    assert cfg.description and cfg.run.out.startswith("runs/")
    cfg = _tiny(name)
    num_classes, note = num_classes_for(cfg)
    if cfg.data.name == "folder":  # ImageNet layout: the class folders decide; without them, ImageNet's 1000
        assert num_classes == 1000 and "assumed 1000" in note
    else:
        assert note is None, note  # the other shipped configs know their classes without their data
    torch.manual_seed(0)
    model = build_model_from_config(cfg, num_classes, load_pretrained_weights=False, log=lambda s: None).eval()
    blocks = [m for m in model.modules() if isinstance(m, NonlocalBlock)]
    want = [(p.block, p.units) for p in cfg.model.blocks for _ in range(p.count)]
    assert sorted((b.name, len(b.units)) for b in blocks) == sorted(want)
    shape = input_shape_for(cfg, model)
    assert shape[-1] <= 32
    x = torch.randn(2, *shape)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, num_classes) and torch.isfinite(y).all()
    assert not torch.allclose(y[0], y[1])  # the logits depend on the input


def test_configs_lists_every_shipped_config_with_its_paper_row(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert out == format_configs()
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and "/" in line.split()[0]]
    assert listed == [c.name for c in shipped_configs()] and sorted(listed) == NAMES
    for folder, paper in PAPERS.items():
        assert f"{folder}: {paper}" in out
    assert "paper: Tao et al. 2018, Table 1 (median of 5): error 8.19 %" in out
    assert "paper: Zhu et al. 2021 (ICCV), Table 2: top1 76.41 %" in out


def test_copy_writes_the_shipped_config_with_its_base_merged(tmp_path, capsys):
    assert main(["configs", "--copy", "claims/snl", str(tmp_path / "edit")]) == 0
    dest = tmp_path / "edit" / "snl.yaml"
    assert capsys.readouterr().out.strip() == str(dest)
    text = dest.read_text()
    assert text.startswith("# One snl block") and "base:" not in yaml.safe_load(text)
    assert config_to_dict(load_config(dest)) == config_to_dict(load_config("claims/snl"))
    assert load_config(dest).data.options["min_distance"] == 16  # from claims/baseline, two bases up
    # without a base it is the file itself; never overwritten; a file or unknown name is refused
    plain = copy_config("demo/baseline", tmp_path)
    assert plain.read_text() == (SHIPPED / "demo" / "baseline.yaml").read_text()
    with pytest.raises(ConfigError, match="exists; not overwritten"):
        copy_config("demo/baseline.yaml", tmp_path)
    assert main(["configs", "--copy", "claims/snl", str(tmp_path / "edit")]) == 2
    assert "exists; not overwritten" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"did you mean claims/snl"):
        copy_config("claims/snll", tmp_path)
    with pytest.raises(ConfigError, match="is a file, not a shipped config"):
        copy_config(str(dest), tmp_path / "other")
