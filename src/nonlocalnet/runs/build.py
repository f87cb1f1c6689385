"""From a config to objects: the datasets, their batch transforms and the model (backbone + blocks).

Train, eval and the analyses all build through here, so a run is rebuilt the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nonlocalnet.data import (
    DATASETS,
    BatchTransform,
    FileDataset,
    UnsafePickleError,
    build_dataset,
    dataset_options,
    expected_num_classes,
)
from nonlocalnet.models import build_model, check_outputs, default_input_shape, insert_blocks, is_user_arch

from .checkpoint import CheckpointError, load_weights
from .config import Config, ConfigError


class DatasetError(RuntimeError):
    """A dataset that cannot be read (missing, truncated or refused files); the message names the file."""


__all__ = ["DatasetError", "batch_transform", "build_datasets", "build_model_from_config", "dataset_kwargs",
           "input_shape_for", "load_pretrained", "num_classes_for"]

_FILE_DATASETS = tuple(n for n, cls in DATASETS.items() if issubclass(cls, FileDataset))


def dataset_kwargs(cfg: Config) -> dict[str, Any]:
    """The keyword options ``build_dataset`` gets for ``cfg.data`` (``size``, ``frames``, ``options``; the
    per-sample augmentation seed of file datasets follows ``train.seed``)."""
    opts: dict[str, Any] = {}
    if cfg.data.size is not None:
        opts["size"] = cfg.data.size
    if cfg.data.frames is not None:
        opts["frames"] = cfg.data.frames
    if cfg.data.name in _FILE_DATASETS:
        opts["seed"] = cfg.train.seed
    opts.update(cfg.data.options)
    return opts


def build_datasets(cfg: Config, splits: tuple[str, ...] = ("train", "test"), root: str | None = None
                   ) -> dict[str, Any]:
    """``{"train": dataset, "test": dataset}`` from ``cfg.data`` (``root`` overrides ``data.root``)."""
    names = {"train": cfg.data.train_split, "test": cfg.data.test_split}
    out = {}
    for s in splits:
        try:
            out[s] = build_dataset(cfg.data.name, root if root is not None else cfg.data.root, names[s],
                                   **dataset_kwargs(cfg))
        except TypeError as e:
            raise ConfigError(f"data.options/size/frames not accepted by dataset {cfg.data.name!r}: {e}") from e
        except UnsafePickleError as e:
            raise DatasetError(f"dataset {cfg.data.name!r}: {e}. The file was refused, not loaded: a pickle that "
                               "calls anything beyond the numpy arrays of a CIFAR batch could run code") from None
        except (ValueError, OSError) as e:
            raise DatasetError(f"dataset {cfg.data.name!r} ({names[s]} split, data.root={cfg.data.root!r}) cannot be "
                               f"read: {e}") from None
    return out


def batch_transform(ds, train: bool, cfg: Config, generator: torch.Generator | None = None):
    """The dataset's on-device batch transform (augmentation when ``train``; normalization always)."""
    overrides: dict[str, Any] = {}
    if train:
        if cfg.data.crop_padding is not None:
            overrides["crop_padding"] = cfg.data.crop_padding
        if cfg.data.flip is not None:
            overrides["flip"] = cfg.data.flip
    if hasattr(ds, "batch_transform"):
        return ds.batch_transform(train, generator=generator, **overrides)
    return BatchTransform(ds.mean, ds.std, train=train, generator=generator, **overrides)


def load_pretrained(model: nn.Module, path: str | Path, log: Callable[[str], None] = print) -> None:
    """Load a state dict (``.safetensors``, or a ``weights_only`` torch file) into ``model``, non-strict:
    tensors whose shape differs (e.g. the classifier) are skipped and reported."""
    p = Path(path)
    if p.suffix == ".safetensors":
        state = load_weights(p)
    else:
        if not p.is_file():
            raise CheckpointError(f"pretrained weights {p} do not exist")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"pretrained weights {p} are corrupt: {type(e).__name__}: {e}") from None
        for key in ("state_dict", "model", "model_state"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"pretrained weights {p} hold a {type(state).__name__}, not a state dict (a mapping "
                              "of parameter names to tensors, as saved by torch.save(model.state_dict()))")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()
             if isinstance(v, torch.Tensor)}
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    result = model.load_state_dict(state, strict=False)
    log(f"pretrained {p}: loaded {len(state) - len(result.unexpected_keys)} tensors; "
        f"{len(skipped)} skipped (shape), {len(result.missing_keys)} missing, "
        f"{len(result.unexpected_keys)} unexpected")
    if len(state) == len(result.unexpected_keys):
        raise CheckpointError(f"pretrained weights {p} share no tensor names with model {type(model).__name__}")


def build_model_from_config(cfg: Config, num_classes: int, *, load_pretrained_weights: bool = True,
                            log: Callable[[str], None] = print) -> nn.Module:
    """Backbone from ``cfg.model`` (+ pretrained weights) with the nonlocal blocks inserted."""
    try:
        model = build_model(cfg.model.arch, num_classes, **cfg.model.options)
        if is_user_arch(cfg.model.arch):  # the user's factory: does it give (B, num_classes) logits on the data?
            check_outputs(model, num_classes, input_shape_for(cfg, model), cfg.model.arch)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from e
    if load_pretrained_weights and cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained, log)
    if cfg.model.blocks:
        shape = input_shape_for(cfg, model)  # the dry forward sees what the data will give the model
        try:
            insert_blocks(model, [b.to_dict() for b in cfg.model.blocks], input_shape=shape)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"model.blocks: {e} [input shape {shape}: from data.name {cfg.data.name!r} / "
                              "data.size; model.options sets the model's own, e.g. img_size of a timm ViT]") from e
    return model


def _num_classes_from_state(cfg: Config, state: dict[str, torch.Tensor]) -> int | None:
    """The classifier width: the backbone's parameters whose shape depends on ``num_classes``."""
    try:
        a = build_model(cfg.model.arch, 1, **cfg.model.options).state_dict()
        b = build_model(cfg.model.arch, 2, **cfg.model.options).state_dict()
    except (TypeError, ValueError):
        return None
    for key, t in a.items():
        if key in b and b[key].shape != t.shape and t.shape[0] == 1:
            for k2, v in state.items():  # the key may have moved under an insertion wrapper
                if k2 == key or k2.replace(".module.", ".") == key:
                    return int(v.shape[0])
    return None


def num_classes_for(cfg: Config, state: dict[str, torch.Tensor] | None = None) -> tuple[int, str | None]:
    """The number of classes of a run without reading its data: ``model.num_classes``, else the classifier's
    shape in ``state``, else the dataset's known count or its class folders; ``(count, note or None)``."""
    if cfg.model.num_classes:
        return int(cfg.model.num_classes), None
    if state:
        nc = _num_classes_from_state(cfg, state)
        if nc is not None:
            return nc, None
    name = cfg.data.name
    known = expected_num_classes(name, **cfg.data.options)
    if known is not None:
        return known, None
    if cfg.data.root is not None:
        root = Path(cfg.data.root)
        sub = root / "train" if (root / "train").is_dir() else root
        if sub.is_dir():
            classes = [d for d in sub.iterdir() if d.is_dir()]
            if classes:
                return len(classes), None
    return 1000, f"number of classes unknown without the data of {name!r}: assumed 1000 (set model.num_classes)"


def input_shape_for(cfg: Config, model: nn.Module | None = None) -> tuple[int, ...]:
    """The per-sample input shape the run's data gives the model (no data read)."""
    name = cfg.data.name
    fixed = getattr(DATASETS[name], "input_shape", None)
    if isinstance(fixed, tuple):  # CIFAR: 3×32×32 whatever the options
        return fixed
    opts = dataset_options(name)
    size = cfg.data.size or cfg.data.options.get("size") or opts.get("size")
    if size is None:
        said = default_input_shape(model) if model is not None else None
        return said[0] if said is not None else (3, 224, 224)
    if "frames" in opts:
        frames = cfg.data.frames or cfg.data.options.get("frames") or opts["frames"]
        return (3, int(frames), int(size), int(size))
    return (3, int(size), int(size))
