"""Run configuration: a schema of nested dataclasses, loaded from YAML with ``--set`` overrides.

Every key has a default; an unknown key is an error that lists the valid keys at its level.  A config file
may name ``base:`` (a path, relative to the file, or a list of paths) whose content it overrides key by key
(dicts merge recursively, lists and scalars are replaced).

:func:`load_config` takes a file or the name of a config shipped inside the package (``SHIPPED``, one folder per
paper: ``tao2018/preresnet20_cifar10``, with or without ``.yaml``); a path that exists wins
(:func:`resolve_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from nonlocalnet.data import DATASETS
from nonlocalnet.models.placement import check_placement

__all__ = [
    "BlockPlacement",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "PaperResult",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "load_raw",
    "parse_override",
    "resolve_config",
    "shipped_names",
    "SHIPPED",
]



class ConfigError(ValueError):
    """An invalid configuration (unknown key, wrong type, inconsistent values)."""


# --------------------------------------------------------------------------------------------- schema


@dataclass
class DataConfig:
    name: str = "demo"
    """Dataset name, one of ``nonlocalnet.data.DATASETS`` (``build_dataset``)."""
    root: str | None = None
    """Dataset directory (``demo``: None = generate in memory, a directory = cache the arrays there)."""
    size: int | None = None
    """Input size (crop side) for datasets that resize (folder, cub200, ucf101, demo); None = dataset
    default."""
    frames: int | None = None
    """Frames per clip (ucf101); None = dataset default."""
    train_split: str = "train"
    test_split: str = "test"
    crop_padding: int | None = None
    """Random-crop padding of the on-device training augmentation; None = the dataset's recommendation
    (CIFAR: 4); 0 disables the crop."""
    flip: bool | None = None
    """Random horizontal flip of the training augmentation; None = the dataset's recommendation."""
    num_workers: int = 4
    """DataLoader workers for datasets that are not held in memory."""
    in_memory: bool = True
    """Move datasets that expose ``.images``/``.labels`` to the device once and batch by index."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``build_dataset``."""

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ConfigError(f"data.name: must be one of {', '.join(DATASETS)}; got {self.name!r}")


@dataclass
class BlockPlacement:
    """Where to insert nonlocal blocks (the keys of ``nonlocalnet.models.insert_blocks``).

    Exactly one of ``at`` (a module path), ``stage`` (PreResNet stage k / ResNet ``layer{k}``) or ``res``
    (ResNet stage ``res{r}`` = ``layer{r-1}``), optionally refined by one of ``after_block``/``before_block``
    (1-based) or ``after_last``/``before_last``.
    """

    at: str | None = None
    """A dotted module path, e.g. ``stage1.1`` or ``layer3.5``."""
    stage: int | None = None
    res: int | None = None
    after_block: int | None = None
    """``{stage: 1, after_block: 2}``: right after the 2nd residual block of stage 1."""
    before_block: int | None = None
    after_last: bool | None = None
    before_last: bool | None = None
    """``{res: 4, before_last: true}``: right before the last residual block of res4."""
    where: Literal["after", "before"] | None = None
    """Insert after (default) or before the target; implied by the position keys."""
    block: str = "nl"
    """Block preset (``nonlocalnet.list_blocks()``): nl, ns, snl, gsnl, cheby, a2, cgnl, cc."""
    units: int = 1
    """Units in one block, sharing one affinity (a nonlocal stage)."""
    count: int = 1
    """Separate blocks chained at this place (each with its own affinity)."""
    dim: int | None = None
    """Spatial rank (1, 2, 3); None = inferred from a dry forward pass."""
    in_channels: int | None = None
    """None = inferred from a dry forward pass."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for ``nonlocalnet.build_block`` (e.g. ``reduction``)."""
    layout: Literal["channels_first", "channels_last", "tokens"] | None = None
    """The features' layout there; None = what the model says (timm feature_info, ...), an error if ambiguous."""
    grid: list[int] | None = None
    """Tokens: the patch grid, e.g. ``[14, 14]`` (None = from the model)."""
    prefix_tokens: int | None = None
    """Tokens: class/register tokens in front, passed through unchanged (None = L - prod(grid))."""

    def __post_init__(self) -> None:
        try:
            check_placement(self.to_dict())
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        """The placement as the dict ``nonlocalnet.models.insert_blocks`` takes (unset keys left out)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None or (f.name in ("after_last", "before_last") and v is False):
                continue
            out[f.name] = copy.deepcopy(v)
        return out


@dataclass
class ModelConfig:
    arch: str = "preresnet20"
    """Backbone (``nonlocalnet.models.build_model``): a bundled name, ``torchvision:NAME``, ``timm:NAME`` or
    ``package.module:callable``."""
    num_classes: int | None = None
    """None: the dataset's number of classes."""
    blocks: list[BlockPlacement] = field(default_factory=list)
    """Nonlocal blocks to insert (empty: the baseline)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``build_model`` (the timm / torchvision constructor's, e.g. ``img_size``)."""
    pretrained: str | None = None
    """A state dict (.safetensors / .pt) loaded into the backbone before blocks are inserted (non-strict;
    tensors whose shape differs, e.g. the classifier, are skipped and reported)."""


@dataclass
class TrainConfig:
    epochs: int = 164
    batch_size: int = 128
    """Global batch size (split over the processes of a distributed run)."""
    eval_batch_size: int | None = None
    """None: ``batch_size``."""
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [81, 122])
    """multistep: epochs (0-based epoch index at which the new lr starts, as torch's MultiStepLR)."""
    gamma: float = 0.1
    min_lr: float = 0.0
    """cosine: final learning rate."""
    warmup_epochs: float = 0.0
    """Linear warmup from lr/steps to lr, per step, over this many epochs."""
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = True
    """Use channels_last memory format (GPU only)."""
    compile: bool = False
    sync_bn: bool = False
    """Convert BatchNorm to SyncBatchNorm in distributed runs."""
    find_unused_parameters: bool = False
    clip_grad_norm: float | None = None
    drop_last: bool = False
    seed: int = 0
    deterministic: bool = False
    max_steps_per_epoch: int | None = None
    """Cap the number of training steps per epoch (smoke runs)."""
    max_eval_batches: int | None = None
    """Cap the number of test batches (smoke runs); None = the whole test set."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A training step whose loss is NaN/inf: ``stop`` (raise before the optimizer step; the last epoch's
    checkpoint stays the last good one) or ``skip`` the step. Either way BatchNorm running statistics are
    restored to their values before the step, so no NaN reaches the model."""
    max_skipped_steps: int = 10
    """``nonfinite: skip``: stop anyway after this many skipped steps in one run."""

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"train.{key} must be {expected}, got {getattr(self, key)!r}")

        need(self.epochs >= 1, "epochs", ">= 1")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size", ">= 1 (or null)")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "a finite number > 0")
        need(math.isfinite(self.momentum) and 0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0")
        need(math.isfinite(self.gamma) and self.gamma > 0, "gamma", "a finite number > 0")
        need(math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr, "min_lr", f"in [0, lr = {self.lr}]")
        need(math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0, "warmup_epochs", "a finite number >= 0")
        need(self.clip_grad_norm is None or (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0),
             "clip_grad_norm", "a finite number > 0 (or null for no clipping)")
        if sorted(self.milestones) != list(self.milestones) or any(m < 0 for m in self.milestones):
            raise ConfigError(f"train.milestones must be increasing epochs >= 0, got {self.milestones}")
        need(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "max_steps_per_epoch", ">= 1")
        need(self.max_eval_batches is None or self.max_eval_batches >= 1, "max_eval_batches", ">= 1")
        need(self.max_skipped_steps >= 1, "max_skipped_steps", ">= 1")
        need(self.nesterov is False or self.momentum > 0, "nesterov", "false when momentum is 0")


@dataclass
class RunConfig:
    out: str = "runs/default"
    """Output directory: config.yaml, metrics.jsonl, checkpoints, tensorboard/."""
    tensorboard: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    keep_epochs: bool = True
    """Also keep ``epoch_{k:04d}.safetensors`` for every epoch (the analysis reads the evolution)."""
    overwrite: bool = False
    """Allow a fresh (non ``--resume``) run in a directory that already holds a run: the new run is written
    beside it and replaces it only once it has saved its first epoch (a run that fails earlier leaves the
    previous one as it was)."""
    progress: bool = True
    """tqdm bar per epoch (only on a TTY, only on rank 0)."""
    log_every: float = 30.0
    """Without a terminal (nohup, Slurm, CI): a progress line every this many seconds (and one per epoch)."""
    name: str | None = None
    """Free-form run name (recorded, not used)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.log_every) and self.log_every > 0):
            raise ConfigError(f"run.log_every must be a finite number of seconds > 0, got {self.log_every!r}")
        if not self.out:
            raise ConfigError("run.out must be a non-empty directory path")


@dataclass
class PaperResult:
    """The number a paper reports for the row a config reproduces (shown beside ours by ``summarize``)."""

    source: str
    """The paper and table, e.g. "Tao et al. 2018, Table 1"."""
    metric: Literal["top1", "error"] = "top1"
    """``top1``: test top-1 accuracy (%); ``error``: test error (%) = 100 - top-1."""
    value: float = 0.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    description: str | None = None
    """What this config reproduces (free text)."""
    paper: PaperResult | None = None
    """The paper's number for the row this config reproduces, if any (docs/configs.md)."""

    def __post_init__(self) -> None:
        t = self.train
        # milestones beyond train.epochs are allowed (never reached), so that a smoke run can shorten
        # train.epochs alone.
        if t.warmup_epochs > t.epochs:
            raise ConfigError("train.warmup_epochs exceeds train.epochs")


# ------------------------------------------------------------------------------------------ conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null (expected {_type_name(tp)})")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got "
                          f"{type(value).__name__} {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return copy.deepcopy(dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {where}")  # pragma: no cover


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls: type, data: Any, where: str) -> Any:
    label = where or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{path}'{hint}; valid keys at {label!s}: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}" if where and not str(e).startswith(where) else str(e)) from None


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a raw (YAML) dict against the schema; raises :class:`ConfigError`."""
    data = dict(data or {})
    data.pop("base", None)
    return _from_dict(Config, data, "")


def config_to_dict(cfg: Any) -> Any:
    """The config as plain dicts/lists (YAML-ready)."""
    if isinstance(cfg, BlockPlacement):
        return cfg.to_dict()
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


# ------------------------------------------------------------------------------------- files, overrides


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


SHIPPED = Path(__file__).resolve().parents[1] / "configs"
"""The configs shipped as package data: ``SHIPPED/<paper>/<name>.yaml`` (the repository's ``configs/`` links here)."""


def shipped_names() -> list[str]:
    """The shipped configs' names: their paths under :data:`SHIPPED` without ``.yaml`` (``demo/snl``)."""
    return sorted(p.relative_to(SHIPPED).with_suffix("").as_posix() for p in SHIPPED.rglob("*.yaml"))


def resolve_config(config: str | Path) -> Path:
    """The file of ``config``: a path that exists (it wins), else a shipped config's name (``demo/snl`` or
    ``demo/snl.yaml``). Neither: a :class:`ConfigError` with the closest shipped names."""
    path = Path(config)
    if path.exists():
        return path
    name = path.as_posix()
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    names = shipped_names()
    if name in names:
        return SHIPPED / f"{name}.yaml"
    close = [n for n in names if n.rsplit("/", 1)[-1] == path.stem]
    close += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in close]
    hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
    raise ConfigError(f"cannot read config file {str(config)!r}: no such file, and no shipped config of that "
                      f"name{hint} (`nonlocalnet configs` lists them)")


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config file, resolving ``base:`` chains; returns the raw merged dict."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (undecodable byte at offset {e.start}); a config "
                          "is a YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a path or a list of paths")
    merged: dict[str, Any] = {}
    resolved = path.resolve()
    for b in bases:
        bpath = (path.parent / b).resolve()
        if bpath in _seen or bpath == resolved:
            raise ConfigError(f"{path}: circular 'base' {b}")
        merged = _merge(merged, load_raw(bpath, (*_seen, resolved)))
    return _merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml.safe_load(value))."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like KEY=VALUE (e.g. train.lr=0.05)")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: invalid YAML value: {e}") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config dict (a copy is returned). List items are addressed by
    index (``model.blocks.0.units=3``); missing intermediate mappings are created (and then validated)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = raw
        for i, k in enumerate(keys):
            last = i == len(keys) - 1
            where = ".".join(keys[: i + 1])
            if isinstance(node, list):
                try:
                    idx = int(k)
                    node[idx]  # noqa: B018 - bounds check
                except (ValueError, IndexError):
                    raise ConfigError(f"override {text!r}: {where!r} is not an index of a list of "
                                      f"{len(node)} items") from None
                if last:
                    node[idx] = value
                else:
                    if node[idx] is None:
                        node[idx] = {}
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[k] = value
                else:
                    if node.get(k) is None:
                        node[k] = {}
                    node = node[k]
            else:
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:i])!r} is not a mapping or list")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (a file, or a shipped config's name: :func:`resolve_config`; the defaults when None), apply
    ``overrides`` and validate."""
    if path is not None:
        path = resolve_config(path)
    raw = load_raw(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None
