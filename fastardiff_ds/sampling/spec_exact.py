"""The exact round (and its relaxed variant): accept each drafted trajectory with min(1, P/Q), resample the residual.

3. Each drafted trajectory is accepted with min(1, P/Q) (acceptance.py; `relaxed`: min(1, (P/Q)^(1/T)), NOT
   target-distributed); at the first rejection the token is drawn from the residual max(0, P - Q) by
   acceptance-rejection, later drafts are dropped; if everything was accepted the target adds one token of its own.
"""
from __future__ import annotations

import torch

from .acceptance import exact_log_ratio, residual_accept_prob
from .flow import Trajectory, gaussian_chain_logprob, trajectory_logprob, transition_stds
from .noise import rand, rand_varlen
from .common import sample_rows
from .spec_core import Ctx, Drafts, State, commit, pair_field, target_sample


def _accept(ctx: Ctx, st: State, dr: Drafts, tcond: torch.Tensor) -> torch.Tensor:
    """Accepted drafts per sample a (B,): the first rejection truncates the round."""
    B, G = dr.g.shape[0], dr.states.shape[1]
    valid = torch.arange(G, device=dr.g.device)[None] < dr.g[:, None]
    b, j = torch.nonzero(valid, as_tuple=True)
    log_r = torch.zeros(B, G, dtype=ctx.dtype, device=dr.g.device)
    if b.numel():
        p_fld = pair_field(ctx, ctx.target, tcond, st.n, b, j, ctx.stats.target_head)
        q_traj = Trajectory(dr.states[b, j], dr.means[b, j], transition_stds(ctx.draft.sampler, b.device, ctx.dtype))
        log_r[b, j] = exact_log_ratio(p_fld, ctx.target.sampler, q_traj, ctx.spec.relax_temperature)
    u = rand_varlen(ctx.gens, dr.g, G, device=dr.g.device, dtype=ctx.dtype)
    ok = (torch.log(u) < log_r) & valid
    return ok.long().cumprod(1).sum(1)


def _residual(ctx: Ctx, st: State, dr: Drafts, tcond, a, rejected, y):
    """y ~ max(0, P - Q)/Z for samples `rejected` by proposing whole trajectories from P."""
    rows = torch.nonzero(rejected).flatten()
    p_fld = pair_field(ctx, ctx.target, tcond, st.n, rows, a[rows], ctx.stats.target_head)
    q_fld = pair_field(ctx, ctx.draft, dr.conds, st.n, rows, a[rows], ctx.stats.draft_head)
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
    fallback_rows(ctx, y, pending, rows, fallback)


def fallback_rows(ctx: Ctx, y, pending, rows, fallback):
    """Rows whose residual sampling ran out of tries take `fallback` (the target's own sample)."""
    left = pending[rows]
    y[rows[left]] = fallback[left]
    ctx.stats.fallbacks += int(left.sum())


def _next_token(ctx: Ctx, st: State, dr: Drafts, tcond, a, active) -> torch.Tensor:
    """The one token the target adds per sample (bonus token, or residual sample at the rejection)."""
    B, D = st.n.shape[0], ctx.target.token_dim
    y = torch.zeros(B, D, device=st.n.device, dtype=ctx.dtype)
    bonus = active & (a == dr.g)
    rejected = active & (a < dr.g)
    if bool(bonus.any()):
        rows = torch.nonzero(bonus).flatten()
        y[rows] = target_sample(ctx, st, tcond, a, rows, bonus)[1].token
    if bool(rejected.any()):
        ctx.stats.resampled += int(rejected.sum())
        _residual(ctx, st, dr, tcond, a, rejected, y)
    return y


def round_exact(ctx: Ctx, st: State, dr: Drafts, tstep, active: torch.Tensor) -> None:
    """Steps 3-4 of an exact (or relaxed) round, after drafting and verification."""
    a = _accept(ctx, st, dr, tstep.cond)
    y = _next_token(ctx, st, dr, tstep.cond, a, active)
    B, G = a.shape[0], dr.states.shape[1]
    tokens = torch.cat([ctx.target.finalize(dr.states[:, :, -1]), y.new_zeros(B, 1, y.shape[-1])], 1)
    tokens[torch.arange(B, device=a.device), a] = ctx.target.finalize(y)
    commit(ctx, st, tokens, a + 1, a, dr, active, tstep.hidden)
