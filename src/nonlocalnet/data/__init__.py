"""Datasets for nonlocalnet: CIFAR-10/100, image folders, CUB-200-2011, UCF-101 frame folders and the
bundled ``demo`` task, plus :class:`BatchTransform` (augmentation + normalization on the training device).

Every dataset built by :func:`build_dataset` yields ``(uint8 tensor, int label)`` samples -- images
``(C, H, W)`` or clips ``(C, T, H, W)`` -- and carries ``num_classes``, ``mean``, ``std`` (0..1 units),
``input_shape``, ``classes`` and ``info`` (:class:`DatasetInfo`). The in-memory ones (``cifar10``,
``cifar100``, ``demo``) also expose ``images`` / ``labels`` tensors so a trainer can move the whole set to
the GPU. Nothing here downloads anything; see ``docs/data.md`` for the on-disk layouts.
"""

from ._common import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BaseDataset,
    DatasetInfo,
    FileDataset,
    InMemoryDataset,
    SampleError,
)
from .cifar import CIFAR10, CIFAR100
from .demo import DemoDataset, generate_demo
from .folder import CUB200, ImageFolder
from .registry import DATASETS, build_dataset, dataset_options, expected_num_classes
from .safe_pickle import RestrictedUnpickler, UnsafePickleError, load_restricted
from .transforms import BatchTransform
from .ucf101 import UCF101

__all__ = [
    "BatchTransform",
    "BaseDataset",
    "CIFAR10",
    "CIFAR100",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CUB200",
    "DATASETS",
    "DatasetInfo",
    "DemoDataset",
    "FileDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolder",
    "InMemoryDataset",
    "RestrictedUnpickler",
    "SampleError",
    "UCF101",
    "UnsafePickleError",
    "build_dataset",
    "dataset_options",
    "expected_num_classes",
    "generate_demo",
    "load_restricted",
]
