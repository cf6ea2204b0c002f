"""Exact speculative decoding of continuous tokens with entropy early stop (DESIGN.md §4, Fast-ARDiff Alg. 1).

One round, per sample (batched, every sample keeps its own accepted length):
1. The draft AR reads the last committed tokens; while its shallow-layer entropy at the newest position is >= tau
   and fewer than gamma tokens are drafted, it samples the next token with its own head chain (trajectory kept)
   and reads it. Entropy below tau stops drafting for that sample (tau = +inf: never drafts, -inf: never stops).
2. The target AR reads [last committed token, drafts] in ONE decode pass: gamma+1 conditions.
3. Each drafted trajectory is accepted with min(1, P/Q) (acceptance.py); at the first rejection the token is
   drawn from the residual max(0, P - Q) by acceptance-rejection, later drafts are dropped; if everything was
   accepted the target adds one token of its own. KV caches of both models are rolled back per sample.

How many tokens a sample may draft per round is `gamma`, or with policy='adaptive' the number that pays given
its acceptance so far (draft_policy.py; a function of finished rounds only, so exactness holds).

Early stop deviates from a literal reading of Alg. 1 (which drops the token x_i whose own position has low
entropy): that drop depends on x_i's value, which would make the drafted tokens' law differ from Q and break
exactness. Here the entropy at x_i's position only decides whether x_{i+1} is drafted -- a function of the
prefix, which keeps the output exactly target-distributed.

A feature-level (EAGLE-style) draft also reads, with each token, the hidden state that conditioned it: the target's
for committed tokens (from the prefill and the verification passes, kept in `_State.feat`), its own for the tokens
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

from .acceptance import cspd_log_ratio, cspd_residual_logs, exact_log_ratio, residual_accept_prob
from .common import ARFlow, DecodeStats, GenerationResult, ar_rows, chain_dtype, make_field, prompt_rows, sample_rows
from ..models.ar import draft_features
from .draft_policy import POLICIES, DraftPolicy, choose_gamma, draft_cost_ratio
from .flow import Trajectory as _Trajectory
from .flow import gaussian_chain_logprob, require_density, trajectory_logprob, transition_stds
from .noise import rand, rand_varlen, randn

ACCEPT_RULES = ("exact", "cspd")


@dataclass(frozen=True)
class SpecConfig:
    gamma: int = 4  # most tokens drafted per round
    tau: float = float("-inf")  # entropy threshold (Fast-ARDiff Eq. 10; stored in the checkpoint)
    accept: str = "exact"  # exact (lossless) | cspd (CSpD's last-step rule, not lossless)
    relax_temperature: float = 1.0  # exact only: min(1, (P/Q)^(1/T)); T > 1 is faster and NOT lossless
    cspd_inner_temperature: float = 1.0  # CSpD's T_in (42 in their code); != 1 is not lossless either
    max_resample_tries: int = 100  # residual acceptance-rejection tries before the target's own sample is used
    policy: str = "fixed"  # fixed (gamma every round) | adaptive (the gamma that pays, per sample; draft_policy.py)
    draft_cost: float = 0.0  # adaptive: cost of a drafted token in target rounds; 0 = estimate from parameters
    probe_drafts: int = 4  # adaptive: drafts per sample measured before it may stop drafting

    def __post_init__(self):
        if self.gamma < 0 or self.max_resample_tries < 1:
            raise ValueError("SpecConfig: gamma must be >= 0 and max_resample_tries >= 1")
        if self.accept not in ACCEPT_RULES:
            raise ValueError(f"SpecConfig.accept={self.accept!r} (config key inference.accept): choose one of "
                             f"{ACCEPT_RULES}")
        if self.relax_temperature < 1.0 or self.cspd_inner_temperature <= 0:
            raise ValueError("SpecConfig: relax_temperature must be >= 1 (1 = exact) and cspd_inner_temperature > 0")
        if self.policy not in POLICIES or self.draft_cost < 0:
            raise ValueError(f"SpecConfig.policy={self.policy!r} (config key inference.draft_policy): choose one of "
                             f"{POLICIES}; draft_cost (inference.draft_cost) must be >= 0")
        if math.isnan(self.tau):
            raise ValueError("SpecConfig.tau is NaN: use a number, +inf (never draft) or -inf (never stop early)")

    @property
    def drafts(self) -> bool:
        return self.gamma > 0 and self.tau != float("inf")


def check_pair(target: ARFlow, draft: ARFlow, spec: SpecConfig) -> None:
    """Raise unless the draft and target chains have comparable trajectory densities."""
    if target.token_dim != draft.token_dim or target.token_layernorm != draft.token_layernorm:
        raise ValueError("draft and target must emit the same tokens (token_dim and token_layernorm must match)")
    require_density(target.sampler, "speculative decoding (target sampler)")
    require_density(draft.sampler, "speculative decoding (draft sampler)")
    if target.sampler.steps != draft.sampler.steps:
        raise ValueError(f"draft sampler has {draft.sampler.steps} steps, target {target.sampler.steps}: a "
                         "trajectory only has a density ratio between chains of the same length")
    if _reads_features(draft) and draft.cfg.batch_mult > target.cfg.batch_mult:
        raise ValueError("a feature-level draft (model.draft.kind=eagle) with two-pass CFG needs the target's "
                         "unconditional hidden states: run the target with two-pass CFG too")


def _reads_features(flow: ARFlow) -> bool:
    return bool(getattr(flow.ar, "reads_features", False))


@dataclass
class _Ctx:
    target: ARFlow
    draft: ARFlow
    spec: SpecConfig
    gens: Sequence[torch.Generator]
    num_tokens: int
    dtype: torch.dtype
    stats: DecodeStats
    policy: DraftPolicy = DraftPolicy()  # fixed gamma unless speculative_generate sets an adaptive one


@dataclass
class _State:
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
class _Drafts:
    g: torch.Tensor  # (B,) tokens drafted per sample
    states: torch.Tensor  # (B,G,K+1,D) draft trajectories (zero where j >= g)
    means: torch.Tensor  # (B,G,K,D)
    conds: torch.Tensor  # (B*m_d,G,C) draft condition of each drafted token (for the residual's Q)


def gather_cond(cond: torch.Tensor, B: int, mult: int, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """cond (B*mult, T, C) at pairs (b, j) (R,) -> (R*mult, C) laid out as [conditional rows; unconditional rows]."""
    return torch.cat([cond[h * B + b, j] for h in range(mult)])


def _pair_field(ctx: _Ctx, model: ARFlow, cond: torch.Tensor, n: torch.Tensor, b: torch.Tensor, j: torch.Tensor,
                counter):
    """Guided field of the R tokens at (sample b, round position j); cond (B*m, T, C); n (B,) committed counts."""
    flat = gather_cond(cond, n.shape[0], model.cfg.batch_mult, b, j)
    rows = torch.arange(b.shape[0], device=b.device)
    return make_field(model, flat, n[b] + j, ctx.num_tokens, rows, counter, ctx.dtype)


def _entropy_ok(ctx: _Ctx, step, B: int) -> torch.Tensor:
    """(B,) True where the draft's entropy at the newest position is >= tau (conditional rows of a CFG pair)."""
    tau = ctx.spec.tau
    if tau == float("-inf"):
        return torch.ones(B, dtype=torch.bool, device=step.cond.device)
    if step.entropy is None:
        raise ValueError(f"SpecConfig.tau={tau} needs the draft's shallow-layer entropy, but the draft AR returned "
                         "none: build it with an entropy (shallow) layer, or set tau=-inf to disable early stop")
    return step.entropy[:B, -1] >= tau


def _draft_rows(ctx: _Ctx, x: torch.Tensor) -> torch.Tensor:
    """Target AR-batch rows (B*m_t, ...) -> the draft's (B*m_d, ...) (m_d <= m_t, `check_pair`)."""
    return x[: x.shape[0] // ctx.target.cfg.batch_mult * ctx.draft.cfg.batch_mult]


def _draft_window(ctx: _Ctx, st: _State):
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


def _draft(ctx: _Ctx, st: _State, active: torch.Tensor, gmax: torch.Tensor) -> _Drafts:
    """Step 1: up to gmax (B,) tokens per sample from the draft, stopping on low entropy."""
    B, dev, m = st.n.shape[0], st.n.device, ctx.draft.cfg.batch_mult
    g = torch.zeros(B, dtype=torch.long, device=dev)
    states, means, conds = [], [], []
    sessions = active & (gmax > 0)
    if ctx.spec.drafts and bool(sessions.any()):  # else no sample drafts again: skip its window
        step = _draft_window(ctx, st)
        ok = _entropy_ok(ctx, step, B)
        ctx.stats.draft_sessions += int(sessions.sum())
        ctx.stats.early_stops += int((sessions & ~ok).sum())
        drafting = sessions & ok
        while bool(drafting.any()):
            rows, cond = torch.nonzero(drafting).flatten(), step.cond[:, -1]
            fld = make_field(ctx.draft, cond, st.n + g, ctx.num_tokens, rows, ctx.stats.draft_head, ctx.dtype)
            traj = sample_rows(ctx.draft, fld, ctx.gens, rows, drafting, ctx.dtype)
            states.append(_scatter(traj.states, rows, B))
            means.append(_scatter(traj.means, rows, B))
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
        return _Drafts(g, empty, empty[:, :, 1:], torch.zeros(B * m, 0, 1, device=dev, dtype=ctx.dtype))
    return _Drafts(g, torch.stack(states, 1), torch.stack(means, 1), torch.stack(conds, 1))


def _scatter(x: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    out = torch.zeros((B, *x.shape[1:]), dtype=x.dtype, device=x.device)
    out[rows] = x
    return out


def _verify(ctx: _Ctx, st: _State, dr: _Drafts):
    """Step 2: the target reads [newest committed token, drafts] in one pass -> ARStep, cond (B*m_t, 1+G, C)."""
    B = st.n.shape[0]
    pending = st.out[torch.arange(B, device=st.n.device), st.n - 1][:, None]
    tokens = torch.cat([pending, ctx.target.finalize(dr.states[:, :, -1])], 1)
    ctx.stats.target_forwards += 1
    return ctx.target.ar.decode(ar_rows(tokens, ctx.target.cfg.batch_mult), st.tcache)


def _accept(ctx: _Ctx, st: _State, dr: _Drafts, tcond: torch.Tensor):
    """Step 3a: accepted drafts per sample a (B,), plus CSpD's shared-noise target trajectories (or None)."""
    B, G = dr.g.shape[0], dr.states.shape[1]
    valid = torch.arange(G, device=dr.g.device)[None] < dr.g[:, None]
    b, j = torch.nonzero(valid, as_tuple=True)
    log_r = torch.zeros(B, G, dtype=ctx.dtype, device=dr.g.device)
    aux = None
    if b.numel():
        p_fld = _pair_field(ctx, ctx.target, tcond, st.n, b, j, ctx.stats.target_head)
        q_traj = _Trajectory(dr.states[b, j], dr.means[b, j], transition_stds(ctx.draft.sampler, b.device, ctx.dtype))
        if ctx.spec.accept == "exact":
            log_r[b, j] = exact_log_ratio(p_fld, ctx.target.sampler, q_traj, ctx.spec.relax_temperature)
        else:
            r, p_traj = cspd_log_ratio(p_fld, ctx.target.sampler, q_traj, ctx.spec.cspd_inner_temperature)
            log_r[b, j] = r
            aux = (_scatter2(p_traj.token, b, j, B, G), _scatter2(p_traj.means[:, -1], b, j, B, G))
    u = rand_varlen(ctx.gens, dr.g, G, device=dr.g.device, dtype=ctx.dtype)
    ok = (torch.log(u) < log_r) & valid
    a = ok.long().cumprod(1).sum(1)
    return a, aux


def _scatter2(x: torch.Tensor, b: torch.Tensor, j: torch.Tensor, B: int, G: int) -> torch.Tensor:
    out = torch.zeros((B, G, *x.shape[1:]), dtype=x.dtype, device=x.device)
    out[b, j] = x
    return out


def _bonus(ctx: _Ctx, st: _State, tcond: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor):
    """Target chains (R,...) for samples `rows` at round position a (their first undrafted/rejected position)."""
    fld = _pair_field(ctx, ctx.target, tcond, st.n, rows, a[rows], ctx.stats.target_head)
    return fld, sample_rows(ctx.target, fld, ctx.gens, rows, mask, ctx.dtype)


def _residual_exact(ctx: _Ctx, st: _State, dr: _Drafts, tcond, a, rejected, y):
    """Step 3b: y ~ max(0, P - Q)/Z for samples `rejected` by proposing whole trajectories from P."""
    rows = torch.nonzero(rejected).flatten()
    p_fld = _pair_field(ctx, ctx.target, tcond, st.n, rows, a[rows], ctx.stats.target_head)
    q_fld = _pair_field(ctx, ctx.draft, dr.conds, st.n, rows, a[rows], ctx.stats.draft_head)
    pending, fallback = rejected.clone(), None
    for _ in range(ctx.spec.max_resample_tries):
        loc = torch.nonzero(pending[rows]).flatten()
        traj = sample_rows(ctx.target, p_fld.select(loc), ctx.gens, rows[loc], pending, ctx.dtype)
        if fallback is None:
            fallback = traj.token  # the target's own sample, used if no proposal is ever accepted
        log_p = gaussian_chain_logprob(traj.states, traj.means, traj.stds)
        log_q = trajectory_logprob(q_fld.select(loc), ctx.draft.sampler, traj.states)
        u = rand(ctx.gens, device=y.device, dtype=ctx.dtype, active=pending)[rows[loc]]
        ok = u < residual_accept_prob(log_q, log_p)
        y[rows[loc[ok]]] = traj.token[ok]
        pending[rows[loc[ok]]] = False
        ctx.stats.resample_tries += int(loc.numel())
        if not bool(pending.any()):
            break
    _fallback(ctx, y, pending, rows, fallback)


def _fallback(ctx: _Ctx, y, pending, rows, fallback):
    left = pending[rows]
    y[rows[left]] = fallback[left]
    ctx.stats.fallbacks += int(left.sum())


def _residual_cspd(ctx: _Ctx, st: _State, dr: _Drafts, aux, a, rejected, y):
    """CSpD's resampling: propose from the target's last-step Gaussian, accept with max(0, 1 - q/(F p))."""
    rows = torch.nonzero(rejected).flatten()
    p_token, p_mean = aux[0][rows, a[rows]], aux[1][rows, a[rows]]
    q_mean = dr.means[rows, a[rows], -1]
    s_p = transition_stds(ctx.target.sampler, y.device, ctx.dtype)
    s_q = transition_stds(ctx.draft.sampler, y.device, ctx.dtype)
    log_fixed = y.shape[-1] * torch.log(s_p[:-1] / s_q[:-1]).sum()
    pending = rejected.clone()
    for _ in range(ctx.spec.max_resample_tries):
        loc = torch.nonzero(pending[rows]).flatten()
        z = randn(ctx.gens, (y.shape[-1],), device=y.device, dtype=ctx.dtype, active=pending)[rows[loc]]
        prop = p_mean[loc] + s_p[-1] * z
        log_p, log_q = cspd_residual_logs(prop, p_mean[loc], s_p[-1], q_mean[loc], s_q[-1], log_fixed)
        u = rand(ctx.gens, device=y.device, dtype=ctx.dtype, active=pending)[rows[loc]]
        ok = u < residual_accept_prob(log_q, log_p)
        y[rows[loc[ok]]] = prop[ok]
        pending[rows[loc[ok]]] = False
        ctx.stats.resample_tries += int(loc.numel())
        if not bool(pending.any()):
            break
    _fallback(ctx, y, pending, rows, p_token)  # CSpD's fallback: the target's shared-noise sample


def _next_token(ctx: _Ctx, st: _State, dr: _Drafts, tcond, a, aux, active) -> torch.Tensor:
    """Step 3b: the one token the target adds per sample (bonus token, or residual sample at the rejection)."""
    B, D = st.n.shape[0], ctx.target.token_dim
    y = torch.zeros(B, D, device=st.n.device, dtype=ctx.dtype)
    bonus = active & (a == dr.g)
    rejected = active & (a < dr.g)
    if bool(bonus.any()):
        rows = torch.nonzero(bonus).flatten()
        y[rows] = _bonus(ctx, st, tcond, a, rows, bonus)[1].token
    if bool(rejected.any()):
        ctx.stats.resampled += int(rejected.sum())
        if ctx.spec.accept == "exact":
            _residual_exact(ctx, st, dr, tcond, a, rejected, y)
        else:
            _residual_cspd(ctx, st, dr, aux, a, rejected, y)
    return y


def _commit(ctx: _Ctx, st: _State, dr: _Drafts, a, y, active, t_hidden=None) -> None:
    """Append accepted drafts and the target's token; roll the target cache back to prompt + committed[:-1].
    t_hidden (B*m_t, 1+G, H): the verification pass's hidden states, kept for a feature-level draft."""
    if st.feat is not None:  # position j of the pass conditioned committed token n + j, for j <= a
        m = ctx.draft.cfg.batch_mult
        hid = _draft_rows(ctx, t_hidden)
        for j in range(hid.shape[1]):
            rows = torch.nonzero(ar_rows(active & (j <= a), m)).flatten()
            st.feat[rows, ar_rows(st.n, m)[rows] + j] = hid[rows, j].to(st.feat.dtype)
    drafts = ctx.target.finalize(dr.states[:, :, -1])
    for j in range(drafts.shape[1]):
        rows = torch.nonzero(active & (j < a)).flatten()
        st.out[rows, st.n[rows] + j] = drafts[rows, j]
    rows = torch.nonzero(active).flatten()
    st.out[rows, st.n[rows] + a[rows]] = ctx.target.finalize(y[rows])
    st.n = st.n + torch.where(active, a + 1, torch.zeros_like(a))
    st.tcache.rollback(ar_rows(st.t_base + st.n - 1, ctx.target.cfg.batch_mult))
    st.first_round = False
    st.accepted = st.accepted + torch.where(active, a, torch.zeros_like(a))
    st.drafted = st.drafted + torch.where(active, dr.g, torch.zeros_like(a))
    ctx.stats.drafted += int(dr.g[active].sum())
    ctx.stats.accepted += int(a[active].sum())
    ctx.stats.accepted_lengths.extend(a[active].tolist())


def _round(ctx: _Ctx, st: _State) -> None:
    active = st.n < ctx.num_tokens
    chosen = choose_gamma(ctx.policy, ctx.spec.gamma, st.accepted, st.drafted)
    ctx.stats.policy_skips += int((active & (chosen == 0)).sum()) if ctx.spec.drafts else 0
    gmax = torch.clamp(torch.minimum(chosen, ctx.num_tokens - st.n - 1), min=0)
    gmax = torch.where(active, gmax, torch.zeros_like(gmax))
    dr = _draft(ctx, st, active, gmax)
    tstep = _verify(ctx, st, dr)
    tcond = tstep.cond
    a, aux = _accept(ctx, st, dr, tcond)
    y = _next_token(ctx, st, dr, tcond, a, aux, active)
    _commit(ctx, st, dr, a, y, active, tstep.hidden)
    ctx.stats.rounds += 1


def _start(ctx: _Ctx, ids, mask) -> _State:
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
        if _reads_features(ctx.draft):  # the target's prompt states, shifted; then the one that conditions token 0
            hid = _draft_rows(ctx, tstep.hidden)
            kw["feats"] = draft_features(hid, d_mask.bool())
            feat = torch.zeros(hid.shape[0], N, hid.shape[-1], device=dev, dtype=hid.dtype)
            feat[:, 0] = hid[:, -1]
        ctx.draft.ar.prefill(d_ids, d_mask, dcache, **kw)
        ctx.stats.draft_forwards += 1
    out = torch.zeros(B, N, ctx.target.token_dim, device=dev, dtype=ctx.dtype)
    zeros = lambda: torch.zeros(B, dtype=torch.long, device=dev)  # noqa: E731 -- one tensor per counter, no aliasing
    st = _State(out, zeros(), tcache, dcache, tcache.lengths[:B].clone(),
                None if dcache is None else dcache.lengths[:B].clone(), zeros(), zeros(), feat=feat)
    everyone = torch.ones(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    _, traj = _bonus(ctx, st, tcond, torch.zeros(B, dtype=torch.long, device=dev), rows, everyone)
    st.out[:, 0] = ctx.target.finalize(traj.token)
    st.n = st.n + 1
    return st


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
    ctx = _Ctx(target, draft, spec, generators, num_tokens, torch.float32, DecodeStats(), policy)
    st = _start(ctx, input_ids, attention_mask)
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
