"""Learning-rate multipliers as pure functions of the step, for `torch.optim.lr_scheduler.LambdaLR`.

NextStep-1 pretraining uses linear warmup (5000 steps) then cosine; the distillation stages use a
short warmup and a constant lr (DMD2). The multiplier scales the optimizer's base lr.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

LR_KINDS = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class LRSchedule:
    """warmup_steps of linear warmup, then `kind` decay to min_ratio·lr at total_steps.

    kind: "constant" (no decay), "cosine", "linear". total_steps is only read by the decays.
    """

    kind: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 10_000
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LR_KINDS:
            raise ValueError(f"LRSchedule.kind={self.kind!r} is unknown; choose one of {LR_KINDS}")
        if self.warmup_steps < 0:
            raise ValueError(f"LRSchedule.warmup_steps={self.warmup_steps} must be >= 0")
        if self.kind != "constant" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"LRSchedule.total_steps={self.total_steps} must exceed warmup_steps={self.warmup_steps} "
                f"for a {self.kind} decay"
            )
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"LRSchedule.min_ratio={self.min_ratio} must lie in [0, 1]")


def lr_multiplier(step: int, schedule: LRSchedule) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based).

    Warmup: (step + 1)/warmup_steps, so the very first update already has a non-zero lr and
    step warmup_steps − 1 reaches 1. Decay: progress p = (step − warmup)/(total − warmup),
    clamped to [0, 1]; cosine: min + (1 − min)·½(1 + cos πp); linear: min + (1 − min)(1 − p).
    """
    if step < 0:
        raise ValueError(f"lr_multiplier: step must be >= 0, got {step}")
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.kind == "constant":
        return 1.0
    p = min((step - schedule.warmup_steps) / (schedule.total_steps - schedule.warmup_steps), 1.0)
    m = schedule.min_ratio
    if schedule.kind == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    return m + (1.0 - m) * (1.0 - p)


def make_lr_lambda(schedule: LRSchedule) -> Callable[[int], float]:
    """`lr_lambda` for LambdaLR: a partial (picklable), not a closure."""
    return functools.partial(lr_multiplier, schedule=schedule)
