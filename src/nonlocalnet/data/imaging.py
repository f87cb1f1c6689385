"""PIL decoding and geometry for the file-based datasets (no torchvision).

* evaluation: resize the shorter side to ``resize`` then center-crop ``size x size``;
* training ("random-resized-crop-lite"): a random box covering ``scale`` of the image area with aspect
  ratio in ``ratio`` (log-uniform), resized to ``size x size``. Flips are left to
  :class:`~nonlocalnet.data.BatchTransform`, which runs on the training device.

Both produce a uint8 tensor ``(3, size, size)``; crop and resize happen in one PIL call
(``Image.resize(..., box=...)``) so no intermediate image is materialised.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from ._common import SampleError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

Box = tuple[float, float, float, float]


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def default_resize(size: int) -> int:
    """The usual eval resize for a crop size: 224 -> 256, 112 -> 128."""
    return int(round(size / 0.875))


def open_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Decode ``path`` to an RGB PIL image (``draft_size`` lets JPEG decode at a reduced scale)."""
    try:
        with Image.open(path) as im:
            if draft_size is not None and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            return im.convert("RGB")
    except FileNotFoundError:
        raise
    except Exception as exc:
        size = os.path.getsize(path) if os.path.isfile(path) else None
        what = "an empty (0-byte) file" if size == 0 else f"{type(exc).__name__}: {exc}"
        raise SampleError(f"cannot decode image {path}: {what}") from exc


def center_box(width: int, height: int, size: int, resize: int) -> tuple[Box, tuple[int, int]]:
    """Box (in source pixels) equivalent to 'resize shorter side to ``resize``, center-crop ``size``'."""
    scale = resize / min(width, height)
    crop_w = min(size / scale, width)
    crop_h = min(size / scale, height)
    x0 = (width - crop_w) / 2
    y0 = (height - crop_h) / 2
    return (x0, y0, x0 + crop_w, y0 + crop_h), (size, size)


def random_box(width: int, height: int, rng: np.random.Generator, scale=(0.35, 1.0),
               ratio=(3 / 4, 4 / 3), attempts: int = 10) -> Box:
    """A random box with area fraction in ``scale`` and aspect ratio (w/h) in ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if w <= width and h <= height:
            x0 = rng.uniform(0, width - w)
            y0 = rng.uniform(0, height - h)
            return (x0, y0, x0 + w, y0 + h)
    side = min(width, height)  # fallback: central square
    x0, y0 = (width - side) / 2, (height - side) / 2
    return (x0, y0, x0 + side, y0 + side)


def crop_resize(im: Image.Image, box: Box, out_size: tuple[int, int]) -> torch.Tensor:
    """Crop ``box`` from ``im``, resize to ``out_size`` (w, h) bilinearly, return uint8 ``(3, h, w)``."""
    out = im.resize(out_size, Image.Resampling.BILINEAR, box=box)
    arr = np.asarray(out, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def load_image(path: str | os.PathLike, size: int, resize: int, train: bool,
               rng: np.random.Generator | None = None, scale=(0.35, 1.0)) -> torch.Tensor:
    """Decode ``path`` and return a uint8 ``(3, size, size)`` tensor (see module docstring)."""
    if train:
        im = open_rgb(path)
        box = random_box(im.width, im.height, rng, scale=scale)
        return crop_resize(im, box, (size, size))
    im = open_rgb(path, draft_size=resize)
    box, out = center_box(im.width, im.height, size, resize)
    return crop_resize(im, box, out)
