"""Flow-matching head: MAR / NextStep-1 SimpleMLPAdaLN predicting velocity.

Time convention (NextStep-1, used everywhere in this package): t = 1 is data, t = 0 is noise,
x_t = t * x + (1 - t) * eps, and the head predicts v = x - eps. Key names match NextStep-1's `image_head.net.*`
(`time_embed.mlp.{0,2}`, `cond_embed`, `input_proj`, `res_blocks.{j}.{in_ln,mlp,adaLN_modulation}`, `final_layer`).
A CFG-distilled student adds `guidance_embed` (same sinusoidal MLP as time) so the fast path needs no uncond pass.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config.schema import HeadConfig, StudentHeadConfig


TOKEN_NORM_EPS = 1e-6  # NextStep-1 pipeline `layer_norm(..., eps=1e-6)` (also vLLM-Omni's NextStep-1.1)


def token_layernorm(x: torch.Tensor) -> torch.Tensor:
    """NextStep-1 `use_norm`: the sampled token (..., D) normalised over D, no affine, eps 1e-6.

    The official pipelines apply `F.layer_norm(token, token.shape[1:], None, None, 1e-6)` to each sampled token
    before it is emitted and fed back (`pipeline_nextstep.py: decoding`); torch's default eps (1e-5) differs.
    """
    return torch.nn.functional.layer_norm(x, x.shape[-1:], None, None, TOKEN_NORM_EPS)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal(256) -> Linear -> SiLU -> Linear, as in DiT / MAR / NextStep-1 (t fed in [0, 1])."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        inner = int(width * mlp_ratio)
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, inner), nn.SiLU(), nn.Linear(inner, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        return self.modulated(x, self.adaLN_modulation(y))

    def modulated(self, x, mod):
        """x (N,W) with this block's adaLN output mod = adaLN_modulation(y) (N,3W) computed beforehand."""
        shift, scale, gate = mod.chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        return self.modulated(x, self.adaLN_modulation(y))

    def modulated(self, x, mod):
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """out_dim: token_dim (a velocity, NextStep) by default; MAR's DiffLoss net predicts eps and a learned-sigma
    interpolant, 2 * token_dim (sampling/diffloss.py)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, mlp_ratio: float,
                 out_dim: int | None = None):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList([ResBlock(width, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_dim or token_dim)
        self.reset_parameters()

    def reset_parameters(self):
        if self.input_proj.weight.dim() != 2:  # not materialised (built partitioned, e.g. under zero.Init)
            return  # the weights are loaded from a checkpoint afterwards
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.res_blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for m in zero:  # adaLN-zero: every block starts as the identity, the output as 0
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, cond, extra=None):
        y = self.time_embed(t) + self.cond_embed(cond)
        if extra is not None:
            y = y + extra
        return self.modulated(x, self.modulations(y))

    def modulations(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Every adaLN output for conditioning y (..., W): [(..., 3W) per block, (..., 2W) final layer].

        They depend on (t, cond, guidance) only, not on the state x, so a sampler that knows its time grid can
        compute them for all K steps of a token at once (fastardiff_ds/sampling/fast_chain.py)."""
        return [b.adaLN_modulation(y) for b in self.res_blocks] + [self.final_layer.adaLN_modulation(y)]

    def modulated(self, x: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        """The state-dependent part of the forward: x (N,D) with precomputed `modulations` (each (N, *))."""
        return self.final_layer.modulated(self.trunk(x, mods), mods[-1])

    def trunk(self, x: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        """The features (N,W) the final layer reads: input projection and every residual block."""
        h = self.input_proj(x)
        for block, mod in zip(self.res_blocks, mods):
            h = block.modulated(h, mod)
        return h


class FlowHead(nn.Module):
    """v = head(x (N,D), t (N,), cond (N,C), guidance (N,) | None) -> (N,D)."""

    def __init__(self, cfg: HeadConfig, token_dim: int, cond_dim: int, guidance_embed: bool = False,
                 discriminator: bool = False):
        """guidance_embed: the CFG-distilled student's guidance-scale input (the teacher has none).
        discriminator: a GAN classifier on the trunk's features (`discriminate`; DMD2's head on the fake score's
        bottleneck), for the fake-score network of a run with train.gan_weight > 0."""
        super().__init__()
        self.token_dim, self.cond_dim = token_dim, cond_dim
        self.net = SimpleMLPAdaLN(token_dim, cond_dim, cfg.width, cfg.depth, cfg.mlp_ratio)
        self.guidance_embed = TimestepEmbedder(cfg.width) if guidance_embed else None
        if self.guidance_embed is not None and self.guidance_embed.mlp[2].weight.dim() == 2:
            nn.init.zeros_(self.guidance_embed.mlp[2].weight)  # starts as the teacher: no guidance signal
            nn.init.zeros_(self.guidance_embed.mlp[2].bias)
        w = cfg.width
        self.cls_head = (nn.Sequential(nn.LayerNorm(w, eps=1e-6), nn.Linear(w, w), nn.SiLU(), nn.Linear(w, 1))
                         if discriminator else None)
        if self.cls_head is not None and self.cls_head[1].weight.dim() == 2:
            nn.init.zeros_(self.cls_head[-1].weight)  # logit 0 for every input: D(x) = 1/2 at the start
            nn.init.zeros_(self.cls_head[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: torch.Tensor | None = None):
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        extra = self._guidance(guidance, x.shape[0])
        dtype = self.net.input_proj.weight.dtype
        return self.net(x.to(dtype), t.to(dtype), cond.to(dtype), extra)

    def discriminate(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """GAN logits (N,) of noised tokens x (N,D) at times t (N,) given cond (N,C): the classifier on the trunk's
        features (the same trunk that predicts the fake score's velocity). Only on a head built with
        discriminator=True."""
        if self.cls_head is None:
            raise ValueError("this head has no GAN classifier: build it with discriminator=True (train.gan_weight > 0)")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        dtype = self.net.input_proj.weight.dtype
        y = self.net.time_embed(t.to(dtype)) + self.net.cond_embed(cond.to(dtype))
        h = self.net.trunk(x.to(dtype), self.net.modulations(y))
        return self.cls_head(h).squeeze(-1).float()

    def _guidance(self, guidance: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if self.guidance_embed is None:
            return None
        if guidance is None:
            raise ValueError("this head was built with guidance_embed=True: pass the CFG scale as `guidance`")
        return self.guidance_embed(guidance.expand(n) if guidance.dim() == 0 else guidance)

    def chain_modulations(self, t_grid: torch.Tensor, cond: torch.Tensor,
                          guidance: torch.Tensor | None = None) -> list[torch.Tensor]:
        """adaLN outputs of N tokens at every step of a time grid: t_grid (K,), cond (N,C), guidance (N,) | None
        -> list of (K, N, *) tensors, one per block + the final layer. Equal to what K `forward` calls compute."""
        dtype = self.net.input_proj.weight.dtype
        y = self.net.time_embed(t_grid.to(dtype))[:, None] + self.net.cond_embed(cond.to(dtype))[None]  # (K,N,W)
        extra = self._guidance(guidance, cond.shape[0])
        if extra is not None:
            y = y + extra[None]
        return self.net.modulations(y)

    def modulated(self, x: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        """v (N,D) at states x (N,D) given one step's `chain_modulations` (each (N, *))."""
        return self.net.modulated(x.to(self.net.input_proj.weight.dtype), mods)


def student_head_config(head: HeadConfig, student: StudentHeadConfig) -> HeadConfig:
    """The student head's size: the teacher head's, grown where `model.student_head` says so."""
    return HeadConfig(width=head.width, depth=head.depth if student.depth is None else student.depth,
                      mlp_ratio=head.mlp_ratio if student.mlp_ratio is None else student.mlp_ratio)


def grow_state(teacher: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict for a head at least as large as the teacher's (same width) that computes the teacher's function.

    `fresh` is the larger head's own initialisation. Tensors of equal shape are the teacher's. The MLPs' extra
    hidden units keep their fresh input weights and get zero output weights, so they add nothing until trained.
    Blocks the teacher lacks keep their fresh init: adaLN-zero, the identity. Keys only in `fresh` (the guidance
    embedding, zero-initialised) stay fresh. Raises ValueError on a key or shape the teacher cannot grow into."""
    out = dict(fresh)
    for key, t in teacher.items():
        if key not in fresh:
            raise ValueError(f"student head init: the teacher head's '{key}' has no place in the student head")
        f = fresh[key]
        if f.shape == t.shape:
            out[key] = t.clone()
            continue
        if f.dim() != t.dim() or any(a < b for a, b in zip(f.shape, t.shape)):
            raise ValueError(f"student head init: '{key}' is {tuple(f.shape)} in the student, {tuple(t.shape)} in "
                             "the teacher; a student head can only grow (model.student_head)")
        grown = f.clone()
        if key.endswith("mlp.2.weight"):  # (W, inner): extra hidden units feed nothing
            grown.zero_()
        grown[tuple(slice(0, n) for n in t.shape)] = t
        out[key] = grown
    return out
