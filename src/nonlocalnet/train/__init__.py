"""Training: the loop (:mod:`.trainer`), batches (:mod:`.batches`), the LR schedule (:mod:`.schedule`),
evaluation (:mod:`.evaluate`) and DDP helpers (:mod:`.distributed`).

``nonlocalnet train CONFIG.yaml [--set KEY=VALUE ...] [--resume]`` and ``nonlocalnet eval CHECKPOINT``
(``docs/configs.md``). Configs, checkpoints and run directories live in :mod:`nonlocalnet.runs`.
"""

from .evaluate import evaluate, evaluate_checkpoint
from .schedule import build_scheduler
from .trainer import NonFiniteLossError, TrainingError, train

__all__ = ["NonFiniteLossError", "TrainingError", "build_scheduler", "evaluate", "evaluate_checkpoint", "train"]
