"""The run directory: which files a run writes, how a checkpoint is found, the config of a checkpoint.

A run dir (``run.out``) holds ``config.yaml``, ``metrics.jsonl`` (one JSON record per epoch),
``last.safetensors`` + ``last.state.pt`` (the latest epoch; see :mod:`.checkpoint`), ``best.safetensors``,
``epoch_XXXX.safetensors`` (``run.keep_epochs``) and ``analysis/``. Train, eval, analysis, the demo and
the summaries all find things through this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import CheckpointError, read_metadata
from .config import Config, ConfigError, apply_overrides, config_from_dict, load_config

__all__ = ["CONFIG_FILE", "METRICS_FILE", "NEXT_WEIGHTS", "RUN_FILES", "RunDirError", "checkpoint_config",
           "epoch_checkpoints", "epoch_file", "lock_path", "read_metrics", "require_directory", "resolve_checkpoint",
           "stage_path"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LAST_WEIGHTS = "last.safetensors"
NEXT_WEIGHTS = "last.next.safetensors"
BEST_WEIGHTS = "best.safetensors"
RUN_FILES = (LAST_WEIGHTS, "last.state.pt", NEXT_WEIGHTS, BEST_WEIGHTS, METRICS_FILE)
TMP_GLOB = ".*.tmp"  # atomic writes' temporary files (runs/checkpoint.py), left behind only by a killed process
EPOCH_RE = re.compile(r"^epoch_(\d+)\.safetensors$")


class RunDirError(RuntimeError):
    """A run directory (or an output directory) that cannot be used or read as it is; the message names it."""


def lock_path(run_dir: str | Path) -> Path:
    """The lock file of a run dir (:mod:`.lock`): ``.<name>.lock`` beside it, so that it outlives the replacement
    of the directory by a ``run.overwrite`` run (:func:`stage_path`)."""
    p = Path(run_dir).resolve()
    return p.parent / f".{p.name}.lock"


def stage_path(run_dir: str | Path) -> Path:
    """Where a ``run.overwrite`` run writes until its first checkpoint replaces the run at ``run_dir``."""
    p = Path(run_dir)
    return p.parent / f".{p.name}.incoming"


def require_directory(path: str | Path, what: str) -> Path:
    """``path`` as an output directory: absent (it will be created) or a directory; a :class:`RunDirError` naming
    ``what`` (e.g. ``"run.out"``, ``"--out"``) when it, or a parent of it, is a file."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise RunDirError(f"{what} {p} names a file, not a directory; give a directory path" if q == p else
                              f"{what} {p} cannot be a directory: its parent {q} is a file")
    return p


def epoch_file(epoch: int) -> str:
    return f"epoch_{epoch:04d}.safetensors"


def epoch_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(epoch, path)]`` of the ``epoch_XXXX.safetensors`` files of a run dir, by epoch."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = EPOCH_RE.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def resolve_checkpoint(path: str | Path) -> Path:
    """A weights file: ``path`` itself, or in a run dir ``last``, else ``best``, else the latest epoch file."""
    p = Path(path)
    if p.is_dir():
        for name in (LAST_WEIGHTS, BEST_WEIGHTS):
            if (p / name).is_file():
                return p / name
        epochs = epoch_checkpoints(p)
        if epochs:
            return epochs[-1][1]
        raise CheckpointError(f"no checkpoint in {p} (expected {LAST_WEIGHTS}, {BEST_WEIGHTS} or "
                              "epoch_XXXX.safetensors, as written by `nonlocalnet train`)")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def checkpoint_config(checkpoint: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, str]:
    """The config of a checkpoint — ``config.yaml`` next to it, else the one stored in its metadata — with
    ``--set`` style ``overrides``; returns ``(config, where it came from)``."""
    checkpoint = Path(checkpoint)
    cfg_file = checkpoint.parent / CONFIG_FILE
    if cfg_file.is_file():
        return load_config(cfg_file, list(overrides)), str(cfg_file)
    meta = read_metadata(checkpoint)
    if "config" not in meta:
        raise CheckpointError(f"no config for checkpoint {checkpoint}: neither {cfg_file} nor config metadata "
                              "in the file")
    try:
        raw = yaml.safe_load(meta["config"]) or {}
    except yaml.YAMLError as e:
        raise CheckpointError(f"checkpoint {checkpoint}: the config in its metadata is not valid YAML: {e}") from None
    try:
        return config_from_dict(apply_overrides(raw, list(overrides))), f"{checkpoint} (metadata)"
    except ConfigError as e:
        raise ConfigError(f"{checkpoint} (metadata): {e}") from None


def read_metrics(run_dir: str | Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl`` (empty when the run has none); a :class:`RunDirError` naming
    the file and the line when a line is not a JSON object or lacks a numeric value of a ``required`` key."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunDirError(f"{path} is not UTF-8 text (byte {e.start}): not a metrics file written by "
                          "`nonlocalnet train`") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}:{lineno}: not a JSON record ({e.msg}); each line of {METRICS_FILE} is one "
                              "epoch's JSON object, as `nonlocalnet train` writes it") from None
        if not isinstance(row, dict):
            raise RunDirError(f"{path}:{lineno}: a {type(row).__name__}, not a JSON object (one epoch's record)")
        missing = [k for k in required
                   if isinstance(row.get(k), bool) or not isinstance(row.get(k), int | float)]
        if missing:
            raise RunDirError(f"{path}:{lineno}: the record has no numeric {', '.join(map(repr, missing))} "
                              f"(its keys: {', '.join(row) or 'none'})")
        rows.append(row)
    return rows
