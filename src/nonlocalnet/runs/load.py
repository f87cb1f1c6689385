"""A run rebuilt in memory: its config, its model with the checkpoint's weights, its nonlocal blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nonlocalnet.blocks import NonlocalBlock
from nonlocalnet.models import default_input_shape

from .build import build_model_from_config, input_shape_for, num_classes_for
from .checkpoint import load_weights, load_weights_into, read_metadata
from .config import Config, load_config
from .layout import checkpoint_config, epoch_checkpoints, resolve_checkpoint

__all__ = ["Loaded", "find_blocks", "load_config_only", "load_run"]


def find_blocks(model: nn.Module) -> dict[str, NonlocalBlock]:
    """``{module path: block}`` of every :class:`~nonlocalnet.blocks.NonlocalBlock` in ``model``, in module
    order (an inserted block's path is ``<at>.nonlocal_block``, its state-dict prefix)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NonlocalBlock)}


@dataclass
class Loaded:
    """A model rebuilt from a run (:func:`load_run`, :func:`load_config_only`) or given in Python
    (:meth:`Loaded.from_model`): config (None for a model given without one), weights, and its nonlocal blocks
    (``{module path: block}``)."""

    source: Path
    checkpoint: Path | None
    run_dir: Path | None
    config_source: str
    cfg: Config | None
    model: nn.Module
    state: dict[str, torch.Tensor]
    blocks: dict[str, NonlocalBlock]
    num_classes: int
    epoch: int | None = None
    epochs: list[tuple[int, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    arch: str | None = None
    """The model's name (``cfg.model.arch`` when there is a config)."""
    input_shape: tuple[int, ...] | None = None
    """The per-sample input shape, when known without a config (``from_model(input_shape=...)``)."""

    @classmethod
    def from_model(cls, model: nn.Module, cfg: Config | None = None, *, name: str | None = None,
                   input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                   device: str | torch.device | None = None) -> Loaded:
        """A model built in Python (any ``nn.Module`` with blocks inserted), for the analyses.

        ``cfg``: a config whose data the data-based analyses read (None: give them ``batch=`` instead,
        :meth:`nonlocalnet.analysis.Batch.from_tensor`); ``input_shape``: the per-sample input shape for
        ``cost`` (default: the config's data, else what the model says, e.g. timm's ``pretrained_cfg``);
        ``name``: shown as the model's name (default: ``cfg.model.arch`` or the class name). The model is put in
        eval mode (and on ``device`` when given); its current weights are analyzed.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"Loaded.from_model: model must be an nn.Module, got {type(model).__name__}")
        if cfg is not None and not isinstance(cfg, Config):
            raise TypeError(f"Loaded.from_model: cfg must be a nonlocalnet.runs.Config or None, got "
                            f"{type(cfg).__name__} (load one with nonlocalnet.runs.load_config)")
        if input_shape is not None:
            input_shape = tuple(int(s) for s in input_shape)
            if len(input_shape) < 2 or any(s < 1 for s in input_shape):
                raise ValueError(f"Loaded.from_model: input_shape must be the per-sample shape (C, *spatial) with "
                                 f"positive sizes, got {input_shape}")
        if device is not None:
            model.to(device)
        model.eval()
        arch = name or (cfg.model.arch if cfg is not None else type(model).__name__)
        nc = num_classes if num_classes is not None else (num_classes_for(cfg)[0] if cfg is not None else 0)
        return cls(Path(f"<python: {arch}>"), None, None, "none (a model given in Python)" if cfg is None else
                   "given in Python", cfg, model, {}, find_blocks(model), int(nc), None, [], [], arch, input_shape)

    def describe(self) -> dict[str, Any]:
        arch = self.arch or (self.cfg.model.arch if self.cfg is not None else type(self.model).__name__)
        return {"source": str(self.source), "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "config": self.config_source, "epoch": self.epoch, "arch": arch,
                "num_classes": self.num_classes, "blocks": {k: b.name for k, b in self.blocks.items()}}

    def model_input_shape(self) -> tuple[int, ...]:
        """The per-sample input shape of the model: ``input_shape`` if given, else the config's data, else what
        the model says (timm ``pretrained_cfg``, ...); a ValueError naming ``input_shape`` otherwise."""
        if self.input_shape is not None:
            return self.input_shape
        if self.cfg is not None:
            return input_shape_for(self.cfg, self.model)
        said = default_input_shape(self.model)
        if said is None:
            raise ValueError(f"the input shape of {self.describe()['arch']} is unknown (no config, and the model "
                             "does not say): pass input_shape=(C, *spatial) to Loaded.from_model (or "
                             "--input-shape to analyze cost)")
        return said[0]


def load_run(path: str | Path, overrides: Sequence[str] = (), device: str = "cpu") -> Loaded:
    """Rebuild the model of a run dir or a ``.safetensors`` checkpoint, weights loaded, in eval mode.

    The config is the run's ``config.yaml`` (next to the checkpoint) or the one stored in the file's
    metadata, with ``--set`` style ``overrides``. No data is read: the number of classes comes from the
    config or from the classifier's shape in the checkpoint.
    """
    source = Path(path)
    ckpt = resolve_checkpoint(source)
    cfg, cfg_source = checkpoint_config(ckpt, overrides)
    meta = read_metadata(ckpt)
    state = load_weights(ckpt)
    nc, note = num_classes_for(cfg, state)
    model = build_model_from_config(cfg, nc, load_pretrained_weights=False)
    load_weights_into(model, state, ckpt, f"the model of its config ({cfg_source})")
    model.to(device).eval()
    try:
        epoch = int(meta["epoch"]) if "epoch" in meta else None
    except ValueError:
        epoch = None
    return Loaded(source, ckpt, ckpt.parent, cfg_source, cfg, model, state, find_blocks(model), nc, epoch,
                  epoch_checkpoints(ckpt.parent), [note] if note else [])


def load_config_only(path: str | Path, overrides: Sequence[str] = (), device: str = "cpu") -> Loaded:
    """A model from a config YAML alone (random weights): for analyses that need only shapes (cost)."""
    source = Path(path)
    cfg = load_config(source, list(overrides))
    nc, note = num_classes_for(cfg)
    model = build_model_from_config(cfg, nc, load_pretrained_weights=False).to(device).eval()
    return Loaded(source, None, None, str(source), cfg, model, {}, find_blocks(model), nc, None, [],
                  [note] if note else [])
