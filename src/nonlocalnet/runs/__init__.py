"""Runs: the config schema, the run directory, checkpoints, and building a run's model and data.

Used alike by training, evaluation, the analyses and the apps (docs/design.md has the layers):
:mod:`.config` (YAML schema, ``--set`` overrides), :mod:`.checkpoint` (atomic safetensors + state files),
:mod:`.layout` (which files a run dir holds, checkpoint discovery, the config of a checkpoint),
:mod:`.build` (datasets, transforms, model from a config), :mod:`.load` (a run rebuilt in memory).
"""

from .build import (
    DatasetError,
    batch_transform,
    build_datasets,
    build_model_from_config,
    dataset_kwargs,
    input_shape_for,
    load_pretrained,
    num_classes_for,
)
from .checkpoint import CheckpointError, DiskFullError, load_weights, load_weights_into, read_metadata, save_weights
from .config import (
    SHIPPED,
    BlockPlacement,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    resolve_config,
    shipped_names,
)
from .layout import (
    RunDirError,
    checkpoint_config,
    epoch_checkpoints,
    read_metrics,
    require_directory,
    resolve_checkpoint,
)
from .load import Loaded, find_blocks, load_config_only, load_run
from .lock import RunInUseError, Terminated, run_lock, terminate_on_sigterm
from .shipped import ShippedConfig, copy_config, format_configs, shipped_configs

__all__ = [
    "SHIPPED", "BlockPlacement", "CheckpointError", "Config", "ConfigError", "DataConfig", "DatasetError",
    "DiskFullError", "Loaded", "ModelConfig", "RunConfig", "RunDirError", "RunInUseError", "Terminated",
    "TrainConfig", "apply_overrides", "batch_transform", "build_datasets", "build_model_from_config",
    "checkpoint_config", "config_from_dict", "config_to_dict", "dataset_kwargs", "dump_config", "epoch_checkpoints",
    "find_blocks", "input_shape_for", "load_config", "load_config_only", "load_pretrained", "load_run",
    "load_weights", "load_weights_into", "num_classes_for", "read_metadata", "read_metrics", "require_directory",
    "resolve_checkpoint", "resolve_config", "run_lock", "save_weights", "terminate_on_sigterm", "ShippedConfig",
    "copy_config", "format_configs", "shipped_configs", "shipped_names",
]
