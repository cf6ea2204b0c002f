"""What every speculative round shares, whatever its acceptance rule: config, state, drafting, verification, commit.

One round, per sample (batched, every sample keeps its own accepted length):
1. `draft`: the draft AR reads the last committed tokens; while its shallow-layer entropy at the newest position is
   >= tau and fewer than gamma tokens are drafted, it samples the next token with its own head chain (trajectory
   kept) and reads it. Entropy below tau stops drafting for that sample (tau = +inf: never drafts, -inf: never stops).
2. `verify`: the target AR reads [last committed token, drafts] in ONE decode pass: gamma+1 conditions.
3. The rule (spec_exact.py: exact / relaxed; spec_lossy.py: cspd / feature) decides what is committed.
4. `commit`: the committed tokens are appended and the KV caches of both models are rolled back per sample.

Early stop deviates from a literal reading of Alg. 1 (which drops the token x_i whose own position has low
entropy): that drop depends on x_i's value, which would make the drafted tokens' law differ from Q and break
exactness. Here the entropy at x_i's position only decides whether x_{i+1} is drafted -- a function of the
prefix, which keeps the output exactly target-distributed under the exact rule.

A feature-level (EAGLE-style) draft also reads, with each token, the hidden state that conditioned it: the target's
for committed tokens (from the prefill and the verification passes, kept in `State.feat`), its own for the tokens
it drafts. The draft is still a function of the prefix, so exactness is untouched.

Cache bookkeeping: the target cache holds prompt + committed[:-1] (the newest token is fed with the drafts); the
draft cache is rolled back to prompt + committed[:-2] and re-reads the 2-token window [committed[-2],
committed[-1]], so a sample whose last draft was never read by the draft (all accepted) needs no extra pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..models.ar import draft_features
from .common import ARFlow, DecodeStats, ar_rows, chain_dtype, make_field, prompt_rows, sample_rows
from .draft_policy import POLICIES, DraftPolicy
from .flow import require_density

ACCEPT_RULES = ("exact", "relaxed", "cspd", "feature")
LOSSY_RULES = ("cspd", "feature")  # committed by spec_lossy.py; NOT target-distributed
FEATURE_METRICS = ("l2", "cosine")
COMMITS = ("draft", "target")


@dataclass(frozen=True)
class SpecConfig:
    gamma: int = 4  # most tokens drafted per round
    tau: float = float("-inf")  # entropy threshold (Fast-ARDiff Eq. 10; stored in the checkpoint)
    # exact: lossless | relaxed: min(1, (P/Q)^(1/T)) | cspd: CSpD's last-step rule, the paper's Alg. 1 |
    # feature: Drift-AR's condition distance. Only exact is target-distributed.
    accept: str = "exact"
    relax_temperature: float = 1.0  # relaxed only: T > 1
    cspd_inner_temperature: float = 1.0  # cspd only: CSpD's T_in (42 in their code)
    max_resample_tries: int = 100  # residual acceptance-rejection tries before the target's own sample is used
    policy: str = "fixed"  # fixed (gamma every round) | adaptive (the gamma that pays, per sample; draft_policy.py)
    draft_cost: float = 0.0  # adaptive: cost of a drafted token in target rounds; 0 = estimate from parameters
    probe_drafts: int = 4  # adaptive: drafts per sample measured before it may stop drafting
    prefill_ratio: float = 0.0  # CSpD's token pre-filling: the first ratio*N tokens come from the target alone
    cspd_independent: bool = False  # cspd: each draft accepted on its own (CSpD's code) instead of truncating
    feature_threshold: float = 0.1  # feature: keep a draft while d(target cond, draft cond) <= this
    feature_metric: str = "l2"  # feature: l2 (Drift-AR) | cosine (1 - cos)
    commit: str = "draft"  # cspd / feature: at an accepted position commit the draft's token or the target's

    def __post_init__(self):
        if self.gamma < 0 or self.max_resample_tries < 1:
            raise ValueError("SpecConfig: gamma must be >= 0 and max_resample_tries >= 1")
        _choice("accept", self.accept, ACCEPT_RULES)
        _choice("feature_metric", self.feature_metric, FEATURE_METRICS)
        _choice("commit", self.commit, COMMITS)
        if self.accept == "relaxed" and not self.relax_temperature > 1.0:
            raise ValueError(f"SpecConfig.relax_temperature={self.relax_temperature} (config key "
                             "inference.relax_temperature): the relaxed rule needs T > 1 (T = 1 is accept=exact)")
        if self.accept != "relaxed" and self.relax_temperature != 1.0:
            raise ValueError(f"SpecConfig.relax_temperature={self.relax_temperature} with accept={self.accept!r}: "
                             "only accept=relaxed reads it (inference.accept=relaxed), exact is exact")
        if self.cspd_inner_temperature <= 0 or self.feature_threshold < 0:
            raise ValueError("SpecConfig: cspd_inner_temperature must be > 0 (inference.cspd_inner_temperature) and "
                             "feature_threshold >= 0 (inference.feature_threshold)")
        if not 0.0 <= self.prefill_ratio < 1.0:
            raise ValueError(f"SpecConfig.prefill_ratio={self.prefill_ratio} (config key inference.prefill_ratio) "
                             "must lie in [0, 1)")
        if self.policy not in POLICIES or self.draft_cost < 0:
            raise ValueError(f"SpecConfig.policy={self.policy!r} (config key inference.draft_policy): choose one of "
                             f"{POLICIES}; draft_cost (inference.draft_cost) must be >= 0")
        if math.isnan(self.tau):
            raise ValueError("SpecConfig.tau is NaN: use a number, +inf (never draft) or -inf (never stop early)")

    @property
    def drafts(self) -> bool:
        return self.gamma > 0 and self.tau != float("inf")

    @property
    def lossy(self) -> bool:
        return self.accept in LOSSY_RULES


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"SpecConfig.{key}={value!r} (config key inference.{key}): choose one of {options}")


def check_pair(target: ARFlow, draft: ARFlow, spec: SpecConfig) -> None:
    """Raise unless draft and target can be compared by the rule (same tokens; densities where the rule needs them)."""
    if target.token_dim != draft.token_dim or target.token_layernorm != draft.token_layernorm:
        raise ValueError("draft and target must emit the same tokens (token_dim and token_layernorm must match)")
    if spec.accept != "feature":  # the feature rule compares conditions, never densities
        require_density(target.sampler, "speculative decoding (target sampler)")
        require_density(draft.sampler, "speculative decoding (draft sampler)")
        if target.sampler.steps != draft.sampler.steps:
            raise ValueError(f"draft sampler has {draft.sampler.steps} steps, target {target.sampler.steps}: a "
                             "trajectory only has a density ratio between chains of the same length (a draft "
                             "chain of its own length, inference.draft_steps, needs inference.accept=feature)")
    if reads_features(draft) and draft.cfg.batch_mult > target.cfg.batch_mult:
        raise ValueError("a feature-level draft (model.draft.kind=eagle) with two-pass CFG needs the target's "
                         "unconditional hidden states: run the target with two-pass CFG too")


def reads_features(flow: ARFlow) -> bool:
    return bool(getattr(flow.ar, "reads_features", False))


@dataclass
class Ctx:
    target: ARFlow
    draft: ARFlow
    spec: SpecConfig
    gens: Sequence[torch.Generator]
    num_tokens: int
    dtype: torch.dtype
    stats: DecodeStats
    policy: DraftPolicy = DraftPolicy()  # fixed gamma unless speculative_generate sets an adaptive one
    static: bool = False  # compiled models: pad the verification pass to gamma+1 positions (one graph; the pad
    # follows the drafts, so under causal attention it changes no verified position)


@dataclass
class State:
    out: torch.Tensor  # (B,N,D) committed tokens
    n: torch.Tensor  # (B,) committed count
    tcache: object
    dcache: object
    t_base: torch.Tensor  # (B,) cache length after the prompt
    d_base: torch.Tensor
    accepted: torch.Tensor  # (B,) drafts accepted so far (the adaptive policy's evidence)
    drafted: torch.Tensor  # (B,) drafts verified so far
    first_round: bool = True
    feat: torch.Tensor | None = None  # (B*m_d,N,H) feature-level draft: target hidden state that conditioned token i


@dataclass
class Drafts:
    g: torch.Tensor  # (B,) tokens drafted per sample
    states: torch.Tensor  # (B,G,K+1,D) draft trajectories (zero where j >= g)
    means: torch.Tensor  # (B,G,K,D)
    conds: torch.Tensor  # (B*m_d,G,C) draft condition of each drafted token (for the residual's Q)


def gather_cond(cond: torch.Tensor, B: int, mult: int, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """cond (B*mult, T, C) at pairs (b, j) (R,) -> (R*mult, C) laid out as [conditional rows; unconditional rows]."""
    return torch.cat([cond[h * B + b, j] for h in range(mult)])


def pair_field(ctx: Ctx, model: ARFlow, cond: torch.Tensor, n: torch.Tensor, b: torch.Tensor, j: torch.Tensor,
               counter):
    """Guided field of the R tokens at (sample b, round position j); cond (B*m, T, C); n (B,) committed counts."""
    flat = gather_cond(cond, n.shape[0], model.cfg.batch_mult, b, j)
    rows = torch.arange(b.shape[0], device=b.device)
    return make_field(model, flat, n[b] + j, ctx.num_tokens, rows, counter, ctx.dtype)


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    out = torch.zeros((B, *x.shape[1:]), dtype=x.dtype, device=x.device)
    out[rows] = x
    return out


def scatter_pairs(x: torch.Tensor, b: torch.Tensor, j: torch.Tensor, B: int, G: int) -> torch.Tensor:
    out = torch.zeros((B, G, *x.shape[1:]), dtype=x.dtype, device=x.device)
    out[b, j] = x
    return out


def _entropy_ok(ctx: Ctx, step, B: int) -> torch.Tensor:
    """(B,) True where the draft's entropy at the newest position is >= tau (conditional rows of a CFG pair)."""
    tau = ctx.spec.tau
    if tau == float("-inf"):
        return torch.ones(B, dtype=torch.bool, device=step.cond.device)
    if step.entropy is None:
        raise ValueError(f"SpecConfig.tau={tau} needs the draft's shallow-layer entropy, but the draft AR returned "
                         "none: build it with an entropy (shallow) layer, or set tau=-inf to disable early stop")
    return step.entropy[:B, -1] >= tau


def draft_rows(ctx: Ctx, x: torch.Tensor) -> torch.Tensor:
    """Target AR-batch rows (B*m_t, ...) -> the draft's (B*m_d, ...) (m_d <= m_t, `check_pair`)."""
    return x[: x.shape[0] // ctx.target.cfg.batch_mult * ctx.draft.cfg.batch_mult]


def _draft_window(ctx: Ctx, st: State):
    """Roll the draft back to prompt + committed[:-2] and read [committed[-2], committed[-1]]."""
    B, m = st.n.shape[0], ctx.draft.cfg.batch_mult
    w = 1 if st.first_round else 2
    rows = torch.arange(B, device=st.n.device)[:, None]
    cols = st.n[:, None] - w + torch.arange(w, device=st.n.device)[None]
    st.dcache.rollback(ar_rows(st.d_base + st.n - w, m))
    ctx.stats.draft_forwards += 1
    kw = {}
    if st.feat is not None:
        kw["feats"] = st.feat[torch.arange(B * m, device=st.n.device)[:, None], ar_rows(cols, m)]
    return ctx.draft.ar.decode(ar_rows(st.out[rows, cols], m), st.dcache, **kw)


def draft(ctx: Ctx, st: State, active: torch.Tensor, gmax: torch.Tensor) -> Drafts:
    """Step 1: up to gmax (B,) tokens per sample from the draft, stopping on low entropy."""
    B, dev, m = st.n.shape[0], st.n.device, ctx.draft.cfg.batch_mult
    g = torch.zeros(B, dtype=torch.long, device=dev)
    states, means, conds = [], [], []
    sessions = active & (gmax > 0)
    # else no sample drafts again: skip its window, unless samples will draft after a pre-filled prefix (the draft
    # reads the target's tokens there, one per round, so its cache stays one window behind)
    if ctx.spec.drafts and bool((sessions | (active & prefilled(ctx, st))).any()):
        step = _draft_window(ctx, st)
        ok = _entropy_ok(ctx, step, B)
        ctx.stats.draft_sessions += int(sessions.sum())
        ctx.stats.early_stops += int((sessions & ~ok).sum())
        drafting = sessions & ok
        while bool(drafting.any()):
            rows, cond = torch.nonzero(drafting).flatten(), step.cond[:, -1]
            fld = make_field(ctx.draft, cond, st.n + g, ctx.num_tokens, rows, ctx.stats.draft_head, ctx.dtype)
            traj = sample_rows(ctx.draft, fld, ctx.gens, rows, drafting, ctx.dtype)
            states.append(scatter_rows(traj.states, rows, B))
            means.append(scatter_rows(traj.means, rows, B))
            conds.append(cond)
            g = g + drafting.long()
            cont = drafting & (g < gmax)
            if not bool(cont.any()):
                break
            feats = {"feats": step.hidden[:, -1:]} if st.feat is not None else {}  # its own: conditioned the token
            step = ctx.draft.ar.decode(ar_rows(ctx.draft.finalize(states[-1][:, None, -1]), m), st.dcache, **feats)
            ctx.stats.draft_forwards += 1
            ok = _entropy_ok(ctx, step, B)
            ctx.stats.early_stops += int((cont & ~ok).sum())
            drafting = cont & ok
    if not states:
        K, D = ctx.draft.sampler.steps, ctx.draft.token_dim
        empty = torch.zeros(B, 0, K + 1, D, device=dev, dtype=ctx.dtype)
        return Drafts(g, empty, empty[:, :, 1:], torch.zeros(B * m, 0, 1, device=dev, dtype=ctx.dtype))
    return Drafts(g, torch.stack(states, 1), torch.stack(means, 1), torch.stack(conds, 1))


def verify(ctx: Ctx, st: State, dr: Drafts):
    """Step 2: the target reads [newest committed token, drafts] in one pass -> ARStep, cond (B*m_t, 1+G, C).
    With ctx.static a pass that verifies drafts always reads 1 + gamma positions (zeros after the drafts; rolled back
    at commit), so a compiled target replays one of two graphs (1 or 1 + gamma tokens) whatever the round drafted."""
    B = st.n.shape[0]
    pending = st.out[torch.arange(B, device=st.n.device), st.n - 1][:, None]
    drafts = ctx.target.finalize(dr.states[:, :, -1])
    pad = ctx.spec.gamma - drafts.shape[1] if ctx.static and drafts.shape[1] else 0  # no drafts: a plain decode
    if pad > 0:
        drafts = torch.cat([drafts, drafts.new_zeros(B, pad, drafts.shape[-1])], 1)
    ctx.stats.target_forwards += 1
    return ctx.target.ar.decode(ar_rows(torch.cat([pending, drafts], 1), ctx.target.cfg.batch_mult), st.tcache)


def commit(ctx: Ctx, st: State, tokens: torch.Tensor, c: torch.Tensor, accepted: torch.Tensor, dr: Drafts,
           active: torch.Tensor, t_hidden=None) -> None:
    """Append tokens[b, :c_b] (finalized, (B, >=c, D)) per active sample; roll the target cache back to
    prompt + committed[:-1]. accepted (B,): drafts the rule accepted (stats, adaptive policy).
    t_hidden (B*m_t, 1+G, H): the verification pass's hidden states, kept for a feature-level draft."""
    if st.feat is not None:  # position j of the pass conditioned committed token n + j, for j < c
        m = ctx.draft.cfg.batch_mult
        hid = draft_rows(ctx, t_hidden)
        for j in range(int(c.max())):
            rows = torch.nonzero(ar_rows(active & (j < c), m)).flatten()
            st.feat[rows, ar_rows(st.n, m)[rows] + j] = hid[rows, j].to(st.feat.dtype)
    for j in range(int(c[active].max()) if bool(active.any()) else 0):
        rows = torch.nonzero(active & (j < c)).flatten()
        st.out[rows, st.n[rows] + j] = tokens[rows, j].to(st.out.dtype)
    st.n = st.n + torch.where(active, c, torch.zeros_like(c))
    st.tcache.rollback(ar_rows(st.t_base + st.n - 1, ctx.target.cfg.batch_mult))
    st.first_round = False
    st.accepted = st.accepted + torch.where(active, accepted, torch.zeros_like(accepted))
    st.drafted = st.drafted + torch.where(active, dr.g, torch.zeros_like(dr.g))
    ctx.stats.drafted += int(dr.g[active].sum())
    ctx.stats.accepted += int(accepted[active].sum())
    ctx.stats.accepted_lengths.extend((c[active] - 1).tolist())


def draft_budget(ctx: Ctx, st: State, active: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Most drafts per sample this round (B,): the policy's choice, the room left, and the pre-filled prefix."""
    gmax = torch.clamp(torch.minimum(chosen, ctx.num_tokens - st.n - 1), min=0)
    return torch.where(active & ~prefilled(ctx, st), gmax, torch.zeros_like(gmax))


def prefilled(ctx: Ctx, st: State) -> torch.Tensor:
    """(B,) samples still in CSpD's token pre-filling: their first ceil(ratio*N) tokens come from the target alone."""
    return st.n < math.ceil(ctx.spec.prefill_ratio * ctx.num_tokens)


def target_sample(ctx: Ctx, st: State, tcond: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                  mask: torch.Tensor):
    """The target's own chains (R,...) for samples `rows` at round position pos[rows], fresh noise -> (field, traj)."""
    fld = pair_field(ctx, ctx.target, tcond, st.n, rows, pos[rows], ctx.stats.target_head)
    return fld, sample_rows(ctx.target, fld, ctx.gens, rows, mask, ctx.dtype)


def start(ctx: Ctx, ids, mask) -> State:
    """Prefill both models and sample token 0 from the target (the draft needs one committed token to start)."""
    B, N, dev = len(ctx.gens), ctx.num_tokens, ids.device
    max_len = ids.shape[1] + N + ctx.spec.gamma + 2
    t_ids, t_mask = prompt_rows(ids, mask, B, ctx.target.cfg.batch_mult)
    tcache = ctx.target.ar.new_cache(t_ids.shape[0], max_len)
    tstep = ctx.target.ar.prefill(t_ids, t_mask, tcache)
    tcond = tstep.cond[:, -1:]  # (B*m_t, 1, C)
    ctx.stats.target_forwards += 1
    ctx.dtype = chain_dtype(tcond)
    dcache = feat = None
    if ctx.spec.drafts:
        d_ids, d_mask = prompt_rows(ids, mask, B, ctx.draft.cfg.batch_mult)
        dcache = ctx.draft.ar.new_cache(d_ids.shape[0], max_len)
        kw = {}
        if reads_features(ctx.draft):  # the target's prompt states, shifted; then the one that conditions token 0
            hid = draft_rows(ctx, tstep.hidden)
            kw["feats"] = draft_features(hid, d_mask.bool())
            feat = torch.zeros(hid.shape[0], N, hid.shape[-1], device=dev, dtype=hid.dtype)
            feat[:, 0] = hid[:, -1]
        ctx.draft.ar.prefill(d_ids, d_mask, dcache, **kw)
        ctx.stats.draft_forwards += 1
    out = torch.zeros(B, N, ctx.target.token_dim, device=dev, dtype=ctx.dtype)
    zeros = lambda: torch.zeros(B, dtype=torch.long, device=dev)  # noqa: E731 -- one tensor per counter, no aliasing
    st = State(out, zeros(), tcache, dcache, tcache.lengths[:B].clone(),
               None if dcache is None else dcache.lengths[:B].clone(), zeros(), zeros(), feat=feat)
    everyone = torch.ones(B, dtype=torch.bool, device=dev)
    _, traj = target_sample(ctx, st, tcond, torch.zeros(B, dtype=torch.long, device=dev), torch.arange(B, device=dev),
                            everyone)
    st.out[:, 0] = ctx.target.finalize(traj.token)
    st.n = st.n + 1
    return st
