"""Evaluation: test loss and top-1/top-5 accuracy of a model, or of a checkpoint with the config of its run.

Top-5 is reported only when the model has more than 5 outputs: with 5 classes or fewer every label is in the
top 5 and the number (100 %) says nothing (the bundled demo task has 2 classes).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nonlocalnet.runs import (
    batch_transform,
    build_datasets,
    build_model_from_config,
    checkpoint_config,
    load_weights,
    load_weights_into,
    read_metadata,
    resolve_checkpoint,
)

from . import distributed as D
from .batches import Batches

__all__ = ["autocast", "evaluate", "evaluate_checkpoint", "memory_format"]


def memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, transform, env: D.DistEnv, *, amp: str = "none",
             channels_last: bool = False, max_batches: int | None = None) -> dict[str, float]:
    """Test loss and top-1 accuracy (%) over the (sharded, all-reduced) dataset, and top-5 accuracy (%) when the
    model has more than 5 outputs (``top5`` is left out of the result otherwise)."""
    was_training = model.training
    classes = 0
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, top1, top5, count
    try:
        for x, y in batches.epoch(0, None, limit=max_batches):
            x = transform(x)
            if channels_last:
                x = x.contiguous(memory_format=memory_format(x))
            with autocast(env.device, amp):
                out = model(x)
            out = out.float()
            loss = F.cross_entropy(out, y, reduction="sum")
            classes = out.shape[1]
            k = min(5, classes)
            topk = out.topk(k, dim=1).indices
            hit = topk.eq(y[:, None])
            sums += torch.stack([loss.double(), hit[:, :1].sum().double(), hit.sum().double(),
                                 torch.tensor(float(y.numel()), dtype=torch.float64, device=env.device)])
    finally:
        model.train(was_training)
    D.all_reduce_sum(env, sums)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    res = {"loss": loss / n, "top1": 100.0 * c1 / n}
    if classes > 5:
        res["top5"] = 100.0 * c5 / n
    res["samples"] = int(n)
    return res


def evaluate_checkpoint(path: str | os.PathLike,
                        overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Evaluate a ``.safetensors`` checkpoint (or a run dir's: ``last``, else ``best``, else the latest epoch) on
    the test split of its config (``config.yaml`` next to it, else the config stored in the file's metadata),
    with ``--set`` style overrides."""
    path = resolve_checkpoint(Path(path))
    read_metadata(path)  # fail early, naming the file, on a corrupt header
    cfg, _ = checkpoint_config(path, overrides)
    env = D.DistEnv(device=D.pick_device(cfg.run.device, 0))
    weights = load_weights(path)
    test_ds = build_datasets(cfg, ("test",))["test"]
    num_classes = cfg.model.num_classes or int(test_ds.num_classes)
    model = build_model_from_config(cfg, num_classes, load_pretrained_weights=False)
    load_weights_into(model, weights, path)
    model.to(env.device)
    batches = Batches(test_ds, env, cfg.train.eval_batch_size or cfg.train.batch_size,
                      in_memory=cfg.data.in_memory, num_workers=cfg.data.num_workers, train=False,
                      drop_last=False)
    use_cl = cfg.train.channels_last and env.device.type == "cuda"
    if use_cl:
        fmt = torch.channels_last if len(getattr(test_ds, "input_shape", (3, 1, 1))) == 3 \
            else torch.channels_last_3d
        model = model.to(memory_format=fmt)
    res = evaluate(model, batches, batch_transform(test_ds, False, cfg), env, amp=cfg.train.amp,
                   channels_last=use_cl, max_batches=cfg.train.max_eval_batches)
    return {k: res[k] for k in ("top1", "top5", "loss", "samples") if k in res}
