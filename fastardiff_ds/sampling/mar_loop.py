"""MAR's masked generation (LTH14/mar `MAR.sample_tokens`): random-order, several tokens per step.

Every step runs the encoder-decoder over the tokens so far (masked ones hidden), keeps
mask_len = max(1, min(still masked - 1, floor(L cos(pi/2 (step+1)/num_iter)))) tokens masked for the next step
(MaskGIT's cosine schedule, over the generation order), and samples the tokens that leave the mask this step with
the DiffLoss head (sampling/diffloss.py); the last step samples all that remain. CFG (cfg != 1) runs the
unconditional rows (`fake_latent`) beside the conditional ones; its scale is constant, or linear as in Muse:
1 + (cfg - 1) (L - mask_len) / L. The generation order and the noise are passed in, so a run is reproducible and
a recorded official run replays exactly.
"""
from __future__ import annotations

import math

import torch

from .diffloss import NoiseFn, SpacedCosine, sample_tokens

CFG_SCHEDULES = ("linear", "constant")


def random_orders(batch: int, seq_len: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, L) long: one random generation order per image, on the generator's device."""
    dev = generator.device if generator is not None else None
    return torch.stack([torch.randperm(seq_len, generator=generator, device=dev) for _ in range(batch)])


def student_grid(steps: int, s_min: float, device=None) -> torch.Tensor:
    """(steps,) start times of a few-step student's steps: s_min + (1 - s_min) j / steps. They start at s_min > 0,
    not 0: the student is an eps-net read as a flow (sampling/diffloss_flow.py) and its data estimate at s -> 0
    divides by sqrt(abar) -> 0 (s_min 0.05: abar 2.8e-3, as Stable Diffusion's last step, where DMD2 works)."""
    return s_min + (1 - s_min) * torch.arange(steps, dtype=torch.float32, device=device) / steps


def few_step_tokens(student, z: torch.Tensor, steps: int, noise: NoiseFn, s_min: float = 0.05) -> torch.Tensor:
    """Token latents (N, C) from a few-step flow student (`DiffLossFlow` over a distilled DiffLoss net) on
    conditions z (N, Z): x = (1 - s_0) noise; per step s_j of `student_grid`, x1 = x + (1 - s_j) v, re-noised to
    s_{j+1} (the consistency sampler); the last x1 is the token. CFG is distilled into the student."""
    C, n = student.channels, z.shape[0]
    grid = student_grid(steps, s_min, z.device)
    x = (1 - grid[0]) * noise((n, C)).to(z.device)
    for j in range(steps):
        s = grid[j].expand(n)
        x1 = x + (1 - s)[:, None] * student(x, s, z)
        if j + 1 < steps:
            x = grid[j + 1] * x1 + (1 - grid[j + 1]) * noise((n, C)).to(z.device)
    return x1


@torch.no_grad()
def mar_generate(model, labels: torch.Tensor | None, orders: torch.Tensor, proc: SpacedCosine, noise: NoiseFn,
                 num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                 temperature: float = 1.0, student=None, student_steps: int = 4, s_min: float = 0.05) -> torch.Tensor:
    """Token latents (B, L, C) of B images (labels (B,) or None: unconditional) in `num_iter` steps. With a
    `student` (few-step head, CFG distilled in) the tokens of each step come from `few_step_tokens` and cfg must
    be 1 (no unconditional rows are run)."""
    if student is not None and cfg != 1.0:
        raise ValueError(f"cfg={cfg}: a distilled student has its guidance built in; sample it with cfg=1")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={cfg_schedule!r}: choose one of {CFG_SCHEDULES}")
    B, L = orders.shape
    if not 1 <= num_iter <= L:
        raise ValueError(f"num_iter={num_iter}: must be in [1, seq_len = {L}]")
    dev = orders.device
    mask = torch.ones(B, L, device=dev)
    tokens = torch.zeros(B, L, model.cfg.token_dim, device=dev)
    emb = model.class_embedding(labels, B)
    guided = cfg != 1.0
    if guided:
        emb = torch.cat([emb, model.class_embedding(None, B)])
    for step in range(num_iter):
        x, m = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
        z = model(x, m, emb)  # (B or 2B, L, Dd)
        mask_len = torch.tensor([math.floor(L * math.cos(math.pi / 2 * (step + 1) / num_iter))], dtype=torch.float32)
        mask_len = torch.clamp(torch.minimum(mask[0].sum() - 1, mask_len.to(dev)), min=1)
        nxt = torch.zeros(B, L, device=dev).scatter(1, orders[:, : int(mask_len)], 1.0)
        pred = mask.bool() if step == num_iter - 1 else mask.bool() ^ nxt.bool()
        mask = nxt
        scale = 1 + (cfg - 1) * (L - mask_len) / L if cfg_schedule == "linear" else torch.tensor([cfg], device=dev)
        zs = z[torch.cat([pred, pred])] if guided else z[pred]
        tokens = tokens.clone()
        if student is not None:
            tokens[pred] = few_step_tokens(student, zs, student_steps, noise, s_min)
        else:
            tokens[pred] = sample_tokens(model.diffloss.net, zs, proc, noise, temperature, scale if guided else 1.0)
    return tokens
