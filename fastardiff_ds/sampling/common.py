"""What the AR loops share: a model bundle (AR + head + how to sample), CFG row bookkeeping, per-sample chains, stats.

AR protocol (fastardiff_ds/models/ar.py): `ar.new_cache(batch, max_len)`, `ar.prefill(ids, mask, cache)`,
`ar.decode(tokens (B,T,D), cache)` -> step with `cond` (B,T,C) and `entropy` (B,T) | None; `cache.lengths` (B,) and
`cache.rollback(lengths)`. With two-pass CFG an AR batch holds 2B rows: [0,B) conditional, [B,2B) unconditional,
and both rows of a pair always receive the same image tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..models.flow_head import token_layernorm
from .flow import SamplerConfig, Trajectory, sample_tokens
from .guidance import CFGConfig, HeadCounter, VelocityField, guidance_scale
from .noise import randn


@dataclass
class ARFlow:
    """An AR + flow head and how to sample from them (the target, the draft, or the baseline generator)."""

    ar: object
    head: object
    sampler: SamplerConfig
    cfg: CFGConfig = field(default_factory=lambda: CFGConfig(mode="none"))
    token_layernorm: bool = False  # NextStep-1 `use_norm`: the emitted (and fed-back) token is layer_norm(x_K)
    chain: object = None  # runs a head chain in place of flow.sample_tokens (compiled.HeadChain); None = eager

    @property
    def token_dim(self) -> int:
        for obj in (self.head, self.ar):
            if hasattr(obj, "token_dim"):
                return int(obj.token_dim)
        raise ValueError("cannot tell the token dimension: give the head or the AR a `token_dim` attribute")

    def finalize(self, x: torch.Tensor) -> torch.Tensor:
        """The token emitted and fed back to the AR from a chain's last state (..., D)."""
        return token_layernorm(x) if self.token_layernorm else x


def ar_rows(x: torch.Tensor, mult: int) -> torch.Tensor:
    """Per-sample tensor (B, ...) -> AR-batch tensor (B*mult, ...): both CFG rows of a pair get the same value."""
    return torch.cat([x] * mult) if mult > 1 else x


def prompt_rows(ids: torch.Tensor, mask: torch.Tensor, batch: int, mult: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch*mult rows of a (B or 2B, T) prompt batch: [0,B) conditional, [B,2B) unconditional."""
    if ids.shape[0] not in (batch, 2 * batch):
        raise ValueError(f"prompt batch has {ids.shape[0]} rows for {batch} generators: pass one seeded generator "
                         "per sample and B (or 2B with the unconditional prompts as rows [B,2B)) prompt rows")
    if ids.shape[0] < batch * mult:
        raise ValueError(f"prompt batch has {ids.shape[0]} rows but this model needs {batch * mult} "
                         f"({batch} samples x {mult}); for two-pass CFG append the unconditional (empty) prompts "
                         "as rows [B, 2B)")
    return ids[: batch * mult], mask[: batch * mult]


def make_field(model: ARFlow, cond: torch.Tensor, token_index: torch.Tensor, num_tokens: int,
               rows: torch.Tensor, counter: HeadCounter, dtype) -> VelocityField:
    """Guided velocity field of the samples `rows` (R,). cond: (B*mult, C) AR conditions; token_index (B,)."""
    B = token_index.shape[0]
    cond_c = cond[:B][rows].to(dtype)
    uncond = cond[B: 2 * B][rows].to(dtype) if model.cfg.mode == "two_pass" else None
    scale = guidance_scale(model.cfg, token_index[rows], num_tokens).to(dtype) if model.cfg.mode != "none" else None
    return VelocityField(model.head, cond_c, model.cfg, scale, uncond, counter)


def sample_rows(model: ARFlow, fld: VelocityField, gens, rows: torch.Tensor, active: torch.Tensor,
                dtype) -> Trajectory:
    """One chain per sample in `rows` (R,), its noise (K+1, D) drawn from that sample's own generator."""
    K, D = model.sampler.steps, model.token_dim
    noise = randn(gens, (K + 1, D), device=active.device, dtype=dtype, active=active)[rows]
    return (model.chain or sample_tokens)(fld, model.sampler, noise)


def chain_dtype(cond: torch.Tensor) -> torch.dtype:
    """Chains run in float32 at least (bf16 log-densities of 64-d tokens are too coarse to compare)."""
    return torch.float64 if cond.dtype == torch.float64 else torch.float32


@dataclass
class DecodeStats:
    target_forwards: int = 0
    draft_forwards: int = 0
    target_head: HeadCounter = field(default_factory=HeadCounter)
    draft_head: HeadCounter = field(default_factory=HeadCounter)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_sessions: int = 0  # (sample, round) pairs that could draft (room left, not finished)
    early_stops: int = 0  # ... of which drafting ended on the entropy threshold
    policy_skips: int = 0  # (sample, round) pairs the adaptive draft policy left to the target alone
    resampled: int = 0  # first rejections resampled from the residual
    resample_tries: int = 0
    fallbacks: int = 0  # residual sampling ran out of tries: the target's own sample was used
    tokens: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # drafts accepted per (sample, round)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def early_stop_rate(self) -> float:
        return self.early_stops / self.draft_sessions if self.draft_sessions else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per (sample, round) = accepted drafts + the one token the target adds."""
        n = len(self.accepted_lengths)
        return (sum(self.accepted_lengths) + n) / n if n else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("accepted_lengths")
        d.update(acceptance_rate=self.acceptance_rate, early_stop_rate=self.early_stop_rate,
                 mean_accepted_length=self.mean_accepted_length)
        return d


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, N, D)
    stats: DecodeStats
