"""Flow-head samplers written as chains of explicit Gaussian transitions.

Time convention (NextStep-1): t = 1 is data, t = 0 is noise, x_t = t x + (1 - t) eps, the head predicts v = x - eps.
Every sampler is x_0 ~ N(0, I), x_{k+1} = m_k(x_k) + s_k eps_k on a grid 0 = t_0 < ... < t_K = 1, so a trajectory
has a density -- the thing exact speculative decoding (DESIGN.md §4) compares between draft and target.

- `sde`: Euler-Maruyama of NextStep-1's SDE with noise level eta. score = (t v - x)/(1 - t),
  drift = v + eta^2 (1 - t) score, m = x + drift dt, s = eta sqrt(2 (1 - t) dt) (> 0 for every step incl. the last,
  because the grid runs 0 -> 1 and the last step starts at t_{K-1} < 1). eta = 1 is NextStep-1's sampler; any eta
  keeps the marginals of the probability-flow ODE (g^2 = 2 eta^2 (1 - t) Langevin term).
- `ode`: Euler, m = x + v dt, s = 0 (no density: not usable for exact speculative decoding).
- `consistency` (few-step student): x1_hat = x + (1 - t_k) v; m = t_{k+1} x1_hat, s = 1 - t_{k+1}; the last step
  (t_K = 1) has m = x1_hat and s = `final_std`, which must be > 0 for the chain to have a density.
Timestep shift (NextStep-1): t -> t / (s - (s - 1) t) on linspace(0, 1, K + 1).
- `nextstep` / `nextstep-1.1`: the official NextStep-1 / NextStep-1.1 samplers on their own grids
  (sampling/official.py); `nextstep` ends with a deterministic Euler step (std 0: baseline only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .official import OFFICIAL_KINDS, check_official, nextstep_grid, nextstep_mean, nextstep_stds

KINDS = ("sde", "ode", "consistency") + OFFICIAL_KINDS


@dataclass(frozen=True)
class SamplerConfig:
    kind: str = "sde"  # sde | ode | consistency | nextstep | nextstep-1.1
    num_steps: int = 50
    noise_level: float = 1.0  # eta of the sde / nextstep-1.1 samplers (official 1.1: 0.8)
    time_shift: float = 1.0  # NextStep-1 shift s: t/(s-(s-1)t)
    final_std: float = 0.0  # consistency: std of the last transition (must be > 0 for speculative decoding)
    timesteps: tuple[float, ...] | None = None  # explicit grid 0 = t_0 < ... < t_K = 1 (overrides num_steps/shift)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"SamplerConfig.kind={self.kind!r}: choose one of {KINDS}")
        if self.timesteps is None and self.num_steps < 1:
            raise ValueError(f"SamplerConfig.num_steps={self.num_steps} must be >= 1")
        if self.noise_level < 0 or self.final_std < 0:
            raise ValueError("SamplerConfig.noise_level and final_std must be >= 0")
        if self.time_shift <= 0:
            raise ValueError(f"SamplerConfig.time_shift={self.time_shift} must be > 0 (1.0 = no shift)")
        if self.kind in OFFICIAL_KINDS:
            if self.timesteps is not None:
                raise ValueError(f"SamplerConfig(kind={self.kind!r}) uses the official grid: drop `timesteps`")
            check_official(self.kind, self.num_steps, self.noise_level, self.time_shift)
        if self.timesteps is not None:
            ts = list(self.timesteps)
            ok = len(ts) >= 2 and ts[0] == 0.0 and ts[-1] == 1.0 and all(a < b for a, b in zip(ts, ts[1:]))
            if not ok:
                raise ValueError(f"SamplerConfig.timesteps={self.timesteps}: need a strictly increasing grid "
                                 "from 0.0 (noise) to 1.0 (data)")

    @property
    def steps(self) -> int:
        """K, the number of transitions (head evaluations per token, per CFG branch)."""
        return len(self.timesteps) - 1 if self.timesteps is not None else self.num_steps


def time_grid(cfg: SamplerConfig, device=None, dtype=torch.float32) -> torch.Tensor:
    """(K+1,) grid from 0 (noise) to 1 (data), shifted by `time_shift`."""
    if cfg.kind in OFFICIAL_KINDS:
        return nextstep_grid(cfg.kind, cfg.num_steps, cfg.time_shift).to(device=device, dtype=dtype)
    if cfg.timesteps is not None:
        return torch.tensor(cfg.timesteps, dtype=torch.float64).to(device=device, dtype=dtype)
    t = torch.linspace(0.0, 1.0, cfg.num_steps + 1, dtype=torch.float64)
    s = cfg.time_shift
    return (t / (s - (s - 1.0) * t)).to(device=device, dtype=dtype)


def transition_stds(cfg: SamplerConfig, device=None, dtype=torch.float32) -> torch.Tensor:
    """(K,) transition stds s_k; they depend on the grid only, never on the model or the state."""
    g = time_grid(cfg, dtype=torch.float64)
    t, dt = g[:-1], g[1:] - g[:-1]
    if cfg.kind in OFFICIAL_KINDS:
        s = nextstep_stds(cfg.kind, g, cfg.noise_level)
    elif cfg.kind == "sde":
        s = cfg.noise_level * torch.sqrt(2.0 * (1.0 - t) * dt)
    elif cfg.kind == "ode":
        s = torch.zeros_like(t)
    else:
        s = 1.0 - g[1:]
        s[-1] = cfg.final_std
    return s.to(device=device, dtype=dtype)


def transition_mean(cfg: SamplerConfig, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                    t_next: torch.Tensor) -> torch.Tensor:
    """m_k(x) for states x (N,D) with velocity v (N,D) at times t (N,) stepping to t_next (N,)."""
    if cfg.kind in OFFICIAL_KINDS:
        return nextstep_mean(cfg.kind, time_grid(cfg, dtype=torch.float64), cfg.noise_level, x, v, t, t_next)
    t, t_next = t[:, None].to(x.dtype), t_next[:, None].to(x.dtype)
    dt = t_next - t
    if cfg.kind == "ode":
        return x + v * dt
    if cfg.kind == "sde":
        # eta^2 (1-t) score = eta^2 (t v - x): no division, finite at every t of the grid
        return x + dt * (v + cfg.noise_level**2 * (t * v - x))
    x1_hat = x + (1.0 - t) * v
    return t_next * x1_hat  # t_next = 1 on the last step gives m = x1_hat


def require_density(cfg: SamplerConfig, who: str = "sampler") -> None:
    """Raise unless every transition has s_k > 0 (a trajectory density exists)."""
    s = transition_stds(cfg, dtype=torch.float64)
    if bool((s <= 0).any()):
        k = int(torch.nonzero(s <= 0)[0])
        fix = {"ode": "use kind='sde' with noise_level > 0",
               "sde": "set noise_level > 0",
               "nextstep": "use 'nextstep-1.1' or 'sde' (NextStep-1's final Euler step is deterministic)",
               "nextstep-1.1": "set noise_level > 0",
               "consistency": "set final_std > 0 (e.g. 0.05)"}[cfg.kind]
        raise ValueError(f"{who}: transition {k} of the {cfg.kind!r} sampler has std 0, so a token's trajectory has "
                         f"no density and the exact acceptance test min(1, P/Q) is undefined; {fix}")


@dataclass
class Trajectory:
    """A sampled chain for N tokens: states (N,K+1,D) = x_0..x_K, means (N,K,D) = m_k(x_k), stds (K,)."""

    states: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    @property
    def token(self) -> torch.Tensor:
        return self.states[:, -1]


def sample_tokens(field, cfg: SamplerConfig, noise: torch.Tensor) -> Trajectory:
    """Run the chain. field: v = field(x (N,D), t (N,) or float); noise (N,K+1,D): x_0 and eps_0..eps_{K-1}."""
    K = cfg.steps
    if noise.dim() != 3 or noise.shape[1] != K + 1:
        raise ValueError(f"noise must be (N, K+1={K + 1}, D), got {tuple(noise.shape)}")
    grid = time_grid(cfg, noise.device, torch.float64)
    stds = transition_stds(cfg, noise.device, noise.dtype)
    x = noise[:, 0]
    states, means = [x], []
    n = x.shape[0]
    for k in range(K):
        t, t_next = grid[k].expand(n), grid[k + 1].expand(n)
        m = transition_mean(cfg, x, field(x, t.to(x.dtype)), t, t_next)
        x = m + stds[k] * noise[:, k + 1]
        states.append(x)
        means.append(m)
    return Trajectory(torch.stack(states, 1), torch.stack(means, 1), stds)


def transition_means(field, cfg: SamplerConfig, states: torch.Tensor) -> torch.Tensor:
    """m_k(x_k) of `field` along given trajectories states (N,K+1,D) -> (N,K,D).

    The K evaluations do not depend on each other (the states are given), so they run as ONE head call on N*K
    rows: verifying a drafted trajectory costs one batched head pass, not K sequential ones.
    """
    N, K1, D = states.shape
    K = K1 - 1
    if K != cfg.steps:
        raise ValueError(f"trajectory has {K} transitions but the sampler has {cfg.steps}: draft and target "
                         "samplers must have the same number of steps for their trajectory densities to compare")
    grid = time_grid(cfg, states.device, torch.float64)
    t = grid[:-1].repeat(N)
    t_next = grid[1:].repeat(N)
    x = states[:, :K].reshape(N * K, D)
    v = field.repeat_interleave(K)(x, t.to(x.dtype))
    return transition_mean(cfg, x, v, t, t_next).reshape(N, K, D)


def gaussian_chain_logprob(states: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """log N(x_0; 0, I) + sum_k log N(x_{k+1}; means_k, stds_k^2 I), per trajectory -> (N,). Needs stds > 0."""
    D = states.shape[-1]
    log2pi = math.log(2.0 * math.pi)
    lp = -0.5 * (states[:, 0] ** 2).sum(-1) - 0.5 * D * log2pi
    z = (states[:, 1:] - means) / stds[None, :, None]
    lp = lp - 0.5 * (z**2).sum((-1, -2)) - D * torch.log(stds).sum() - 0.5 * D * log2pi * stds.numel()
    return lp


def trajectory_logprob(field, cfg: SamplerConfig, states: torch.Tensor) -> torch.Tensor:
    """Log-density (N,) of trajectories states (N,K+1,D) under the chain of (field = head+cond+cfg, sampler)."""
    require_density(cfg, "trajectory_logprob")
    means = transition_means(field, cfg, states)
    return gaussian_chain_logprob(states, means, transition_stds(cfg, states.device, states.dtype))
