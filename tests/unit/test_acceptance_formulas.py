"""The acceptance formulas of speculative decoding against values derived by hand, and the residual's fallback.

Hand derivation used below: the `sde` sampler (eta 1) with K = 2 on the grid 0, 1/2, 1 and the analytic rectified-
flow head towards data N(mu, I) (toy.GaussianFlowHead, data std 1):
  s_k = eta sqrt(2 (1 - t_k) dt)          -> s_0 = 1, s_1 = sqrt(1/2)
  v(x, 0) = mu - x, v(x, 1/2) = mu       (the x-coefficient (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) is -1, then 0)
  m_k = x + dt (v + t v - x)             -> m_0 = mu / 2 (for every x_0), m_1 = x_1 / 2 + 3 mu / 4
so log P(tau)/Q(tau) = (|x_1 - mu_q/2|^2 - |x_1 - mu_p/2|^2) / 2 + (|x_2 - m_1(mu_q)|^2 - |x_2 - m_1(mu_p)|^2).
"""
import math

import pytest
import torch

from fastardiff_ds.sampling import spec_exact, speculative
from fastardiff_ds.sampling.acceptance import (cspd_log_ratio, exact_log_ratio, gaussian_logpdf,
                                               residual_accept_prob, shared_noise)
from fastardiff_ds.sampling.flow import SamplerConfig, Trajectory, gaussian_chain_logprob, sample_tokens
from fastardiff_ds.sampling.guidance import VelocityField
from fastardiff_ds.sampling.noise import make_generators
from fastardiff_ds.sampling.speculative import SpecConfig
from toy import GaussianFlowHead

D, N = 3, 5
SDE2 = SamplerConfig("sde", 2, noise_level=1.0)
S = torch.tensor([1.0, math.sqrt(0.5)], dtype=torch.float64)


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    mu_p, mu_q = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)
    states = torch.randn(N, 3, D, generator=g, dtype=torch.float64)
    return mu_p, mu_q, states


def _hand_means(mu, states):
    return torch.stack([mu / 2, states[:, 1] / 2 + 0.75 * mu], 1)


def _field(mu):
    return VelocityField(GaussianFlowHead(D, 1.0), mu)


def test_gaussian_logpdf_known_values():
    x = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    got = gaussian_logpdf(x, torch.zeros(3, dtype=torch.float64), 2.0)
    want0 = -0.5 * 1.0 - 3 * math.log(2.0) - 1.5 * math.log(2 * math.pi)
    want1 = -0.5 * 0.75 - 3 * math.log(2.0) - 1.5 * math.log(2 * math.pi)
    assert torch.allclose(got, torch.tensor([want0, want1], dtype=torch.float64), atol=1e-12)
    ref = torch.distributions.Normal(0.0, 2.0).log_prob(x).sum(-1)
    assert torch.allclose(got, ref, atol=1e-12)


def test_chain_logprob_is_the_product_of_the_hand_gaussians():
    _, mu_q, states = _setup()
    got = gaussian_chain_logprob(states, _hand_means(mu_q, states), S)
    want = (gaussian_logpdf(states[:, 0], 0.0, 1.0) + gaussian_logpdf(states[:, 1], mu_q / 2, S[0])
            + gaussian_logpdf(states[:, 2], states[:, 1] / 2 + 0.75 * mu_q, S[1]))
    assert torch.allclose(got, want, atol=1e-12)


def test_the_hand_derivation_matches_the_sampler():
    """Guards the derivation itself: the library's chain means along the same states are the hand means."""
    mu_p, _, states = _setup()
    traj = sample_tokens(_field(mu_p), SDE2, torch.cat([states[:, :1], torch.randn(N, 2, D, dtype=torch.float64)], 1))
    assert torch.allclose(traj.stds, S, atol=1e-12)
    assert torch.allclose(traj.means, _hand_means(mu_p, traj.states), atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_exact_log_ratio_closed_form(temperature):
    mu_p, mu_q, states = _setup()
    q_traj = Trajectory(states, _hand_means(mu_q, states), S)
    got = exact_log_ratio(_field(mu_p), SDE2, q_traj, temperature)
    x1, x2 = states[:, 1], states[:, 2]
    m1 = lambda mu: x1 / 2 + 0.75 * mu  # noqa: E731
    want = (((x1 - mu_q / 2) ** 2).sum(-1) - ((x1 - mu_p / 2) ** 2).sum(-1)) / 2 \
        + (((x2 - m1(mu_q)) ** 2).sum(-1) - ((x2 - m1(mu_p)) ** 2).sum(-1))
    assert torch.allclose(got, want / temperature, atol=1e-10)
    assert exact_log_ratio(_field(mu_q), SDE2, q_traj).abs().max() < 1e-12  # P = Q: ratio 1


def test_shared_noise_recovers_the_noise_and_a_hand_value():
    mu_p, _, _ = _setup()
    noise = torch.randn(N, 3, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(shared_noise(sample_tokens(_field(mu_p), SDE2, noise)), noise, atol=1e-12)
    hand = Trajectory(torch.tensor([[[0.0], [1.0], [3.0]]]), torch.tensor([[[0.5], [2.0]]]), torch.tensor([0.5, 0.25]))
    assert torch.equal(shared_noise(hand), torch.tensor([[[0.0], [1.0], [4.0]]]))


def test_residual_accept_prob_known_values():
    log_q = torch.tensor([math.log(0.25), 1.0, 0.3, -math.inf, math.log(0.9)], dtype=torch.float64)
    log_p = torch.tensor([0.0, 0.0, 0.3, 0.0, 0.0], dtype=torch.float64)
    want = torch.tensor([0.75, 0.0, 0.0, 1.0, 0.1], dtype=torch.float64)  # max(0, 1 - q/p)
    assert torch.allclose(residual_accept_prob(log_q, log_p), want, atol=1e-12)


@pytest.mark.parametrize("T", [1.0, 42.0])
def test_cspd_log_ratio_closed_form(T):
    """Equal samplers: the std factors cancel and only the last step's z-scores (divided by T) remain; the target's
    chain runs on the draft's noise: x_1^p = mu_p/2 + (x_1 - mu_q/2) (s_0 = 1)."""
    mu_p, mu_q, states = _setup()
    q_traj = Trajectory(states, _hand_means(mu_q, states), S)
    log_r, p_traj = cspd_log_ratio(_field(mu_p), SDE2, q_traj, T)
    x1p = mu_p / 2 + (states[:, 1] - mu_q / 2)
    assert torch.allclose(p_traj.states[:, 1], x1p, atol=1e-12)
    x2 = states[:, 2]
    m1p, m1q = x1p / 2 + 0.75 * mu_p, states[:, 1] / 2 + 0.75 * mu_q
    want = (((x2 - m1q) ** 2).sum(-1) - ((x2 - m1p) ** 2).sum(-1)) / (2 * (S[1] * T) ** 2)
    assert torch.allclose(log_r, want, atol=1e-10)


def test_cspd_log_ratio_std_factor():
    """Unequal chains: a draft whose first step has std 1/2 (target 1) and the same last std. The last-step z-scores
    use each chain's own last std, and the factor D log(s_q/s_p)|last + D sum_{k<K-1} log(s_p/s_q) is D log 2."""
    mu_p, mu_q, states = _setup()
    s_q = torch.tensor([0.5, math.sqrt(0.5)], dtype=torch.float64)
    q_traj = Trajectory(states, _hand_means(mu_q, states), s_q)
    log_r, p_traj = cspd_log_ratio(_field(mu_p), SDE2, q_traj, 1.0)
    x1p = mu_p / 2 + (states[:, 1] - mu_q / 2) / 0.5  # the draft's eps_0 = (x_1 - m_0)/s_q,0, replayed with s_p,0 = 1
    assert torch.allclose(p_traj.states[:, 1], x1p, atol=1e-12)
    x2, m1p, m1q = states[:, 2], x1p / 2 + 0.75 * mu_p, states[:, 1] / 2 + 0.75 * mu_q
    want = (((x2 - m1q) ** 2).sum(-1) - ((x2 - m1p) ** 2).sum(-1)) / (2 * S[1] ** 2) + D * math.log(2.0)
    assert torch.allclose(log_r, want, atol=1e-10)


# --- the residual runs out of tries: the target's own first proposal is used, and counted -----------------------

def _run(monkeypatch, accept_prob, tries):
    from test_speculative_exact import models, prompts

    monkeypatch.setattr(spec_exact, "residual_accept_prob", lambda log_q, log_p: torch.full_like(log_q, accept_prob))
    target, draft = models()
    ids, mask = prompts(64)
    return speculative.speculative_generate(target, draft, ids, mask, 4, make_generators(range(64)),
                                            SpecConfig(gamma=3, max_resample_tries=tries))


def test_fallback_uses_the_targets_first_proposal(monkeypatch):
    never = _run(monkeypatch, 0.0, 1)  # no residual proposal is ever accepted: every rejection falls back
    first = _run(monkeypatch, 1.0, 1)  # the first proposal is accepted: the same draws, the same tokens
    assert never.stats.resampled > 10 and never.stats.fallbacks == never.stats.resampled
    assert first.stats.fallbacks == 0 and first.stats.resampled == never.stats.resampled
    assert torch.equal(never.tokens, first.tokens)


def test_fallback_after_every_try_is_spent(monkeypatch):
    out = _run(monkeypatch, 0.0, 3)
    assert out.stats.resampled > 10 and out.stats.fallbacks == out.stats.resampled
    assert out.stats.resample_tries == 3 * out.stats.resampled
    assert out.tokens.isfinite().all() and bool((out.tokens != 0).all())  # every slot holds a real token
