"""How many tokens each sample drafts next round: a fixed gamma, or the number that pays (adaptive).

Leviathan et al. 2023 (§3.5): with per-token acceptance alpha and a drafted token costing c target rounds, a round
with gamma drafts commits (1 - alpha^(gamma+1)) / (1 - alpha) tokens for gamma*c + 1 of cost, so drafting pays only
where that ratio beats the target alone (gamma = 0). `adaptive` estimates alpha per sample from its own earlier rounds
(Beta(prior) posterior mean) after `probe_drafts` measured drafts, and picks the best gamma in [0, gamma_max].

Exactness is untouched: gamma is a function of rounds already finished, never of the values about to be drafted,
and every round emits target-distributed tokens whatever its length. Once a sample's best gamma is 0 it stays 0
(its estimate only moves when it drafts), so the sample is retired: the draft stops reading its tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

POLICIES = ("fixed", "adaptive")


@dataclass(frozen=True)
class DraftPolicy:
    kind: str = "fixed"  # fixed | adaptive
    draft_cost: float = 0.0  # c: one drafted token (draft AR + draft head + its verification) / one target round
    prior_accept: float = 0.5  # Beta prior mean of the acceptance rate ...
    prior_weight: float = 2.0  # ... and its weight in pseudo-drafts
    probe_drafts: int = 4  # drafts per sample measured before the adaptive policy may stop drafting

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"DraftPolicy.kind={self.kind!r}: choose one of {POLICIES}")
        if self.kind == "adaptive" and self.draft_cost <= 0:
            raise ValueError("DraftPolicy(kind='adaptive') needs draft_cost > 0 (estimate it with draft_cost_ratio)")
        if not 0.0 < self.prior_accept < 1.0 or self.prior_weight <= 0 or self.probe_drafts < 0:
            raise ValueError("DraftPolicy: prior_accept in (0, 1), prior_weight > 0 and probe_drafts >= 0")


def expected_speedup(alpha: torch.Tensor, gamma: torch.Tensor, cost: float) -> torch.Tensor:
    """Leviathan et al. Eq. (speedup of a round): (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)), alpha < 1."""
    alpha = alpha.clamp(max=1.0 - 1e-6)
    return (1.0 - alpha ** (gamma + 1)) / ((1.0 - alpha) * (gamma * cost + 1.0))


def choose_gamma(policy: DraftPolicy, gamma_max: int, accepted: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
    """Drafts per sample (B,) for the next round from its accepted / drafted counts so far (B,)."""
    full = torch.full_like(drafted, gamma_max)
    if policy.kind == "fixed" or gamma_max == 0:
        return full
    a = (accepted.double() + policy.prior_accept * policy.prior_weight) / (drafted.double() + policy.prior_weight)
    gammas = torch.arange(gamma_max + 1, device=drafted.device, dtype=torch.float64)
    gain = expected_speedup(a[:, None], gammas[None], policy.draft_cost)  # (B, gamma_max+1)
    best = gain.argmax(1)  # ties -> the smaller gamma
    probing = drafted < policy.probe_drafts
    return torch.where(probing, torch.clamp(best, min=1), best)


def _flops_params(module) -> int:
    """Parameters that cost FLOPs per token (embedding tables are lookups); 0 for non-modules."""
    if not isinstance(module, torch.nn.Module):
        return 0
    return sum(p.numel() for n, p in module.named_parameters() if "embed_tokens" not in n)


def draft_cost_ratio(target, draft) -> float:
    """c from parameter counts: per drafted token the draft AR + the draft head's K steps + the target head's K
    verification evaluations, over one target round (AR + K head steps), each x its CFG batch multiple.
    `target` / `draft` are ARFlow bundles. Compute-bound estimate: on a GPU at batch 1 small forwards cost more."""
    mt, md = target.cfg.batch_mult, draft.cfg.batch_mult
    kt, kd = target.sampler.steps, draft.sampler.steps
    head_t, head_d = _flops_params(target.head), _flops_params(draft.head)
    round_cost = mt * (_flops_params(target.ar) + kt * head_t)
    draft_cost = md * (_flops_params(draft.ar) + kd * head_d) + mt * kt * head_t
    if round_cost <= 0:
        raise ValueError("cannot estimate the draft cost from parameters (not torch modules): set draft_cost")
    return draft_cost / round_cost
