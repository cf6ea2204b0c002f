"""The paper's rules, which keep quality by measurement, not by construction: NOT target-distributed.

`cspd` is Fast-ARDiff's Algorithm 1 as CSpD's code (MarkXCloud/CSpD, spec_decode_runner.py) runs it: the target's
head chain runs on the draft's noise (shared initial noise and step noise), the test compares only the last step's
Gaussians (z-scores divided by the inner temperature, 42 in their code) times the std products of the other steps
(acceptance.cspd_ratio), and a rejected token is resampled from the last-step residual. CSpD accepts each draft on
its own (`cspd_independent`); here the first rejection truncates the round by default, since in a causal AR later
drafts were conditioned on the rejected one. `feature` is Drift-AR's (aSleepyTree/Drift-AR): a draft is kept while
the target's condition at its position lies within `feature_threshold` of the draft's (acceptance.feature_distance);
verification then needs no head evaluation at all.

`commit`: `draft` keeps the draft's token at an accepted position (CSpD, Drift-AR); `target` commits the target's
own chain at every position of the round (the draft's noise where it drafted, so both tokens agree where the
conditions do), drawn in ONE batched head call with the bonus token. Both caches keep the drafts' keys and values at
accepted positions: with `target` the context the target read differs from the committed tokens by the
draft-target token difference (that is the approximation; it is measured, README Speed / docs).

Head calls per round: one chain over all round positions (cspd, or commit=target), or one over the bonus / rejected
position only (feature with commit=draft). With static shapes (compiled models) the chain always covers
B x (gamma + 1) rows, so it replays one graph.
"""
from __future__ import annotations

import torch

from .acceptance import cspd_ratio, cspd_residual_logs, feature_distance, residual_accept_prob, shared_noise
from .flow import Trajectory, sample_tokens, transition_stds
from .noise import rand, randn, rand_varlen
from .spec_core import Ctx, Drafts, State, commit, pair_field, scatter_pairs
from .spec_exact import fallback_rows


def _round_noise(ctx: Ctx, dr: Drafts, active: torch.Tensor) -> torch.Tensor:
    """(B, gamma+1, K+1, D) noise of the target's chains at round positions 0..gamma: the draft's own noise where it
    drafted (all of it when both chains have K steps, x_0 only otherwise), fresh draws elsewhere. Every round
    draws the same amount, so padded (static) and unpadded rounds use the same streams."""
    K, D = ctx.target.sampler.steps, ctx.target.token_dim
    noise = randn(ctx.gens, (ctx.spec.gamma + 1, K + 1, D), device=dr.g.device, dtype=ctx.dtype, active=active)
    G = dr.states.shape[1]
    if G:
        valid = torch.arange(G, device=dr.g.device)[None] < dr.g[:, None]
        b, j = torch.nonzero(valid, as_tuple=True)
        if ctx.draft.sampler.steps == K:
            stds = transition_stds(ctx.draft.sampler, dr.g.device, ctx.dtype)
            noise[b, j] = shared_noise(Trajectory(dr.states[b, j], dr.means[b, j], stds))
        else:
            noise[b, j, 0] = dr.states[b, j, 0]
    return noise


def _chains_at(ctx: Ctx, st: State, tcond, noise, b: torch.Tensor, j: torch.Tensor, P: int):
    """The target's chains at pairs (sample b, round position j) in one batched call -> tokens, last means (B,P,D)."""
    B = st.n.shape[0]
    fld = pair_field(ctx, ctx.target, tcond, st.n, b, j, ctx.stats.target_head)
    traj = (ctx.target.chain or sample_tokens)(fld, ctx.target.sampler, noise[b, j])
    return scatter_pairs(traj.token, b, j, B, P), scatter_pairs(traj.means[:, -1], b, j, B, P), traj.stds


def _round_chains(ctx: Ctx, st: State, dr: Drafts, tcond, noise, active: torch.Tensor):
    """The target's chains at every round position 0..G (0..gamma, padded, with static shapes)."""
    P = (ctx.spec.gamma if ctx.static and dr.states.shape[1] else dr.states.shape[1]) + 1
    pos = torch.arange(P, device=dr.g.device)[None]
    keep = active[:, None] & ((pos <= dr.g[:, None]) | ctx.static)  # static: padded rows, discarded
    b, j = torch.nonzero(keep, as_tuple=True)
    return _chains_at(ctx, st, tcond, noise, b, j, P)


def _cspd_ok(ctx: Ctx, dr: Drafts, p_mean_last, p_stds, valid) -> torch.Tensor:
    """(B, G) CSpD's test of each drafted token against the target's shared-noise chain."""
    B, G = valid.shape
    b, j = torch.nonzero(valid, as_tuple=True)
    log_r = torch.zeros(B, G, dtype=ctx.dtype, device=valid.device)
    if b.numel():
        q_stds = transition_stds(ctx.draft.sampler, valid.device, ctx.dtype)
        q = Trajectory(dr.states[b, j], dr.means[b, j], q_stds)
        p_means = torch.zeros_like(dr.means[b, j])
        p_means[:, -1] = p_mean_last[b, j]  # cspd_ratio reads the target's last-step mean only
        log_r[b, j] = cspd_ratio(Trajectory(dr.states[b, j], p_means, p_stds), q, ctx.spec.cspd_inner_temperature)
    u = rand_varlen(ctx.gens, dr.g, G, device=valid.device, dtype=ctx.dtype)
    return (torch.log(u) < log_r) & valid


def _feature_ok(ctx: Ctx, dr: Drafts, tcond, valid) -> torch.Tensor:
    """(B, G) Drift-AR's test: the conditional rows' conditions of each drafted position."""
    B, G = valid.shape
    if not G:
        return valid
    dist = feature_distance(tcond[:B, :G], dr.conds[:B, :G], ctx.spec.feature_metric)
    return (dist <= ctx.spec.feature_threshold) & valid


def _cspd_residual(ctx: Ctx, dr: Drafts, p_token, p_mean, rows, pos, y, p_stds) -> None:
    """CSpD's resampling at (rows, pos): propose from the target's last-step Gaussian, accept with max(0, 1 - q/(F p));
    out of tries: the target's shared-noise token (CSpD's fallback)."""
    R = rows.shape[0]
    if not R:
        return
    s_q = transition_stds(ctx.draft.sampler, y.device, ctx.dtype)
    log_fixed = y.shape[-1] * torch.log(p_stds[:-1] / s_q[:-1]).sum()
    mean_p, mean_q = p_mean[rows, pos], dr.means[rows, pos, -1]
    B = dr.g.shape[0]
    pending = torch.zeros(B, dtype=torch.bool, device=y.device)
    pending[rows] = True
    out = torch.zeros(R, y.shape[-1], dtype=y.dtype, device=y.device)
    for _ in range(ctx.spec.max_resample_tries):
        loc = torch.nonzero(pending[rows]).flatten()
        z = randn(ctx.gens, (y.shape[-1],), device=y.device, dtype=ctx.dtype, active=pending)[rows[loc]]
        prop = mean_p[loc] + p_stds[-1] * z
        log_p, log_q = cspd_residual_logs(prop, mean_p[loc], p_stds[-1], mean_q[loc], s_q[-1], log_fixed)
        u = rand(ctx.gens, device=y.device, dtype=ctx.dtype, active=pending)[rows[loc]]
        ok = u < residual_accept_prob(log_q, log_p)
        out[loc[ok]] = prop[ok]
        pending[rows[loc[ok]]] = False
        ctx.stats.resample_tries += int(loc.numel())
        if not bool(pending.any()):
            break
    fallback_rows(ctx, out, pending[rows], torch.arange(R, device=y.device), p_token[rows, pos])
    y[rows, pos] = out


def round_lossy(ctx: Ctx, st: State, dr: Drafts, tstep, active: torch.Tensor) -> None:
    """Steps 3-4 of a cspd / feature round, after drafting and verification."""
    spec, tcond = ctx.spec, tstep.cond
    B, G = dr.g.shape[0], dr.states.shape[1]
    dev = dr.g.device
    valid = (torch.arange(G, device=dev)[None] < dr.g[:, None]) & active[:, None]
    all_chains = spec.accept == "cspd" or spec.commit == "target"
    noise = _round_noise(ctx, dr, active)
    if all_chains:
        p_token, p_mean, p_stds = _round_chains(ctx, st, dr, tcond, noise, active)
    ok = _cspd_ok(ctx, dr, p_mean, p_stds, valid) if spec.accept == "cspd" else _feature_ok(ctx, dr, tcond, valid)
    drafts = dr.states[:, :, -1]
    independent = spec.accept == "cspd" and spec.cspd_independent
    a = dr.g.clone() if independent else ok.long().cumprod(1).sum(1)  # committed drafted positions
    if all_chains:
        y = p_token[:, : G + 1].clone()  # the target's token at every position
    else:  # feature, commit=draft: the target's chain at the one position it adds (same noise as commit=target)
        rows = torch.nonzero(active).flatten()
        y = _chains_at(ctx, st, tcond, noise, rows, a[rows], G + 1)[0]
    if spec.commit == "draft":
        keep = ok if independent else (torch.arange(G, device=dev)[None] < a[:, None])
        y[:, :G] = torch.where(keep[..., None], drafts, y[:, :G])
        if spec.accept == "cspd":  # a rejected position committed by CSpD: the last-step residual
            rej = (valid & ~ok) if independent else (active & (a < dr.g))[:, None] & (
                torch.arange(G, device=dev)[None] == a[:, None])
            ctx.stats.resampled += int(rej.sum())
            for j in range(G):  # one position per sample and call: each sample's stream draws in order
                rows = torch.nonzero(rej[:, j]).flatten()
                _cspd_residual(ctx, dr, p_token, p_mean, rows, torch.full_like(rows, j), y, p_stds)
    accepted = ok.long().sum(1) if independent else a
    commit(ctx, st, ctx.target.finalize(y), a + 1, accepted, dr, active, tstep.hidden)
