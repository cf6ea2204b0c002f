"""Acceptance tests and residual resampling for speculative decoding of continuous tokens (DESIGN.md §4).

Exact rule. A token is the end of a chain of Gaussian transitions, so a drafted token comes with its whole
trajectory tau = (x_0..x_K). Its density under the draft chain is Q(tau) = N(x_0; 0, I) prod_k N(x_{k+1}; m^q_k, s^q_k)
and under the target chain P(tau) is the same product with the target's means m^p_k evaluated ALONG THE DRAFT'S
STATES. Accepting tau with min(1, P/Q) and, at the first rejection, drawing from the residual max(0, P - Q)/Z makes
the emitted trajectory -- hence the token x_K -- exactly P-distributed (Leviathan et al. 2023 / Chen et al. 2023,
applied to trajectories). The residual is sampled by acceptance-rejection: propose tau ~ P, accept with
1 - Q(tau)/P(tau) (bound M = 1/Z, no integral needed).

CSpD rule (`accept="cspd"`, algorithms.md §3, for comparison only, NOT lossless): the target runs its own chain
with the draft's noise (shared-noise alignment), and only the last transition's densities are compared,
log r = log N(x; mu_p, (s_p T)^2) - log N(x; mu_q, (s_q T)^2) + D log(s_q/s_p)|_last + D sum_{k<K-1} log(s_p,k/s_q,k)
(T = CSpD's inner temperature, 42 in their code; 1 here by default). The ratio of last-step densities is not the
ratio of the token marginals, so the output is not target-distributed in general. The one exception: at T = 1
with equal transition stds in both chains, given the shared noise of the first K-1 steps the test is ordinary
speculative sampling between the two last-step Gaussians N(m_q, s^2) and N(m_p, s^2), and the target's chain driven
by that noise is a target sample, so the output is target-distributed (up to fallbacks). CSpD's published T = 42,
or a draft chain with other stds (the factor prod (s_p/s_q)^D), is far from it: test_speculative_exact.py shows
all three.
"""
from __future__ import annotations

import math

import torch

from .flow import Trajectory, gaussian_chain_logprob, sample_tokens, transition_means, transition_stds


def exact_log_ratio(p_field, p_sampler, q_traj: Trajectory, relax_temperature: float = 1.0) -> torch.Tensor:
    """log P(tau)/Q(tau) (R,) for draft trajectories q_traj (states (R,K+1,D), means, stds).

    p_field: the target's guided velocity field for the same R tokens. One batched head call.
    relax_temperature T > 1 returns log(P/Q)/T: acceptance min(1, (P/Q)^(1/T)), a faster but NOT lossless rule.
    """
    states = q_traj.states
    p_means = transition_means(p_field, p_sampler, states)
    p_stds = transition_stds(p_sampler, states.device, states.dtype)
    log_p = gaussian_chain_logprob(states, p_means, p_stds)
    log_q = gaussian_chain_logprob(states, q_traj.means, q_traj.stds)
    return (log_p - log_q) / relax_temperature


def shared_noise(traj: Trajectory) -> torch.Tensor:
    """The noise (R,K+1,D) that produced a trajectory: x_0 and eps_k = (x_{k+1} - m_k)/s_k."""
    eps = (traj.states[:, 1:] - traj.means) / traj.stds[None, :, None]
    return torch.cat([traj.states[:, :1], eps], 1)


def gaussian_logpdf(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, std^2 I) summed over the last dim -> (...)."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    D = x.shape[-1]
    return -0.5 * (((x - mean) / std) ** 2).sum(-1) - D * torch.log(std) - 0.5 * D * math.log(2 * math.pi)


def cspd_log_ratio(p_field, p_sampler, q_traj: Trajectory, inner_temperature: float = 1.0):
    """CSpD's last-step ratio (R,) plus the target's shared-noise trajectory (kept for resampling and fallback)."""
    p_traj = sample_tokens(p_field, p_sampler, shared_noise(q_traj))
    return cspd_ratio(p_traj, q_traj, inner_temperature), p_traj


def cspd_ratio(p_traj: Trajectory, q_traj: Trajectory, inner_temperature: float = 1.0) -> torch.Tensor:
    """CSpD's log r (R,) of draft tokens q_traj.token given the target's chains p_traj run on the draft's noise."""
    x, D = q_traj.token, q_traj.token.shape[-1]
    s_p, s_q = p_traj.stds, q_traj.stds
    T = inner_temperature
    return (-0.5 * (((x - p_traj.means[:, -1]) / (s_p[-1] * T)) ** 2).sum(-1)
            + 0.5 * (((x - q_traj.means[:, -1]) / (s_q[-1] * T)) ** 2).sum(-1)
            + D * torch.log(s_q[-1] / s_p[-1]) + D * torch.log(s_p[:-1] / s_q[:-1]).sum())


def feature_distance(t_cond: torch.Tensor, d_cond: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Drift-AR's verification statistic (...,): the distance between the target's and the draft's conditions of
    the same position, l2 (their ||c_t - c_d||) or cosine (1 - cos). No head evaluation is needed."""
    t, d = t_cond.float(), d_cond.float()
    if metric == "l2":
        return (t - d).norm(dim=-1)
    if metric == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(t, d, dim=-1)
    raise ValueError(f"feature metric {metric!r} (config key inference.feature_metric): choose l2 or cosine")


def residual_accept_prob(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Acceptance probability of a proposal y ~ P for the residual max(0, P - Q): max(0, 1 - Q(y)/P(y))."""
    return -torch.expm1(torch.clamp(log_q - log_p, max=0.0))


def cspd_residual_logs(y, p_last_mean, p_last_std, q_last_mean, q_last_std, log_fixed):
    """(log p(y), log q(y) - log F) for CSpD's last-step residual test; F = prod_{k<K-1} (s_p,k/s_q,k)^D."""
    return (gaussian_logpdf(y, p_last_mean, p_last_std),
            gaussian_logpdf(y, q_last_mean, q_last_std) - log_fixed)
