"""Rectified-flow (flow-matching) loss for the flow head — NextStep-1's image loss.

Convention: t = 1 is data, t = 0 is noise; x_t = t·x + (1 − t)·ε; the head predicts v = x − ε.
Each token is tiled `batch_mul` times with fresh (t, ε) (NextStep's `fm_head_batch_mul` = 4,
MAR's `diffusion_batch_mul`), t is logit-normal, and the loss is the per-token MSE (mean over the
token dimension) averaged over valid tokens (see `common.masked_mean` for the data-parallel note).

Head protocol: head(x (N, D), t (N,), cond (N, C), guidance (N,) | None) -> v (N, D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from fastardiff_ds.losses.common import check_mask, check_same_shape, masked_mean, metric, randn
from fastardiff_ds.schedules.timesteps import sample_timesteps

HeadFn = Callable[..., Tensor]


@dataclass(frozen=True)
class FlowMatchingConfig:
    """batch_mul noise draws per token; t ~ logit-normal(logit_mean, logit_std) or U[t_min, t_max]."""

    batch_mul: int = 4
    t_dist: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_mul < 1:
            raise ValueError(f"FlowMatchingConfig.batch_mul={self.batch_mul} must be >= 1")
        if self.t_dist not in ("logit_normal", "uniform"):
            raise ValueError(f"FlowMatchingConfig.t_dist={self.t_dist!r}: use 'logit_normal' or 'uniform'")

    def sample_t(self, n: int, generator: torch.Generator | None, device=None) -> Tensor:
        """(n,) training timesteps from this config's distribution."""
        if self.t_dist == "logit_normal":
            return sample_timesteps(n, generator, "logit_normal", device, mean=self.logit_mean, std=self.logit_std)
        return sample_timesteps(n, generator, "uniform", device, low=self.t_min, high=self.t_max)


class FlowMatchingBatch(NamedTuple):
    """Inputs/targets for one flow-matching step; all rows tiled batch_mul times (M·N rows)."""

    x_t: Tensor  # (M·N, D) noisy tokens
    t: Tensor  # (M·N,)
    target: Tensor  # (M·N, D) = x − ε
    noise: Tensor  # (M·N, D) ε


def tile(x: Tensor | None, batch_mul: int) -> Tensor | None:
    """Tile rows batch_mul times (copy k of row i at k·N + i), as NextStep/MAR `.repeat` does."""
    if x is None or batch_mul == 1:
        return x
    return x.repeat(batch_mul, *([1] * (x.dim() - 1)))


def interpolate(x1: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = t·x1 + (1 − t)·ε. x1, noise (N, D); t (N,)."""
    t = t.to(x1.dtype)[:, None]
    return t * x1 + (1.0 - t) * noise


def make_flow_matching_inputs(
    tokens: Tensor, generator: torch.Generator | None, config: FlowMatchingConfig = FlowMatchingConfig()
) -> FlowMatchingBatch:
    """From clean tokens (N, D) draw t and ε per tiled copy and build (x_t, t, target = x − ε)."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (N, D), got shape {tuple(tokens.shape)}; flatten (B, L, D) first")
    x = tile(tokens, config.batch_mul)
    t = config.sample_t(x.shape[0], generator).to(x.device)
    noise = randn(tuple(x.shape), generator, like=x)
    return FlowMatchingBatch(interpolate(x, noise, t), t, x - noise, noise)


def flow_matching_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    prefix: str = "fm",
) -> tuple[Tensor, dict[str, float]]:
    """Masked MSE between predicted and target velocities.

    pred, target: (N, D). mask: (N,) or None. Per-token value = mean over D of (pred − target)²;
    reduction = masked mean over tokens (local count unless `normalizer` is given).
    """
    check_same_shape("pred", pred, "target", target)
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)
    loss = masked_mean(per_token, mask, normalizer)
    return loss, {f"{prefix}/loss": metric(loss)}


def head_flow_matching_loss(
    head: HeadFn,
    tokens: Tensor,
    cond: Tensor,
    generator: torch.Generator | None,
    mask: Tensor | None = None,
    config: FlowMatchingConfig = FlowMatchingConfig(),
    guidance: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    prefix: str = "fm",
) -> tuple[Tensor, dict[str, float]]:
    """Flow-matching loss of `head` on clean tokens (N, D) with conditions cond (N, C).

    Tiles tokens/cond/mask/guidance batch_mul times, draws (t, ε) from `generator`, and returns
    the masked MSE against v = x − ε. `normalizer`, if given, counts tokens *before* tiling.
    Used for teacher pretraining (stage 0) and for the DMD fake score (on detached samples).
    """
    if cond.shape[0] != tokens.shape[0]:
        raise ValueError(f"cond has {cond.shape[0]} rows but tokens has {tokens.shape[0]}; one cond per token")
    check_mask(mask, tokens.shape[:1])
    m = config.batch_mul
    batch = make_flow_matching_inputs(tokens, generator, config)
    pred = head(batch.x_t, batch.t, tile(cond, m), tile(guidance, m))
    norm = None if normalizer is None else normalizer * m
    loss, metrics = flow_matching_loss(pred, batch.target, tile(mask, m), norm, prefix)
    metrics[f"{prefix}/t_mean"] = metric(batch.t)
    return loss, metrics
