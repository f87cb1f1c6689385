"""Shared pieces of the dataset layer: statistics, the dataset base class, split names."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import BatchTransform

# Per-channel statistics in 0..1 units (pixel / 255).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SPLIT_ALIASES = {"train": "train", "training": "train", "test": "test", "val": "test", "valid": "test",
                  "validation": "test", "eval": "test"}


def normalize_split(split: str, dataset: str) -> str:
    """Map a split name to ``"train"`` or ``"test"`` (``val``/``validation`` are aliases of ``test``)."""
    key = str(split).strip().lower()
    if key not in _SPLIT_ALIASES:
        raise ValueError(f"{dataset}: unknown split {split!r}; expected 'train' or 'test' (alias 'val')")
    return _SPLIT_ALIASES[key]


def require_root(root: str | os.PathLike | None, dataset: str) -> Path:
    if root is None:
        raise ValueError(f"{dataset}: a root directory is required")
    return Path(root).expanduser()


@dataclass(frozen=True)
class DatasetInfo:
    """What a trainer needs to know about a dataset without touching its samples."""

    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, ...]
    classes: tuple[str, ...] = field(default=())
    #: recommended keyword arguments for :class:`~nonlocalnet.data.BatchTransform` in training mode
    augment: dict = field(default_factory=dict)


class BaseDataset(Dataset):
    """Common attributes of every dataset in :mod:`nonlocalnet.data`.

    Subclasses set ``name``, ``split``, ``classes``, ``num_classes``, ``mean``, ``std``, ``input_shape`` and
    ``augment`` (the recommended training-mode :class:`BatchTransform` options).
    Samples are ``(uint8 tensor, int label)``.
    """

    name: str = ""
    split: str = "train"
    classes: list[str]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, ...]
    augment: dict = {"crop_padding": 0, "flip": True}

    @classmethod
    def expected_num_classes(cls, **options) -> int | None:
        """The number of classes known without reading the data (``None`` where the files decide)."""
        n = cls.__dict__.get("num_classes")
        return n if isinstance(n, int) else None

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, int(self.num_classes), tuple(self.mean), tuple(self.std),
                           tuple(self.input_shape), tuple(self.classes), dict(self.augment))

    def batch_transform(self, train: bool, *, generator: torch.Generator | None = None, **overrides):
        """A :class:`BatchTransform` with this dataset's statistics and recommended augmentation."""
        options = dict(self.augment) if train else {}
        options.update(overrides)
        return BatchTransform(self.mean, self.std, train=train, generator=generator, **options)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, samples={len(self)}, "
                f"num_classes={self.num_classes}, input_shape={tuple(self.input_shape)})")


class InMemoryDataset(BaseDataset):
    """A dataset held entirely in memory: ``.images`` (uint8, ``(N, C, H, W)``) and ``.labels`` (int64)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class SampleError(ValueError):
    """A sample's file that cannot be read or decoded (raised on access, so during training); names the file."""


class FileDataset(BaseDataset):
    """A dataset decoded from files on access, with a per-sample random stream for training augmentation.

    The stream of sample ``i`` is ``numpy.random.default_rng((seed, epoch, i))``, so augmentation is
    reproducible and independent of the number of loader workers; call :meth:`set_epoch` each epoch
    (with persistent loader workers, recreate the loader or the workers keep the old epoch).
    """

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((int(self.seed) & 0xFFFFFFFF, self.epoch, int(index)))
