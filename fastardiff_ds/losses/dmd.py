"""Distribution-matching distillation of the flow head (Fast-ARDiff §4.2 stage 2, Eq. 7; DMD2 form).

Generator loss (DMD2 `compute_distribution_matching_loss`, t = 1 data convention):
    t ~ U[t_min, t_max], x_t = t·x + (1 − t)·ε'
    x̂_real = x_t + (1 − t)·v_T^cfg(x_t, t),   x̂_fake = x_t + (1 − t)·v_φ(x_t, t)
    grad = (x̂_fake − x̂_real) / mean|x − x̂_real|        (per sample: a token, or an image of tokens)
    L_G = 0.5·MSE(x, sg(x − grad))   ⇒  ∂L_G/∂x = grad / numel
By Tweedie, x̂ = (x_t + (1 − t)²·score(x_t))/t, so x̂_fake − x̂_real ∝ s_fake − s_real: descending
L_G moves samples up the real density and down the fake one — ∇ KL(p_fake ‖ p_real) of Eq. 7.
Fake score φ: flow-matching loss on *detached* student samples, all t (DMD2 `compute_loss_fake`).

The few-step student generator used to make x (with DMD2's backward simulation) lives here too,
because it is training machinery (which step gets the gradient); the inference sampler with a
stochastic final step (DESIGN §4, needed by exact speculative decoding) belongs in `sampling/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from fastardiff_ds.losses.common import check_mask, masked_mean, metric, randn
from fastardiff_ds.losses.consistency import consistency_function
from fastardiff_ds.losses.flow_matching import FlowMatchingConfig, HeadFn, head_flow_matching_loss, interpolate
from fastardiff_ds.schedules.timesteps import sample_uniform

# velocity(x (N, D), t (N,)) -> v (N, D) with conditioning (and, for the teacher, CFG) bound by the caller
VelocityFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class DMDConfig:
    """t ~ U[t_min, t_max] for the generator loss (DMD2: 0.02..0.98 of the schedule); `fake` is the
    fake-score flow-matching setup (DMD2 trains it on all t: uniform over [0, 1], one draw/token)."""

    t_min: float = 0.02
    t_max: float = 0.98
    fake: FlowMatchingConfig = field(default_factory=lambda: FlowMatchingConfig(batch_mul=1, t_dist="uniform"))

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_min <= self.t_max < 1.0:
            raise ValueError(
                f"DMDConfig needs 0 <= t_min <= t_max < 1 (at t = 1 both scores are exact and grad = 0/0), "
                f"got [{self.t_min}, {self.t_max}]"
            )


def dmd_generator_loss(
    x: Tensor,
    real_velocity: VelocityFn,
    fake_velocity: VelocityFn,
    generator: torch.Generator | None,
    mask: Tensor | None = None,
    config: DMDConfig = DMDConfig(),
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """DMD generator loss on student samples (grad flows into x only).

    x: (N, D) — every token is one sample — or (B, L, D) — each image of L tokens is one sample
      (t and the normaliser mean|x − x̂_real| are per image over its valid tokens, as DMD2 does per
      image; the mean over L·D numbers is far steadier than over one 64-d token). mask: (N,) or (B, L).
    real_velocity: teacher velocity with CFG bound; fake_velocity: the fake score head; both get
      flattened rows (M, D), t (M,) and run under no_grad. Draw order from `generator`: t (one per
      sample), ε'. Reduction: per-token 0.5·mean_D(x − sg(x − grad))², masked mean over tokens
      (= DMD2's mean-reduced MSE when mask is None). Samples with mean|x − x̂_real| = 0 get grad 0
      (DMD2's nan_to_num would map 0/0 to 0 but x/0 to float max).
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (N, D) or (B, L, D) student samples, got shape {tuple(x.shape)}")
    check_mask(mask, x.shape[:-1])
    xb = x[:, None] if x.dim() == 2 else x  # (B, L, D)
    valid = torch.ones(xb.shape[:2], device=x.device) if mask is None else mask.reshape(xb.shape[:2]).float()
    b, l, d = xb.shape
    t = sample_uniform(b, generator, config.t_min, config.t_max).to(x.device)
    noise = randn((b * l, d), generator, like=x)
    t_tok = t.repeat_interleave(l)
    with torch.no_grad():
        xd = xb.detach().reshape(b * l, d)
        x_t = interpolate(xd, noise, t_tok)
        x_real = consistency_function(x_t, t_tok, real_velocity(x_t, t_tok)).float().view(b, l, d)
        x_fake = consistency_function(x_t, t_tok, fake_velocity(x_t, t_tok)).float().view(b, l, d)
        per_tok = (xb.detach().float() - x_real).abs().mean(dim=-1)  # (B, L)
        scale = (per_tok * valid).sum(-1) / valid.sum(-1).clamp_min(1.0)  # (B,)
        grad = torch.nan_to_num((x_fake - x_real) / scale[:, None, None], nan=0.0, posinf=0.0, neginf=0.0)
        target = xb.detach().float() - grad
    per_token = 0.5 * (xb.float() - target).pow(2).mean(dim=-1).reshape(x.shape[:-1])
    loss = masked_mean(per_token, mask, normalizer)
    return loss, {
        "dmd/loss": metric(loss),
        "dmd/grad_norm": metric(masked_mean(grad.norm(dim=-1).reshape(x.shape[:-1]), mask)),
        "dmd/t_mean": metric(t),
    }


def dmd_fake_score_loss(
    fake_head: HeadFn,
    samples: Tensor,
    cond: Tensor,
    generator: torch.Generator | None,
    mask: Tensor | None = None,
    config: DMDConfig = DMDConfig(),
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Flow-matching loss of the fake score on detached student samples (N, D), cond (N, C).

    Both samples and cond are detached: this loss trains φ only, never the student or the AR.
    The fake head runs without guidance (DMD2 asserts fake guidance 1).
    """
    return head_flow_matching_loss(
        fake_head, samples.detach(), cond.detach(), generator, mask, config.fake, None, normalizer, prefix="fake"
    )


def few_step_generate(
    student: HeadFn,
    cond: Tensor,
    noise: Tensor,
    t_grid: Tensor,
    generator: torch.Generator | None,
    guidance: Tensor | None = None,
    step_index: int | None = None,
    backward_simulation: bool = True,
    data: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Few-step student samples x̂1 (N, D) for DMD, with a gradient through one step only.

    t_grid: (K,) start times of the K student steps, t_grid[0] = 0 (e.g. `time_grid(K)[:-1]`).
    Step j: x̂1 = f(x, t_j) = x + (1 − t_j)·v; then x ← t_{j+1}·x̂1 + (1 − t_{j+1})·ε_j (§6 sampler).
    step_index k (drawn uniformly from `generator` when None) is the step that gets the gradient.
    backward_simulation (DMD2): reach x_{t_k} by running steps 0..k−1 of the student itself under
    no_grad from `noise` (train on the student's own inputs); otherwise x_{t_k} = t_k·data +
    (1 − t_k)·noise from real tokens `data`. Returns (x̂1, k).
    """
    k_max = t_grid.numel()
    if k_max < 1 or float(t_grid[0]) != 0.0:
        raise ValueError(f"t_grid must be the K >= 1 step start times with t_grid[0] = 0, got {t_grid.tolist()}")
    k = step_index
    if k is None:
        k = int(torch.randint(k_max, (1,), generator=generator, device=getattr(generator, "device", "cpu")))
    if not 0 <= k < k_max:
        raise ValueError(f"step_index={k} is outside the {k_max}-step grid")
    n = noise.shape[0]
    times = t_grid.to(device=noise.device, dtype=noise.dtype)
    if backward_simulation or k == 0:
        x = noise
        with torch.no_grad():
            for j in range(k):
                t_j = times[j].expand(n)
                x1 = consistency_function(x, t_j, student(x, t_j, cond.detach(), guidance))
                x = interpolate(x1, randn(tuple(x.shape), generator, like=x), times[j + 1].expand(n))
    else:
        if data is None:
            raise ValueError("few_step_generate without backward_simulation needs real tokens `data` for k > 0")
        x = interpolate(data.detach(), noise, times[k].expand(n))
    t_k = times[k].expand(n)
    return consistency_function(x, t_k, student(x, t_k, cond, guidance)), k
