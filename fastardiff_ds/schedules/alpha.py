"""The α(t) schedule that moves the weight from the AR losses to the head's distillation loss.

Fast-ARDiff Eq. 8: α(t) = α0 − (α0 − αT)·t/T (α0 = 0.95, αT = 0.05), and Eq. 9:
L = α(t)·(L_reg + λ_ent·L_ent) + (1 − α(t))·L_dist. The paper counts t in epochs; here t is the
optimizer step (a finer clock with the same shape). Cosine and step variants exist for sweeps.

How α reaches the networks (``eq9_weights``). Each network is its own engine with its own AdamW and no
parameter gets gradients from both terms (L_reg stops the gradient at the target feature, Eq. 4), so Eq. 9
splits into one weighted term per engine. Scaling a term's loss by a slowly varying α is what Eq. 9 says,
but Adam divides the gradient by its running RMS (β2 = 0.95: ~20 steps), so the update size forgets α and
α only acts through gradient clipping. Mode "lr" (default) moves the weight onto each engine's learning
rate instead -- draft lr × α(t), student and target lr × (1 − α(t)), unweighted losses backpropagated:
under SGD that is exactly the step of Eq. 9's weighted loss, and under Adam the update size follows α.
Mode "loss" keeps the literal loss weighting (the pre-issue-12 behaviour) for comparison sweeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

ALPHA_KINDS = ("linear", "cosine", "step", "constant")
ALPHA_MODES = ("lr", "loss")
# The Eq. 9 term each engine's gradient comes from ("ar" = L_reg + λ L_ent, "dist" = L_dist). The fake score
# (DMD's auxiliary) is outside Eq. 9: its loss and lr are never weighted.
ENGINE_TERM = {"draft": "ar", "student": "dist", "target": "dist"}


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


@dataclass(frozen=True)
class Eq9Weights:
    """How Eq. 9's α(t) is applied at one step.

    loss: multiplier of each term's loss before backward ({"ar", "dist"}).
    lr: multiplier of each engine's scheduled learning rate ({"draft", "student", "target"}; others 1).
    Under SGD both modes give the same update: lr[e] · loss[term(e)] = Eq. 9's weight of e's term.
    """

    alpha: float
    loss: dict
    lr: dict


def eq9_weights(alpha_t: float, mode: str = "lr") -> Eq9Weights:
    """Split Eq. 9's weights α, 1 − α into loss and lr multipliers (see the module docstring)."""
    if mode not in ALPHA_MODES:
        raise ValueError(f"train.alpha_mode={mode!r} is unknown; choose one of {ALPHA_MODES} "
                         "(lr: alpha scales each engine's learning rate; loss: alpha scales the losses)")
    if not 0.0 <= alpha_t <= 1.0:
        raise ValueError(f"eq9_weights: alpha must lie in [0, 1], got {alpha_t}")
    term = {"ar": alpha_t, "dist": 1.0 - alpha_t}
    if mode == "loss":
        return Eq9Weights(alpha_t, term, {name: 1.0 for name in ENGINE_TERM})
    return Eq9Weights(alpha_t, {"ar": 1.0, "dist": 1.0}, {name: term[t] for name, t in ENGINE_TERM.items()})
