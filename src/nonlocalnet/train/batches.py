"""Batches on the training device: in-memory datasets indexed on the device, others through a DataLoader.

Sharding follows :class:`torch.utils.data.DistributedSampler` (padded to a multiple of the world size,
strided ``rank::world``), but over a permutation drawn from the run's own checkpointed generator, so that
in-memory datasets are shuffled and indexed on the device and a resumed run sees the same order
(docs/design.md says why this is not a DistributedSampler).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from nonlocalnet.data import SampleError
from nonlocalnet.runs import DatasetError

from . import distributed as D

__all__ = ["Batches", "shard"]


def shard(n: int, env: D.DistEnv, perm: torch.Tensor | None, pad: bool) -> torch.Tensor:
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


class Batches:
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
        self.shard_len = len(shard(self.n, env, None, pad=train))

    def __len__(self) -> int:
        return _num_batches(self.shard_len, self.bs, self.drop_last)

    def epoch(self, epoch: int, generator: torch.Generator | None, limit: int | None = None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(self.n, generator=generator) if self.train else None
        idx = shard(self.n, self.env, perm, pad=self.train)
        steps = len(self) if limit is None else min(len(self), limit)
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)
        if self.in_memory:
            idx = idx.to(self.env.device)
            for i in range(steps):
                j = idx[i * self.bs : (i + 1) * self.bs]
                yield self.images[j], self.labels[j]
            return
        loader = DataLoader(self.ds, batch_size=self.bs, sampler=idx.tolist(), num_workers=self.num_workers,
                            pin_memory=self.env.device.type == "cuda", drop_last=self.drop_last,
                            generator=generator, persistent_workers=False)
        try:
            for i, (x, y) in enumerate(loader):
                if i >= steps:
                    break
                yield (x.to(self.env.device, non_blocking=True),
                       torch.as_tensor(y).to(self.env.device, torch.long, non_blocking=True))
        except (SampleError, FileNotFoundError) as e:
            raise DatasetError(_sample_message(e)) from None


def _sample_message(e: Exception) -> str:
    """The message of a sample that could not be read; from a loader worker, the last line of the worker's
    traceback (the DataLoader re-raises with the whole traceback as the message)."""
    text = str(e).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith((type(e).__name__, "nonlocalnet.")) and ": " in last else last
    return text


