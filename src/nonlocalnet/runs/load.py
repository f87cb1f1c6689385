"""A run rebuilt in memory: its config, its model with the checkpoint's weights, its nonlocal blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nonlocalnet.blocks import NonlocalBlock

from .build import build_model_from_config, num_classes_for
from .checkpoint import CheckpointError, load_weights, read_metadata
from .config import Config, load_config
from .layout import checkpoint_config, epoch_checkpoints, resolve_checkpoint

__all__ = ["Loaded", "find_blocks", "load_config_only", "load_run"]


def find_blocks(model: nn.Module) -> dict[str, NonlocalBlock]:
    """``{module path: block}`` of every :class:`~nonlocalnet.blocks.NonlocalBlock` in ``model``, in module
    order (an inserted block's path is ``<at>.nonlocal_block``, its state-dict prefix)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NonlocalBlock)}


@dataclass
class Loaded:
    """A model rebuilt from a run: config, weights, and its nonlocal blocks (``{module path: block}``)."""

    source: Path
    checkpoint: Path | None
    run_dir: Path | None
    config_source: str
    cfg: Config
    model: nn.Module
    state: dict[str, torch.Tensor]
    blocks: dict[str, NonlocalBlock]
    num_classes: int
    epoch: int | None = None
    epochs: list[tuple[int, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"source": str(self.source), "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "config": self.config_source, "epoch": self.epoch, "arch": self.cfg.model.arch,
                "num_classes": self.num_classes, "blocks": {k: b.name for k, b in self.blocks.items()}}


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
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt} does not fit the model of its config ({cfg_source}): {e}") from None
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
