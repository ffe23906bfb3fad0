"""Learning-rate schedules: linear warmup, then cosine or step decay (per iteration)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def lr_factor(
    it: int,
    total: int,
    warmup: int,
    kind: str = "cosine",
    min_ratio: float = 0.01,
    milestones: Sequence[float] = (0.67, 0.89),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base lr at iteration ``it`` (0-based) of ``total``.

    Warmup: linear from 1/warmup... to 1 over ``warmup`` iterations. Cosine: from 1 down to
    ``min_ratio`` at ``total``. Step: times ``gamma`` at each milestone (a fraction of ``total``).
    """
    if warmup > 0 and it < warmup:
        return (it + 1) / warmup
    if kind == "cosine":
        span = max(1, total - warmup)
        t = min(1.0, (it - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "step":
        f = 1.0
        for m in milestones:
            if it >= int(m * total):
                f *= gamma
        return f
    raise ValueError(f"unknown schedule {kind!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total: int,
    warmup: int,
    kind: str,
    min_ratio: float,
    milestones: Sequence[float],
    gamma: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per iteration (its state dict is just the iteration count)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, total, warmup, kind, min_ratio, milestones, gamma)
    )
