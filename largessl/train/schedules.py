"""Learning-rate schedules as pure functions of the global step (trivially correct on resume)."""

from __future__ import annotations

import math

from torch.optim import Optimizer


def warmup_cosine(step: int, warmup_steps: int, num_steps: int, final_ratio: float) -> float:
    """Multiplier of the peak lr at 0-based ``step``: linear warm-up, then cosine down to ``final_ratio``.

    The warm-up ramps (step + 1) / warmup_steps so the very first update is not wasted at lr 0; the cosine
    covers the remaining ``num_steps - warmup_steps`` steps and ends exactly at ``final_ratio``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0 (got {step})")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, num_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    q = 0.5 * (1.0 + math.cos(math.pi * progress))
    return final_ratio + (1.0 - final_ratio) * q


def group_lr(group: dict, step: int, warmup_steps: int, num_steps: int, final_ratio: float) -> float:
    """The lr of one optimizer group at ``step``: its ``peak_lr`` times the schedule named in ``schedule``."""
    schedule = group.get("schedule", "cosine")
    if schedule == "constant":
        return group["peak_lr"]
    if schedule == "cosine":
        return group["peak_lr"] * warmup_cosine(step, warmup_steps, num_steps, final_ratio)
    raise AssertionError(f"unknown schedule {schedule!r} in group {group.get('name')}")


def apply_lr(optimizer: Optimizer, step: int, warmup_steps: int, num_steps: int, final_ratio: float) -> float:
    """Set every group's lr for ``step``; returns the lr of the first group (the one logged as ``lr``)."""
    first = None
    for g in optimizer.param_groups:
        g["lr"] = group_lr(g, step, warmup_steps, num_steps, final_ratio)
        if first is None:
            first = g["lr"]
    return float(first if first is not None else 0.0)
