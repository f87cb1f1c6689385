"""``build_dataset``: one entry point for every dataset of :mod:`nonlocalnet.data`."""

from __future__ import annotations

import inspect
import os

from ._common import BaseDataset
from .cifar import CIFAR10, CIFAR100
from .demo import DemoDataset
from .folder import CUB200, ImageFolder
from .ucf101 import UCF101

__all__ = ["DATASETS", "build_dataset", "dataset_options", "expected_num_classes"]

#: dataset name -> class; every class is called as ``cls(root, split, **options)``
DATASETS: dict[str, type[BaseDataset]] = {
    "cifar10": CIFAR10,
    "cifar100": CIFAR100,
    "folder": ImageFolder,
    "cub200": CUB200,
    "ucf101": UCF101,
    "demo": DemoDataset,
}

_ALIASES = {"imagefolder": "folder", "imagenet": "folder", "cub": "cub200", "cub2002011": "cub200",
            "ucf": "ucf101"}


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    return _ALIASES.get(key, key)


def dataset_options(name: str) -> dict[str, object]:
    """The keyword options of dataset ``name`` with their defaults."""
    cls = DATASETS[_canonical(name)]
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]  # self, root, split
    return {p.name: p.default for p in params}


def expected_num_classes(name: str, **options) -> int | None:
    """The number of classes of dataset ``name`` known without its files (``None``: the files decide)."""
    return DATASETS[_canonical(name)].expected_num_classes(**options)


def build_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                  **options) -> BaseDataset:
    """Build dataset ``name`` (one of :data:`DATASETS`) from ``root`` for ``split`` (train/test/val).

    Every dataset yields ``(uint8 tensor, int label)`` samples and has ``num_classes``, ``mean``, ``std``
    (per channel, 0..1 units), ``input_shape``, ``classes`` and ``info``; ``cifar10``, ``cifar100`` and
    ``demo`` also hold ``images`` (uint8) and ``labels`` (int64) in memory. ``root`` may be ``None`` only
    for ``demo``. Unknown options raise ``TypeError`` listing the valid ones.
    """
    key = _canonical(name)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    valid = dataset_options(key)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"dataset {key!r} got unknown option(s) {', '.join(unknown)}; "
                        f"valid options: {', '.join(valid)}")
    return DATASETS[key](root, split, **options)
