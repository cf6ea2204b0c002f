"""The official NextStep samplers of the flow head, written as Gaussian chains (pure functions).

Both run one chain per token with the guided velocity v(x, t) (t = 1 data, t = 0 noise, v = x - eps) and are the
users' baseline: `nextstep` is NextStep-1 (`FlowMatchingHead.sample` of stepfun-ai/NextStep-1
`nextstep/models/modeling_fm_head.py`, used by `pipeline_nextstep.py`), `nextstep-1.1` is the sampler of the
NextStep-1.1 code (`FlowMatchingHead.sample(sde_type="sde")` in stepfun-ai/NextStep-1 `inference/nextstep_model.py`,
default `noise_level` 0.8). `num_steps` K is the official `num_sampling_steps`: K head evaluations per token
(per CFG branch), shift s maps t -> t / (s - (s - 1) t) (`timesteps_shift`).

- `nextstep` (NextStep-1): grid t_0..t_{K-1} = shift(linspace(0, 0.96, K)); K-1 Euler-Maruyama steps
  x' = x + dt (v + t v - x) + sqrt(2 (1 - t) dt) eps (score (t v - x)/(1 - t), drift v + (1 - t) score), then one
  deterministic Euler step x_K = x_{K-1} + 0.04 v(x_{K-1}, t_{K-1}) (`last_step_size`), so t_K = t_{K-1} + 0.04.
  The last transition has std 0: a token has no trajectory density (no exact speculative decoding).
- `nextstep-1.1`: grid shift(linspace(0, 1, K + 1)[:-1]) then 1.0; with x0 = x - t v (noise estimate),
  x1 = x + (1 - t) v (data estimate), sigma = 1 - t and
  std = eta sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))), sigma_max = t_{K-1} (the official code's
  `timesteps[-2]`): x' = (1 - t') x0 + t' x1 - std^2 dt / (2 sigma) x0 + std sqrt(dt) eps. Every step, the last
  included, adds noise, so this chain has a density and serves exact speculative decoding too.
The noise: x_0 = noise[:, 0], the k-th transition uses noise[:, k + 1] (`flow.sample_tokens`); the official code
draws the same count from the global generator (K for NextStep-1, K + 1 for 1.1; we always draw K + 1).
"""
from __future__ import annotations

import math

import torch

OFFICIAL_KINDS = ("nextstep", "nextstep-1.1")
LAST_STEP_SIZE = 0.04  # NextStep-1 `FlowMatchingHead.sample(last_step_size=0.04)`
DEFAULT_NOISE_LEVEL = {"sde": 1.0, "ode": 1.0, "nextstep": 1.0, "nextstep-1.1": 0.8}


def _shift(t: torch.Tensor, s: float) -> torch.Tensor:
    return t / (s - (s - 1.0) * t)


def nextstep_grid(kind: str, num_steps: int, time_shift: float = 1.0) -> torch.Tensor:
    """(K+1,) float64 times of the states x_0..x_K of the official sampler `kind` with K = num_steps."""
    K = int(num_steps)
    if kind == "nextstep":
        if K < 2:
            raise ValueError(f"sampler 'nextstep' needs num_steps >= 2 (K-1 SDE steps and a final Euler step), "
                             f"got {K}")
        t = _shift(torch.linspace(0.0, 1.0 - LAST_STEP_SIZE, K, dtype=torch.float64), time_shift)
        return torch.cat([t, t[-1:] + LAST_STEP_SIZE])
    if kind == "nextstep-1.1":
        if K < 1:
            raise ValueError(f"sampler 'nextstep-1.1' needs num_steps >= 1, got {K}")
        t = _shift(torch.linspace(0.0, 1.0, K + 1, dtype=torch.float64)[:-1], time_shift)
        return torch.cat([t, torch.ones(1, dtype=torch.float64)])
    raise ValueError(f"unknown official sampler {kind!r}: choose one of {OFFICIAL_KINDS}")


def _v11_std(grid: torch.Tensor, t: torch.Tensor, noise_level: float) -> torch.Tensor:
    """The 1.1 sampler's std_dev_t at times t (...,): eta sqrt(sigma / (1 - sigma')), sigma' = sigma_max at t = 0."""
    sigma = 1.0 - t
    sigma_max = grid[-2].to(t)
    return noise_level * torch.sqrt(sigma / (1.0 - torch.where(sigma == 1.0, sigma_max, sigma)))


def nextstep_stds(kind: str, grid: torch.Tensor, noise_level: float) -> torch.Tensor:
    """(K,) float64 transition stds s_k on `grid` (K+1,) (x_{k+1} = m_k + s_k eps)."""
    t, dt = grid[:-1], grid[1:] - grid[:-1]
    if kind == "nextstep":
        s = torch.sqrt(2.0 * (1.0 - t) * dt)
        s[-1] = 0.0  # the final Euler step is deterministic
        return s
    return _v11_std(grid, t, noise_level) * torch.sqrt(dt)


def nextstep_mean(kind: str, grid: torch.Tensor, noise_level: float, x: torch.Tensor, v: torch.Tensor,
                  t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """m_k(x) (N,D) for states x (N,D), guided velocity v (N,D), step start times t (N,) and ends t_next (N,)."""
    tt, tn = t[:, None].to(x.dtype), t_next[:, None].to(x.dtype)
    dt = tn - tt
    if kind == "nextstep":
        sde = x + dt * (v + tt * v - x)
        last = t > 0.5 * (grid[-3] + grid[-2]).to(t)  # the final step starts at t_{K-1} (grid from this config)
        return torch.where(last[:, None], x + v * LAST_STEP_SIZE, sde)
    x0, x1 = x - v * tt, x + v * (1.0 - tt)
    sigma = 1.0 - tt
    std = _v11_std(grid, t, noise_level)[:, None].to(x.dtype)
    return x0 * (1.0 - tn) + x1 * tn - std**2 * dt / (2.0 * sigma) * x0


def check_official(kind: str, num_steps: int, noise_level: float, time_shift: float) -> None:
    """Raise with the fix when the settings cannot reproduce the official sampler `kind`."""
    nextstep_grid(kind, num_steps, time_shift)
    if kind == "nextstep" and noise_level != 1.0:
        raise ValueError(f"sampler 'nextstep' (NextStep-1) has no noise level, got noise_level={noise_level}: "
                         "leave inference.noise_level unset, or use sampler=nextstep-1.1 / sde, which take one")
    if kind == "nextstep-1.1" and not math.isfinite(noise_level):
        raise ValueError(f"sampler 'nextstep-1.1': noise_level={noise_level} must be finite")


def check_mode_settings(mode: str, sampler: str, negative_prompt: str = "") -> None:
    """Which inference modes can use which teacher sampler; raises (sd + nextstep) or warns (student modes).

    `inference.sampler` drives the teacher head: baseline (every kind) and sd (Gaussian chains with noise on every
    step: sde, nextstep-1.1). NextStep-1's `nextstep` ends with a deterministic step, so a token has no trajectory
    density and exact speculative verification cannot use it: refused. dmd / fastardiff sample with the student's
    few-step consistency chain and ignore `inference.sampler`; their CFG-distilled student has no unconditional
    rows: the negative prompt acts through distillation only (the DMD teacher's unconditional rows use the training
    run's `inference.negative_prompt`), so changing it at inference has no effect (logged).
    """
    import logging
    import warnings

    if mode == "sd" and sampler == "nextstep":
        raise ValueError("inference.sampler=nextstep (NextStep-1's sampler) ends with a deterministic Euler step, so a "
                         "token has no trajectory density and exact speculative decoding (--mode sd) cannot verify "
                         "it: use inference.sampler=nextstep-1.1 (the NextStep-1.1 SDE, noise on every step) or sde, "
                         "or --mode baseline for the official NextStep-1 sampler")
    if mode in ("dmd", "fastardiff") and negative_prompt:
        logging.getLogger(__name__).info(
            "mode %r: the CFG-distilled student runs no unconditional rows; the negative prompt acts only through "
            "distillation (the DMD teacher used the training run's inference.negative_prompt)", mode)
    if mode in ("dmd", "fastardiff") and sampler != "sde":
        warnings.warn(f"inference.sampler={sampler} applies to the teacher head (modes baseline and sd); mode "
                      f"{mode!r} samples with the distilled student's consistency chain (inference.student_steps)",
                      stacklevel=3)


def resolve_noise_level(sampler: str, noise_level: float | None) -> float:
    """`inference.noise_level`, or the sampler's own default when unset (sde 1.0, nextstep-1.1 0.8)."""
    return DEFAULT_NOISE_LEVEL.get(sampler, 1.0) if noise_level is None else float(noise_level)


__all__ = ["DEFAULT_NOISE_LEVEL", "LAST_STEP_SIZE", "OFFICIAL_KINDS", "check_mode_settings", "check_official",
           "nextstep_grid", "nextstep_mean", "nextstep_stds", "resolve_noise_level"]
