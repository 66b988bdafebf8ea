"""Learning-rate schedule: linear warm-up, then cosine or polynomial decay."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """The multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warm-up rises linearly to 1 over ``warmup_steps`` (the first step is ``1 / warmup_steps``, never 0);
    then ``cosine`` and ``poly`` (nnU-Net's ``(1 - t) ** 0.9``) fall to ``min_lr_ratio`` at ``steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    if schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "poly":
        shape = (1 - progress) ** 0.9
    else:
        raise ValueError(f"train.schedule: expected cosine, poly or constant, got {schedule!r}")
    return min_lr_ratio + (1 - min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping once per optimizer step; its ``state_dict`` restores the position."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, steps=steps, warmup_steps=warmup_steps, schedule=schedule, min_lr_ratio=min_lr_ratio
        ),
    )
