"""The training loop: SGD + multistep/cosine LR with warmup, AMP, channels_last, torch.compile, DDP,
exact resume, NaN guard, metrics and checkpoints.

Reproducibility: with ``train.seed`` fixed, a run is a function of its config on a given machine and
software stack (bit-exact on CPU; on GPU add ``train.deterministic: true``).  Every source of randomness
is a generator whose state is checkpointed every epoch: python ``random``, numpy, torch CPU/CUDA, the data
generator (sample order, DataLoader worker seeds) and the augmentation generator (on the training device,
one per rank).  ``--resume`` restores all of them, so an interrupted run continued from its last checkpoint
writes the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from nonlocalnet.runs import (
    CheckpointError,
    Config,
    ConfigError,
    DiskFullError,
    batch_transform,
    build_datasets,
    build_model_from_config,
    config_to_dict,
    dump_config,
    load_weights,
    load_weights_into,
    read_metadata,
    require_directory,
    run_lock,
    save_weights,
    terminate_on_sigterm,
)
from nonlocalnet.runs.checkpoint import (
    atomic_write_bytes,
    capture_rng,
    disk_full,
    load_state,
    restore_rng,
    save_state,
    state_path,
)
from nonlocalnet.runs.layout import (
    CONFIG_FILE,
    LAST_WEIGHTS,
    METRICS_FILE,
    NEXT_WEIGHTS,
    RUN_FILES,
    TMP_GLOB,
    epoch_file,
    lock_path,
    stage_path,
)

from . import distributed as D
from .batches import Batches
from .evaluate import autocast, evaluate, memory_format
from .schedule import build_scheduler

__all__ = ["NonFiniteLossError", "TrainingError", "train"]


class TrainingError(RuntimeError):
    """A training run that cannot start or continue (the message says why)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good epoch."""


def _log(env: D.DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- helpers


def _configure_determinism(cfg: Config, device: torch.device) -> None:
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional extra `tensorboard`: imported lazily
    except ImportError as e:
        raise TrainingError("run.tensorboard is true but the tensorboard package is not installed: "
                            "pip install 'nonlocalnet[tensorboard]' (or set run.tensorboard=false)") from e
    return SummaryWriter


def _open_tensorboard(out: Path, purge_step: int | None):
    return _check_tensorboard()(log_dir=str(out / "tensorboard"), purge_step=purge_step)


def _clean_temporaries(out: Path) -> None:
    """Remove the temporary files of checkpoint writes that a killed process left behind."""
    if out.is_dir():
        for p in out.glob(TMP_GLOB):
            p.unlink(missing_ok=True)


def _fresh_out(out: Path, overwrite: bool) -> Path | None:
    """Where a fresh run writes until its first good checkpoint: ``None`` (``out`` itself) when ``out`` holds
    no run; a staging directory beside ``out`` when it holds one and ``overwrite`` allows replacing it.

    Nothing of the previous run is touched here: it is replaced by :func:`_replace_run` only after the new run
    has validated everything and saved its first epoch."""
    old = [out / f for f in RUN_FILES if (out / f).exists()]
    old += sorted(out.glob("epoch_[0-9]*.safetensors")) if out.is_dir() else []
    if not old:
        _clean_temporaries(out)
        return None
    # a run killed before its first checkpoint left config.yaml and an empty metrics.jsonl: no result to keep, so it
    # starts again, staged as with overwrite (those files stay until the new run has saved its first epoch)
    killed_early = old == [out / METRICS_FILE] and not (out / METRICS_FILE).read_text().strip()
    if not overwrite and not killed_early:
        raise TrainingError(f"{out} already holds a run ({', '.join(p.name for p in old[:4])}"
                            f"{', ...' if len(old) > 4 else ''}); continue it with --resume, choose another "
                            "run.out, or set run.overwrite=true to replace it")
    stage = stage_path(out)
    if stage.exists():  # a replacement that was killed before its first checkpoint: nothing of value
        shutil.rmtree(stage)
    return stage


def _replace_run(stage: Path, out: Path) -> None:
    """Put the new run (``stage``, holding a good checkpoint) in place of the old one at ``out``."""
    trash = out.parent / f".{out.name}.replaced"
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(out, trash)
    os.rename(stage, out)
    shutil.rmtree(trash)


def _write_metrics_file(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in history).encode())


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _weights_metadata(cfg: Config, epoch: int, step: int, extra: dict[str, Any] | None = None) -> dict:
    meta = {"format": "nonlocalnet", "epoch": epoch, "step": step, "arch": cfg.model.arch,
            "config": dump_config(cfg)}
    meta.update(extra or {})
    return meta


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _gather_rng(env: D.DistEnv, gens: dict[str, torch.Generator]) -> list[dict[str, Any]]:
    state = capture_rng(gens)
    if not env.distributed:
        return [state]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, state)
    return out


# --------------------------------------------------------------------------------------------- train


def _resume_point(out: Path, env: D.DistEnv) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    weights_path = out / LAST_WEIGHTS
    spath = state_path(weights_path)
    if not weights_path.exists() and not spath.exists():
        return None
    state = load_state(spath)
    epoch = int(state["epoch"])
    meta_epoch = int(read_metadata(weights_path).get("epoch", -1)) if weights_path.exists() else -1
    if meta_epoch == epoch:
        return state, load_weights(weights_path)
    # interrupted between writing last.state.pt and renaming last.next.safetensors: use the new weights
    for alt in (out / NEXT_WEIGHTS, out / epoch_file(epoch)):
        if alt.exists() and int(read_metadata(alt).get("epoch", -1)) == epoch:
            _log(env, f"resume: {weights_path} is from epoch {meta_epoch}, {spath} from epoch {epoch}; "
                      f"using {alt}")
            return state, load_weights(alt)
    raise CheckpointError(f"cannot resume from {out}: {weights_path} is from epoch {meta_epoch} but {spath} "
                          f"is from epoch {epoch}, and neither {NEXT_WEIGHTS} nor "
                          f"epoch_{epoch:04d}.safetensors holds that epoch")


def _config_differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``[(dotted key, value in a, value in b)]`` where two raw configs differ (lists compared item by item)."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = []
        for k in sorted(set(a) | set(b), key=str):
            diffs += _config_differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return diffs
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _config_differences(x, y, f"{prefix}.{i}")]
    return [] if a == b else [(prefix, a, b)]


# model.* keys that may change on a resume: they do not change the model whose weights the checkpoint holds
_MODEL_KEYS_FREE_ON_RESUME = ("model.pretrained",)


def _show_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    shown = [f"{k} ({a!r} in the checkpoint, {b!r} now)" for k, a, b in diffs[:8]]
    return ", ".join(shown) + (f", and {len(diffs) - 8} more" if len(diffs) > 8 else "")


def train(cfg: Config, *, resume: bool = False, allow_model_change: bool = False) -> dict[str, Any]:
    """Run (or resume) training as configured; returns a summary dict (rank 0's view).

    The process writing the run (rank 0) holds the lock of ``run.out`` for the whole run (:mod:`nonlocalnet.runs.lock`):
    a second writer gets :class:`~nonlocalnet.runs.RunInUseError`. A resume refuses a model that differs from the one
    its checkpoint saved (the ``model`` keys of the config) unless ``allow_model_change``.

    Raises :class:`NonFiniteLossError` when the loss becomes NaN/inf (checkpoints on disk stay at the last
    good epoch), :class:`ConfigError`, :class:`CheckpointError` or :class:`TrainingError` otherwise.
    """
    out = require_directory(cfg.run.out, "run.out")
    env = D.setup(cfg.run.device)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(terminate_on_sigterm())
            if env.is_main:
                stack.enter_context(run_lock(out, lock_path(out), log=lambda m: _log(env, m)))
            try:
                return _train(cfg, env, resume, allow_model_change)
            except BaseException:
                if env.is_main and not resume and stage_path(out).exists():
                    # a replacement that failed before its first checkpoint: its staging dir holds nothing of value
                    shutil.rmtree(stage_path(out), ignore_errors=True)
                raise
    finally:
        D.cleanup(env)


@contextlib.contextmanager
def _disk_full_is_an_error(out: Path, resumable: bool) -> Iterator[None]:
    """A full disk while writing the run is a :class:`TrainingError` that says how to continue."""
    try:
        yield
    except DiskFullError as e:
        raise TrainingError(f"{e}. {_continue(out, resumable)}") from None
    except OSError as e:
        if not disk_full(e):
            raise
        raise TrainingError(f"disk full while writing {e.filename or out}. {_continue(out, resumable)}") from None


def _continue(out: Path, resumable: bool) -> str:
    if resumable:
        return (f"The last completed epoch's checkpoint in {out} is intact: free some space, then continue the run "
                "with `nonlocalnet train CONFIG --resume`")
    return f"No epoch of this run was saved: free some space, then start it again (run.out {out})"


def _train(cfg: Config, env: D.DistEnv, resume: bool, allow_model_change: bool = False) -> dict[str, Any]:
    t = cfg.train
    device = env.device
    out = Path(cfg.run.out)
    if t.batch_size % env.world_size:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the world size "
                          f"{env.world_size}")
    bs = t.batch_size // env.world_size
    eval_bs = max((t.eval_batch_size or t.batch_size) // env.world_size, 1)
    _configure_determinism(cfg, device)
    if cfg.run.tensorboard and env.is_main:
        _check_tensorboard()
    stage = None
    if env.is_main:
        if resume:
            _clean_temporaries(out)
        else:
            stage = _fresh_out(out, cfg.run.overwrite)
    run_dir = stage or out  # rank 0 writes here; `out` itself once the new run has a good checkpoint
    seed_everything(t.seed)

    # --- data
    datasets = build_datasets(cfg)
    train_ds, test_ds = datasets["train"], datasets["test"]
    num_classes = cfg.model.num_classes or int(train_ds.num_classes)
    if num_classes < int(train_ds.num_classes):
        raise ConfigError(f"model.num_classes={num_classes} < the dataset's {train_ds.num_classes} classes")
    train_batches = Batches(train_ds, env, bs, in_memory=cfg.data.in_memory,
                             num_workers=cfg.data.num_workers, train=True, drop_last=t.drop_last)
    test_batches = Batches(test_ds, env, eval_bs, in_memory=cfg.data.in_memory,
                            num_workers=cfg.data.num_workers, train=False, drop_last=False)
    steps_per_epoch = len(train_batches)
    if t.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ConfigError(f"no training step per epoch: {len(train_ds)} samples, batch size {bs} per "
                          f"process, drop_last={t.drop_last}")

    # --- generators (data order / DataLoader seeds: same on every rank; augmentation: per rank)
    data_gen = torch.Generator().manual_seed(t.seed)
    aug_gen = torch.Generator(device=device).manual_seed(t.seed * 1000 + 1 + env.rank)
    gens = {"data": data_gen, "augment": aug_gen}
    train_tf = batch_transform(train_ds, True, cfg, aug_gen)
    test_tf = batch_transform(test_ds, False, cfg)

    # --- model
    model = build_model_from_config(cfg, num_classes, log=lambda m: _log(env, m)).to(device)
    use_cl = t.channels_last and device.type == "cuda"
    if use_cl:
        fmt = torch.channels_last if len(getattr(train_ds, "input_shape", (3, 1, 1))) == 3 \
            else torch.channels_last_3d
        model = model.to(memory_format=fmt)
    if env.distributed and t.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                                weight_decay=t.weight_decay, nesterov=t.nesterov)
    scheduler = build_scheduler(optimizer, steps_per_epoch, t)
    scaler = torch.amp.GradScaler(device.type) if t.amp == "fp16" else None

    # --- resume
    start_epoch, step = 0, 0
    best_top1, best_epoch = -1.0, 0
    history: list[dict[str, Any]] = []
    if resume:
        point = _resume_point(out, env)
        if point is None:
            _log(env, f"resume: no checkpoint in {out}; starting from scratch")
        else:
            state, weights = point
            saved_cfg = state.get("config")
            if isinstance(saved_cfg, str):
                diffs = _config_differences(yaml.safe_load(saved_cfg) or {}, config_to_dict(cfg))
                changed = [d for d in diffs if d[0].split(".")[0] == "model"
                           and not d[0].startswith(_MODEL_KEYS_FREE_ON_RESUME)]
                if changed and not allow_model_change:
                    raise CheckpointError(
                        f"cannot resume {out}: the configured model differs from the one its checkpoint saved, in "
                        f"{_show_differences(changed)}; a resume continues the model it saved. Undo the change "
                        "(or train it as a new run.out), or load these weights into the changed model on purpose "
                        "with `train --resume --allow-model-change`")
                if changed:
                    _log(env, "resume: warning: --allow-model-change: loading the checkpoint of another model "
                              f"(it differs in {_show_differences(changed)})")
                others = [d for d in diffs if d not in changed]
                if others:
                    _log(env, "resume: warning: the config differs from the checkpoint's in "
                              f"{', '.join(k for k, _, _ in others)}")
            load_weights_into(model, weights, out / LAST_WEIGHTS)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            rngs = state["rng"]
            if len(rngs) != env.world_size:
                _log(env, f"resume: warning: saved by {len(rngs)} processes, now {env.world_size}; "
                          "the continuation is not bit-exact")
            restore_rng(rngs[env.rank % len(rngs)], gens)
            start_epoch, step = int(state["epoch"]), int(state["step"])
            best_top1, best_epoch = float(state["best_top1"]), int(state["best_epoch"])
            history = list(state.get("history", []))
            _log(env, f"resume: from epoch {start_epoch} (step {step}) in {out}")
    if start_epoch >= t.epochs:
        _log(env, f"nothing to do: {start_epoch} of {t.epochs} epochs done")

    # --- wrap
    train_model: nn.Module = model
    if env.distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                          find_unused_parameters=t.find_unused_parameters)
    if t.compile:
        train_model = torch.compile(train_model)

    # --- outputs
    tb = None
    if env.is_main:
        with _disk_full_is_an_error(out, resumable=start_epoch > 0):
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(run_dir / CONFIG_FILE, dump_config(cfg).encode())
            _write_metrics_file(run_dir / METRICS_FILE, history)
        if cfg.run.tensorboard:
            tb = _open_tensorboard(run_dir, step if start_epoch else None)
    _log(env, f"training {cfg.model.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.3f} M params, "
              f"{len(cfg.model.blocks)} placement(s)) on {cfg.data.name}: {len(train_ds)} train / "
              f"{len(test_ds)} test samples, {steps_per_epoch} steps/epoch, device {device}, "
              f"world size {env.world_size}, out {out}"
              + (f" (written to {run_dir} until the first checkpoint replaces the previous run)" if stage else ""))

    show_bar = cfg.run.progress and env.is_main and sys.stderr.isatty()
    bn_buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    skipped = 0
    last_log = time.perf_counter()
    last: dict[str, Any] = history[-1] if history else {}
    try:
        for epoch in range(start_epoch, t.epochs):
            t0 = time.perf_counter()
            train_model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            lr_used = optimizer.param_groups[0]["lr"]
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not show_bar,
                       leave=False, dynamic_ncols=True, file=sys.stderr)
            for i, (x, y) in enumerate(train_batches.epoch(epoch, data_gen, limit=steps_per_epoch)):
                x = train_tf(x)
                if use_cl:
                    x = x.contiguous(memory_format=memory_format(x))
                lr_used = optimizer.param_groups[0]["lr"]
                saved_bn = [b.clone() for b in bn_buffers]  # the forward pass updates the running statistics
                with autocast(device, t.amp):
                    logits = train_model(x)
                    loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                if not _all_finite(env, loss.detach()):
                    with torch.no_grad():
                        for b, v in zip(bn_buffers, saved_bn):
                            b.copy_(v)
                    skipped += 1
                    where = f"epoch {epoch + 1}, step {i + 1} of {steps_per_epoch}"
                    if t.nonfinite == "stop" or skipped > t.max_skipped_steps:
                        why = ("train.nonfinite=stop" if t.nonfinite == "stop"
                               else f"more than train.max_skipped_steps={t.max_skipped_steps} skipped steps")
                        raise NonFiniteLossError(
                            f"non-finite loss (NaN or inf) at {where}; training stopped ({why}) before the "
                            f"optimizer step, BatchNorm statistics restored. The checkpoints on disk are from "
                            f"the last completed epoch ({epoch}). Lower train.lr, add train.warmup_epochs or "
                            "train.clip_grad_norm, or set train.nonfinite=skip.")
                    _log(env, f"warning: non-finite loss at {where}: step skipped ({skipped} so far)")
                    scheduler.step()
                    step += 1
                    bar.update(1)
                    continue
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if t.clip_grad_norm:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if t.clip_grad_norm:
                        nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
                    optimizer.step()
                scheduler.step()
                step += 1
                ld = loss.detach()
                loss_sum += ld.double() * y.numel()
                correct += (logits.detach().argmax(1) == y).sum().double()
                seen += y.numel()
                bar.update(1)
                if show_bar and (i + 1) % 20 == 0:
                    bar.set_postfix(loss=f"{ld.item():.4f}", lr=f"{lr_used:.4g}")
                elif not show_bar and env.is_main and time.perf_counter() - last_log >= cfg.run.log_every:
                    # no terminal (nohup, Slurm, CI): a plain progress line at a fixed interval
                    last_log = time.perf_counter()
                    _log(env, f"epoch {epoch + 1}/{t.epochs} step {i + 1}/{steps_per_epoch}  loss {ld.item():.4f}"
                              f"  lr {lr_used:.4g}  {seen * env.world_size / (last_log - t0):.1f} samples/s")
            bar.close()
            if seen == 0:
                raise NonFiniteLossError(f"every step of epoch {epoch + 1} had a non-finite loss and was skipped")
            totals = torch.stack([loss_sum, correct,
                                  torch.tensor(float(seen), dtype=torch.float64, device=device)])
            D.all_reduce_sum(env, totals)
            train_loss, train_correct, train_n = totals.tolist()
            D.broadcast_buffers(env, model)
            test = evaluate(model, test_batches, test_tf, env, amp=t.amp, channels_last=use_cl,
                            max_batches=t.max_eval_batches)
            elapsed = time.perf_counter() - t0
            k = epoch + 1
            is_best = test["top1"] > best_top1
            if is_best:
                best_top1, best_epoch = test["top1"], k
            record = {"epoch": k, "step": step, "train_loss": train_loss / train_n,
                      "train_top1": 100.0 * train_correct / train_n, "test_loss": test["loss"],
                      "top1": test["top1"], **({"top5": test["top5"]} if "top5" in test else {}),
                      "lr": lr_used, "time_s": round(elapsed, 3), "best_top1": best_top1, "best_epoch": best_epoch}
            history.append(record)
            last = record
            rngs = _gather_rng(env, gens)
            if env.is_main:
                with _disk_full_is_an_error(out, resumable=stage is None and epoch > 0):
                    _save_epoch(cfg, run_dir, model, optimizer, scheduler, scaler, rngs, record, history, is_best)
                    _append_metrics(run_dir / METRICS_FILE, record)
                if stage is not None:  # the new run has a good checkpoint: now it replaces the previous one
                    _replace_run(stage, out)
                    run_dir, stage = out, None
                if tb is not None:
                    for key in ("train_loss", "train_top1", "test_loss", "top1", "top5", "lr"):
                        if key in record:
                            tb.add_scalar(key, record[key], k)
                    tb.flush()
                _log(env, f"epoch {k}/{t.epochs}  loss {record['train_loss']:.4f}  "
                          f"top1 {record['top1']:.2f}  "
                          + (f"top5 {record['top5']:.2f}  " if "top5" in record else "")
                          + f"lr {lr_used:.4g}  "
                          f"{elapsed:.1f}s")
    finally:
        if tb is not None:
            tb.close()
    D.barrier(env)
    return {"out": str(out), "epochs": len(history), "best_top1": best_top1, "best_epoch": best_epoch,
            "last": last}


def _all_finite(env: D.DistEnv, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (one small all-reduce per step in DDP)."""
    ok = torch.isfinite(loss).to(torch.int32)
    if env.distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _save_epoch(cfg: Config, out: Path, model: nn.Module, optimizer, scheduler, scaler, rngs, record,
                history, is_best: bool) -> None:
    k, step = record["epoch"], record["step"]
    weights = _unwrap(model).state_dict()
    meta = _weights_metadata(cfg, k, step, {key: record[key] for key in ("top1", "top5") if key in record})
    # order matters for crash safety: epoch file, best, then the last.* pair
    if cfg.run.keep_epochs:
        save_weights(out / epoch_file(k), weights, meta)
    if is_best:
        save_weights(out / "best.safetensors", weights, meta)
    state = {
        "epoch": k,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rngs,
        "best_top1": record["best_top1"],
        "best_epoch": record["best_epoch"],
        "history": history,
        "config": dump_config(cfg),
    }
    # last.next.safetensors, then last.state.pt, then rename: at any crash point either the pair
    # (last.safetensors, last.state.pt) or (last.next.safetensors, last.state.pt) is of one epoch.
    nxt = out / NEXT_WEIGHTS
    save_weights(nxt, weights, meta)
    save_state(state_path(out / LAST_WEIGHTS), state)
    os.replace(nxt, out / LAST_WEIGHTS)


