"""Training: config schema (:mod:`.config`), loop (:mod:`.trainer`), checkpoints (:mod:`.checkpoint`), DDP.

``nonlocalnet train CONFIG.yaml [--set KEY=VALUE ...] [--resume]`` and ``nonlocalnet eval CHECKPOINT``
(see :mod:`nonlocalnet.cli_train` and ``docs/configs.md``).
"""

from .checkpoint import CheckpointError, load_weights, read_metadata, save_weights
from .config import (
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
)
from .trainer import (
    NonFiniteLossError,
    TrainingError,
    build_datasets,
    build_model_from_config,
    evaluate,
    evaluate_checkpoint,
    lr_factor,
    train,
)

__all__ = [
    "BlockPlacement",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "RunConfig",
    "TrainConfig",
    "TrainingError",
    "apply_overrides",
    "build_datasets",
    "build_model_from_config",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "evaluate",
    "evaluate_checkpoint",
    "load_config",
    "load_weights",
    "lr_factor",
    "read_metadata",
    "save_weights",
    "train",
]
