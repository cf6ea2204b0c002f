"""The α(t) schedule that moves the weight from the AR losses to the head's distillation loss.

Fast-ARDiff Eq. 8: α(t) = α0 − (α0 − αT)·t/T (α0 = 0.95, αT = 0.05), and Eq. 9:
L = α(t)·(L_reg + λ_ent·L_ent) + (1 − α(t))·L_dist. The paper counts t in epochs; here t is the
optimizer step (a finer clock with the same shape). Cosine and step variants exist for sweeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

ALPHA_KINDS = ("linear", "cosine", "step", "constant")


@dataclass(frozen=True)
class AlphaSchedule:
    """Config of α(t).

    kind: "linear" (paper Eq. 8), "cosine" (α0 → αT along a half cosine), "step" (α0 before
    step_at·total_steps, αT from then on; Drift-AR's freeze has this shape), "constant" (α0
    always; the paper's ablation B uses α = 0.5).
    total_steps: T in optimizer steps; after T, α stays at its final value.
    step_at: for "step", the switch point as a fraction of total_steps, in (0, 1].
    """

    kind: str = "linear"
    alpha0: float = 0.95
    alphaT: float = 0.05
    total_steps: int = 10_000
    step_at: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ALPHA_KINDS:
            raise ValueError(f"AlphaSchedule.kind={self.kind!r} is unknown; choose one of {ALPHA_KINDS}")
        for name in ("alpha0", "alphaT"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AlphaSchedule.{name}={value} must lie in [0, 1] (it is a loss weight)")
        if self.total_steps < 1:
            raise ValueError(f"AlphaSchedule.total_steps={self.total_steps} must be >= 1")
        if not 0.0 < self.step_at <= 1.0:
            raise ValueError(f"AlphaSchedule.step_at={self.step_at} must be a fraction in (0, 1]")

    def __call__(self, step: int | float) -> float:
        return alpha(step, self)


def alpha(step: int | float, schedule: AlphaSchedule) -> float:
    """α at optimizer step `step` (>= 0). Pure function of (step, schedule)."""
    if step < 0:
        raise ValueError(f"alpha: step must be >= 0, got {step}")
    a0, aT = schedule.alpha0, schedule.alphaT
    # progress through the schedule, held at 1 after total_steps
    p = min(float(step) / schedule.total_steps, 1.0)
    if schedule.kind == "linear":  # Eq. 8
        return a0 - (a0 - aT) * p
    if schedule.kind == "cosine":
        return aT + (a0 - aT) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule.kind == "step":
        return a0 if p < schedule.step_at else aT
    return a0  # constant


def total_loss(
    alpha_t: float | Tensor,
    l_reg: Tensor,
    l_ent: Tensor,
    l_dist: Tensor,
    lambda_ent: float = 1.0,
) -> Tensor:
    """Fast-ARDiff Eq. 9: α·(L_reg + λ_ent·L_ent) + (1 − α)·L_dist (scalars in, scalar out).

    The paper's Eq. 9 has λ_ent = 1; the weight is exposed because L_ent ∈ [−1, 0] and L_reg's
    scale depends on the feature norm.
    """
    a = float(alpha_t) if not isinstance(alpha_t, Tensor) else alpha_t
    if not isinstance(a, Tensor) and not 0.0 <= a <= 1.0:
        raise ValueError(f"total_loss: alpha must lie in [0, 1], got {a}")
    return a * (l_reg + lambda_ent * l_ent) + (1.0 - a) * l_dist
