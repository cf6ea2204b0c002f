"""Speculative decoding of continuous tokens with entropy early stop (DESIGN.md §4, Fast-ARDiff Alg. 1).

A round drafts up to gamma tokens with the draft AR, verifies them in one target pass and commits what the
acceptance rule keeps (spec_core.py has the round's shared steps):
- `exact` (spec_exact.py): min(1, P/Q) on whole trajectories and residual resampling: exactly target-distributed;
- `relaxed` (spec_exact.py): min(1, (P/Q)^(1/T)), T > 1: faster, NOT target-distributed;
- `cspd` (spec_lossy.py): the paper's Algorithm 1 as CSpD's code runs it (shared noise, last-step ratio, inner
  temperature, token pre-filling): NOT target-distributed, quality kept by measurement;
- `feature` (spec_lossy.py): Drift-AR's condition-distance test, no head call in verification: NOT
  target-distributed either.

How many tokens a sample may draft per round is `gamma`, or with policy='adaptive' the number that pays given
its acceptance so far (draft_policy.py; a function of finished rounds only, so exactness holds).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .common import ARFlow, DecodeStats, GenerationResult
from .draft_policy import DraftPolicy, choose_gamma, draft_cost_ratio
from .spec_core import ACCEPT_RULES, Ctx, SpecConfig, State, check_pair, draft, draft_budget, start, verify
from .spec_exact import round_exact
from .spec_lossy import round_lossy


def _round(ctx: Ctx, st: State) -> None:
    active = st.n < ctx.num_tokens
    chosen = choose_gamma(ctx.policy, ctx.spec.gamma, st.accepted, st.drafted)
    ctx.stats.policy_skips += int((active & (chosen == 0)).sum()) if ctx.spec.drafts else 0
    dr = draft(ctx, st, active, draft_budget(ctx, st, active, chosen))
    tstep = verify(ctx, st, dr)
    (round_lossy if ctx.spec.lossy else round_exact)(ctx, st, dr, tstep, active)
    ctx.stats.rounds += 1


def _static(flow: ARFlow) -> bool:
    """A compiled model (static KV cache): give it the same shapes every round."""
    return flow.chain is not None


@torch.no_grad()
def speculative_generate(target: ARFlow, draft: ARFlow, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         num_tokens: int, generators: Sequence[torch.Generator], spec: SpecConfig = SpecConfig(),
                         progress: bool = False) -> GenerationResult:
    """Speculative decoding of `num_tokens` image tokens per prompt; exactly target-distributed for accept='exact'.

    input_ids / attention_mask: (B or 2B, T) left-padded prompts ending in <boi>; rows [B,2B) are the unconditional
    prompts, needed when either model uses two-pass CFG (a model with mode 'distilled'/'none' reads rows [0,B)).
    generators: B per-sample generators. Returns tokens (B,N,D) and DecodeStats.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens}: generate at least one image token")
    policy = DraftPolicy()
    if spec.drafts:
        check_pair(target, draft, spec)
        if spec.policy == "adaptive":
            cost = spec.draft_cost or draft_cost_ratio(target, draft)
            policy = DraftPolicy("adaptive", cost, probe_drafts=spec.probe_drafts)
    ctx = Ctx(target, draft, spec, generators, num_tokens, torch.float32, DecodeStats(), policy,
              static=_static(target))
    st = start(ctx, input_ids, attention_mask)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(generators) * num_tokens, desc="image tokens", leave=False)
    while bool((st.n < num_tokens).any()):
        before = int(st.n.sum())
        _round(ctx, st)
        if bar is not None:
            bar.update(int(st.n.sum()) - before)
    if bar is not None:
        bar.close()
    ctx.stats.tokens = len(generators) * num_tokens
    return GenerationResult(st.out, ctx.stats)


__all__ = ["ACCEPT_RULES", "SpecConfig", "check_pair", "speculative_generate"]
