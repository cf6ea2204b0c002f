"""MAR's DiffLoss head read as a flow head, so the project's flow machinery (CD, DMD, few-step students, ODE
samplers) runs on it unchanged.

DiffLoss is an eps-prediction VP diffusion: x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps (1000 cosine steps). The
flow convention here is x_s = s x0 + (1 - s) eps (s = 1 data). Both are the same point up to a scale:
    x_vp = k(s) x_s,  k = 1 / sqrt(s^2 + (1 - s)^2),  abar(s) = s^2 / (s^2 + (1 - s)^2)
so the flow velocity v = dx_s/ds = x0 - eps follows from one net call at the DDPM time tau(s) whose abar is
abar(s) (the inverse of the 1000-step table, interpolated linearly in log-SNR between integer steps; the net's
sinusoidal time embedding takes fractional tau):
    eps = net(k x_s, tau(s), z)[:, :C],   x0 = (x_vp - sqrt(1 - abar) eps) / sqrt(abar),   v = x0 - eps.
CFG on eps is CFG on v (v is affine in eps at fixed x). The learned-variance half of the output is not used by the
flow view (the deterministic probability-flow ODE and DMD's scores need the mean only).
"""
from __future__ import annotations

import torch
from torch import nn

from ..losses.diffloss import TRAIN_STEPS
from .diffloss import SpacedCosine


class DDPMTime:
    """Flow time s <-> DDPM time tau for MAR's 1000-step cosine process."""

    def __init__(self, num_steps: int = TRAIN_STEPS):
        abar = (1 / SpacedCosine.make(str(num_steps), num_steps).sqrt_recip_abar ** 2)  # float64 (T,)
        self.log_snr = torch.log(abar / (1 - abar))  # decreasing in tau
        self.steps = num_steps

    def tau(self, s: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM step(s) with the flow time's SNR, clamped to [0, T - 1]."""
        s = s.double().clamp(1e-6, 1 - 1e-6)
        target = (2 * torch.log(s / (1 - s))).cpu()
        ls = self.log_snr  # decreasing: search on the negated table
        idx = torch.searchsorted(-ls, -target).clamp(1, self.steps - 1)
        lo, hi = ls[idx - 1], ls[idx]
        frac = ((lo - target) / (lo - hi)).clamp(0, 1)
        tau = (idx - 1).double() + frac
        tau = torch.where(target >= ls[0], torch.zeros_like(tau), tau)
        return tau.clamp(0, self.steps - 1).to(s.device)


class DiffLossFlow(nn.Module):
    """`head(x (N, C), s (N,), cond (N, Z), guidance=None) -> v (N, C)` over a DiffLoss net (out 2C).

    guidance (N,) > 1 with `uncond` (N, Z) set by `with_uncond` is not part of this module: CFG is composed by
    the caller (`guided_velocity`), as for the NextStep teacher."""

    def __init__(self, net: nn.Module, time: DDPMTime | None = None):
        super().__init__()
        self.net = net
        self.time = time or DDPMTime()
        self.channels = net.final_layer.linear.out_features // 2

    def forward(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor, guidance=None) -> torch.Tensor:
        s64 = s.double().clamp(1e-6, 1 - 1e-6)
        norm = torch.sqrt(s64**2 + (1 - s64) ** 2)
        sqrt_abar, sqrt_1m = (s64 / norm).to(x.dtype)[:, None], ((1 - s64) / norm).to(x.dtype)[:, None]
        x_vp = x / norm.to(x.dtype)[:, None]
        eps = self.net(x_vp, self.time.tau(s).to(x.dtype), cond)[:, : self.channels]
        return (x_vp - sqrt_1m * eps) / sqrt_abar - eps


def guided_velocity(head: DiffLossFlow, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float):
    """velocity(x, s) of `head` under conditions (N, Z), with CFG `scale` against `uncond` (N, Z) when != 1."""
    def velocity(x, s):
        if uncond is None or scale == 1.0:
            return head(x, s, cond)
        v = head(torch.cat([x, x]), torch.cat([s, s]), torch.cat([cond, uncond]))
        vc, vu = v.chunk(2)
        return vu + scale * (vc - vu)
    return velocity
