"""Timestep samplers and grids for the flow head.

Convention (NextStep-1): t = 1 is data, t = 0 is noise, x_t = t·x + (1 − t)·ε, the head predicts
v = x − ε. All samplers take an explicit `torch.Generator` so that every draw is reproducible and
resumable; none touches the global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def sample_logit_normal(
    n: int,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """t = sigmoid(mean + std·z), z ~ N(0, 1): NextStep-1's training timesteps. Returns (n,)."""
    _check_generator(generator)
    if std <= 0:
        raise ValueError(f"logit-normal std must be > 0, got {std}")
    device = device if device is not None else (generator.device if generator else "cpu")
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(mean + std * z).to(dtype)


def sample_uniform(
    n: int,
    generator: torch.Generator | None = None,
    low: float = 0.0,
    high: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """t ~ U[low, high). Returns (n,). Used by DMD (t ∈ [0.02, 0.98]) and consistency distillation."""
    _check_generator(generator)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"uniform timestep range must satisfy 0 <= low <= high <= 1, got [{low}, {high}]")
    device = device if device is not None else (generator.device if generator else "cpu")
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    return (low + (high - low) * u).to(dtype)


def sample_timesteps(
    n: int,
    generator: torch.Generator | None,
    dist: str = "logit_normal",
    device: torch.device | str | None = None,
    **kwargs: float,
) -> Tensor:
    """Dispatch on `dist` ∈ {"logit_normal", "uniform"}; kwargs go to the sampler. Returns (n,)."""
    if dist == "logit_normal":
        return sample_logit_normal(n, generator, device=device, **kwargs)
    if dist == "uniform":
        return sample_uniform(n, generator, device=device, **kwargs)
    raise ValueError(f"unknown timestep distribution {dist!r}; use 'logit_normal' or 'uniform'")


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """NextStep-1's time shift t ↦ t / (s − (s − 1)·t) (t = 1 data).

    s = 1 is the identity; s > 1 spends more of the grid near noise (t(0.5) = 1/(s+1)).
    The endpoints 0 and 1 are fixed points.
    """
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    return t / (shift - (shift - 1.0) * t)


def time_grid(
    num_steps: int,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sampling grid from noise to data: (num_steps + 1,), t_0 = 0 < ... < t_N = 1, shifted.

    A sampler integrates from grid[k] to grid[k+1]; the few-step consistency sampler evaluates
    the student at grid[:-1] (for N = 4 and shift 1: 0, 0.25, 0.5, 0.75 — DMD2's
    [999, 749, 499, 249] list in this convention).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    return shift_timesteps(t, shift).to(device=device, dtype=dtype)
