"""MAR's DiffLoss training loss (LTH14/mar `DiffLoss.forward` -> improved-diffusion `training_losses`).

The training process is the unspaced cosine one (1000 steps, `SpacedCosine.make("1000")`). Per token, with t and
the noise given (the caller draws them: t ~ U{0..999}, noise ~ N(0, I)):
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise;  [eps, v] = net(x_t, t, z)
    mse = mean_c (noise - eps)^2
    vb  = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) / ln 2, mean over c, with eps detached (the variance is
          learned through the bound, the mean only through mse); at t = 0 the discretised Gaussian NLL of x0
          (bins of 2/255, as for 8-bit images in [-1, 1]) instead
    loss = mean over the masked tokens of (mse + vb)     (MSE loss type, no rescaling: create_diffusion's default)
Constants are read as IDDPM reads them: float64 tables indexed by t, then cast to float32.
"""
from __future__ import annotations

import math

import torch

from ..sampling.diffloss import SpacedCosine

TRAIN_STEPS = 1000


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))  # IDDPM's tanh approximation


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log P(x) (nats, elementwise) of N(mean, exp(log_scale)^2) integrated over x's 8-bit bin in [-1, 1]."""
    inv = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv * (x - mean + 1 / 255))
    cdf_min = _std_normal_cdf(inv * (x - mean - 1 / 255))
    log_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus = torch.log((1 - cdf_min).clamp(min=1e-12))
    mid = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return -torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus, mid))


def _table(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return values.to(t.device)[t].float()[:, None]


def diffloss_terms(net, x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   proc: SpacedCosine) -> dict[str, torch.Tensor]:
    """Per-token terms (N,): mse, vb and loss = mse + vb, for tokens x0 (N, C), conditions z (N, Z), steps t (N,)
    long in [0, proc.steps) and noise (N, C). `proc` is the training process (`SpacedCosine.make("1000")`)."""
    sqrt_abar = 1 / proc.sqrt_recip_abar
    x_t = _table(sqrt_abar, t) * x0 + _table(proc.sqrt_recipm1_abar * sqrt_abar, t) * noise
    out = net(x_t, proc.timestep_map.to(t.device)[t], z)
    C = x0.shape[1]
    eps, v = out[:, :C], out[:, C:]
    mse = ((noise - eps) ** 2).mean(1)
    coef_x0, coef_xt = _table(proc.coef_x0, t), _table(proc.coef_xt, t)
    log_min, log_max = _table(proc.log_var_min, t), _table(proc.log_var_max, t)
    true_mean = coef_x0 * x0 + coef_xt * x_t
    x0_pred = _table(proc.sqrt_recip_abar, t) * x_t - _table(proc.sqrt_recipm1_abar, t) * eps.detach()
    mean = coef_x0 * x0_pred + coef_xt * x_t
    frac = (v + 1) / 2
    log_var = frac * log_max + (1 - frac) * log_min
    kl = normal_kl(true_mean, log_min, mean, log_var).mean(1) / math.log(2.0)
    nll = discretized_gaussian_nll(x0, mean, 0.5 * log_var).mean(1) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return {"mse": mse, "vb": vb, "loss": mse + vb}


def diffloss_loss(net, x0, z, t, noise, proc: SpacedCosine, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`DiffLoss.forward`: the mean of (mse + vb) over the tokens with mask 1 (all tokens when mask is None)."""
    loss = diffloss_terms(net, x0, z, t, noise, proc)["loss"]
    if mask is None:
        return loss.mean()
    return (loss * mask).sum() / mask.sum()
