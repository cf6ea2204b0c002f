"""Does the draft's entropy say when its tokens will be rejected? Fig. 6 and the early-stop threshold tau.

Teacher-forced on committed sequences (the target's own samples), for every image token i >= 1:
- e_i: the draft's shallow-layer entropy at the position that decides whether token i is drafted (the draft has
  just read token i-1; sampling/speculative.py stops drafting when e_i < tau);
- a_i: the acceptance probability min(1, P/Q) of a draft of token i (draft chain under the draft's condition,
  exact rule against the target's chain), as fidelity.py measures it;
- the target's entropy at the corresponding layer (rules.align_layer), for the draft-vs-target histogram (Fig. 6).

tau from Eq. 10 (0.3 mean - 0.1 std of e) is one rule. `calibrate_tau` is another, beyond the paper: the tau that
maximises sum over drafted tokens of (a_i - c), c the cost of one drafted token in target rounds (draft_policy.py):
a token is worth drafting when its acceptance pays for it. If e and a are unrelated, the best tau is one of the
extremes: -inf (draft everything, when the mean acceptance beats c) or +inf (draft nothing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling.acceptance import exact_log_ratio
from ..sampling.common import ARFlow
from ..sampling.flow import sample_tokens
from .fidelity import _field, _teacher_forced


@dataclass
class EntropyStudy:
    draft_entropy: torch.Tensor  # (R,) e_i, conditional rows, tokens 1..N-1
    target_entropy: torch.Tensor  # (R,) the target's entropy at the same positions (its align layer)
    alpha: torch.Tensor  # (R,) acceptance probability of a draft of that token

    def eq10_tau(self) -> float:
        e = self.draft_entropy.double()
        return float(0.3 * e.mean() - 0.1 * e.std())

    def summary(self, tau: float) -> dict:
        """What early stop at `tau` does: drafts kept, their mean acceptance and that of the dropped ones."""
        keep = self.draft_entropy >= tau
        mean = lambda m: float(self.alpha[m].mean()) if bool(m.any()) else None  # noqa: E731
        return {"tau": tau, "kept": float(keep.float().mean()), "alpha_kept": mean(keep), "alpha_dropped": mean(~keep)}


@torch.no_grad()
def entropy_study(target: ARFlow, draft: ARFlow, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor,
                  target_layer: int, seed: int = 0) -> EntropyStudy:
    """Per-token draft entropy, target entropy and acceptance for committed tokens (B,N,D) of prompts ids/mask."""
    if target.cfg.batch_mult != draft.cfg.batch_mult or target.sampler != draft.sampler:
        raise ValueError("draft and target flows need the same sampler and CFG mode")
    B, N, D = tokens.shape
    if N < 2:
        raise ValueError("the study needs at least two image tokens (token 0 is never drafted)")
    dtype = torch.float32
    z_p, ent_t = _teacher_forced(target, ids, mask, tokens, explicit_layer=target_layer)
    z_q, ent_d = _teacher_forced(draft, ids, mask, tokens, target)
    if ent_d is None:
        raise ValueError("the draft reports no shallow-layer entropy: build it with model.draft.shallow_layer set")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(B * N, draft.sampler.steps + 1, D, generator=gen, dtype=dtype).to(tokens.device)
    q_traj = sample_tokens(_field(draft, z_q.to(dtype), B, N, dtype), draft.sampler, noise)
    log_r = exact_log_ratio(_field(target, z_p.to(dtype), B, N, dtype), target.sampler, q_traj)
    alpha = torch.exp(torch.clamp(log_r, max=0.0)).reshape(B, N)
    return EntropyStudy(ent_d[:B, 1:].reshape(-1).float().cpu(), ent_t[:B, 1:].reshape(-1).float().cpu(),
                        alpha[:, 1:].reshape(-1).float().cpu())


def calibrate_tau(study: EntropyStudy, cost: float) -> float:
    """The tau maximising sum_{e_i >= tau} (a_i - cost) over the study's tokens (ties: the lowest such tau)."""
    e, gain = study.draft_entropy.double(), study.alpha.double() - cost
    order = torch.argsort(e, descending=True)
    kept_gain = torch.cumsum(gain[order], 0)  # keep the k highest-entropy tokens: tau = their lowest entropy
    best = int(torch.argmax(kept_gain))
    if float(kept_gain[best]) <= 0.0:
        return float("inf")  # no tau makes drafting pay: draft nothing
    if best == len(order) - 1:
        return float("-inf")  # every token pays on average down to the lowest entropy: never stop early
    return float(e[order[best]])


__all__ = ["EntropyStudy", "calibrate_tau", "entropy_study"]
