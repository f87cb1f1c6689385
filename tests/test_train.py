"""Training: config schema, every configs/ YAML, LR schedule, train/eval CLI, exact resume after SIGKILL,
NaN guard, 2-process DDP (gloo). Tiny models on the demo task; subprocesses run with one thread."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nonlocalnet.runs import (
    CheckpointError,
    Config,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    read_metadata,
)
from nonlocalnet.train import build_scheduler

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))

TINY = {
    "data": {"name": "demo", "size": 16, "options": {"train_size": 64, "test_size": 32}},
    "model": {"arch": "preresnet20", "blocks": [{"stage": 1, "after_block": 2, "block": "snl"}]},
    "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "milestones": [1]},
    "run": {"device": "cpu"},
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nonlocalnet", *args], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- schema


def test_defaults_follow_the_papers():
    cfg = Config()
    assert cfg.train.momentum == 0.9 and cfg.train.weight_decay == 1e-4 and cfg.train.gamma == 0.1
    assert cfg.train.amp == "none" and cfg.run.keep_epochs is True
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg  # dump/load round trip


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"train": {"lrr": 0.1}})
    msg = str(e.value)
    assert "train.lrr" in msg and "did you mean 'lr'" in msg
    assert "valid keys at train:" in msg and "weight_decay" in msg and "warmup_epochs" in msg
    with pytest.raises(ConfigError, match="valid keys at the config: data, model, train, run"):
        config_from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"model\.blocks\[0\]\.foo.*valid keys at model\.blocks\[0\]"):
        config_from_dict({"model": {"blocks": [{"stage": 1, "after_block": 2, "foo": 1}]}})


@pytest.mark.parametrize("raw, match", [
    ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
    ({"train": {"epochs": 1.5}}, "train.epochs: expected an integer"),
    ({"train": {"amp": "fp32"}}, "train.amp: must be one of none, bf16, fp16"),
    ({"train": {"channels_last": "yes"}}, "expected true/false"),
    ({"data": {"name": "mnist"}}, "data.name: must be one of"),
    ({"train": {"milestones": [10, 5]}}, "increasing"),
    ({"model": {"blocks": [{"block": "nl"}]}}, "exactly one of 'at', 'stage', 'res'"),
    ({"model": {"blocks": [{"stage": 1, "after_block": 2, "before_last": True}]}}, "at most one"),
    ({"model": {"blocks": [{"at": "stage1.1", "units": 0}]}}, "'units' must be an integer >= 1"),
    ({"model": {"blocks": {"stage": 1}}}, "model.blocks: expected a list"),
])
def test_invalid_values(raw, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(raw)


def test_overrides_and_base(tmp_path):
    blocks = [{"stage": 1, "after_block": 2, "block": "snl"}]
    _write(tmp_path / "base.yaml", {"train": {"lr": 0.1, "epochs": 300, "milestones": [150, 250]},
                                    "model": {"blocks": blocks}})
    child = _write(tmp_path / "child.yaml", {"base": "base.yaml", "train": {"epochs": 200}})
    cfg = load_config(child, ["train.lr=5e-2", "model.blocks.0.block=ns",
                              "model.blocks.0.options.reduction=4", "run.out=/tmp/x", "train.amp=bf16"])
    assert cfg.train.epochs == 200 and cfg.train.milestones == [150, 250]  # merged with the base
    assert cfg.train.lr == 0.05 and cfg.train.amp == "bf16" and cfg.run.out == "/tmp/x"
    assert cfg.model.blocks[0].block == "ns" and cfg.model.blocks[0].options == {"reduction": 4}
    assert load_config(child, ["model.blocks=[]"]).model.blocks == []
    two = load_config(child, ["model.blocks=[{stage: 1, after_block: 2}, "
                              "{res: 4, before_last: true, count: 3}]"])
    assert two.model.blocks[1].to_dict() == {"res": 4, "before_last": True, "block": "nl", "units": 1,
                                             "count": 3, "options": {}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(child, ["model.blocks.3.units=2"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def _lr_factors(t: TrainConfig, steps_per_epoch: int, steps: int) -> list[float]:
    """The learning rate of each optimizer step, as a multiple of train.lr, from the real scheduler."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched = build_scheduler(opt, steps_per_epoch, t)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"] / t.lr)
        opt.step()
        sched.step()
    return out


def test_lr_schedule():
    t = TrainConfig(epochs=10, lr=0.1, milestones=[3, 6], gamma=0.1, warmup_epochs=1)
    f = _lr_factors(t, 4, 40)
    assert all(math.isclose(a, b) for a, b in zip(f[:4], [0.25, 0.5, 0.75, 1.0]))  # per-step linear warmup
    assert all(math.isclose(v, 1.0) for v in f[4:12]) and all(math.isclose(v, 0.1) for v in f[12:24])
    assert all(math.isclose(v, 0.01) for v in f[24:])
    c = TrainConfig(epochs=10, lr=0.1, schedule="cosine", milestones=[], min_lr=0.001)
    g = _lr_factors(c, 10, 100)
    assert g[0] == 1.0 and all(a >= b for a, b in zip(g, g[1:])) and math.isclose(g[50], (1 + 0.01) / 2)


# ---------------------------------------------------------------------------------------- configs/


_MODELS: dict = {}


def _model_for(arch: str, options: dict, num_classes: int):
    from nonlocalnet.models import build_model

    key = (arch, json.dumps(options, sort_keys=True))
    if key not in _MODELS:
        _MODELS[key] = build_model(arch, num_classes, **options)
    return _MODELS[key]


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_files_validate(path):
    """Every YAML in configs/ passes the schema; its placements resolve in its backbone and its blocks'
    options are accepted (no data, no forward pass)."""
    import nonlocalnet
    from nonlocalnet.data import dataset_options
    from nonlocalnet.models import resolve_placement

    cfg = load_config(path)
    assert cfg.description, f"{path} should say what it reproduces (description:)"
    valid = dataset_options(cfg.data.name)
    assert set(cfg.data.options) <= set(valid), f"unknown dataset options in {path}"
    assert cfg.train.batch_size > 0
    if not cfg.model.blocks:
        return
    model = _model_for(cfg.model.arch, cfg.model.options, cfg.model.num_classes or 10)
    for p in cfg.model.blocks:
        resolved = resolve_placement(model, p.to_dict())
        assert resolved["block"] in nonlocalnet.list_blocks()
        dim = 3 if "3d" in cfg.model.arch else 2
        opts = dict(p.options)
        if p.units > 1:
            opts["units"] = p.units
        nonlocalnet.build_block(p.block, 32, dim=dim, **opts)  # validates the options


def test_demo_configs_exist():
    names = {p.name for p in (ROOT / "configs" / "demo").glob("*.yaml")}
    assert {"baseline.yaml", "nl.yaml", "snl.yaml"} <= names


def test_claims_configs_keep_their_settings():
    """docs/results.md's claims runs were made with these values; the claims configs do not inherit the demo's
    (which may change), so they keep them."""
    paths = sorted((ROOT / "configs" / "claims").glob("*.yaml"))
    assert len(paths) >= 20
    for path in paths:
        assert yaml.safe_load(path.read_text()).get("base") in (None, "baseline.yaml"), path
        cfg = load_config(path)
        d, t = cfg.data, cfg.train
        assert (d.name, d.root, d.size, d.crop_padding, d.flip) == ("demo", None, 24, None, None), path
        assert d.options == {"train_size": 3000, "test_size": 600, "min_distance": 16}, path
        assert cfg.model.arch == "preresnet20" and cfg.model.options == {}, path
        assert (t.epochs, t.batch_size, t.lr, t.schedule, t.milestones, t.warmup_epochs, t.momentum,
                t.weight_decay, t.nesterov, t.min_lr, t.seed, t.amp) == \
            (12, 32, 0.05, "cosine", [], 1.0, 0.9, 1e-4, False, 0.0, 0, "none"), path
        assert (cfg.run.device, cfg.run.overwrite) == ("auto", False), path


# -------------------------------------------------------------------------------------- train/eval


def test_train_and_eval(tmp_path, capsys):
    cfg = _write(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "run"
    r = _cli("train", str(cfg), "--set", f"run.out={out}")
    assert r.returncode == 0, r.stderr
    rows = _metrics(out)
    assert [m["epoch"] for m in rows] == [1, 2]
    for m in rows:
        assert {"epoch", "train_loss", "top1", "lr", "time_s", "test_loss"} <= set(m)
        assert "top5" not in m  # 2 classes: every label is in the top 5
        assert 0 <= m["top1"] <= 100 and math.isfinite(m["train_loss"])
    assert math.isclose(rows[0]["lr"], 0.05) and math.isclose(rows[1]["lr"], 0.005)  # milestone at epoch 1
    for f in ("config.yaml", "last.safetensors", "last.state.pt", "best.safetensors",
              "epoch_0001.safetensors", "epoch_0002.safetensors"):
        assert (out / f).is_file(), f
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert not (out / "last.next.safetensors").exists()
    assert load_config(out / "config.yaml").run.out == str(out)
    meta = read_metadata(out / "last.safetensors")
    assert meta["epoch"] == "2" and meta["arch"] == "preresnet20"
    state = torch.load(out / "last.state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 8 and "optimizer" in state and "rng" in state

    from nonlocalnet.cli import main

    assert main(["eval", str(out / "last.safetensors")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"top1", "loss", "samples"}
    assert res["top1"] == rows[-1]["top1"] and math.isclose(res["loss"], rows[-1]["test_loss"], rel_tol=1e-5)

    # a crash between writing last.state.pt (epoch 2) and renaming last.next.safetensors to last.safetensors
    # (still epoch 1) is recovered from last.next (or epoch_0002) and refused when neither holds epoch 2
    import shutil

    from safetensors.torch import load_file

    from nonlocalnet.train.distributed import DistEnv
    from nonlocalnet.train.trainer import _resume_point

    crash = tmp_path / "crash"
    shutil.copytree(out, crash)
    shutil.copy(crash / "last.safetensors", crash / "last.next.safetensors")
    shutil.copy(crash / "epoch_0001.safetensors", crash / "last.safetensors")
    ref = load_file(out / "last.safetensors")
    for drop in ("last.next.safetensors", "epoch_0002.safetensors"):
        state, weights = _resume_point(crash, DistEnv())
        assert state["epoch"] == 2 and read_metadata(crash / "last.safetensors")["epoch"] == "1"
        assert all(torch.equal(weights[k], ref[k]) for k in ref)
        (crash / drop).unlink()
    with pytest.raises(CheckpointError, match="epoch 1 but .* from epoch 2"):
        _resume_point(crash, DistEnv())

    # a fresh run does not silently clobber an existing one
    assert main(["train", str(cfg), "--set", f"run.out={out}"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "run.overwrite" in err


class _FixedBatches:
    """The one method ``evaluate`` uses of ``Batches``: the test set as one batch."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def epoch(self, epoch, generator, limit=None):
        yield self.x, self.y


def test_evaluate_reports_top5_only_with_more_than_5_classes():
    from nonlocalnet.train.distributed import DistEnv
    from nonlocalnet.train.evaluate import evaluate

    # logits = the inputs: class 0 ranks first, then 1, 2, ...; labels 0 (top-1 hit), 3 (top-5 hit), 6 (miss)
    x = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3, 2]]).repeat(4, 1)
    y = torch.tensor([0, 3, 6, 0])
    res = evaluate(torch.nn.Identity(), _FixedBatches(x, y), lambda t: t, DistEnv())
    assert res["top1"] == 50.0 and res["top5"] == 75.0 and res["samples"] == 4
    assert math.isclose(res["loss"], torch.nn.functional.cross_entropy(x, y).item(), rel_tol=1e-6)
    for classes in (2, 5):  # every label is in the top 5: no top-5 number
        res = evaluate(torch.nn.Identity(), _FixedBatches(x[:, :classes], y % classes), lambda t: t, DistEnv())
        assert "top5" not in res and set(res) == {"loss", "top1", "samples"}
        assert res["top1"] == 100.0 * float((y % classes == 0).float().mean())


def test_eval_errors_name_the_file(tmp_path, capsys):
    from nonlocalnet.cli import main

    missing = tmp_path / "nothing.safetensors"
    assert main(["eval", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "corrupt" in err
    with pytest.raises(CheckpointError, match="does not exist"):
        read_metadata(missing)


def test_cli_config_errors(tmp_path, capsys):
    from nonlocalnet.cli import main

    cfg = _write(tmp_path / "tiny.yaml", TINY)
    assert main(["train", str(cfg), "--set", "train.bogus=1"]) == 2
    assert "unknown key 'train.bogus'" in capsys.readouterr().err
    assert main(["train", str(cfg), "--set", "train.lr=0.2", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lr"] == 0.2
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        tb = ["--set", "run.tensorboard=true", "--set", f"run.out={tmp_path / 'tb'}"]
        assert main(["train", str(cfg), *tb]) == 2
        assert "tensorboard package is not installed" in capsys.readouterr().err


def test_resume_after_sigkill_is_exact(tmp_path):
    raw = json.loads(json.dumps(TINY))
    raw["data"]["options"] = {"train_size": 256, "test_size": 64}
    raw["train"].update(epochs=3, milestones=[2])
    cfg = _write(tmp_path / "res.yaml", raw)
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _cli("train", str(cfg), "--set", f"run.out={full}")
    assert r.returncode == 0, r.stderr

    proc = subprocess.Popen([sys.executable, "-m", "nonlocalnet", "train", str(cfg), "--set",
                             f"run.out={killed}"], env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and '"epoch": 1' in metrics.read_text():
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(_metrics(killed))
    assert 1 <= done < 3

    r = _cli("train", str(cfg), "--set", f"run.out={killed}", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resume: from epoch" in r.stderr
    a, b = _metrics(full), _metrics(killed)
    assert [m["epoch"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in ("step", "train_loss", "train_top1", "test_loss", "top1", "lr"):
            assert x[key] == y[key], (key, x, y)
    from safetensors.torch import load_file

    wa, wb = load_file(full / "last.safetensors"), load_file(killed / "last.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nonfinite_loss_stops_with_last_good_checkpoint(tmp_path):
    raw = json.loads(json.dumps(TINY))
    # lr 0.01 in epoch 1, then 1e8: the loss blows up in epoch 2 or 3
    raw["train"].update(epochs=4, lr=0.01, milestones=[1], gamma=1e10)
    raw["model"]["blocks"] = []
    cfg = _write(tmp_path / "nan.yaml", raw)
    out = tmp_path / "nan"
    r = _cli("train", str(cfg), "--set", f"run.out={out}")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "non-finite loss" in r.stderr and "at epoch" in r.stderr and "step" in r.stderr
    done = len(_metrics(out))
    assert 1 <= done < 4
    assert read_metadata(out / "last.safetensors")["epoch"] == str(done)
    assert torch.load(out / "last.state.pt", weights_only=True)["epoch"] == done
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(out / "last.safetensors").values()
               if v.is_floating_point())


def test_two_process_ddp_gloo(tmp_path):
    cfg = _write(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nonlocalnet", "train", str(cfg), "--set", f"run.out={out}"]
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size 2" in r.stderr
    rows = _metrics(out)
    assert [m["epoch"] for m in rows] == [1, 2] and rows[-1]["step"] == 8  # 64 samples / 16 per step
    assert (out / "last.safetensors").is_file() and (out / "epoch_0002.safetensors").is_file()
    assert len(torch.load(out / "last.state.pt", weights_only=True)["rng"]) == 2  # one RNG state per rank
