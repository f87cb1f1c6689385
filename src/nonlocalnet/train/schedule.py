"""The learning-rate schedule, stepped once per optimizer step, from :mod:`torch.optim.lr_scheduler`.

Per-step linear warmup over ``train.warmup_epochs`` (the factor at step ``s`` is ``(s + 1) / W``), composed with
``multistep`` (×``gamma`` at each epoch of ``train.milestones``), ``cosine`` (from ``lr`` down to ``min_lr``
over the steps after the warmup) or ``constant``. Its state is checkpointed, so a resumed run continues the
same sequence of learning rates.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim import lr_scheduler as S

__all__ = ["build_scheduler"]


def build_scheduler(optimizer: Optimizer, steps_per_epoch: int, t) -> S.LRScheduler:
    """The scheduler of ``train`` config ``t`` for ``steps_per_epoch`` optimizer steps per epoch."""
    warm = round(t.warmup_epochs * steps_per_epoch)
    total = t.epochs * steps_per_epoch
    warmup = S.LinearLR(optimizer, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm - 1) if warm > 1 else None
    if t.schedule == "cosine":
        cosine = S.CosineAnnealingLR(optimizer, T_max=max(total - warm, 1), eta_min=t.min_lr)
        if warmup is None:
            return cosine
        return S.SequentialLR(optimizer, [warmup, cosine], milestones=[warm])
    if t.schedule == "multistep":
        main = S.MultiStepLR(optimizer, milestones=[m * steps_per_epoch for m in t.milestones], gamma=t.gamma)
    else:
        main = S.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return main if warmup is None else S.ChainedScheduler([warmup, main], optimizer=optimizer)
