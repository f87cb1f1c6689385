"""``demo``: a bundled synthetic "same glyph?" task in which long-range dependencies decide the label.

Each ``size x size`` RGB image (default 32) holds two glyphs, each one of four 5x5 binary patterns
(plus, cross, L, T -- all with exactly 9 "on" pixels and a full 5x5 extent, so pixel counts and bounding
boxes carry no information), painted in an independent random bright color and placed so that their
centers are at least ``min_distance`` pixels apart (default ``size // 2``, i.e. 16 for 32x32). The label is
``1`` if both glyphs are the same pattern and ``0`` otherwise; labels are exactly balanced (a shuffled
half of each split is "same") and, for "different" pairs, the second glyph is uniform over the other three.
Uniform background noise (``0..noise``) and ``distractors`` isolated pixels of glyph-like colors are added,
so neither intensity nor color reveals the answer -- only the two shapes, compared across the image.

Why it tests nonlocal modelling: the answer is a relation between two far-apart positions. A
convolutional network whose features see at most one glyph per location, followed by the usual global
average pooling and a linear classifier, computes a score that is *additive* over the glyphs,
``s(a) + s(b) + const``; no additive score separates "same" from "different" (``2 s(a) > t`` and
``2 s(b) > t`` imply ``s(a) + s(b) > t``). A purely local CNN must therefore grow a receptive field that
spans both glyphs (>= 16 px apart) before pooling -- possible only in its deepest, coarsest layers, where
it learns slowly -- whereas one nonlocal block lets every position read the other glyph directly.

Generation is deterministic: split ``train`` uses ``numpy.random.default_rng([seed, 0])`` and ``test``
``default_rng([seed, 1])``. ``mean`` / ``std`` are computed on a fixed reference sample of 512 images with
the same geometry, so train and test share them. Nothing is written to disk unless ``root`` is given, in
which case the arrays are cached as ``root/demo-<split>-<parameters>.npz`` (loaded without pickle).
Besides ``images`` / ``labels`` the dataset exposes ``glyph_ids`` (N, 2) and ``glyph_positions`` (N, 2, 2;
top-left ``(y, x)`` of each glyph) for analysis, e.g. checking where an attention map points.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch

from ._common import InMemoryDataset, normalize_split

__all__ = ["DemoDataset", "GLYPHS", "GLYPH_NAMES", "generate_demo", "glyph_indices"]

GENERATOR_VERSION = 1
GLYPH_SIZE = 5
GLYPH_NAMES = ("plus", "cross", "L", "T")
_GLYPH_ART = (
    ("..#..",
     "..#..",
     "#####",
     "..#..",
     "..#.."),
    ("#...#",
     ".#.#.",
     "..#..",
     ".#.#.",
     "#...#"),
    ("#....",
     "#....",
     "#....",
     "#....",
     "#####"),
    ("#####",
     "..#..",
     "..#..",
     "..#..",
     "..#.."),
)
#: the four glyphs as a bool array (4, 5, 5)
GLYPHS = np.array([[[c == "#" for c in row] for row in art] for art in _GLYPH_ART], dtype=bool)
_ON = [np.nonzero(g) for g in GLYPHS]  # all glyphs have the same number of pixels
_GLYPH_DY = np.stack([on[0] for on in _ON])  # (4, 9)
_GLYPH_DX = np.stack([on[1] for on in _ON])
_BOX_DY, _BOX_DX = (a.reshape(-1) for a in np.mgrid[0:GLYPH_SIZE, 0:GLYPH_SIZE])

_SPLIT_CODES = {"train": 0, "test": 1, "reference": 2}
_COLOR_LOW = 96


def _check_geometry(size: int, min_distance: float, margin: int) -> None:
    if size < GLYPH_SIZE + 2 * margin + 2:
        raise ValueError(f"demo: size {size} is too small for two {GLYPH_SIZE}x{GLYPH_SIZE} glyphs")
    span = size - GLYPH_SIZE - 2 * margin  # top-left coordinates lie in [margin, margin + span]
    if min_distance > 0.9 * math.sqrt(2) * span:
        raise ValueError(f"demo: min_distance {min_distance} is not achievable in a {size}x{size} image "
                         f"(at most about {0.9 * math.sqrt(2) * span:.1f})")


def glyph_indices(glyphs) -> tuple[int, ...]:
    """The indices into :data:`GLYPH_NAMES` of ``glyphs`` (names, at least two, distinct), checked."""
    if isinstance(glyphs, str):
        raise ValueError(f"demo: glyphs must be a list of glyph names, got the string {glyphs!r}")
    names = tuple(glyphs)
    unknown = [g for g in names if g not in GLYPH_NAMES]
    if unknown or len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"demo: glyphs must be at least two distinct names of {', '.join(GLYPH_NAMES)}, got "
                         f"{list(names)}")
    return tuple(GLYPH_NAMES.index(g) for g in names)


def generate_demo(count: int, rng: np.random.Generator, *, size: int = 32, min_distance: float = 16,
                  margin: int = 1, noise: int = 48, distractors: int = 8, glyphs=GLYPH_NAMES):
    """Generate ``count`` samples: ``(images uint8 (N,3,S,S), labels int64, glyph_ids, positions)``.

    ``glyphs``: the patterns drawn from (names of :data:`GLYPH_NAMES`; ``glyph_ids`` index :data:`GLYPHS`). With
    two, "same" is the XOR of the two glyphs' kinds: the smallest relation no additive score separates."""
    _check_geometry(size, min_distance, margin)
    if not 0 <= noise < _COLOR_LOW:
        raise ValueError(f"demo: noise must be in [0, {_COLOR_LOW}), got {noise}")
    kinds = np.array(glyph_indices(glyphs))
    k = len(kinds)
    n = int(count)
    labels = np.zeros(n, dtype=np.int64)
    labels[: n // 2] = 1
    labels = labels[rng.permutation(n)]
    first = rng.integers(0, k, n)
    second = np.where(labels == 1, first, (first + rng.integers(1, k, n)) % k)
    glyph_ids = kinds[np.stack([first, second], axis=1)]

    low, high = margin, size - GLYPH_SIZE - margin + 1
    pos = rng.integers(low, high, (n, 2, 2))  # (sample, glyph, yx)
    for _ in range(10_000):
        d = pos[:, 0] - pos[:, 1]
        bad = np.nonzero(np.hypot(d[:, 0], d[:, 1]) < min_distance)[0]
        if bad.size == 0:
            break
        pos[bad] = rng.integers(low, high, (bad.size, 2, 2))
    else:  # pragma: no cover - excluded by _check_geometry
        raise RuntimeError("demo: could not place glyphs far enough apart")

    background = rng.integers(0, noise + 1, (n, 3, size, size), dtype=np.uint8)
    images = background.copy()
    rows = np.arange(n)[:, None]
    if distractors > 0:
        dy = rng.integers(0, size, (n, distractors))
        dx = rng.integers(0, size, (n, distractors))
        images[rows, :, dy, dx] = rng.integers(_COLOR_LOW, 256, (n, distractors, 3), dtype=np.uint8)
    colors = rng.integers(_COLOR_LOW, 256, (n, 2, 3), dtype=np.uint8)
    for j in range(2):
        y, x = pos[:, j, 0:1], pos[:, j, 1:2]
        by, bx = y + _BOX_DY, x + _BOX_DX  # clear distractors from the glyph's box
        images[rows, :, by, bx] = background[rows, :, by, bx]
        gy, gx = y + _GLYPH_DY[glyph_ids[:, j]], x + _GLYPH_DX[glyph_ids[:, j]]
        images[rows, :, gy, gx] = colors[:, j][:, None, :]
    return images, labels, glyph_ids.astype(np.int64), pos.astype(np.int64)


@functools.lru_cache(maxsize=16)
def _reference_stats(size: int, min_distance: float, margin: int, noise: int, distractors: int, glyphs: tuple):
    rng = np.random.default_rng([0, _SPLIT_CODES["reference"]])
    images = generate_demo(512, rng, size=size, min_distance=min_distance, margin=margin, noise=noise,
                           distractors=distractors, glyphs=glyphs)[0].astype(np.float64) / 255.0
    mean = images.mean(axis=(0, 2, 3))
    std = images.std(axis=(0, 2, 3))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


class DemoDataset(InMemoryDataset):
    """The bundled "same glyph?" task (see module docstring); 2 classes: 0 = different, 1 = same."""

    name = "demo"
    num_classes = 2
    augment = {"crop_padding": 0, "flip": True}  # a flip keeps same/different; crops could cut a glyph

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", size: int = 32,
                 train_size: int = 4000, test_size: int = 1000, seed: int = 0,
                 min_distance: float | None = None, margin: int = 1, noise: int = 48, distractors: int = 8,
                 glyphs=GLYPH_NAMES):
        self.split = normalize_split(split, "demo")
        self.size = int(size)
        self.min_distance = float(size // 2 if min_distance is None else min_distance)
        self.margin, self.noise, self.distractors = int(margin), int(noise), int(distractors)
        self.glyphs = tuple(GLYPH_NAMES[i] for i in glyph_indices(glyphs))
        self.seed = int(seed)
        count = int(train_size if self.split == "train" else test_size)
        if count <= 0:
            raise ValueError(f"demo: {self.split}_size must be positive, got {count}")
        geometry = dict(size=self.size, min_distance=self.min_distance, margin=self.margin, noise=self.noise,
                        distractors=self.distractors, glyphs=self.glyphs)
        _check_geometry(self.size, self.min_distance, self.margin)
        self.classes = ["different", "same"]
        self.input_shape = (3, self.size, self.size)
        self.mean, self.std = _reference_stats(**geometry)

        cache = None
        if root is not None:
            kinds = "" if self.glyphs == GLYPH_NAMES else "-g" + "".join(str(GLYPH_NAMES.index(g)) for g in self.glyphs)
            key = (f"demo-{self.split}-v{GENERATOR_VERSION}-n{count}-s{self.size}-seed{self.seed}"
                   f"-d{self.min_distance:g}-m{self.margin}-z{self.noise}-k{self.distractors}{kinds}.npz")
            cache = Path(root).expanduser() / key
        arrays = self._load_cache(cache, count) if cache is not None else None
        if arrays is None:
            rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split]])
            arrays = generate_demo(count, rng, **geometry)
            if cache is not None:
                self._save_cache(cache, arrays)
        images, labels, glyph_ids, positions = arrays
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels)
        self.glyph_ids = torch.from_numpy(glyph_ids)
        self.glyph_positions = torch.from_numpy(positions)
        self.root = None if root is None else Path(root)

    def _load_cache(self, path: Path, count: int):
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            arrays = tuple(z[k] for k in ("images", "labels", "glyph_ids", "positions"))
        if arrays[0].shape != (count, 3, self.size, self.size) or arrays[0].dtype != np.uint8:
            raise ValueError(f"demo cache {path} has images {arrays[0].dtype} {arrays[0].shape}; delete it")
        return arrays

    @staticmethod
    def _save_cache(path: Path, arrays) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        images, labels, glyph_ids, positions = arrays
        np.savez(tmp, images=images, labels=labels, glyph_ids=glyph_ids, positions=positions)
        os.replace(tmp, path)
