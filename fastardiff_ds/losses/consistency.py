"""Consistency distillation of a flow head (Fast-ARDiff §4.2 stage 1, Eq. 6), flow-head form.

Convention t = 1 data, t = 0 noise. The student's consistency function is
    f_θ(x_t, t) = x_t + (1 − t)·v_θ(x_t, t)          (c_skip = 1, c_out = 1 − t, so f(x, 1) = x)
i.e. one Euler step of the student's velocity to t = 1. One training step:
    t ~ U[t_min, t_max] (random interpolation, not a fixed grid — paper §4.2), t' = min(t + Δ, 1),
    x_t = t·x + (1 − t)·ε,  x_t' = teacher ODE from (x_t, t) to t' in `solver_steps` Euler steps (no grad)
    L = pseudoHuber(f_θ(x_t, t; w), sg f_θ⁻(x_t', t'; w))              (θ⁻ = EMA or the student)
With Δ = 0.02 and one Euler step (LCM's form) the boundary condition f(x, 1) = x reaches t = 0 only through ~1/Δ
bootstrapping hops, many optimizer steps apart; a larger skip solved in several teacher steps shortens the chain
(Δ = 1: every target is the teacher's own ODE endpoint, f(x_1, 1) = x_1, no bootstrap at all).
The guidance scale w is drawn per token and fed to the student as its guidance embedding while the
teacher applies CFG with the same w, so the student learns the guided flow for every w (LCM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from fastardiff_ds.losses.common import check_mask, masked_mean, metric, randn
from fastardiff_ds.losses.flow_matching import HeadFn, interpolate
from fastardiff_ds.schedules.timesteps import sample_uniform

# teacher_velocity(x (N, D), t (N,), w (N,)) -> CFG-guided velocity (N, D); the caller binds the
# teacher's own conditional / unconditional features (it has its own AR).
GuidedVelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ConsistencyConfig:
    """delta: skip Δ = t' − t (t' clamped to 1), crossed by the teacher in `solver_steps` Euler steps.
    t ~ U[t_min, t_max]. huber_c: pseudo-Huber c (LCM: 1e-3). w ~ U[guidance_min, guidance_max] per token.
    """

    delta: float = 0.02
    solver_steps: int = 1
    t_min: float = 0.0
    t_max: float = 0.98
    huber_c: float = 1e-3
    guidance_min: float = 1.0
    guidance_max: float = 7.5
    # the few-step sampler's step start times: t is drawn uniformly among them (in place of U[t_min, t_max]), so the
    # student learns its jumps where its sampler evaluates it. () = uniform over [t_min, t_max]
    t_grid: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if any(not 0.0 <= g < 1.0 for g in self.t_grid):
            raise ValueError(f"ConsistencyConfig.t_grid={self.t_grid}: every start time must lie in [0, 1)")
        if not 0.0 < self.delta <= 1.0:
            raise ValueError(f"ConsistencyConfig.delta={self.delta} must lie in (0, 1]")
        if not 0.0 <= self.t_min <= self.t_max < 1.0:
            raise ValueError(f"ConsistencyConfig needs 0 <= t_min <= t_max < 1 (t' = min(t + delta, 1) > t), "
                             f"got t_min={self.t_min}, t_max={self.t_max}")
        if self.solver_steps < 1:
            raise ValueError(f"ConsistencyConfig.solver_steps={self.solver_steps} must be >= 1")
        if self.huber_c <= 0:
            raise ValueError(f"ConsistencyConfig.huber_c={self.huber_c} must be > 0")
        if self.guidance_min > self.guidance_max:
            raise ValueError(f"ConsistencyConfig guidance range [{self.guidance_min}, {self.guidance_max}] is empty")


def consistency_function(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """f(x_t, t) = x_t + (1 − t)·v: the data estimate of a flow head. x_t, v (N, D); t (N,)."""
    return x_t + (1.0 - t.to(x_t.dtype))[:, None] * v


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Elementwise √((a − b)² + c²) − c (LCM's pseudo-Huber): ≈ quadratic below c, ≈ |a − b| above."""
    return ((a - b).pow(2) + c * c).sqrt() - c


def sample_guidance(n: int, generator: torch.Generator | None, low: float, high: float, device=None) -> Tensor:
    """(n,) guidance scales w ~ U[low, high] (a constant when low == high)."""
    return low + (high - low) * sample_uniform(n, generator, device=device)


def teacher_solve(teacher_velocity: GuidedVelocityFn, x: Tensor, t: Tensor, t_end: Tensor, w: Tensor,
                  steps: int) -> Tensor:
    """The teacher's guided ODE from (x, t) to t_end in `steps` equal Euler steps per row (t, t_end: (N,))."""
    h = ((t_end - t) / steps).to(x.dtype)
    for i in range(steps):
        x = x + h[:, None] * teacher_velocity(x, t + i * h, w)
    return x


def consistency_distillation_loss(
    student: HeadFn,
    target: HeadFn,
    teacher_velocity: GuidedVelocityFn,
    tokens: Tensor,
    cond: Tensor,
    generator: torch.Generator | None,
    mask: Tensor | None = None,
    config: ConsistencyConfig = ConsistencyConfig(),
    guidance: Tensor | None = None,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Consistency-distillation loss for the student head (see module docstring).

    student, target: heads, called as head(x (N, D), t (N,), cond (N, C), w (N,)); the target
      (EMA, or the student itself for stop-grad CD) runs under no_grad with cond detached.
    teacher_velocity: (x, t, w) -> CFG-guided teacher velocity, run under no_grad.
    tokens: (N, D) clean data tokens x (teacher forcing). cond: (N, C) student conditions.
    guidance: (N,) fixed w (overrides sampling). Draw order from `generator`: t, w, ε.
    Reduction: per-token mean over D of the pseudo-Huber distance, masked mean over tokens.
    """
    if tokens.dim() != 2 or cond.shape[0] != tokens.shape[0]:
        raise ValueError(f"tokens must be (N, D) and cond (N, C); got {tuple(tokens.shape)} and {tuple(cond.shape)}")
    check_mask(mask, tokens.shape[:1])
    n, device, cfg = tokens.shape[0], tokens.device, config
    if cfg.t_grid:  # one draw per row either way: u ~ U[0, 1) -> grid[floor(u K)]
        u = sample_uniform(n, generator).to(device)
        k = len(cfg.t_grid)
        t = torch.tensor(cfg.t_grid, device=device, dtype=u.dtype)[(u * k).long().clamp(max=k - 1)]
    else:
        t = sample_uniform(n, generator, cfg.t_min, cfg.t_max).to(device)
    w = sample_guidance(n, generator, cfg.guidance_min, cfg.guidance_max).to(device)
    if guidance is not None:
        w = guidance.to(device=device, dtype=w.dtype).expand(n)
    x_t = interpolate(tokens.detach(), randn(tuple(tokens.shape), generator, like=tokens), t)
    t_next = (t + cfg.delta).clamp(max=1.0)
    with torch.no_grad():
        x_next = teacher_solve(teacher_velocity, x_t, t, t_next, w, cfg.solver_steps)
        t_low = min(cfg.t_grid) if cfg.t_grid else cfg.t_min
        if t_low + cfg.delta >= 1.0:  # every row reaches t' = 1, where f(x, 1) = x: no target network call
            f_target = x_next
        else:
            f_target = consistency_function(x_next, t_next, target(x_next, t_next, cond.detach(), w))
            f_target = torch.where((t_next >= 1.0)[:, None], x_next, f_target)  # f(x, 1) = x, exactly
    f_student = consistency_function(x_t, t, student(x_t, t, cond, w))
    per_token = pseudo_huber(f_student.float(), f_target.float(), cfg.huber_c).mean(dim=-1)
    loss = masked_mean(per_token, mask, normalizer)
    gap = (f_student.detach() - f_target).float().abs().mean(dim=-1)
    return loss, {
        "cd/loss": metric(loss),
        "cd/abs_gap": metric(masked_mean(gap, mask)),
        "cd/t_mean": metric(t),
        "cd/w_mean": metric(w),
    }
