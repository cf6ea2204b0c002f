"""MAR's DiffLoss sampler: the IDDPM cosine process, respaced, with a learned-range sigma and a temperature.

LTH14/mar `models/diffloss.py` samples each token latent with `create_diffusion(num_sampling_steps, "cosine")`
(improved-diffusion's `GaussianDiffusion` under `SpacedDiffusion`). The math, with t counted in the spaced
process (i = K-1 .. 0) and the net called at the original step timestep_map[i]:
    betas (1000, cosine):  beta_j = min(1 - abar((j+1)/T) / abar(j/T), 0.999),  abar(s) = cos((s+0.008)/1.008 pi/2)^2
    respacing:             keep `space_timesteps(1000, "K")`, beta'_i = 1 - abar_i / abar_{i-1} over the kept steps
    net output (N, 2C):    [eps, v], v in [-1, 1]
    x0 = sqrt(1/abar) x - sqrt(1/abar - 1) eps;  mean = c1 x0 + c2 x        (the posterior q(x_{i-1} | x_i, x0))
    log var = (v+1)/2 log beta'_i + (1-(v+1)/2) log posterior_var_i          (posterior_var_0 clipped to _1)
    x_{i-1} = mean + [i > 0] exp(log var / 2) noise temperature
CFG (`SimpleMLPAdaLN.forward_with_cfg`): the net sees the conditional half twice (once per condition), eps is
uncond + w (cond - uncond), and the conditional half keeps its own v. Noise is drawn the way the official loop
draws it (one (N/2, C) draw at the start, then one draw of the full (N, C) batch per step, even at i = 0) so that
a recorded official run replays here draw for draw; only the conditional half is carried.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]  # shape -> standard normal draws


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """(num_steps,) float64 betas of the IDDPM cosine schedule."""
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - abar((j + 1) / num_steps) / abar(j / num_steps), max_beta)
                         for j in range(num_steps)], dtype=torch.float64)


def space_timesteps(num_steps: int, sections: str | int) -> list[int]:
    """The kept steps of a respaced process (improved-diffusion's rule): `sections` "K" or "K1,K2,..." splits
    [0, num_steps) into equal parts and takes K_i evenly rounded steps from part i."""
    counts = [int(x) for x in str(sections).split(",")]
    size, extra = divmod(num_steps, len(counts))
    kept, start = [], 0
    for i, k in enumerate(counts):
        part = size + (1 if i < extra else 0)
        if not 1 <= k <= part:
            raise ValueError(f"num_sampling_steps={sections!r}: cannot take {k} steps from a section of {part} "
                             f"(of {num_steps} diffusion steps); use 1..{part} per section")
        stride = 1 if k == 1 else (part - 1) / (k - 1)
        kept += [start + round(j * stride) for j in range(k)]
        start += part
    return sorted(set(kept))


@dataclass(frozen=True)
class SpacedCosine:
    """The respaced process's per-step constants (float64); `at(name, i)` reads one as float32, as IDDPM does."""

    timestep_map: torch.Tensor  # (K,) long: original step of spaced step i
    betas: torch.Tensor
    sqrt_recip_abar: torch.Tensor
    sqrt_recipm1_abar: torch.Tensor
    coef_x0: torch.Tensor
    coef_xt: torch.Tensor
    log_var_min: torch.Tensor  # log posterior variance, clipped at step 0
    log_var_max: torch.Tensor  # log beta

    @classmethod
    def make(cls, sampling_steps: str | int = "100", num_steps: int = 1000, start: int | None = None) -> "SpacedCosine":
        """`start` < num_steps - 1 respaces [0, start] instead (sampling begins at step `start` from N(0, I)):
        the cosine table's clipped last beta makes abar(999) = 2.4e-9, so the first step multiplies the net's eps
        error by sqrt(1 / abar) = 2e4; a net less exact than MAR's (the tiny preset's) starts lower, e.g. 990
        (abar 2e-4; the data's share of x there is 1.4 % of its scale). None: the official process."""
        top = num_steps if start is None else start + 1
        if not 1 <= top <= num_steps:
            raise ValueError(f"start={start}: must be in [0, {num_steps - 1}]")
        keep = space_timesteps(top, sampling_steps)
        abar_all = torch.cumprod(1 - cosine_betas(num_steps), 0)
        abar = abar_all[keep]
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        betas = 1 - abar / prev
        post_var = betas * (1 - prev) / (1 - abar)
        log_min = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(keep) > 1 else torch.zeros(1).double()
        return cls(torch.tensor(keep), betas, torch.sqrt(1 / abar), torch.sqrt(1 / abar - 1),
                   betas * torch.sqrt(prev) / (1 - abar), (1 - prev) * torch.sqrt(1 - betas) / (1 - abar),
                   log_min, torch.log(betas))

    @property
    def steps(self) -> int:
        return len(self.timestep_map)

    def at(self, name: str, i: int, like: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)[i].float().to(like.device)


def p_step(proc: SpacedCosine, i: int, x: torch.Tensor, eps: torch.Tensor, v: torch.Tensor,
           noise: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """x_{i-1} from x_i (N, C) given the net's eps and v (N, C) at spaced step i (module docstring)."""
    x0 = proc.at("sqrt_recip_abar", i, x) * x - proc.at("sqrt_recipm1_abar", i, x) * eps
    mean = proc.at("coef_x0", i, x) * x0 + proc.at("coef_xt", i, x) * x
    frac = (v + 1) / 2
    log_var = frac * proc.at("log_var_max", i, x) + (1 - frac) * proc.at("log_var_min", i, x)
    if i == 0:
        return mean
    return mean + torch.exp(0.5 * log_var) * noise * temperature


@torch.no_grad()
def sample_tokens(net, z: torch.Tensor, proc: SpacedCosine, noise: NoiseFn, temperature: float = 1.0,
                  cfg: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Token latents (N, C) for conditions z (N, Z) with net(x, t, c) -> (N, 2C), MAR's `DiffLoss.sample`.
    With cfg != 1, z is (2N, Z): the conditional rows, then the unconditional ones; the result is (N, C).
    cfg may be a float32 tensor (MAR's linear schedule computes it so, and mixes eps at that precision)."""
    C = net.final_layer.linear.out_features // 2
    guided = float(cfg) != 1.0
    rows = z.shape[0] // 2 if guided else z.shape[0]
    x = noise((rows, C))
    for i in reversed(range(proc.steps)):
        t = proc.timestep_map[i].expand(z.shape[0]).to(z.device)
        out = net(torch.cat([x, x]) if guided else x, t, z)
        eps, v = out[:, :C], out[:, C:]
        if guided:
            cond, uncond = eps.chunk(2)
            eps, v = uncond + cfg * (cond - uncond), v[:rows]
        x = p_step(proc, i, x, eps, v, noise((z.shape[0], C))[:rows], temperature)
    return x
