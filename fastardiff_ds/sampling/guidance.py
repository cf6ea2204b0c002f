"""Classifier-free guidance on the head's velocity, and the guided velocity field a sampler integrates.

CFG (NextStep-1 `FlowMatchingHead.sample`): v = v_u + w (v_c - v_u), both branches evaluated at the same x.
Per-token scale schedules over the image-token index n = 0..N-1, as the official NextStep pipelines apply them:
`constant` (w = scale); `linear` (NextStep-1 `pipeline_nextstep.py` and vLLM-Omni's NextStep-1.1 pipeline:
w_n = 1 + (scale - 1) (N - n) / N, i.e. full `scale` at the first token, falling to 1 + (scale - 1)/N at the last);
`linear-rising` (the NextStep-1.1 `inference/gen_pipeline.py` of stepfun-ai/NextStep-1:
w_n = max(scale / 2, 1 + (scale - 1) n / N), rising from max(scale/2, 1) to nearly `scale`).
Modes: `two_pass` -- the AR batch is doubled (rows [0,B) conditional, [B,2B) unconditional prompt) and the head
runs on both conditions; `distilled` -- a CFG-distilled student head takes w as its `guidance` input and needs no
unconditional AR pass (DESIGN.md §3); `none` -- plain conditional sampling (scale must be 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODES = ("two_pass", "distilled", "none")
SCHEDULES = ("constant", "linear", "linear-rising")


@dataclass(frozen=True)
class CFGConfig:
    scale: float = 1.0
    schedule: str = "constant"  # constant | linear | linear-rising
    mode: str = "two_pass"  # two_pass | distilled | none

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"CFGConfig.mode={self.mode!r}: choose one of {MODES}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"CFGConfig.schedule={self.schedule!r}: choose one of {SCHEDULES}")
        if self.mode == "none" and self.scale != 1.0:
            raise ValueError(f"CFGConfig(mode='none') samples without guidance, but scale={self.scale}; "
                             "use mode='two_pass' (teacher) or 'distilled' (student with a guidance embedding)")

    @property
    def batch_mult(self) -> int:
        """AR rows per sample: 2 when the unconditional prompt runs through the AR too."""
        return 2 if self.mode == "two_pass" else 1


def guidance_scale(cfg: CFGConfig, token_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-token CFG scale w (N,) for image-token positions `token_index` (N,) of an N_img = `num_tokens` image."""
    if cfg.schedule == "constant":
        return torch.full(token_index.shape, float(cfg.scale), device=token_index.device)
    n, N = token_index.double(), max(int(num_tokens), 1)
    if cfg.schedule == "linear":  # official `cfg_iter = 1 + (cfg - 1) * (max_new_len - tokens_len) / max_new_len`
        return (1.0 + (cfg.scale - 1.0) * (N - n) / N).float()
    rising = 1.0 + (cfg.scale - 1.0) * n / N  # gen_pipeline: `max(cfg / 2, 1 + (cfg - 1) * tokens_len / max_new_len)`
    return torch.clamp(rising, min=cfg.scale / 2.0).float()


@dataclass
class HeadCounter:
    """Head forward calls (one batched call each, a two-pass CFG call counts once) and token rows evaluated."""

    calls: int = 0
    rows: int = 0


@dataclass
class VelocityField:
    """The guided velocity v(x, t) of a batch of N tokens: a (head, cond, cfg, scale) bundle.

    head: `head(x (N,D), t (N,), cond (N,C), guidance (N,) | None) -> (N,D)`; cond (N,C); uncond (N,C) for
    `two_pass`; scale (N,) per-token CFG scale w.
    """

    head: object
    cond: torch.Tensor
    cfg: CFGConfig = field(default_factory=lambda: CFGConfig(mode="none"))
    scale: torch.Tensor | None = None
    uncond: torch.Tensor | None = None
    counter: HeadCounter | None = None

    def __post_init__(self):
        if self.cfg.mode == "two_pass" and self.uncond is None:
            raise ValueError("CFG mode 'two_pass' needs the unconditional condition `uncond` (N,C) "
                             "(the AR's rows [B,2B)); for a CFG-distilled student use mode='distilled'")
        if self.cfg.mode != "none" and self.scale is None:
            raise ValueError(f"CFG mode {self.cfg.mode!r} needs the per-token scale (N,): see guidance_scale()")

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """v (N,D) at states x (N,D) and times t (scalar or (N,))."""
        n = x.shape[0]
        tt = torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(n)
        if self.counter is not None:
            self.counter.calls += 1
            self.counter.rows += n * self.cfg.batch_mult
        if self.cfg.mode == "none":
            return self.head(x, tt, self.cond).to(x.dtype)
        w = self.scale.to(x.dtype)
        if self.cfg.mode == "distilled":
            return self.head(x, tt, self.cond, w).to(x.dtype)
        v = self.head(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([self.cond, self.uncond])).to(x.dtype)
        v_c, v_u = v[:n], v[n:]
        return v_u + w[:, None] * (v_c - v_u)

    def select(self, rows: torch.Tensor) -> "VelocityField":
        """The field of a subset of the tokens (same counter)."""
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return VelocityField(self.head, self.cond[rows], self.cfg, pick(self.scale), pick(self.uncond), self.counter)

    def repeat_interleave(self, k: int) -> "VelocityField":
        """The field of every token repeated k times in place (row i -> rows i*k .. i*k+k-1)."""
        rep = lambda a: None if a is None else a.repeat_interleave(k, dim=0)  # noqa: E731
        return VelocityField(self.head, rep(self.cond), self.cfg, rep(self.scale), rep(self.uncond), self.counter)
