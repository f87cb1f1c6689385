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
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    capture_rng,
    load_state,
    load_weights,
    read_metadata,
    restore_rng,
    save_state,
    save_weights,
    state_path,
)
from .config import Config, ConfigError, config_from_dict, config_to_dict, dump_config, load_config

__all__ = [
    "NonFiniteLossError",
    "TrainingError",
    "build_datasets",
    "build_model_from_config",
    "evaluate",
    "evaluate_checkpoint",
    "lr_factor",
    "train",
]


NEXT_WEIGHTS = "last.next.safetensors"


class TrainingError(RuntimeError):
    """A training run that cannot start or continue (the message says why)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good epoch."""


def _log(env: D.DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ building


def _call_with_supported(fn, *args, **kwargs):
    """Call ``fn`` with the keyword arguments it accepts (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


_FILE_DATASETS = ("folder", "cub200", "ucf101")


def _dataset_options(cfg: Config) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if cfg.data.size is not None:
        opts["size"] = cfg.data.size
    if cfg.data.frames is not None:
        opts["frames"] = cfg.data.frames
    if cfg.data.name in _FILE_DATASETS:
        opts["seed"] = cfg.train.seed  # per-sample CPU augmentation streams follow the training seed
    opts.update(cfg.data.options)
    return opts


def build_datasets(cfg: Config, splits: tuple[str, ...] = ("train", "test")) -> dict[str, Any]:
    """``{"train": dataset, "test": dataset}`` from ``cfg.data``."""
    from nonlocalnet.data import build_dataset

    names = {"train": cfg.data.train_split, "test": cfg.data.test_split}
    out = {}
    for s in splits:
        opts = _dataset_options(cfg)
        try:
            out[s] = build_dataset(cfg.data.name, cfg.data.root, names[s], **opts)
        except TypeError as e:
            raise ConfigError(f"data.options/size/frames not accepted by dataset {cfg.data.name!r}: "
                              f"{e}") from e
    return out


def _load_pretrained(model: nn.Module, path: str, env: D.DistEnv) -> None:
    p = Path(path)
    if p.suffix == ".safetensors":
        state = load_weights(p)
    else:
        if not p.is_file():
            raise CheckpointError(f"pretrained weights {p} do not exist")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"pretrained weights {p} are corrupt: {type(e).__name__}: {e}") from None
        for key in ("state_dict", "model", "model_state"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()
             if isinstance(v, torch.Tensor)}
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    result = model.load_state_dict(state, strict=False)
    _log(env, f"pretrained {p}: loaded {len(state) - len(result.unexpected_keys)} tensors; "
              f"{len(skipped)} skipped (shape), {len(result.missing_keys)} missing, "
              f"{len(result.unexpected_keys)} unexpected")
    if len(state) == len(result.unexpected_keys):
        raise CheckpointError(f"pretrained weights {p} share no tensor names with model "
                              f"{type(model).__name__}")


def build_model_from_config(cfg: Config, num_classes: int, *, env: D.DistEnv | None = None,
                            load_pretrained: bool = True) -> nn.Module:
    """Backbone from ``cfg.model`` (+ pretrained weights) with the nonlocal blocks inserted."""
    from nonlocalnet.models import build_model, insert_blocks

    try:
        model = build_model(cfg.model.arch, num_classes, **cfg.model.options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from e
    if load_pretrained and cfg.model.pretrained:
        _load_pretrained(model, cfg.model.pretrained, env or D.DistEnv())
    if cfg.model.blocks:
        try:
            insert_blocks(model, [b.to_dict() for b in cfg.model.blocks])
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"model.blocks: {e}") from e
    return model


def _transform(ds, train: bool, cfg: Config, generator: torch.Generator | None):
    overrides: dict[str, Any] = {}
    if train:
        if cfg.data.crop_padding is not None:
            overrides["crop_padding"] = cfg.data.crop_padding
        if cfg.data.flip is not None:
            overrides["flip"] = cfg.data.flip
    if hasattr(ds, "batch_transform"):
        return ds.batch_transform(train, generator=generator, **overrides)
    from nonlocalnet.data import BatchTransform

    return BatchTransform(ds.mean, ds.std, train=train, generator=generator, **overrides)


# -------------------------------------------------------------------------------------------- batches


def _shard(n: int, env: D.DistEnv, perm: torch.Tensor | None, pad: bool) -> torch.Tensor:
    """Indices of this rank: like DistributedSampler (padded to a multiple of the world size when
    ``pad``; strided ``rank::world``)."""
    idx = perm if perm is not None else torch.arange(n)
    if env.world_size == 1:
        return idx
    if pad:
        total = math.ceil(n / env.world_size) * env.world_size
        if total > n:
            idx = torch.cat([idx, idx[: total - n]])
    return idx[env.rank :: env.world_size]


def _num_batches(n: int, bs: int, drop_last: bool) -> int:
    return n // bs if drop_last else math.ceil(n / bs)


class _Batches:
    """Uint8 batches ``(x, y)`` on the device, from an in-memory dataset (indexing on the device) or a
    DataLoader."""

    def __init__(self, ds, env: D.DistEnv, batch_size: int, *, in_memory: bool, num_workers: int,
                 train: bool, drop_last: bool) -> None:
        self.ds, self.env, self.bs, self.train, self.drop_last = ds, env, batch_size, train, drop_last
        self.n = len(ds)
        self.num_workers = num_workers
        self.in_memory = bool(in_memory and hasattr(ds, "images") and hasattr(ds, "labels"))
        if self.in_memory:
            images = ds.images if isinstance(ds.images, torch.Tensor) else torch.as_tensor(ds.images)
            labels = ds.labels if isinstance(ds.labels, torch.Tensor) else torch.as_tensor(ds.labels)
            self.images = images.to(env.device)
            self.labels = labels.to(env.device, torch.long)
        self.shard_len = len(_shard(self.n, env, None, pad=train))

    def __len__(self) -> int:
        return _num_batches(self.shard_len, self.bs, self.drop_last)

    def epoch(self, epoch: int, generator: torch.Generator | None, limit: int | None = None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(self.n, generator=generator) if self.train else None
        idx = _shard(self.n, self.env, perm, pad=self.train)
        steps = len(self) if limit is None else min(len(self), limit)
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)
        if self.in_memory:
            idx = idx.to(self.env.device)
            for i in range(steps):
                j = idx[i * self.bs : (i + 1) * self.bs]
                yield self.images[j], self.labels[j]
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(self.ds, batch_size=self.bs, sampler=idx.tolist(), num_workers=self.num_workers,
                            pin_memory=self.env.device.type == "cuda", drop_last=self.drop_last,
                            generator=generator, persistent_workers=False)
        for i, (x, y) in enumerate(loader):
            if i >= steps:
                break
            yield (x.to(self.env.device, non_blocking=True),
                   torch.as_tensor(y).to(self.env.device, torch.long, non_blocking=True))


# -------------------------------------------------------------------------------------------- schedule


def lr_factor(step: int, steps_per_epoch: int, cfg_train) -> float:
    """Multiplier of ``train.lr`` for optimizer step ``step`` (0-based, per-step linear warmup)."""
    t = cfg_train
    warm_steps = round(t.warmup_epochs * steps_per_epoch)
    warm = (step + 1) / warm_steps if step < warm_steps else 1.0
    if t.schedule == "multistep":
        epoch = step // steps_per_epoch
        f = t.gamma ** sum(epoch >= m for m in t.milestones)
    elif t.schedule == "cosine":
        total = t.epochs * steps_per_epoch
        progress = min(max(step - warm_steps, 0) / max(total - warm_steps, 1), 1.0)
        lo = t.min_lr / t.lr
        f = lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        f = 1.0
    return warm * f


# ---------------------------------------------------------------------------------------------- eval


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, batches: _Batches, transform, env: D.DistEnv, *, amp: str = "none",
             channels_last: bool = False, max_batches: int | None = None) -> dict[str, float]:
    """Test loss and top-1/top-5 accuracy (%) over the (sharded, all-reduced) dataset."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, top1, top5, count
    try:
        for x, y in batches.epoch(0, None, limit=max_batches):
            x = transform(x)
            if channels_last:
                x = x.contiguous(memory_format=_memory_format(x))
            with _autocast(env.device, amp):
                out = model(x)
            out = out.float()
            loss = F.cross_entropy(out, y, reduction="sum")
            k = min(5, out.shape[1])
            topk = out.topk(k, dim=1).indices
            hit = topk.eq(y[:, None])
            sums += torch.stack([loss.double(), hit[:, :1].sum().double(), hit.sum().double(),
                                 torch.tensor(float(y.numel()), dtype=torch.float64, device=env.device)])
    finally:
        model.train(was_training)
    D.all_reduce_sum(env, sums)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "samples": int(n)}


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
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TrainingError("run.tensorboard is true but the tensorboard package is not installed: "
                            "pip install 'nonlocalnet[tensorboard]' (or set run.tensorboard=false)") from e
    return SummaryWriter


def _open_tensorboard(out: Path, purge_step: int | None):
    return _check_tensorboard()(log_dir=str(out / "tensorboard"), purge_step=purge_step)


_RUN_FILES = ("last.safetensors", "last.state.pt", "last.next.safetensors", "best.safetensors",
              "metrics.jsonl")


def _prepare_fresh_out(out: Path, overwrite: bool) -> None:
    old = [out / f for f in _RUN_FILES if (out / f).exists()]
    old += sorted(out.glob("epoch_[0-9]*.safetensors")) if out.is_dir() else []
    if not old:
        return
    if not overwrite:
        raise TrainingError(f"{out} already holds a run ({', '.join(p.name for p in old[:4])}"
                            f"{', ...' if len(old) > 4 else ''}); continue it with --resume, choose another "
                            "run.out, or set run.overwrite=true to replace it")
    for p in old:
        p.unlink()


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
    import torch.distributed as dist

    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, state)
    return out


# --------------------------------------------------------------------------------------------- train


def _resume_point(out: Path, env: D.DistEnv) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    weights_path = out / "last.safetensors"
    spath = state_path(weights_path)
    if not weights_path.exists() and not spath.exists():
        return None
    state = load_state(spath)
    epoch = int(state["epoch"])
    meta_epoch = int(read_metadata(weights_path).get("epoch", -1)) if weights_path.exists() else -1
    if meta_epoch == epoch:
        return state, load_weights(weights_path)
    # interrupted between writing last.state.pt and renaming last.next.safetensors: use the new weights
    for alt in (out / NEXT_WEIGHTS, out / f"epoch_{epoch:04d}.safetensors"):
        if alt.exists() and int(read_metadata(alt).get("epoch", -1)) == epoch:
            _log(env, f"resume: {weights_path} is from epoch {meta_epoch}, {spath} from epoch {epoch}; "
                      f"using {alt}")
            return state, load_weights(alt)
    raise CheckpointError(f"cannot resume from {out}: {weights_path} is from epoch {meta_epoch} but {spath} "
                          f"is from epoch {epoch}, and neither {NEXT_WEIGHTS} nor "
                          f"epoch_{epoch:04d}.safetensors holds that epoch")


def _config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        key = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _config_differences(va, vb, key + ".")
        elif va != vb:
            diffs.append(key)
    return diffs


def train(cfg: Config, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) training as configured; returns a summary dict (rank 0's view).

    Raises :class:`NonFiniteLossError` when the loss becomes NaN/inf (checkpoints on disk stay at the last
    good epoch), :class:`ConfigError`, :class:`CheckpointError` or :class:`TrainingError` otherwise.
    """
    env = D.setup(cfg.run.device)
    try:
        return _train(cfg, env, resume)
    finally:
        D.cleanup(env)


def _train(cfg: Config, env: D.DistEnv, resume: bool) -> dict[str, Any]:
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
    if not resume and env.is_main:
        _prepare_fresh_out(out, cfg.run.overwrite)
    seed_everything(t.seed)

    # --- data
    datasets = build_datasets(cfg)
    train_ds, test_ds = datasets["train"], datasets["test"]
    num_classes = cfg.model.num_classes or int(train_ds.num_classes)
    if num_classes < int(train_ds.num_classes):
        raise ConfigError(f"model.num_classes={num_classes} < the dataset's {train_ds.num_classes} classes")
    train_batches = _Batches(train_ds, env, bs, in_memory=cfg.data.in_memory,
                             num_workers=cfg.data.num_workers, train=True, drop_last=t.drop_last)
    test_batches = _Batches(test_ds, env, eval_bs, in_memory=cfg.data.in_memory,
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
    train_tf = _transform(train_ds, True, cfg, aug_gen)
    test_tf = _transform(test_ds, False, cfg, None)

    # --- model
    model = build_model_from_config(cfg, num_classes, env=env).to(device)
    use_cl = t.channels_last and device.type == "cuda"
    if use_cl:
        fmt = torch.channels_last if len(getattr(train_ds, "input_shape", (3, 1, 1))) == 3 \
            else torch.channels_last_3d
        model = model.to(memory_format=fmt)
    if env.distributed and t.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                                weight_decay=t.weight_decay, nesterov=t.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, t))
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
                import yaml

                diffs = _config_differences(yaml.safe_load(saved_cfg) or {}, config_to_dict(cfg))
                if diffs:
                    _log(env, "resume: warning: the config differs from the checkpoint's in "
                              f"{', '.join(diffs)}")
            try:
                model.load_state_dict(weights)
            except RuntimeError as e:
                raise CheckpointError(f"{out / 'last.safetensors'} does not fit the configured model: "
                                      f"{e}") from None
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
    metrics_path = out / "metrics.jsonl"
    tb = None
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.yaml", dump_config(cfg).encode())
        _write_metrics_file(metrics_path, history)
        if cfg.run.tensorboard:
            tb = _open_tensorboard(out, step if start_epoch else None)
    _log(env, f"training {cfg.model.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.3f} M params, "
              f"{len(cfg.model.blocks)} placement(s)) on {cfg.data.name}: {len(train_ds)} train / "
              f"{len(test_ds)} test samples, {steps_per_epoch} steps/epoch, device {device}, "
              f"world size {env.world_size}, out {out}")

    from tqdm import tqdm

    show_bar = cfg.run.progress and env.is_main and sys.stderr.isatty()
    last: dict[str, Any] = history[-1] if history else {}
    try:
        for epoch in range(start_epoch, t.epochs):
            t0 = time.perf_counter()
            train_model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            bad_step = torch.full((), -1, dtype=torch.long, device=device)
            lr_used = optimizer.param_groups[0]["lr"]
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not show_bar,
                       leave=False, dynamic_ncols=True, file=sys.stderr)
            for i, (x, y) in enumerate(train_batches.epoch(epoch, data_gen, limit=steps_per_epoch)):
                x = train_tf(x)
                if use_cl:
                    x = x.contiguous(memory_format=_memory_format(x))
                lr_used = optimizer.param_groups[0]["lr"]
                with _autocast(device, t.amp):
                    logits = train_model(x)
                    loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
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
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(ld), i + 1, bad_step)
                loss_sum += ld.double() * y.numel()
                correct += (logits.detach().argmax(1) == y).sum().double()
                seen += y.numel()
                if (i + 1) % t.nan_check_every == 0 or i + 1 == steps_per_epoch:
                    _check_finite(env, bad_step, epoch, steps_per_epoch)
                    if show_bar:
                        bar.set_postfix(loss=f"{ld.item():.4f}", lr=f"{lr_used:.4g}")
                bar.update(1)
            bar.close()
            _check_finite(env, bad_step, epoch, steps_per_epoch)
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
                      "top1": test["top1"], "top5": test["top5"], "lr": lr_used, "time_s": round(elapsed, 3),
                      "best_top1": best_top1, "best_epoch": best_epoch}
            history.append(record)
            last = record
            rngs = _gather_rng(env, gens)
            if env.is_main:
                _save_epoch(cfg, out, model, optimizer, scheduler, scaler, rngs, record, history, is_best)
                _append_metrics(metrics_path, record)
                if tb is not None:
                    for key in ("train_loss", "train_top1", "test_loss", "top1", "top5", "lr"):
                        tb.add_scalar(key, record[key], k)
                    tb.flush()
                _log(env, f"epoch {k}/{t.epochs}  loss {record['train_loss']:.4f}  "
                          f"top1 {record['top1']:.2f}  top5 {record['top5']:.2f}  lr {lr_used:.4g}  "
                          f"{elapsed:.1f}s")
    finally:
        if tb is not None:
            tb.close()
    D.barrier(env)
    return {"out": str(out), "epochs": len(history), "best_top1": best_top1, "best_epoch": best_epoch,
            "last": last}


def _check_finite(env: D.DistEnv, bad_step: torch.Tensor, epoch: int, steps: int) -> None:
    flag = bad_step.clone()
    if env.distributed:
        import torch.distributed as dist

        flag = torch.where(flag < 0, torch.iinfo(torch.long).max, flag)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        flag = torch.where(flag == torch.iinfo(torch.long).max, -1, flag)
    s = int(flag.item())
    if s >= 0:
        raise NonFiniteLossError(
            f"non-finite loss (NaN or inf) at epoch {epoch + 1}, step {s} of {steps}; training stopped. "
            f"The checkpoints on disk are from the last completed epoch ({epoch}). Lower train.lr, add "
            "train.warmup_epochs or train.clip_grad_norm.")


def _save_epoch(cfg: Config, out: Path, model: nn.Module, optimizer, scheduler, scaler, rngs, record,
                history, is_best: bool) -> None:
    k, step = record["epoch"], record["step"]
    weights = _unwrap(model).state_dict()
    meta = _weights_metadata(cfg, k, step, {"top1": record["top1"], "top5": record["top5"]})
    # order matters for crash safety: epoch file, best, then the last.* pair
    if cfg.run.keep_epochs:
        save_weights(out / f"epoch_{k:04d}.safetensors", weights, meta)
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
    save_state(state_path(out / "last.safetensors"), state)
    os.replace(nxt, out / "last.safetensors")


# ---------------------------------------------------------------------------------------- evaluation


def _checkpoint_config(path: Path, overrides: list[str] | tuple[str, ...]) -> Config:
    cfg_file = path.parent / "config.yaml"
    if cfg_file.exists():
        return load_config(cfg_file, overrides)
    meta = read_metadata(path)
    if "config" not in meta:
        raise CheckpointError(f"no config for checkpoint {path}: neither {cfg_file} nor config metadata "
                              "in the file")
    import yaml

    from .config import apply_overrides

    return config_from_dict(apply_overrides(yaml.safe_load(meta["config"]) or {}, overrides))


def evaluate_checkpoint(path: str | os.PathLike,
                        overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Evaluate a ``.safetensors`` checkpoint on the test split of its config (``config.yaml`` next to it,
    else the config stored in the file's metadata), with ``--set`` style overrides."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    read_metadata(path)  # fail early, naming the file, on a corrupt header
    cfg = _checkpoint_config(path, overrides)
    env = D.DistEnv(device=D._pick_device(cfg.run.device, 0))
    weights = load_weights(path)
    test_ds = build_datasets(cfg, ("test",))["test"]
    num_classes = cfg.model.num_classes or int(test_ds.num_classes)
    model = build_model_from_config(cfg, num_classes, env=env, load_pretrained=False)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit the configured model: {e}") from None
    model.to(env.device)
    batches = _Batches(test_ds, env, cfg.train.eval_batch_size or cfg.train.batch_size,
                       in_memory=cfg.data.in_memory, num_workers=cfg.data.num_workers, train=False,
                       drop_last=False)
    use_cl = cfg.train.channels_last and env.device.type == "cuda"
    if use_cl:
        fmt = torch.channels_last if len(getattr(test_ds, "input_shape", (3, 1, 1))) == 3 \
            else torch.channels_last_3d
        model = model.to(memory_format=fmt)
    res = evaluate(model, batches, _transform(test_ds, False, cfg, None), env, amp=cfg.train.amp,
                   channels_last=use_cl, max_batches=cfg.train.max_eval_batches)
    return {"top1": res["top1"], "top5": res["top5"], "loss": res["loss"], "samples": res["samples"]}
