"""Learning-rate schedules: linear warmup, then cosine, WSD (warmup-stable-decay) or constant."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    lr: float,
    steps: int,
    warmup_steps: int,
    schedule: str,
    min_lr_ratio: float,
    wsd_decay_frac: float = 0.2,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``steps``."""
    min_lr = lr * min_lr_ratio
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly to min_lr over the last wsd_decay_frac of training
    decay_steps = max(1, round(steps * wsd_decay_frac))
    decay_start = steps - decay_steps
    if step < decay_start:
        return lr
    return lr + (min_lr - lr) * min(1.0, (step - decay_start + 1) / decay_steps)
