"""Nothing lost, every bad input named: early failures keep the previous run, silently accepted values are
errors, user mistakes are one line from the CLI, a non-finite loss never poisons BatchNorm, logs appear
without a terminal, leftovers of killed writes are cleaned."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_data import _Evil, make_cifar10

import nonlocalnet
from nonlocalnet.cli import main
from nonlocalnet.compat import from_official_snl
from nonlocalnet.runs import ConfigError, TrainConfig, config_from_dict, load_config, read_metrics
from nonlocalnet.train import NonFiniteLossError, train

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"name": "demo", "size": 16, "options": {"train_size": 32, "test_size": 16}},
    "model": {"arch": "preresnet20", "blocks": [{"stage": 1, "after_block": 2, "block": "snl"}]},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "milestones": []},
    "run": {"device": "cpu", "overwrite": True},
}


def _config(tmp_path: Path, **over) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in over.items():
        section, _, name = key.partition("__")
        raw[section][name] = value
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ 1. data loss


@pytest.mark.parametrize("override", [
    ["model.blocks.0.block=fooo"],                       # model validation
    ["data.options.train_size=-1"],                      # data validation
    ["model.pretrained=/nonexistent/weights.pt"],        # pretrained weights
    ["train.lr=1.0e+30"],                                # the first epoch itself fails (non-finite loss)
])
def test_failed_overwrite_keeps_the_previous_run(tmp_path, override, capsys):
    out = tmp_path / "run"
    cfg = _config(tmp_path)
    assert main(["train", str(cfg), "--out", str(out)]) == 0
    (out / "analysis").mkdir()
    (out / "analysis" / "note.txt").write_text("an analysis of the previous run")
    before = _snapshot(out)
    assert main(["train", str(cfg), "--out", str(out), *[f"--set={o}" for o in override]]) in (2, 3)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nonlocalnet: error: ")
    assert _snapshot(out) == before  # every file of the previous run, byte for byte
    assert not (tmp_path / ".run.incoming").exists() or not any((tmp_path / ".run.incoming").glob("*.safetensors"))


def test_overwrite_replaces_only_after_the_first_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(_config(tmp_path), [f"run.out={out}", "train.epochs=2"])
    train(cfg)
    old = read_metrics(out)
    cfg2 = load_config(_config(tmp_path), [f"run.out={out}", "train.epochs=1", "train.seed=5"])
    train(cfg2)
    new = read_metrics(out)
    assert len(old) == 2 and len(new) == 1 and new[0]["train_loss"] != old[0]["train_loss"]
    assert not (out / "epoch_0002.safetensors").exists()  # the old run is gone, as a whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no stage, no trash
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 5


def test_leftover_temporaries_are_cleaned(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(_config(tmp_path), [f"run.out={out}", "train.epochs=2"])
    train(load_config(_config(tmp_path), [f"run.out={out}"]))
    leftover = out / ".last.safetensors.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    train(cfg, resume=True)
    assert not leftover.exists() and len(read_metrics(out)) == 2


# --------------------------------------------------------------------------------- 2. silently accepted


@pytest.mark.parametrize("key,value", [
    ("lr", float("nan")), ("lr", 0.0), ("lr", -0.1), ("momentum", -0.1), ("momentum", 1.0), ("gamma", 0.0),
    ("gamma", -1.0), ("warmup_epochs", float("nan")), ("warmup_epochs", -1.0), ("clip_grad_norm", -1.0),
    ("clip_grad_norm", 0.0), ("eval_batch_size", 0), ("min_lr", -1.0), ("weight_decay", float("inf")),
])
def test_train_values_out_of_range(key, value):
    with pytest.raises(ConfigError, match=rf"train\.{key} must be"):
        TrainConfig(**{key: value})
    with pytest.raises(ConfigError, match=rf"train\.{key}"):
        config_from_dict({"train": {key: value}})


@pytest.mark.parametrize("name,kwargs,exc,fragment", [
    ("nl", dict(scale=float("inf")), ValueError, "scale"),
    ("nl", dict(scale=float("nan")), ValueError, "scale"),
    ("nl", dict(scale="big"), TypeError, "scale"),
    ("nl", dict(memory_budget=float("nan")), ValueError, "memory_budget"),
    ("nl", dict(norm_groups=0), ValueError, "norm_groups"),
    ("nl", dict(norm_groups=1.5), ValueError, "norm_groups"),
    ("cgnl", dict(kernel="gaussian", rbf_gamma=float("nan")), ValueError, "rbf_gamma"),
    ("cgnl", dict(kernel="gaussian", rbf_gamma=-1.0), ValueError, "rbf_gamma"),
    ("cgnl", dict(kernel="gaussian", rbf_gamma="x"), TypeError, "rbf_gamma"),
])
def test_block_options_out_of_range(name, kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        nonlocalnet.build_block(name, 8, **kwargs)


def test_nonfinite_state_dict_is_refused():
    block = nonlocalnet.build_block("snl", 8)
    sd = {f"theta.{k}": v for k, v in block.edges.theta.state_dict().items()}
    sd.update({f"phi.{k}": v for k, v in block.edges.phi.state_dict().items()})
    sd["theta.weight"] = torch.full_like(sd["theta.weight"], float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        from_official_snl(sd)


def test_dtype_mismatch_names_both_dtypes():
    block = nonlocalnet.build_block("snl", 8)
    for dt in (torch.float64, torch.float16):
        with pytest.raises(TypeError, match=rf"{dt}.*torch\.float32.*block\.to"):
            block(torch.randn(1, 8, 4, 4, dtype=dt))


# ------------------------------------------------------------------------------------- 3. one line


def _one_line(capsys, argv: list[str], *fragments: str) -> str:
    with pytest.raises(SystemExit) if argv[0] == "bench" else _no_exit():
        rc = main(argv)
        assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert "error:" in last, err
    for f in fragments:
        assert f in last, last
    return last


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    d, _, _ = make_cifar10(tmp_path / "cifar")
    cfg = _config(tmp_path, data__name="cifar10", data__root=str(d), data__options={}, data__size=None)
    raw = (d / "data_batch_2").read_bytes()
    (d / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    _one_line(capsys, ["train", str(cfg), "--out", str(tmp_path / "r1")], "data_batch_2", "cannot")
    (d / "data_batch_2").write_bytes(raw)
    marker = tmp_path / "pwned"
    import pickle

    with open(d / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": _Evil(f"touch {marker}"), b"labels": [0]}, fh, protocol=2)
    _one_line(capsys, ["train", str(cfg), "--out", str(tmp_path / "r2")], "refus", "data_batch_3")
    assert not marker.exists()

    bare = tmp_path / "bare.pt"
    torch.save(torch.zeros(3), bare)
    _one_line(capsys, ["train", str(_config(tmp_path)), "--out", str(tmp_path / "r3"), "--set",
                       f"model.pretrained={bare}"], "bare.pt", "Tensor", "state dict")

    for argv, frag in ((["bench", "--sizes", "0"], "--sizes"), (["bench", "--video", "4x28"], "TxHxW"),
                       (["bench", "--blocks", "foo"], "'foo'")):
        _one_line(capsys, argv, frag)


def test_analysis_arguments_checked(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(_config(tmp_path)), "--out", str(out)]) == 0
    capsys.readouterr()
    _one_line(capsys, ["analyze", "attention", str(out), "--query", "40,3", "--out", str(tmp_path / "a")],
              "--query 40,3", "outside the image", "[0, 15]")
    with pytest.raises(SystemExit):
        main(["analyze", "spectrum", str(out), "--top", "0"])
    assert "--top" in capsys.readouterr().err


# --------------------------------------------------------------------------------- 4. NaN, defined


def test_nonfinite_loss_stops_before_the_step_and_skip_keeps_bn_finite(tmp_path):
    out = tmp_path / "stop"
    with pytest.raises(NonFiniteLossError, match="before the optimizer step"):
        train(load_config(_config(tmp_path), [f"run.out={out}", "train.lr=1.0e+30"]))
    assert not (out / "last.safetensors").exists()
    out = tmp_path / "skip"
    train(load_config(_config(tmp_path), [f"run.out={out}", "train.lr=1.0e+30", "train.nonfinite=skip",
                                          "train.max_skipped_steps=100"]))
    state = load_file(out / "last.safetensors")
    running = {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}
    assert running and all(bool(torch.isfinite(v).all()) for v in running.values())
    with pytest.raises(NonFiniteLossError, match="max_skipped_steps=1"):
        train(load_config(_config(tmp_path), [f"run.out={tmp_path / 'skip1'}", "train.lr=1.0e+30",
                                              "train.nonfinite=skip", "train.max_skipped_steps=1",
                                              "data.options.train_size=64"]))


def test_exp_kernels_stay_finite_at_large_inputs():
    """The softmax is max-shifted on every backend: finite up to inputs whose logits overflow float32 itself
    (|θ·φ| > 3.4e38, inputs of magnitude ~1e19 with unit weights), which is the documented limit."""
    x = torch.randn(1, 8, 6, 6) * 1e15
    for backend in ("dense", "chunked", "sdpa"):
        block = nonlocalnet.build_block("nl", 8, backend=backend, out_norm="none", memory_budget=0.001).eval()
        assert torch.isfinite(block(x)).all(), backend
    snl = nonlocalnet.build_block("snl", 8).eval()
    assert torch.isfinite(snl(torch.randn(1, 8, 6, 6) * 1e20)).all()


# ----------------------------------------------------------------------------- 5. logs without a terminal


def test_progress_lines_without_a_terminal(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "nonlocalnet", "train", str(_config(tmp_path)), "--out",
                           str(tmp_path / "r"), "--set", "run.log_every=0.001", "--set",
                           "data.options.train_size=64"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    steps = [ln for ln in lines if " step " in ln and "samples/s" in ln]
    assert len(steps) >= 2 and any(ln.startswith("epoch 1/1 ") for ln in lines)
    assert math.isfinite(float(steps[0].split("loss ")[1].split()[0]))
