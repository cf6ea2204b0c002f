"""DMD2's GAN term on the fake-score network (Yin et al. 2024, §4.3), for a per-token flow head.

The fake score's trunk carries a classifier (`FlowHead.discriminate`): real tokens of the data and the student's
tokens, each noised to its own t ~ U[t_min, t_max] (DMD2's diffusion GAN; t = 1 data convention), both with the
conditioning the target AR gave them. Non-saturating losses, as DMD2's `compute_guidance_clean_cls_loss` and
`compute_generator_clean_cls_loss`:
    discriminator (trains the fake-score network):  softplus(D(fake)) + softplus(-D(real))
    generator (trains the student):                 softplus(-D(fake))
The generator's term reaches the student through its samples only: its gradient with respect to the samples is
taken with `torch.autograd.grad` (the fake-score network's parameters get no gradient and its engine takes no
step), then applied to the student's samples as a linear surrogate whose value is the loss itself. That is the
DMD loss's pattern too (losses/dmd.py): the student's engine never backpropagates into another engine.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastardiff_ds.losses.common import metric, randn
from fastardiff_ds.losses.flow_matching import interpolate
from fastardiff_ds.schedules.timesteps import sample_uniform

# logits(x (N, D), t (N,)) -> (N,): the classifier of the fake-score network with the conditioning bound
Discriminator = Callable[[Tensor, Tensor], Tensor]


def _noised(x: Tensor, generator: torch.Generator | None, t_min: float, t_max: float) -> tuple[Tensor, Tensor]:
    """x_t = t x + (1 - t) eps with one t ~ U[t_min, t_max] per row. Draw order: t, then eps."""
    t = sample_uniform(x.shape[0], generator, t_min, t_max).to(device=x.device, dtype=x.dtype)
    return interpolate(x, randn(tuple(x.shape), generator, like=x), t), t


def gan_discriminator_loss(disc: Discriminator, real: Tensor, fake: Tensor, generator: torch.Generator | None,
                           t_min: float = 0.02, t_max: float = 0.98) -> tuple[Tensor, dict[str, float]]:
    """softplus(D(fake_t)) + softplus(-D(real_t)), each a mean over rows; real/fake (N, D) are detached here.
    Draw order: the real rows' t and noise, then the fake rows'."""
    xr, tr = _noised(real.detach(), generator, t_min, t_max)
    xf, tf = _noised(fake.detach(), generator, t_min, t_max)
    lr, lf = disc(xr, tr), disc(xf, tf)
    loss = F.softplus(-lr).mean() + F.softplus(lf).mean()
    return loss, {"gan/d_loss": metric(loss), "gan/d_real": metric(torch.sigmoid(lr).mean()),
                  "gan/d_fake": metric(torch.sigmoid(lf).mean())}


def gan_generator_loss(disc: Discriminator, x: Tensor, generator: torch.Generator | None,
                       t_min: float = 0.02, t_max: float = 0.98) -> tuple[Tensor, dict[str, float]]:
    """softplus(-D(x_t)) (mean over rows) for the student's samples x (N, D), as a loss whose gradient reaches x
    only: value = the GAN loss, d/dx = its gradient through the classifier, no gradient into the classifier."""
    xd = x.detach().float().requires_grad_(True)
    with torch.enable_grad():
        xt, t = _noised(xd, generator, t_min, t_max)
        loss = F.softplus(-disc(xt, t)).mean()
        (grad,) = torch.autograd.grad(loss, xd)
    value = loss.detach()
    surrogate = (x.float() * grad).sum()
    return value + surrogate - surrogate.detach(), {"gan/g_loss": metric(value)}
