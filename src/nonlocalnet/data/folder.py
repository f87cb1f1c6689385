"""Image datasets decoded from files: ImageNet-style class folders and CUB-200-2011.

``folder``: ``root/train/<class>/*.jpg|png|...`` and ``root/val/<class>/...`` (``test`` is accepted in place
of ``val``); one subfolder per class, class index = position in the sorted class names of the ``train``
folder (so train and val agree even when a val class folder is missing).

``cub200``: the CUB-200-2011 layout -- ``images.txt`` (``<id> <relative path>``), ``image_class_labels.txt``
(``<id> <class>``, 1-based), ``train_test_split.txt`` (``<id> <1 = train, 0 = test>``), ``images/<path>``,
optional ``classes.txt``; ``root`` may be the directory or its parent holding ``CUB_200_2011``.

Samples are uint8 ``(3, size, size)``: eval = resize shorter side to ``resize`` + center crop, train =
random-resized-crop-lite (see :mod:`nonlocalnet.data.imaging`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ._common import IMAGENET_MEAN, IMAGENET_STD, FileDataset, normalize_split, require_root
from .imaging import default_resize, is_image_file, load_image

__all__ = ["ImageFolder", "CUB200"]


class _ImageFileDataset(FileDataset):
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    augment = {"crop_padding": 0, "flip": True}

    def _setup_geometry(self, size: int, resize: int | None, scale, seed: int) -> None:
        self.size = int(size)
        self.resize = int(resize) if resize is not None else default_resize(self.size)
        if self.size <= 0 or self.resize < self.size:
            raise ValueError(f"{self.name}: need 0 < size <= resize, got size={size}, resize={resize}")
        lo, hi = float(scale[0]), float(scale[1])
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"{self.name}: scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.scale = (lo, hi)
        self.seed = int(seed)
        self.input_shape = (3, self.size, self.size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        train = self.split == "train"
        rng = self._rng(index) if train else None
        return load_image(path, self.size, self.resize, train, rng, self.scale), label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


def _class_dirs(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


class ImageFolder(_ImageFileDataset):
    """``root/{train,val}/<class>/<image>``; ``.samples`` is a list of ``(path, label)``."""

    name = "folder"

    def __init__(self, root: str | os.PathLike, split: str = "train", size: int = 224,
                 resize: int | None = None, scale=(0.35, 1.0), seed: int = 0):
        self.split = normalize_split(split, "folder")
        self._setup_geometry(size, resize, scale, seed)
        root = require_root(root, "folder")
        expected = "root/train/<class>/<image> and root/val/<class>/<image>"
        if not root.is_dir():
            raise FileNotFoundError(f"image folder root {root} does not exist; expected {expected}")
        names = ["train"] if self.split == "train" else ["val", "test"]
        split_dir = next((root / n for n in names if (root / n).is_dir()), None)
        if split_dir is None:
            raise FileNotFoundError(f"image folder root {root} lacks {' or '.join(names)}/; "
                                    f"expected {expected}")
        class_source = root / "train" if (root / "train").is_dir() else split_dir
        self.classes = _class_dirs(class_source)
        if not self.classes:
            raise ValueError(f"{class_source} has no class subfolders; expected {expected}")
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for cls in _class_dirs(split_dir):
            if cls not in index:
                raise ValueError(f"{split_dir / cls} is a class folder that {class_source} does not have")
            before = len(self.samples)
            for dirpath, dirnames, filenames in os.walk(split_dir / cls, followlinks=True):
                dirnames.sort()
                for fname in sorted(filenames):
                    if is_image_file(fname):
                        self.samples.append((os.path.join(dirpath, fname), index[cls]))
            if len(self.samples) == before:
                raise ValueError(f"class folder {split_dir / cls} holds no images (.jpg, .png, ...); a class "
                                 "without samples cannot be learned or measured: fill it or remove it")
        if not self.samples:
            raise ValueError(f"{split_dir} holds no images (.jpg, .png, ...); "
                             f"expected {expected}")
        self.num_classes = len(self.classes)
        self.root = root


def _read_table(path: Path, expected: str) -> dict[int, str]:
    if not path.is_file():
        raise FileNotFoundError(f"CUB-200-2011 directory {path.parent} lacks {path.name}; "
                                f"expected {expected}")
    table: dict[int, str] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise ValueError(f"{path}:{lineno}: expected '<image id> <value>', got {line!r}")
            table[int(parts[0])] = parts[1].strip()
    return table


class CUB200(_ImageFileDataset):
    """CUB-200-2011 birds (200 classes); ``.samples`` is a list of ``(path, label)`` with 0-based labels."""

    name = "cub200"
    num_classes = 200
    EXPECTED = "images.txt, image_class_labels.txt, train_test_split.txt, images/"

    def __init__(self, root: str | os.PathLike, split: str = "train", size: int = 224,
                 resize: int | None = None, scale=(0.35, 1.0), seed: int = 0):
        self.split = normalize_split(split, "cub200")
        self._setup_geometry(size, resize, scale, seed)
        root = require_root(root, "cub200")
        if not (root / "images.txt").exists() and (root / "CUB_200_2011").is_dir():
            root = root / "CUB_200_2011"
        if not root.is_dir():
            raise FileNotFoundError(f"CUB-200-2011 directory {root} does not exist; expected {self.EXPECTED}")
        images = _read_table(root / "images.txt", self.EXPECTED)
        labels = _read_table(root / "image_class_labels.txt", self.EXPECTED)
        is_train = _read_table(root / "train_test_split.txt", self.EXPECTED)
        if not (root / "images").is_dir():
            raise FileNotFoundError(f"CUB-200-2011 directory {root} lacks images/; expected {self.EXPECTED}")
        for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
            missing = sorted(set(images) - set(table))
            if missing:
                raise ValueError(f"{root / name} has no entry for image id {missing[0]} "
                                 f"({len(missing)} ids of images.txt missing)")
        try:
            class_ids = {i: int(v) for i, v in labels.items()}
        except ValueError as exc:
            raise ValueError(f"{root / 'image_class_labels.txt'}: class ids must be integers") from exc
        if class_ids and min(class_ids.values()) < 1:
            raise ValueError(f"{root / 'image_class_labels.txt'}: class ids are 1-based, found "
                             f"{min(class_ids.values())}")
        if (root / "classes.txt").is_file():
            names = _read_table(root / "classes.txt", self.EXPECTED)
            self.classes = [names.get(i, str(i)) for i in range(1, max(names) + 1)]
        else:
            self.classes = [str(i) for i in range(1, max(class_ids.values(), default=0) + 1)]
        self.num_classes = len(self.classes)
        want = "1" if self.split == "train" else "0"
        self.samples = []
        for image_id in sorted(images):
            flag = is_train[image_id].strip()
            if flag not in ("0", "1"):
                raise ValueError(f"{root / 'train_test_split.txt'}: image {image_id} has flag {flag!r}, "
                                 "expected 0 or 1")
            if flag != want:
                continue
            label = class_ids[image_id] - 1
            if label >= self.num_classes:
                raise ValueError(f"image {image_id} has class {label + 1} but classes.txt lists "
                                 f"{self.num_classes}")
            self.samples.append((str(root / "images" / images[image_id]), label))
        self.root = root
