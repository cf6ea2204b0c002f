"""How close must the draft's features be for its tokens to be accepted? (teacher-forced acceptance study)

For committed sequences from the target's own distribution, both ARs read the same prefixes in one teacher-forced
pass each, giving the draft's and the target's condition z_q, z_p for every image token. For a mix lam in [0, 1]
the draft condition is replaced by z_lam = (1 - lam) z_q + lam z_p (lam = 0: the trained draft; lam = 1: a perfect
one), a trajectory is drawn from the head chain under z_lam, and the acceptance rule is evaluated against the
target's chain under z_p. The per-token acceptance probability alpha = E min(1, P/Q) is what one drafted token of
speculative decoding sees; with gamma drafts and i.i.d. acceptance a round commits (1 - alpha^(gamma+1)) / (1 - alpha)
tokens. The cosine between z_lam and z_p says which feature fidelity buys which alpha.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sampling.acceptance import cspd_log_ratio, exact_log_ratio
from ..sampling.common import ARFlow, prompt_rows
from ..sampling.flow import sample_tokens
from ..sampling.guidance import HeadCounter, VelocityField, guidance_scale


@dataclass
class FidelityPoint:
    mix: float
    cosine: float  # mean cosine(z_lam, z_p) over tokens (conditional rows)
    rel_error: float  # mean ||z_lam - z_p|| / ||z_p||
    alpha: dict  # rule -> mean min(1, P/Q)

    def tokens_per_round(self, gamma: int) -> dict:
        return {r: (gamma + 1.0 if a >= 1.0 else (1.0 - a ** (gamma + 1)) / (1.0 - a)) for r, a in self.alpha.items()}


def teacher_forced_conditions(flow: ARFlow, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor,
                              target: ARFlow | None = None) -> torch.Tensor:
    """Conditions (B*m, N, C) of N committed tokens (B,N,D): token 0's from the prompt, token i's after token i-1.
    A feature-level draft reads the `target`'s hidden states of the same prefixes (as at the first drafted token
    of a round; deeper drafts read the draft's own, so this is its best case)."""
    return _teacher_forced(flow, ids, mask, tokens, target)[0]


def _teacher_forced(flow, ids, mask, tokens, target=None, explicit_layer=None):
    """A KV-cached pass over prompt + tokens[:-1], as inference reads them: (conditions (B*m,N,C), entropy (B*m,N)
    of `explicit_layer` (default: the AR's own, a draft's shallow layer) or None)."""
    B, N, _ = tokens.shape
    m = flow.cfg.batch_mult
    ids, mask = prompt_rows(ids, mask, B, m)
    kw = {} if explicit_layer is None else {"explicit_layer": explicit_layer}
    feats = None
    if getattr(flow.ar, "reads_features", False):
        if target is None:
            raise ValueError("a feature-level draft (model.draft.kind=eagle) reads the target's hidden states: "
                             "pass the target flow")
        feats = target.ar.forward_train(ids, mask, torch.cat([tokens] * m), draft_feats=True).draft_feats
    cache = flow.ar.new_cache(B * m, ids.shape[1] + N)
    P = ids.shape[1]
    first = flow.ar.prefill(ids, mask, cache, **kw, **({} if feats is None else {"feats": feats[:, :P]}))
    ent = lambda *steps: None if steps[0].entropy is None else torch.cat([s.entropy for s in steps], 1)  # noqa: E731
    if N == 1:
        return first.cond[:, -1:], ent(first)[:, -1:] if first.entropy is not None else None
    rest = flow.ar.decode(torch.cat([tokens[:, :-1]] * m), cache, **kw,
                          **({} if feats is None else {"feats": feats[:, P:]}))
    e = ent(first, rest)
    return torch.cat([first.cond[:, -1:], rest.cond], 1), None if e is None else e[:, P - 1:]


def _field(flow: ARFlow, cond: torch.Tensor, B: int, N: int, dtype) -> VelocityField:
    """The guided field of all B*N tokens from conditions (B*m, N, C)."""
    m, C = flow.cfg.batch_mult, cond.shape[-1]
    rows = cond.reshape(m, B * N, C).to(dtype)
    idx = torch.arange(N, device=cond.device).repeat(B)
    scale = guidance_scale(flow.cfg, idx, N).to(dtype) if flow.cfg.mode != "none" else None
    return VelocityField(flow.head, rows[0], flow.cfg, scale, rows[1] if m == 2 else None, HeadCounter())


@torch.no_grad()
def acceptance_vs_fidelity(target: ARFlow, draft: ARFlow, ids: torch.Tensor, mask: torch.Tensor,
                           tokens: torch.Tensor, mixes=(0.0, 0.5, 0.9, 1.0), rules=("exact",),
                           cspd_inner_temperature: float = 1.0, seed: int = 0) -> list[FidelityPoint]:
    """alpha per mix and rule for the committed tokens (B,N,D) of prompts ids/mask (rows as in generate_ar)."""
    if target.cfg.batch_mult != draft.cfg.batch_mult or target.sampler != draft.sampler:
        raise ValueError("the study compares one head chain under two conditions: draft and target flows need the "
                         "same sampler and CFG mode")
    B, N, D = tokens.shape
    dtype = torch.float32
    z_p = teacher_forced_conditions(target, ids, mask, tokens).to(dtype)
    z_q = teacher_forced_conditions(draft, ids, mask, tokens, target).to(dtype)
    p_field = _field(target, z_p, B, N, dtype)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(B * N, target.sampler.steps + 1, D, generator=gen, dtype=dtype).to(tokens.device)
    points = []
    for lam in mixes:
        z = (1.0 - lam) * z_q + lam * z_p
        q_traj = sample_tokens(_field(draft, z, B, N, dtype), draft.sampler, noise)
        alpha = {}
        for rule in rules:
            if rule == "exact":
                log_r = exact_log_ratio(p_field, target.sampler, q_traj)
            elif rule == "cspd":
                log_r = cspd_log_ratio(p_field, target.sampler, q_traj, cspd_inner_temperature)[0]
            else:
                raise ValueError(f"unknown acceptance rule {rule!r}: use exact or cspd")
            alpha[rule] = float(torch.exp(torch.clamp(log_r, max=0.0)).mean())
        zc, pc = z[:B], z_p[:B]
        points.append(FidelityPoint(float(lam), float(F.cosine_similarity(zc, pc, dim=-1).mean()),
                                    float(((zc - pc).norm(dim=-1) / pc.norm(dim=-1).clamp_min(1e-12)).mean()), alpha))
    return points


__all__ = ["FidelityPoint", "acceptance_vs_fidelity", "teacher_forced_conditions"]
