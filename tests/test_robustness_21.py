"""Issue 21: one writer per run directory (two real processes), a full disk, a resume of a changed model,
checkpoints with a wrong dtype or NaN, factories, placements, folder datasets, converters, summarize / bench /
--out / --device, and the NaN semantics the trainer relies on. Each case asserts that the message names the
argument, key or file."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _util import Tokens
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import nonlocalnet
from nonlocalnet.cli import main
from nonlocalnet.compat import from_cgnl, from_timm
from nonlocalnet.models import build_model, insert_blocks
from nonlocalnet.runs import (
    CheckpointError,
    ConfigError,
    RunInUseError,
    load_config,
    load_run,
    read_metrics,
    run_lock,
)
from nonlocalnet.runs.layout import lock_path
from nonlocalnet.train import evaluate_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"name": "demo", "size": 16, "options": {"train_size": 32, "test_size": 16}},
    "model": {"arch": "preresnet20", "blocks": [{"stage": 1, "after_block": 2, "block": "snl"}]},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "milestones": []},
    "run": {"device": "cpu", "keep_epochs": False},
}


def _config(tmp_path: Path, name: str = "cfg", **sections) -> Path:
    raw = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _error_line(capsys, argv: list[str], rc: int = 2) -> str:
    """Run the CLI; it must end with ``rc`` and one ``nonlocalnet: error:`` line, no traceback."""
    assert main(argv) == rc
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("nonlocalnet: error: "), err
    return last


def _argparse_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished 1-epoch run (SNL block), shared by the tests that only read it."""
    d = tmp_path_factory.mktemp("trained")
    out = d / "run"
    train(load_config(_config(d), [f"run.out={out}"]))
    return out


# ------------------------------------------------------------------------------- 1. one writer per run dir


def test_second_writer_is_refused_and_metrics_are_not_mixed(tmp_path):
    out = tmp_path / "run"
    cfg = _config(tmp_path, train={"epochs": 100000, "max_steps_per_epoch": 1, "max_eval_batches": 1},
                  run={"out": str(out)})
    a = subprocess.Popen([sys.executable, "-m", "nonlocalnet", "train", str(cfg)], env=_env(), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and a.poll() is None and len(read_metrics(out)) < 2:
            time.sleep(0.05)
        assert a.poll() is None and len(read_metrics(out)) >= 2, "the first run did not start"
        owner = json.loads(lock_path(out).read_text())
        assert owner["pid"] == a.pid and owner["host"] == socket.gethostname()
        b = subprocess.run([sys.executable, "-m", "nonlocalnet", "train", str(cfg), "--set", "train.seed=1"],
                           env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
        c = subprocess.run([sys.executable, "-m", "nonlocalnet", "train", str(cfg), "--resume"],
                           env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert a.poll() is None, "the first run ended before the second one was refused"
    finally:
        a.send_signal(signal.SIGTERM)
        _, a_err = a.communicate(timeout=120)
    for r in (b, c):
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1] == (
            f"nonlocalnet: error: run directory {out.resolve()} is in use by PID {a.pid} on host "
            f"{socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner['since']))}; "
            f"wait for that run to end or choose another run.out (its lock file: {lock_path(out)})")
    # SIGTERM: one line, exit 143, the lock released; metrics are the first run's epochs 1..k, once each
    assert a.returncode == 128 + signal.SIGTERM, a_err[-2000:]
    assert a_err.strip().splitlines()[-1] == ("nonlocalnet: error: terminated by signal SIGTERM; a training run "
                                              "continues with --resume")
    assert not lock_path(out).exists()
    epochs = [r["epoch"] for r in read_metrics(out)]
    assert epochs == list(range(1, len(epochs) + 1))
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 0


def test_stale_lock_is_taken_over_and_a_held_one_refuses(tmp_path, capsys):
    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "since": 1.0e9, "command": "killed"}
    lock_path(out).write_text(json.dumps(stale) + "\n")  # left by a `kill -9`ed run: present, not flock-ed
    train(load_config(_config(tmp_path), [f"run.out={out}"]))
    err = capsys.readouterr().err
    assert f"run directory {out.resolve()}: taking over the lock of PID {stale['pid']} on host " in err
    assert "ended without releasing it" in err
    assert not lock_path(out).exists() and len(read_metrics(out)) == 1
    # a held lock refuses train (also in the same process) and a sweep that reaches the run
    with run_lock(out, lock_path(out)):
        with pytest.raises(RunInUseError, match=rf"run directory {out.resolve()} is in use by PID {os.getpid()}"):
            train(load_config(_config(tmp_path), [f"run.out={out}", "train.epochs=2"]), resume=True)
    sw = tmp_path / "sw"
    with run_lock(sw / "cfg" / "seed0", lock_path(sw / "cfg" / "seed0")):
        last = _error_line(capsys, ["sweep", str(_config(tmp_path)), "--seed-list", "0", "--out", str(sw)])
    assert f"run directory {(sw / 'cfg' / 'seed0').resolve()} is in use by PID {os.getpid()}" in last
    assert len(read_metrics(out)) == 1


# ------------------------------------------------------------------------------------------ 2. disk full


def test_disk_full_while_writing_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cfg = _config(tmp_path, run={"out": str(out)})
    assert main(["train", str(cfg)]) == 0
    before = load_file(out / "last.safetensors")
    real_fsync = os.fsync

    def full(fd):
        if ".last.next.safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    capsys.readouterr()
    last = _error_line(capsys, ["train", str(cfg), "--resume", "--set", "train.epochs=2"])
    assert f"disk full while writing {out / 'last.next.safetensors'}: it needs " in last
    assert " MiB free, " in last and "MiB are left on that file system" in last
    assert "continue the run with `nonlocalnet train CONFIG --resume`" in last
    assert not list(out.glob(".*.tmp")) and not lock_path(out).exists()
    after = load_file(out / "last.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the previous checkpoint is intact
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(["train", str(cfg), "--resume", "--set", "train.epochs=2"]) == 0
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]


# ----------------------------------------------------------------------------------- 3. resume, changed model


def test_resume_of_a_changed_model_is_refused_unless_asked(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _config(tmp_path, run={"out": str(out)})
    assert main(["train", str(cfg)]) == 0
    change = ["--set", "model.blocks.0.block=cheby", "--set", "model.blocks.0.options={order: 1}",
              "--set", "train.epochs=2"]
    last = _error_line(capsys, ["train", str(cfg), "--resume", *change])
    assert "model.blocks.0.block ('snl' in the checkpoint, 'cheby' now)" in last
    assert "model.blocks.0.options.order (None in the checkpoint, 1 now)" in last
    assert "--allow-model-change" in last and len(read_metrics(out)) == 1
    assert main(["train", str(cfg), "--resume", "--allow-model-change", *change]) == 0
    assert "loading the checkpoint of another model" in capsys.readouterr().err
    assert len(read_metrics(out)) == 2
    # a change outside model.* is still only a warning
    assert main(["train", str(cfg), "--resume", "--set", "train.epochs=3", "--set", "model.blocks.0.block=cheby",
                 "--set", "model.blocks.0.options={order: 1}", "--set", "train.lr=0.01"]) == 0
    assert "differs from the checkpoint's in train.epochs, train.lr" in capsys.readouterr().err
    _error_line(capsys, ["train", str(cfg), "--allow-model-change"])


# -------------------------------------------------------------------------------- 4. checkpoint dtype / NaN


@pytest.mark.parametrize("fault", ["float16", "nan"])
def test_checkpoint_with_a_wrong_dtype_or_nan_is_refused(trained, tmp_path, capsys, fault):
    run = tmp_path / "copy"
    run.mkdir()
    (run / "config.yaml").write_bytes((trained / "config.yaml").read_bytes())
    state = load_file(trained / "last.safetensors")
    key = "stage1.1.nonlocal_block.edges.theta.weight"
    state[key] = state[key].half() if fault == "float16" else torch.full_like(state[key], float("nan"))
    save_file(state, run / "last.safetensors")
    frag = f"tensor {key!r} is torch.float16 but the model's is torch.float32" if fault == "float16" \
        else f"tensor {key!r} holds NaN or inf ({state[key].numel()} of {state[key].numel()} values)"
    last = _error_line(capsys, ["eval", str(run / "last.safetensors")])
    assert f"checkpoint {run / 'last.safetensors'}: {frag}" in last
    with pytest.raises(CheckpointError, match=frag.replace("(", r"\(").replace(")", r"\)")):
        load_run(run)


# ------------------------------------------------------------------------------------------- 5. factories


def ignores_classes(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def raises(num_classes: int) -> nn.Module:
    raise RuntimeError("my model is broken")


def test_factory_outputs_options_and_failures_are_named(tmp_path, capsys):
    cfg = _config(tmp_path, model={"arch": "test_robustness_21:ignores_classes", "blocks": []})
    last = _error_line(capsys, ["train", str(cfg), "--out", str(tmp_path / "r")])
    assert "arch 'test_robustness_21:ignores_classes': the model gives shape (2, 10) for a batch of 2, expected " \
           "logits (2, 2) for num_classes=2" in last and "ignore num_classes" in last
    cfg = _config(tmp_path, model={"arch": "test_robustness_21:raises", "blocks": []})
    last = _error_line(capsys, ["train", str(cfg), "--out", str(tmp_path / "r")])
    assert "arch 'test_robustness_21:raises': its factory test_robustness_21.raises raised RuntimeError: my model " \
           "is broken" in last
    with pytest.raises(ValueError, match=r"arch 'preresnet20': num_classes must be a positive integer .* got 0"):
        build_model("preresnet20", 0)
    with pytest.raises(ValueError, match=r"arch 'preresnet20': unknown option\(s\) 'depht' \(model.options\); "
                                         r"valid options: bottleneck, widths, in_channels"):
        build_model("preresnet20", 10, depht=20)
    with pytest.raises(ValueError, match=r"'zero_init'.*valid options: zero_init_residual, in_channels; did you "
                                         r"mean 'zero_init_residual'"):
        build_model("resnet50", 10, zero_init=True)


# ------------------------------------------------------------------------------------------- 6. placements


def test_placements_check_what_they_state():
    with pytest.raises(ValueError, match=r"grid \[8, 7\] leaves 9 of the L=65 tokens .* confirm it with the "
                                         r"placement key 'prefix_tokens': 9; else correct 'grid' \(e\.g\. grid "
                                         r"\[8, 8\] with 1 prefix token"):
        insert_blocks(Tokens(), {"at": "blocks", "block": "nl", "grid": [8, 7]}, input_shape=(3, 32, 32))
    m = insert_blocks(Tokens(), {"at": "blocks", "block": "nl", "grid": [8, 7], "prefix_tokens": 9},
                      input_shape=(3, 32, 32))
    assert (m.blocks.layout.spatial, m.blocks.layout.prefix) == ((8, 7), 9)  # confirmed: obeyed
    with pytest.raises(ValueError, match=r"'layout': 'channels_first' reads 17 channels from the features of shape "
                                         r"\(2, 17, 12\), but they look like tokens .*the last dim, 12, is the "
                                         r"channel axis.*'in_channels': 17"):
        insert_blocks(Tokens(), {"at": "blocks", "block": "nl", "layout": "channels_first"}, input_shape=(3, 16, 16))
    spec = {"stage": 1, "after_block": 2, "block": "nl"}
    with pytest.raises(ValueError, match=r"placement at 'stage1.1' \(after it\): 'layout': 'channels_last' reads 32 "
                                         r"channels .*shape \(2, 16, 32, 32\), but they look channels-first .*dim 1, "
                                         r"16, is the channel axis"):
        insert_blocks(build_model("preresnet20", 10), {**spec, "layout": "channels_last"}, input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"placement at 'stage1.1': in_channels=32 but the tensor has 16"):
        insert_blocks(build_model("preresnet20", 10), {**spec, "in_channels": 32, "dim": 2}, input_shape=(3, 32, 32))
    # the config goes through the same check (its input shape is the data's)
    with pytest.raises(ConfigError, match=r"model.blocks: placement at 'stage1.1': in_channels=32 but the tensor "
                                          r"has 16"):
        from nonlocalnet.runs import build_model_from_config

        build_model_from_config(load_config(None, ["data.name=demo", "data.size=16", "model.arch=preresnet20",
                                                   "model.blocks=[{stage: 1, after_block: 2, block: nl, "
                                                   "in_channels: 32, dim: 2}]"]), 5)


# ------------------------------------------------------------------------------------------ 7. folder data


def _folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


@pytest.mark.parametrize("workers", [0, 1])
def test_folder_empty_class_and_unreadable_file_are_one_line(tmp_path, capsys, workers):
    root = tmp_path / "data"
    _folder(root)
    (root / "train" / "empty").mkdir()
    cfg = _config(tmp_path, data={"name": "folder", "root": str(root), "size": 16, "options": {},
                                  "num_workers": workers}, model={"blocks": []}, train={"batch_size": 2})
    last = _error_line(capsys, ["train", str(cfg), "--out", str(tmp_path / "r1")])
    assert f"class folder {root / 'train' / 'empty'} holds no images" in last
    (root / "train" / "empty").rmdir()
    (root / "train" / "a" / "9.png").write_bytes(b"")
    last = _error_line(capsys, ["train", str(cfg), "--out", str(tmp_path / "r2")])
    assert last == f"nonlocalnet: error: cannot decode image {root / 'train' / 'a' / '9.png'}: an empty (0-byte) file"
    (root / "train" / "a" / "9.png").write_text("not an image")
    last = _error_line(capsys, ["train", str(cfg), "--out", str(tmp_path / "r3")])
    assert f"cannot decode image {root / 'train' / 'a' / '9.png'}: UnidentifiedImageError" in last


# ------------------------------------------------------------------------------------------- 8. converters


def _timm_sd(c: int = 16, cr: int = 8) -> dict[str, torch.Tensor]:
    sd = {f"{m}.weight": torch.randn(cr, c, 1, 1) for m in "tpg"}
    sd.update({f"{m}.bias": torch.randn(cr) for m in "tpg"})
    sd.update({"z.weight": torch.randn(c, cr, 1, 1), "z.bias": torch.randn(c), "norm.weight": torch.rand(c),
               "norm.bias": torch.randn(c), "norm.running_mean": torch.randn(c), "norm.running_var": torch.rand(c) + 1,
               "norm.num_batches_tracked": torch.tensor(7)})
    return sd


def test_converters_refuse_mixed_and_integer_dtypes():
    block = from_timm(_timm_sd())  # the integer BatchNorm counter is fine
    assert {p.dtype for p in block.parameters()} == {torch.float32}
    sd = _timm_sd()
    sd["g.bias"] = sd["g.bias"].half()
    with pytest.raises(ValueError, match=r"from_timm\(NonLocalAttn\): the weights mix dtypes \(torch.float16, "
                                         r"torch.float32\): \['g.bias'\] is torch.float16 but 't.weight' is "
                                         r"torch.float32"):
        from_timm(sd)
    cgnl = {"t.weight": torch.ones(8, 16, 1, 1), "p.weight": torch.ones(8, 16, 1, 1),
            "g.weight": torch.ones(8, 16, 1, 1), "z.weight": torch.ones(16, 8, 1, 1), "gn.weight": torch.ones(16),
            "gn.bias": torch.zeros(16)}
    assert from_cgnl(cgnl).units[0].g.weight.dtype == torch.float32
    with pytest.raises(ValueError, match=r"from_cgnl\(kernel='dot_product'\): weights must be floating-point "
                                         r"tensors; \['t.weight', 'p.weight', .*\] are torch.int64"):
        from_cgnl({k: v.long() for k, v in cgnl.items()})


# --------------------------------------------------------------------------------- 9. summarize and bench


def test_summarize_dedupes_and_names_bad_files(trained, tmp_path, capsys):
    assert main(["summarize", str(trained), str(trained), "--out", str(tmp_path / "s")]) == 0
    assert f"{trained} is given twice: counted once" in capsys.readouterr().err
    data = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert data["groups"][0]["seeds"] == [0] and data["groups"][0]["runs"] == [str(trained)]

    run = tmp_path / "copy"
    run.mkdir()
    (run / "config.yaml").write_bytes((trained / "config.yaml").read_bytes())
    good = (trained / "metrics.jsonl").read_text()
    for text, frag in ((good + '{"epoch": 2, "top1": \n', f"{run / 'metrics.jsonl'}:2: not a JSON record"),
                       (good + '{"epoch": 2, "loss": 1.0}\n', f"{run / 'metrics.jsonl'}:2: the record has no numeric "
                                                              "'top1' (its keys: epoch, loss)"),
                       (good + "[1, 2]\n", f"{run / 'metrics.jsonl'}:2: a list, not a JSON object")):
        (run / "metrics.jsonl").write_text(text)
        assert frag in _error_line(capsys, ["summarize", str(run), "--out", str(tmp_path / "s2")])
    (run / "metrics.jsonl").write_text(good)
    (run / "config.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    last = _error_line(capsys, ["summarize", str(run), "--out", str(tmp_path / "s2")])
    assert f"config file {run / 'config.yaml'} is not UTF-8 text (undecodable byte at offset 0)" in last
    save_file(load_file(trained / "last.safetensors"), run / "last.safetensors")
    for argv in (["eval", str(run / "last.safetensors")], ["analyze", "spectrum", str(run)]):
        assert f"config file {run / 'config.yaml'} is not UTF-8 text" in _error_line(capsys, argv)


def test_bench_arguments_are_checked(capsys):
    assert "argument --backends: invalid choice: 'foo' (choose from 'auto', 'dense', 'lowrank', 'sdpa', 'chunked')" \
        in _argparse_error(capsys, ["bench", "--backends", "foo"])
    assert "argument --dense-cap-gib: expected a positive number of GiB, got '-1'" \
        in _argparse_error(capsys, ["bench", "--dense-cap-gib", "-1"])
    from nonlocalnet.bench import run, run_naive

    with pytest.raises(ValueError, match=r"backends \(--backends\): unknown 'foo'; valid: auto, dense, lowrank"):
        run(quick=True, backends=["foo"])
    for f in (run, run_naive):
        with pytest.raises(ValueError, match=r"dense_cap_gib \(--dense-cap-gib\) must be a positive number of GiB, "
                                             r"got -1"):
            f(dense_cap_gib=-1)


# ----------------------------------------------------------------------------- 10. --out, --device, eval


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("not a directory")
    cfg = _config(tmp_path)
    assert f"run.out {f} names a file, not a directory" in _error_line(capsys, ["train", str(cfg), "--out", str(f)])
    assert f"run.out {f / 'sub'} cannot be a directory: its parent {f} is a file" in \
        _error_line(capsys, ["train", str(cfg), "--out", str(f / "sub")])
    assert f"sweep: --out {f} names a file" in _error_line(capsys, ["sweep", str(cfg), "--seeds", "1", "--out",
                                                                    str(f)])
    assert not list(tmp_path.glob(".*"))  # no lock file, no staging dir left


def test_summarize_out_file(trained, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert f"summarize: --out {f} names a file, not a directory" in \
        _error_line(capsys, ["summarize", str(trained), "--out", str(f)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(trained, tmp_path, capsys):
    why = "run.device=cuda but CUDA is not available"
    assert why in _error_line(capsys, ["train", str(_config(tmp_path)), "--out", str(tmp_path / "r"), "--set",
                                       "run.device=cuda"])
    assert why in _error_line(capsys, ["eval", str(trained / "last.safetensors"), "--set", "run.device=cuda"])
    assert "argument --device: device 'cuda': CUDA is not available" in \
        _argparse_error(capsys, ["bench", "--device", "cuda"])
    assert "argument --device: device 'cuda': CUDA is not available" in \
        _argparse_error(capsys, ["analyze", "cost", str(trained), "--device", "cuda"])


def test_eval_of_a_directory(trained, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"no checkpoint in {empty} (expected last.safetensors, best.safetensors or epoch_XXXX.safetensors" in \
        _error_line(capsys, ["eval", str(empty)])
    assert evaluate_checkpoint(trained) == evaluate_checkpoint(trained / "last.safetensors")


def test_failed_overwrite_removes_its_staging_dir(trained, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _config(tmp_path, run={"out": str(out), "overwrite": True})
    assert main(["train", str(cfg)]) == 0
    before = (out / "last.safetensors").read_bytes()
    assert main(["train", str(cfg), "--set", "train.lr=1.0e+30"]) == 3  # fails in its first epoch
    assert "non-finite loss" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert (out / "last.safetensors").read_bytes() == before


# ---------------------------------------------------------------------------------------- 11. NaN semantics


def test_a_nan_sample_stays_in_its_sample_and_a_nan_batch_poisons_batchnorm():
    model = insert_blocks(build_model("preresnet20", 10), {"stage": 1, "after_block": 2, "block": "snl"},
                          input_shape=(3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    bad = x.clone()
    bad[1, :, 3, 5] = float("nan")
    model.eval()
    with torch.no_grad():
        clean, out = model(x), model(bad)
    assert torch.isnan(out[1]).all()
    assert torch.equal(out[[0, 2, 3]], clean[[0, 2, 3]])  # the other samples bit-identical
    model.train()
    with torch.no_grad():
        out = model(bad)
    assert torch.isnan(out).all()  # train mode: the batch statistics carry it to every sample
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.isnan(m.running_mean).all() for m in bns[1:])  # and into the running statistics


def test_every_block_keeps_a_nan_in_its_sample():
    x = torch.randn(3, 8, 6, 6)
    x[0, 2, 1, 1] = float("nan")
    for name in nonlocalnet.list_blocks():
        if name == "cgnl":
            block = nonlocalnet.build_block(name, 8, norm_groups=2).eval()
        else:
            block = nonlocalnet.build_block(name, 8).eval()
        with torch.no_grad():
            y, ref = block(x), block(x[1:])
        assert torch.equal(y[1:], ref), name
