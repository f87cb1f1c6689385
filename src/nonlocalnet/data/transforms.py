"""Batch-level augmentation and normalization on the training device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["BatchTransform"]


class BatchTransform:
    """Turn a uint8 batch into a normalized float32 batch, augmenting it in training mode.

    Input: uint8 images ``(B, C, H, W)`` or clips ``(B, C, T, H, W)`` on any device; output: float32 of the
    same shape on the same device, ``(x / 255 - mean) / std`` per channel.

    Training mode (``train=True``), vectorized with per-sample random numbers:

    * ``crop_padding > 0``: pad ``crop_padding`` black pixels (value 0, before normalization, as in the
      usual CIFAR recipe) on every side and crop back to ``H x W`` at a random offset;
    * ``flip``: mirror horizontally with probability 1/2.

    A clip gets one crop offset and one flip decision for all its frames. Random numbers come from
    ``generator`` when given (drawn on the generator's device, then moved), else from torch's default
    generator on the batch's device. Eval mode only normalizes.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, train: bool, crop_padding: int = 4,
                 flip: bool = True, generator: torch.Generator | None = None):
        self.mean = torch.as_tensor([float(m) for m in mean], dtype=torch.float32)
        self.std = torch.as_tensor([float(s) for s in std], dtype=torch.float32)
        if self.mean.ndim != 1 or self.mean.shape != self.std.shape or self.mean.numel() == 0:
            raise ValueError(f"mean and std must be equal-length sequences, got {list(mean)}, {list(std)}")
        if bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive, got {list(std)}")
        if int(crop_padding) < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.train = bool(train)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.generator = generator
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (f"BatchTransform(mean={self.mean.tolist()}, std={self.std.tolist()}, train={self.train}, "
                f"crop_padding={self.crop_padding}, flip={self.flip})")

    def _stats_on(self, device: torch.device):
        if device not in self._stats:
            self._stats[device] = (self.mean.to(device), self.std.to(device))
        return self._stats[device]

    def _randint(self, high: int, size: int, device: torch.device) -> torch.Tensor:
        gen_device = self.generator.device if self.generator is not None else device
        r = torch.randint(0, high, (size,), generator=self.generator, device=gen_device)
        return r.to(device)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The geometric part only (uint8 in, uint8 out); used by ``__call__`` in training mode."""
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        p = self.crop_padding
        if b == 0 or (p == 0 and not self.flip):
            return x
        flat = x.reshape(b, -1, h, w)
        device = x.device
        if p > 0:
            oy = self._randint(2 * p + 1, b, device)
            ox = self._randint(2 * p + 1, b, device)
        else:
            oy = ox = torch.zeros(b, dtype=torch.long, device=device)
        flips = self._randint(2, b, device).bool() if self.flip else None

        if p > 0:
            padded = F.pad(flat, (p, p, p, p))  # zeros
            rows = oy[:, None] + torch.arange(h, device=device)  # (B, H)
            idx = rows[:, None, :, None].expand(b, flat.shape[1], h, padded.shape[-1])
            padded = torch.gather(padded, 2, idx)  # (B, CT, H, W + 2p)
        else:
            padded = flat
        cols = torch.arange(w, device=device).expand(b, w)
        if flips is not None:
            cols = torch.where(flips[:, None], (w - 1) - cols, cols)
        cols = ox[:, None] + cols  # (B, W)
        idx = cols[:, None, None, :].expand(b, flat.shape[1], h, w)
        out = torch.gather(padded, 3, idx)
        return out.reshape(x.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"BatchTransform expects a uint8 batch, got {x.dtype}")
        if x.ndim not in (4, 5):
            raise ValueError(f"BatchTransform expects (B, C, H, W) or (B, C, T, H, W), "
                             f"got shape {tuple(x.shape)}")
        c = x.shape[1]
        if c != self.mean.numel():
            raise ValueError(f"batch has {c} channels but mean/std have {self.mean.numel()}")
        if self.train:
            x = self.augment(x)
        mean, std = self._stats_on(x.device)
        view = (1, c) + (1,) * (x.ndim - 2)
        return x.to(torch.float32).div_(255.0).sub_(mean.view(view)).div_(std.view(view))
