"""The data an analysis looks at: a batch of a run's split, and each block's input captured with hooks."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from nonlocalnet.runs import Loaded, batch_transform, build_datasets

from .errors import AnalysisError, DataError

__all__ = ["Batch", "capture_batch", "capture_blocks", "dense_affinity", "float64_block", "load_batch"]


@dataclass
class Batch:
    """A batch of a run's data: ``x`` normalized float (what the model sees), ``images`` uint8."""

    x: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    indices: list[int]
    info: dict[str, Any]

    @classmethod
    def from_tensor(cls, x: torch.Tensor, labels: torch.Tensor | None = None,
                    images: torch.Tensor | None = None) -> Batch:
        """A batch of model inputs ``x`` ``(B, C, *S)`` given in Python (for a model without a config):
        ``images`` (uint8, for the figures) default to ``x`` rescaled to 0..255 per sample."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 3 or x.shape[0] < 1:
            raise TypeError(f"Batch.from_tensor: x must be a floating-point tensor (B, C, *spatial) with B >= 1, got "
                            f"{type(x).__name__} {tuple(x.shape) if isinstance(x, torch.Tensor) else ''}")
        n = x.shape[0]
        if images is None:
            flat = x.detach().float().cpu().flatten(1)
            lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
            images = ((flat - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8).reshape(x.shape)
        labels = torch.zeros(n, dtype=torch.long) if labels is None else torch.as_tensor(labels)
        info = {"dataset": None, "root": None, "split": None, "samples": n, "indices": list(range(n)),
                "input_shape": list(x.shape[1:]), "needs": "a batch given in Python"}
        return cls(x, images, labels, list(range(n)), info)

    def head(self, n: int) -> Batch:
        """The first ``n`` samples."""
        n = max(1, min(int(n), self.x.shape[0]))
        return Batch(self.x[:n], self.images[:n], self.labels[:n], self.indices[:n],
                     dict(self.info, samples=n, indices=self.indices[:n]))


def data_requirement(cfg, split: str = "test") -> str:
    name, root = cfg.data.name, cfg.data.root
    split_name = cfg.data.test_split if split == "test" else cfg.data.train_split
    if name == "demo":
        return f"the {split_name!r} split of the bundled 'demo' dataset (generated, no files needed)"
    return f"the {split_name!r} split of dataset {name!r} under root {root!r}"


def load_batch(cfg, *, count: int, split: str = "test", data_root: str | None = None, what: str = "this analysis",
               device: str | torch.device = "cpu") -> Batch:
    """The first ``count`` samples of the run's ``split`` (``test`` or ``train``), without augmentation.

    Raises :class:`DataError` naming the dataset and root the run's config points to when they cannot be read.
    """
    if cfg is None:
        raise DataError(f"{what} looks at data, and a model given in Python without a config has none: pass "
                        "batch=nonlocalnet.analysis.Batch.from_tensor(x), or a config with data "
                        "(Loaded.from_model(model, cfg=...))")
    cfg = copy.deepcopy(cfg)
    if data_root is not None:
        cfg.data.root = str(data_root)
    split_name = cfg.data.test_split if split == "test" else cfg.data.train_split
    # demo: generated in memory; do not write a cache file unless a root was asked for explicitly
    if cfg.data.name == "demo" and data_root is None:
        cfg.data.root = None
    root = cfg.data.root
    need = data_requirement(cfg, split)
    try:
        ds = build_datasets(cfg, (split,))[split]
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as e:
        raise DataError(f"{what} looks at data: it needs {need} (from the run's config). Loading it failed: "
                        f"{type(e).__name__}: {e}. Pass --data-root DIR or --set data.root=DIR (or another "
                        "data.* key); the 'demo' dataset needs no files.") from None
    n = min(int(count), len(ds))
    if n < 1:
        raise DataError(f"{what}: {need} is empty")
    samples = [ds[i] for i in range(n)]
    images = torch.stack([torch.as_tensor(s[0]) for s in samples])
    labels = torch.as_tensor([int(s[1]) for s in samples])
    x = batch_transform(ds, False, cfg)(images.to(device))
    info = {"dataset": cfg.data.name, "root": None if root is None else str(root), "split": split_name,
            "samples": n, "indices": list(range(n)), "input_shape": list(images.shape[1:]), "needs": need}
    return Batch(x, images, labels, list(range(n)), info)


# ------------------------------------------------------------------------------------------ capture


@torch.no_grad()
def capture_blocks(model: nn.Module, blocks: dict[str, nn.Module], x: torch.Tensor
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (input, output)}`` of each block during one eval-mode forward pass of ``model`` on ``x``
    (forward hooks; the first call of each block when it is called more than once)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def hook(name):
        def fn(module, args, out):
            if name not in seen:
                seen[name] = (args[0].detach().clone(), out.detach().clone())
        return fn

    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device)
    try:
        for name, b in blocks.items():
            handles.append(b.register_forward_hook(hook(name)))
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in blocks if n not in seen]
    if missing:
        raise AnalysisError(f"block(s) {', '.join(missing)} were not called in the forward pass")
    return seen


def capture_batch(loaded: Loaded, batch: Batch | None, *, images: int, split: str, data_root: str | None,
                  what: str) -> tuple[Batch, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The batch an analysis runs on — ``batch.head(images)`` when one is given (e.g. shared by the report),
    else the first ``images`` samples of ``split`` (:func:`load_batch`) — and its :func:`capture_blocks`."""
    if batch is None:
        batch = load_batch(loaded.cfg, count=images, split=split, data_root=data_root, what=what)
    else:
        batch = batch.head(images)
    return batch, capture_blocks(loaded.model, loaded.blocks, batch.x)


def float64_block(block: nn.Module) -> nn.Module:
    """A float64, eval-mode copy of ``block`` (the model is left untouched)."""
    return copy.deepcopy(block).double().eval()


def dense_affinity(block: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The block's dense affinity ``A`` (``(B, N, N')``) for input ``x``, computed in float64 on a copy."""
    with torch.no_grad():
        return float64_block(block).affinity(x.double()).cpu().numpy()
