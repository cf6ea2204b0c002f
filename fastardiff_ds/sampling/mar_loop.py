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


@torch.no_grad()
def mar_generate(model, labels: torch.Tensor | None, orders: torch.Tensor, proc: SpacedCosine, noise: NoiseFn,
                 num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                 temperature: float = 1.0) -> torch.Tensor:
    """Token latents (B, L, C) of B images (labels (B,) or None: unconditional) in `num_iter` steps."""
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
        tokens[pred] = sample_tokens(model.diffloss.net, zs, proc, noise, temperature, scale if guided else 1.0)
    return tokens
