"""Learning-rate schedules shared by the SFT and RL stages (pure functions of the step)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning-rate multiplier at optimiser (SFT) or rollout (RL) ``step`` of ``total``: a linear warm-up
    over ``warmup`` steps ((step + 1) / warmup), then ``constant`` (1) or ``cosine`` (from 1 down to 0 at ``total``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return 1.0
