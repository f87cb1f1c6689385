"""UCF-101-style action clips stored as frame folders.

Layout::

    root/frames/<class>/<video>/frame00001.jpg ...      (any image names; sorted naturally)
    root/splits/trainlist01.txt     "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
    root/splits/testlist01.txt      "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"
    root/splits/classInd.txt        "1 ApplyEyeMakeup"   (optional; also looked up in root/)

(``root/ucfTrainTestlist`` -- the name of the official split archive -- is accepted for ``splits``.)
The video folder is the list entry without its extension. The class index comes from ``classInd.txt``
(1-based there, 0-based here) when present, else from the sorted class folders of ``frames/``.

A sample is a uint8 clip ``(3, T, size, size)``: ``T = frames`` indices spread uniformly over the video,
``stride = n / T``, frame ``k`` at ``floor(offset + k * stride)`` with ``offset`` uniform in ``[0, stride)``
in training (seeded, per sample and epoch) and ``stride / 2`` (centered) for test. The spatial crop is the
same for every frame of a clip.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from ._common import IMAGENET_MEAN, IMAGENET_STD, FileDataset, SampleError, normalize_split, require_root
from .imaging import center_box, crop_resize, default_resize, is_image_file, open_rgb, random_box

__all__ = ["UCF101", "sample_frame_indices"]


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def sample_frame_indices(num_frames: int, count: int, offset: float | None = None) -> list[int]:
    """``count`` indices spread uniformly over ``num_frames``.

    ``stride = num_frames / count``; index ``k`` is ``floor(offset + k * stride)`` with ``offset`` in
    ``[0, stride)``; ``offset=None`` centers the samples (``stride / 2``).
    """
    if num_frames <= 0 or count <= 0:
        raise ValueError(f"need positive num_frames and count, got {num_frames}, {count}")
    stride = num_frames / count
    if offset is None:
        offset = stride / 2
    return [min(num_frames - 1, int(math.floor(offset + k * stride))) for k in range(count)]


class UCF101(FileDataset):
    """UCF-101 frame folders; ``.samples`` is a list of ``(video_dir, label)``."""

    name = "ucf101"
    num_classes = 101
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    augment = {"crop_padding": 0, "flip": True}
    EXPECTED = "frames/<class>/<video>/<frame>.jpg and splits/trainlist0N.txt, splits/testlist0N.txt"

    def __init__(self, root: str | os.PathLike, split: str = "train", frames: int = 8, size: int = 112,
                 resize: int | None = None, fold: int = 1, scale=(0.35, 1.0), seed: int = 0):
        self.split = normalize_split(split, "ucf101")
        self.frames = int(frames)
        self.size = int(size)
        self.resize = int(resize) if resize is not None else default_resize(self.size)
        if self.frames <= 0 or self.size <= 0 or self.resize < self.size:
            raise ValueError(f"ucf101: need frames > 0 and 0 < size <= resize, got frames={frames}, "
                             f"size={size}, resize={resize}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.seed = int(seed)
        self.input_shape = (3, self.frames, self.size, self.size)
        root = require_root(root, "ucf101")
        if not root.is_dir():
            raise FileNotFoundError(f"UCF-101 root {root} does not exist; expected {self.EXPECTED}")
        frames_dir = root / "frames"
        if not frames_dir.is_dir():
            raise FileNotFoundError(f"UCF-101 root {root} lacks frames/; expected {self.EXPECTED}")
        splits_dir = next((root / d for d in ("splits", "ucfTrainTestlist") if (root / d).is_dir()), None)
        list_name = f"{'trainlist' if self.split == 'train' else 'testlist'}{int(fold):02d}.txt"
        if splits_dir is None or not (splits_dir / list_name).is_file():
            raise FileNotFoundError(f"UCF-101 root {root} lacks splits/{list_name}; expected {self.EXPECTED}")

        candidates = (splits_dir / "classInd.txt", root / "classInd.txt")
        class_ind = next((p for p in candidates if p.is_file()), None)
        if class_ind is not None:
            self.classes = self._read_class_ind(class_ind)
        else:
            self.classes = sorted(e.name for e in os.scandir(frames_dir)
                                  if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise ValueError(f"UCF-101 root {root}: no classes (no classInd.txt and no folders in frames/)")
        index = {c.lower(): i for i, c in enumerate(self.classes)}
        self.num_classes = len(self.classes)

        self.samples: list[tuple[str, int]] = []
        list_path = splits_dir / list_name
        with open(list_path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                parts = line.split()
                if not parts:
                    continue
                entry = parts[0].replace("\\", "/")
                if "/" not in entry or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
                    raise ValueError(f"{list_path}:{lineno}: expected '<class>/<video>.avi [label]', got "
                                     f"{line.strip()!r}")
                cls, video = entry.split("/", 1)
                if cls.lower() not in index:
                    raise ValueError(f"{list_path}:{lineno}: unknown class {cls!r}")
                label = index[cls.lower()]
                if len(parts) == 2 and class_ind is not None and int(parts[1]) - 1 != label:
                    raise ValueError(f"{list_path}:{lineno}: label {parts[1]} disagrees with {class_ind} "
                                     f"({cls} is {label + 1})")
                video_dir = frames_dir / cls / os.path.splitext(video)[0]
                if not video_dir.is_dir():
                    raise FileNotFoundError(f"{list_path}:{lineno}: frame folder {video_dir} does not exist; "
                                            f"expected {self.EXPECTED}")
                self.samples.append((str(video_dir), label))
        if not self.samples:
            raise ValueError(f"{list_path} lists no videos")
        self.root = root

    @staticmethod
    def _read_class_ind(path: Path) -> list[str]:
        entries: dict[int, str] = {}
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or not parts[0].isdigit():
                    raise ValueError(f"{path}:{lineno}: expected '<index> <class>', got {line.strip()!r}")
                entries[int(parts[0])] = parts[1]
        if sorted(entries) != list(range(1, len(entries) + 1)):
            raise ValueError(f"{path}: class indices must be 1..{len(entries)}")
        return [entries[i] for i in range(1, len(entries) + 1)]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def frame_paths(self, index: int) -> list[str]:
        video_dir = self.samples[index][0]
        names = sorted((n for n in os.listdir(video_dir) if is_image_file(n)), key=_natural_key)
        if not names:
            raise SampleError(f"frame folder {video_dir} holds no images")
        return [os.path.join(video_dir, n) for n in names]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        paths = self.frame_paths(index)
        label = self.samples[index][1]
        train = self.split == "train"
        rng = self._rng(index) if train else None
        stride = len(paths) / self.frames
        offset = float(rng.uniform(0, stride)) if train else None
        chosen = sample_frame_indices(len(paths), self.frames, offset)
        clip = torch.empty(self.input_shape, dtype=torch.uint8)
        box = out = None
        cache: dict[int, torch.Tensor] = {}
        for t, i in enumerate(chosen):
            if i not in cache:
                im = open_rgb(paths[i])
                if box is None:
                    if train:
                        box, out = random_box(im.width, im.height, rng, scale=self.scale), (self.size,) * 2
                    else:
                        box, out = center_box(im.width, im.height, self.size, self.resize)
                cache[i] = crop_resize(im, box, out)
            clip[:, t] = cache[i]
        return clip, label

