"""Test doubles: analytic reference models for the samplers and for exactness checks of speculative decoding.

`GaussianFlowHead`: the exact velocity of rectified flow towards data N(mu, s^2 I), with mu given by the condition:
x_t = t x + (1-t) eps ~ N(t mu, sigma_t^2 I), sigma_t^2 = t^2 s^2 + (1-t)^2, and
v(x_t, t) = E[x - eps | x_t] = mu + (t s^2 - (1 - t)) / sigma_t^2 * (x_t - t mu).
v is affine in mu, so CFG on velocity equals the field of mu_u + w (mu_c - mu_u): a "CFG-distilled" analytic
student (guidance input, no unconditional pass) is exact too.

`ToyAR`: a deterministic causal "AR" over continuous tokens following the AR protocol of the real models
(new_cache / prefill / decode, per-row lengths, rollback). Its head condition after history (prompt, x_1..x_j) is
cond = prompt_vec + prev_coef * tanh(x_j) + mean_coef * mean(x_1..x_j) + bias; a draft is the same toy with a
different `bias` (its proposals are off by a known shift). With `entropy_gain` it also reports an "entropy" in
[0,1] at each image position, sigmoid(gain * x_j[0]), standing in for the draft's shallow-layer attention entropy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class GaussianFlowHead:
    """head(x (N,D), t (N,), cond (N,>=D), guidance (N,) | None) -> exact v (N,D) for data N(cond[:, :D], s^2)."""

    def __init__(self, token_dim: int, data_std: float = 1.0, uncond_mean: float = 0.0):
        self.token_dim, self.data_std, self.uncond_mean = token_dim, float(data_std), float(uncond_mean)

    def __call__(self, x, t, cond, guidance=None):
        mu = cond[:, : self.token_dim].to(x.dtype)
        if guidance is not None:  # analytic CFG-distilled student: mu_u + w (mu_c - mu_u)
            mu = self.uncond_mean + guidance.to(x.dtype)[:, None] * (mu - self.uncond_mean)
        t = t.to(x.dtype)[:, None]
        s2 = self.data_std**2
        var_t = t**2 * s2 + (1 - t) ** 2
        return mu + (t * s2 - (1 - t)) / var_t * (x - t * mu)


@dataclass
class ToyCache:
    tokens: torch.Tensor  # (B, max_len, D): image tokens at their slots (prompt slots stay zero)
    prompt: torch.Tensor  # (B, D) prompt vector
    lengths: torch.Tensor  # (B,) slots written (prompt + image tokens)
    start: torch.Tensor  # (B,) first slot of the image tokens (= prompt length)

    def rollback(self, new_lengths: torch.Tensor) -> None:
        new_lengths = new_lengths.to(self.lengths)
        if bool((new_lengths > self.lengths).any()) or bool((new_lengths < self.start).any()):
            raise ValueError("rollback may only shorten rows, and not into the prompt")
        self.lengths = new_lengths.clone()


@dataclass
class ToyStep:
    cond: torch.Tensor  # (B,T,C)
    hidden: torch.Tensor  # (B,T,C)
    entropy: torch.Tensor | None = None  # (B,T)


class ToyAR:
    def __init__(self, token_dim: int = 2, vocab_size: int = 16, prompt_scale: float = 1.0, prev_coef: float = 0.5,
                 mean_coef: float = 0.3, bias: float | torch.Tensor = 0.0, entropy_gain: float | None = None,
                 seed: int = 0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.embed = prompt_scale * torch.randn(vocab_size, token_dim, generator=g, dtype=dtype)
        self.embed[0] = 0.0  # id 0 is the empty / unconditional prompt token
        self.token_dim, self.prev_coef, self.mean_coef = token_dim, prev_coef, mean_coef
        self.bias = torch.as_tensor(bias, dtype=dtype).expand(token_dim).clone()
        self.entropy_gain, self.dtype = entropy_gain, dtype
        self.forward_calls = 0

    def new_cache(self, batch_size: int, max_len: int, device=None) -> ToyCache:
        z = lambda: torch.zeros(batch_size, dtype=torch.long, device=device)  # noqa: E731
        return ToyCache(torch.zeros(batch_size, max_len, self.token_dim, dtype=self.dtype, device=device),
                        torch.zeros(batch_size, self.token_dim, dtype=self.dtype, device=device), z(), z())

    def _cond(self, prompt, last, mean):
        return prompt + self.prev_coef * torch.tanh(last) + self.mean_coef * mean + self.bias.to(last.device)

    def _entropy(self, last):
        return None if self.entropy_gain is None else torch.sigmoid(self.entropy_gain * last[..., 0])

    def prefill(self, input_ids, attention_mask, cache: ToyCache) -> ToyStep:
        if bool((cache.lengths != 0).any()):
            raise ValueError("prefill expects an empty cache")
        self.forward_calls += 1
        B, T = input_ids.shape
        emb = self.embed.to(input_ids.device)[input_ids] * attention_mask[..., None].to(self.dtype)
        prompts = emb.cumsum(1)  # (B,T,D): cond at position j sees the prompt up to j
        cache.prompt = prompts[:, -1].clone()
        cache.lengths = torch.full((B,), T, dtype=torch.long, device=input_ids.device)
        cache.start = cache.lengths.clone()
        zero = torch.zeros_like(prompts)
        cond = self._cond(prompts, zero, zero)
        ent = None if self.entropy_gain is None else torch.full((B, T), 0.5, dtype=self.dtype, device=emb.device)
        return ToyStep(cond, cond, ent)

    def decode(self, tokens, cache: ToyCache) -> ToyStep:
        """Append tokens (B,T,D) at each row's length; cond[:, j] conditions the token after tokens[:, j]."""
        self.forward_calls += 1
        B, T, D = tokens.shape
        if int(cache.lengths.max()) + T > cache.tokens.shape[1]:
            raise ValueError("toy cache overflow: build it with a larger max_len")
        rows = torch.arange(B, device=tokens.device)[:, None]
        slots = cache.lengths[:, None] + torch.arange(T, device=tokens.device)[None]
        cache.tokens[rows, slots] = tokens.to(self.dtype)
        pos = torch.arange(cache.tokens.shape[1], device=tokens.device)[None]
        conds = []
        for j in range(T):  # mean over this row's image tokens up to and including slot slots[:, j]
            valid = (pos >= cache.start[:, None]) & (pos <= slots[:, j : j + 1])
            mean = (cache.tokens * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
            conds.append(self._cond(cache.prompt, tokens[:, j].to(self.dtype), mean))
        cache.lengths = cache.lengths + T
        cond = torch.stack(conds, 1)
        return ToyStep(cond, cond, self._entropy(tokens.to(self.dtype)))


MAR_SMALL = ["model.enc_dim=32", "model.dec_dim=32", "model.enc_depth=1", "model.dec_depth=1", "model.diffloss_w=32",
             "model.diffloss_d=1"]


def tiny_mar_export(folder, overrides=(), jitter: float = 0.0, seed: int = 0):
    """A MAR export (config.json + model.safetensors) of the mar-tiny preset at MAR_SMALL + `overrides`, with MAR's
    init plus N(0, jitter^2) on every weight (jitter > 0: a non-trivial head; adaLN-zero alone gives eps = 0).
    Returns (folder, its C2IConfig)."""
    import torch

    from fastardiff_ds.config.c2i import resolve_c2i_config
    from fastardiff_ds.models.mar import MAR
    from fastardiff_ds.models.mar_checkpoint import save_mar_export

    cfg = resolve_c2i_config("mar-tiny", overrides=[*MAR_SMALL, *overrides])
    torch.manual_seed(seed)
    mar = MAR(cfg.model)
    mar.init_weights()
    if jitter:
        with torch.no_grad():
            for p in mar.parameters():
                p.add_(jitter * torch.randn_like(p))
    save_mar_export(folder, cfg, mar.state_dict(), meta={"stage": "test"})
    return folder, cfg
