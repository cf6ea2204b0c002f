"""Flow samplers as Gaussian chains: analytic Gaussian data, CFG, trajectory log-densities."""
import math

import pytest
import torch

from fastardiff_ds.sampling.flow import (SamplerConfig, gaussian_chain_logprob, require_density, sample_tokens,
                                         time_grid, trajectory_logprob, transition_stds)
from fastardiff_ds.sampling.guidance import CFGConfig, HeadCounter, VelocityField, guidance_scale
from toy import GaussianFlowHead

D = 2
MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
S = 0.7


def field_for(n, mu=MU, cfg=None, scale=None, uncond=None, s=S):
    head = GaussianFlowHead(D, data_std=s)
    cond = mu.expand(n, D).clone()
    cfg = cfg or CFGConfig(mode="none")
    return VelocityField(head, cond, cfg, scale, uncond)


def draw(n, K, seed=0):
    return torch.randn(n, K + 1, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_ode_is_the_exact_gaussian_transport():
    # rectified flow between N(0,I) and N(mu, s^2 I) is the linear map x_1 = mu + s x_0; Euler error is O(dt)
    errs = []
    for K in (100, 400):
        noise = draw(64, K)
        x = sample_tokens(field_for(64), SamplerConfig(kind="ode", num_steps=K), noise).token
        errs.append(float((x - (MU + S * noise[:, 0])).abs().max()))
    assert errs[1] < 1e-2 and errs[1] < errs[0] / 3, errs  # converges at first order


@pytest.mark.parametrize("cfg", [SamplerConfig(kind="ode", num_steps=100),
                                 SamplerConfig(kind="sde", num_steps=100, noise_level=1.0),
                                 SamplerConfig(kind="sde", num_steps=100, noise_level=0.5, time_shift=3.0)])
def test_samples_match_gaussian_moments(cfg):
    n = 8000
    x = sample_tokens(field_for(n), cfg, draw(n, cfg.steps, seed=1)).token
    se_mean, se_std = S / math.sqrt(n), S / math.sqrt(2 * n)
    # 4 standard errors + a small allowance for the O(dt) discretisation bias
    assert torch.allclose(x.mean(0), MU, atol=4 * se_mean + 0.01), x.mean(0)
    assert torch.allclose(x.std(0), torch.full((D,), S, dtype=torch.float64), atol=4 * se_std + 0.02), x.std(0)


def test_sde_stds_positive_and_shift():
    cfg = SamplerConfig(kind="sde", num_steps=4, noise_level=0.3, time_shift=3.0)
    g = time_grid(cfg, dtype=torch.float64)
    assert torch.allclose(g, torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64) /
                          (3 - 2 * torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)))
    s = transition_stds(cfg, dtype=torch.float64)
    assert bool((s > 0).all())
    assert torch.allclose(s, 0.3 * torch.sqrt(2 * (1 - g[:-1]) * (g[1:] - g[:-1])))


def test_consistency_one_step_with_exact_field_gives_mean_plus_final_noise():
    # x1_hat(x_0, t=0) = E[x | x_0] = mu for the exact field, so the chain output is N(mu, final_std^2)
    cfg = SamplerConfig(kind="consistency", num_steps=1, final_std=0.05)
    noise = draw(4000, 1, seed=2)
    x = sample_tokens(field_for(4000), cfg, noise).token
    assert torch.allclose(x, MU + 0.05 * noise[:, 1], atol=1e-10)
    cfg4 = SamplerConfig(kind="consistency", num_steps=4, final_std=0.05)
    assert torch.allclose(transition_stds(cfg4, dtype=torch.float64),
                          torch.tensor([0.75, 0.5, 0.25, 0.05], dtype=torch.float64))


@pytest.mark.parametrize("cfg", [SamplerConfig(kind="ode", num_steps=4),
                                 SamplerConfig(kind="sde", num_steps=4, noise_level=0.0),
                                 SamplerConfig(kind="consistency", num_steps=2, final_std=0.0)])
def test_zero_std_chains_have_no_density(cfg):
    with pytest.raises(ValueError, match="std 0"):
        require_density(cfg)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="kind"):
        SamplerConfig(kind="ddim")
    with pytest.raises(ValueError, match="timesteps"):
        SamplerConfig(timesteps=(0.0, 0.6, 0.5, 1.0))
    with pytest.raises(ValueError, match="scale"):
        CFGConfig(scale=2.0, mode="none")
    with pytest.raises(ValueError, match="uncond"):
        field_for(3, cfg=CFGConfig(scale=2.0), scale=torch.ones(3))


def test_cfg_scale_one_is_conditional_sampling():
    n, cfg = 256, SamplerConfig(kind="sde", num_steps=8, noise_level=0.8)
    noise = draw(n, cfg.steps, seed=3)
    plain = sample_tokens(field_for(n), cfg, noise)
    unc = torch.randn(n, D, dtype=torch.float64)
    guided = sample_tokens(field_for(n, cfg=CFGConfig(scale=1.0), scale=torch.ones(n, dtype=torch.float64),
                                     uncond=unc), cfg, noise)
    assert torch.allclose(plain.states, guided.states, atol=1e-12)


def test_cfg_on_velocity_known_value_and_distilled_student():
    # v is affine in mu, so CFG with uncond mean 0 and scale w samples N(w mu, s^2); a guidance-input student is equal
    n, w, cfg = 8000, 2.5, SamplerConfig(kind="ode", num_steps=50)
    noise = draw(n, cfg.steps, seed=4)
    scale = torch.full((n,), w, dtype=torch.float64)
    two = field_for(n, cfg=CFGConfig(scale=w), scale=scale, uncond=torch.zeros(n, D, dtype=torch.float64))
    x = sample_tokens(two, cfg, noise).token
    assert torch.allclose(x.mean(0), w * MU, atol=4 * S / math.sqrt(n) + 0.02)
    student = field_for(n, cfg=CFGConfig(scale=w, mode="distilled"), scale=scale)
    assert torch.allclose(sample_tokens(student, cfg, noise).token, x, atol=1e-10)


def test_linear_guidance_schedule():
    cfg = CFGConfig(scale=5.0, schedule="linear")
    w = guidance_scale(cfg, torch.tensor([0, 2, 3]), num_tokens=4)  # official: full scale first, falling
    assert torch.allclose(w, torch.tensor([5.0, 3.0, 2.0]))
    assert torch.allclose(guidance_scale(CFGConfig(scale=5.0), torch.tensor([0, 3]), 4), torch.tensor([5.0, 5.0]))


def brute_force_logprob(head, cond, cfg, states):
    from torch.distributions import Normal
    grid = time_grid(cfg, dtype=torch.float64)
    stds = transition_stds(cfg, dtype=torch.float64)
    lp = Normal(0.0, 1.0).log_prob(states[:, 0]).sum(-1)
    for k in range(cfg.steps):
        x, t, dt = states[:, k], grid[k], grid[k + 1] - grid[k]
        v = head(x, t.expand(len(x)), cond)
        if cfg.kind == "sde":
            score = (t * v - x) / (1 - t)
            mean = x + (v + cfg.noise_level**2 * (1 - t) * score) * dt
        else:
            mean = grid[k + 1] * (x + (1 - t) * v)
        lp = lp + Normal(mean, stds[k]).log_prob(states[:, k + 1]).sum(-1)
    return lp


@pytest.mark.parametrize("cfg", [SamplerConfig(kind="sde", num_steps=6, noise_level=0.6, time_shift=2.0),
                                 SamplerConfig(kind="consistency", num_steps=3, final_std=0.1)])
def test_trajectory_logprob_matches_brute_force(cfg):
    n = 32
    gen = torch.Generator().manual_seed(5)
    cond = torch.randn(n, D, generator=gen, dtype=torch.float64)
    head = GaussianFlowHead(D, data_std=S)
    counter = HeadCounter()
    fld = VelocityField(head, cond, CFGConfig(mode="none"), counter=counter)
    traj = sample_tokens(fld, cfg, draw(n, cfg.steps, seed=6))
    # an arbitrary (not self-sampled) trajectory too: the density must be right everywhere
    other = traj.states + 0.3 * torch.randn(traj.states.shape, generator=gen, dtype=torch.float64)
    for states in (traj.states, other):
        lp = trajectory_logprob(fld, cfg, states)
        assert torch.allclose(lp, brute_force_logprob(head, cond, cfg, states), atol=1e-9)
    # the sampler's own recorded means give the same density, and verification is one batched head call
    assert torch.allclose(gaussian_chain_logprob(traj.states, traj.means, traj.stds),
                          trajectory_logprob(fld, cfg, traj.states), atol=1e-9)
    calls = counter.calls
    trajectory_logprob(fld, cfg, traj.states)
    assert counter.calls == calls + 1 and counter.rows >= n * cfg.steps
