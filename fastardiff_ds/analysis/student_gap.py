"""Where on its chain the few-step student leaves the teacher (issue 25), teacher-forced on the teacher's own samples.

For committed sequences from the teacher (in-distribution prefixes), the AR gives every image token its condition z
(and the unconditional row for the teacher's CFG). On those conditions:

- **per-step gap**: the student's K-step chain runs from noise; at step j (state x_j at time t_j) its jump
  x1_j = x_j + (1 - t_j) v_s(x_j, t_j) is compared with the teacher's guided ODE run from the *same* state to t = 1
  (Euler, `ode_steps` over [0, 1], so about (1 - t_j) ode_steps from t_j). gap_j = mean ||x1_j - x_T||^2 / D. A
  student that matched the teacher's flow map has gap 0 at every step; the step where it grows is where it leaves.
  The same gaps for the teacher's own velocity used as the K-step sampler (jump x + (1 - t) v_T, the student's
  re-noising) are the reference scale: the few-step error the student was distilled to remove.
- **per-condition distribution**: R chains per condition from the student and from the teacher's own sampler (its
  SDE): the squared distance of the two conditional means and the ratio of the conditional variances, both per
  dimension. A mode-seeking student (DMD's reverse KL) shows a variance ratio below 1; a student drawing the wrong
  shape for its condition shows a mean distance large against the teacher's variance.
- both broken down by token row of the image grid (does the gap grow along the AR chain?).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..sampling.common import ARFlow
from ..sampling.flow import sample_tokens, time_grid
from .fidelity import _field, _teacher_forced


@dataclass
class ChainGap:
    steps: int  # K of the student
    t_grid: list[float]  # the student's step start times t_0..t_{K-1}
    gap: list[float]  # per step j: mean ||x1_j - teacher ODE endpoint from x_j||^2 / D
    gap_euler_teacher: list[float]  # the same for the teacher's velocity as the K-step sampler (one Euler jump)
    gap_vs_var: list[float]  # gap / the teacher's conditional variance per dimension (1 = as far as two draws)
    mean_dist: float  # per dim: mean over conditions of ||E_s[x] - E_t[x]||^2 / D (unbiased for the R draws)
    teacher_var: float  # per dim: mean over conditions of the teacher's conditional variance
    var_ratio: float  # student's conditional variance / the teacher's (mean over conditions)
    mean_dist_by_row: list[float]  # mean_dist / teacher_var per image row (grid row of the token)
    gap0_by_row: list[float]  # gap of step 0 per image row
    num_conditions: int
    draws: int

    def as_dict(self) -> dict:
        return asdict(self)


def _ode_endpoint(field, x: torch.Tensor, t0: float, ode_steps: int) -> torch.Tensor:
    """Euler from time t0 to 1 on a uniform grid of max(1, round((1 - t0) ode_steps)) steps."""
    n = max(1, round((1.0 - t0) * ode_steps))
    ts = torch.linspace(t0, 1.0, n + 1, dtype=torch.float64).tolist()
    for a, b in zip(ts[:-1], ts[1:]):
        x = x + (b - a) * field(x, a)
    return x


def _per_row(values: torch.Tensor, B: int, N: int, grid: int) -> list[float]:
    """Mean of per-token values (B*N,) over each image row (N = grid*grid tokens in raster order)."""
    v = values.reshape(B, N)
    rows = torch.arange(N, device=v.device) // grid
    return [float(v[:, rows == r].mean()) for r in range(grid)]


@torch.no_grad()
def chain_gap(teacher: ARFlow, student: ARFlow, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor,
              grid: int, ode_steps: int = 64, draws: int = 8, seed: int = 0) -> ChainGap:
    """teacher / student: flows over the same AR (two-pass CFG teacher, CFG-distilled student); ids/mask: the
    teacher's prompt rows (B conditional + B unconditional); tokens (B,N,D): the teacher's committed samples."""
    if student.sampler.kind != "consistency":
        raise ValueError(f"the student flow must use the consistency sampler, got {student.sampler.kind!r}")
    if student.ar is not teacher.ar:
        raise ValueError("chain_gap compares two heads on one AR's conditions: give both flows the same AR")
    B, N, D = tokens.shape
    dtype = torch.float32
    z_t = _teacher_forced(teacher, ids, mask, tokens)[0].to(dtype)
    z_s = z_t[:B]  # the conditional rows: the student reads the same AR's conditions
    t_field = _field(teacher, z_t, B, N, dtype)
    s_field = _field(student, z_s, B, N, dtype)
    gen = torch.Generator().manual_seed(seed)
    K = student.sampler.steps
    ts = time_grid(student.sampler, dtype=torch.float64)
    noise = torch.randn(B * N, K + 1, D, generator=gen, dtype=dtype).to(tokens.device)

    def per_step(field_fn):
        """Gaps of a K-step chain whose jump from state x at t is field_fn(x, t) -> x1."""
        x, gaps, gap0 = noise[:, 0], [], None
        for j in range(K):
            t = float(ts[j])
            x1 = field_fn(x, t)
            ref = _ode_endpoint(t_field, x, t, ode_steps)
            sq = (x1 - ref).pow(2).mean(-1)
            gaps.append(float(sq.mean()))
            if j == 0:
                gap0 = sq
            tn = float(ts[j + 1])
            x = tn * x1 + (1.0 - tn) * noise[:, j + 1] if j < K - 1 else x1
        return gaps, gap0

    gaps, gap0 = per_step(lambda x, t: x + (1.0 - t) * s_field(x, t))

    gaps_teacher, _ = per_step(lambda x, t: x + (1.0 - t) * t_field(x, t))  # one teacher Euler jump to t = 1

    # conditional distributions: R draws per condition from each sampler
    s_samples, t_samples = [], []
    for _ in range(draws):
        s_noise = torch.randn(B * N, K + 1, D, generator=gen, dtype=dtype).to(tokens.device)
        s_samples.append(sample_tokens(s_field, student.sampler, s_noise).token)
        t_noise = torch.randn(B * N, teacher.sampler.steps + 1, D, generator=gen, dtype=dtype).to(tokens.device)
        t_samples.append(sample_tokens(t_field, teacher.sampler, t_noise).token)
    s_all, t_all = torch.stack(s_samples), torch.stack(t_samples)  # (R, B*N, D)
    t_var = t_all.var(0, unbiased=True).mean(-1)
    s_var = s_all.var(0, unbiased=True).mean(-1)
    # ||mean_s - mean_t||^2 of R draws each overestimates the squared distance by (var_s + var_t) / R: removed
    mean_sq = (s_all.mean(0) - t_all.mean(0)).pow(2).mean(-1) - (s_var + t_var) / draws  # (B*N,)
    norm_dist = mean_sq / t_var.clamp_min(1e-12)
    tv = float(t_var.mean())
    return ChainGap(K, [float(t) for t in ts[:-1]], gaps, gaps_teacher, [g / max(tv, 1e-12) for g in gaps],
                    float(mean_sq.mean()),
                    float(t_var.mean()), float(s_var.mean() / t_var.mean().clamp_min(1e-12)),
                    _per_row(norm_dist, B, N, grid), _per_row(gap0, B, N, grid), B * N, draws)


__all__ = ["ChainGap", "chain_gap"]
