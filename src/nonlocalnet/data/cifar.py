"""CIFAR-10 and CIFAR-100 from the official python-pickle directories, held in memory.

``CIFAR-10`` (``cifar-10-batches-py``): ``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
``batches.meta``; each batch is a dict with ``data`` (uint8, ``N x 3072``: 1024 red, 1024 green, 1024 blue
values, rows of 32 pixels), ``labels``, ``batch_label``, ``filenames``; the meta dict has ``label_names``.

``CIFAR-100`` (``cifar-100-python``): ``train``, ``test``, ``meta``; batches carry ``fine_labels`` and
``coarse_labels``; the meta dict has ``fine_label_names`` and ``coarse_label_names``.

Either the directory itself or its parent can be given as ``root``. Files are read with the restricted
unpickler of :mod:`nonlocalnet.data.safe_pickle`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ._common import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    InMemoryDataset,
    normalize_split,
    require_root,
)
from .safe_pickle import decode_keys, load_restricted

__all__ = ["CIFAR10", "CIFAR100", "resolve_cifar_dir"]


def resolve_cifar_dir(root: str | os.PathLike, subdir: str, names: list[str]) -> Path:
    """``root`` itself if it holds one of ``names``, else ``root/subdir`` if that exists, else ``root``."""
    root = Path(root).expanduser()
    if any((root / n).exists() for n in names):
        return root
    if (root / subdir).is_dir():
        return root / subdir
    return root


def _check_files(directory: Path, needed: list[str], title: str, expected: str) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(f"{title} directory {directory} does not exist; expected {expected}")
    for fname in needed:
        if not (directory / fname).is_file():
            raise FileNotFoundError(f"{title} directory {directory} lacks {fname}; expected {expected}")


def _as_text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = decode_keys(load_restricted(path))
    for key in ("data", label_key):
        if key not in batch:
            raise ValueError(f"{path} is not a CIFAR batch: key {key!r} missing (found {sorted(batch)})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {label_key!r} is not a list of integers") from exc
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} {label_key}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: {label_key} outside [0, {num_classes}) "
                         f"(min {labels.min()}, max {labels.max()})")
    return data, labels


def _read_names(path: Path, key: str, count: int) -> list[str]:
    meta = decode_keys(load_restricted(path))
    if key not in meta:
        raise ValueError(f"{path} is not a CIFAR meta file: key {key!r} missing (found {sorted(meta)})")
    names = [_as_text(n) for n in meta[key]]
    if len(names) != count:
        raise ValueError(f"{path}: {key} has {len(names)} entries, expected {count}")
    return names


class _CIFAR(InMemoryDataset):
    augment = {"crop_padding": 4, "flip": True}
    input_shape = (3, 32, 32)

    def _load(self, directory: Path, files: list[str], label_key: str, meta_file: str, names_key: str):
        datas, labels = [], []
        for fname in files:
            d, l = _read_batch(directory / fname, label_key, self.num_classes)
            datas.append(d)
            labels.append(l)
        data = np.concatenate(datas, axis=0) if datas else np.zeros((0, 3072), np.uint8)
        self.images = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))
        self.labels = torch.from_numpy(np.concatenate(labels, axis=0))
        self.classes = _read_names(directory / meta_file, names_key, self.num_classes)
        self.root = directory


class CIFAR10(_CIFAR):
    """CIFAR-10: ``.images`` uint8 ``(N, 3, 32, 32)``, ``.labels`` int64 ``(N,)``, 10 classes."""

    name = "cifar10"
    num_classes = 10
    mean = CIFAR10_MEAN
    std = CIFAR10_STD
    TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
    TEST_FILES = ["test_batch"]
    META_FILE = "batches.meta"
    EXPECTED = "data_batch_1..5, test_batch, batches.meta"

    def __init__(self, root: str | os.PathLike, split: str = "train"):
        self.split = normalize_split(split, "cifar10")
        directory = resolve_cifar_dir(require_root(root, "cifar10"), "cifar-10-batches-py",
                                      [*self.TRAIN_FILES, *self.TEST_FILES, self.META_FILE])
        files = self.TRAIN_FILES if self.split == "train" else self.TEST_FILES
        _check_files(directory, [*files, self.META_FILE], "CIFAR-10", self.EXPECTED)
        self._load(directory, files, "labels", self.META_FILE, "label_names")


class CIFAR100(_CIFAR):
    """CIFAR-100 with ``label_type="fine"`` (100 classes, default) or ``"coarse"`` (20 superclasses)."""

    name = "cifar100"

    @classmethod
    def expected_num_classes(cls, label_type: str = "fine", **options) -> int:
        return 20 if label_type == "coarse" else 100
    mean = CIFAR100_MEAN
    std = CIFAR100_STD
    META_FILE = "meta"
    EXPECTED = "train, test, meta"

    def __init__(self, root: str | os.PathLike, split: str = "train", label_type: str = "fine"):
        self.split = normalize_split(split, "cifar100")
        if label_type not in ("fine", "coarse"):
            raise ValueError(f"cifar100: label_type must be 'fine' or 'coarse', got {label_type!r}")
        self.label_type = label_type
        self.num_classes = 100 if label_type == "fine" else 20
        directory = resolve_cifar_dir(require_root(root, "cifar100"), "cifar-100-python",
                                      ["train", "test", self.META_FILE])
        files = [self.split]
        _check_files(directory, [*files, self.META_FILE], "CIFAR-100", self.EXPECTED)
        self._load(directory, files, f"{label_type}_labels", self.META_FILE, f"{label_type}_label_names")
