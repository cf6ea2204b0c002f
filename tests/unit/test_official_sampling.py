"""The official NextStep samplers and CFG schedules against independent re-implementations of the official loops.

References written from stepfun-ai/NextStep-1: `FlowMatchingHead.sample` (nextstep/models/modeling_fm_head.py,
NextStep-1), `FlowMatchingHead.sample(sde_type="sde", noise_level=0.8)` (inference/nextstep_model.py, NextStep-1.1),
the `cfg_schedule` lines of `pipeline_nextstep.py: decoding` and `inference/gen_pipeline.py: decoding`, and the
`use_norm` layer norm. The velocity field is a stub: a fixed random nonlinear map of (x, t, cond).
"""
from __future__ import annotations

import pytest
import torch

from fastardiff_ds.models.flow_head import token_layernorm
from fastardiff_ds.sampling.flow import SamplerConfig, require_density, sample_tokens, transition_means
from fastardiff_ds.sampling.guidance import CFGConfig, VelocityField, guidance_scale
from fastardiff_ds.sampling.noise import make_generators, randn
from fastardiff_ds.sampling.official import check_mode_settings

D, C = 6, 8


class StubHead:
    """v = tanh(x A + t b + cond W) * 2 + cond[:, :D]: smooth, nonlinear, condition-dependent."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A, self.b = torch.randn(D, D, generator=g) * 0.5, torch.randn(D, generator=g)
        self.W = torch.randn(C, D, generator=g) * 0.5

    def __call__(self, x, t, cond, guidance=None):
        h = x @ self.A.to(x) + t.to(x)[:, None] * self.b.to(x) + cond.to(x) @ self.W.to(x)
        return 2.0 * torch.tanh(h) + cond[:, :D].to(x)


def guided(head, x, t, cond, uncond, w):
    """The official `cat([x] * 2)` batch through the net, then `get_velocity_from_cfg` (cfg_mult 2)."""
    v = head(torch.cat([x, x]), t.expand(2 * x.shape[0]), torch.cat([cond, uncond])).float()
    cond_v, uncond_v = torch.chunk(v, 2, dim=0)
    return uncond_v + w * (cond_v - uncond_v)


def official_v1(head, cond, uncond, w, draws, K, shift, last_step_size=0.04):
    """NextStep-1 FlowMatchingHead.sample: K-1 SDE steps on linspace(0, 1 - 0.04, K), then one Euler step."""
    x = next(draws)
    xs = []
    ts = torch.linspace(0, 1 - last_step_size, K)
    ts = ts / (shift - (shift - 1) * ts)
    for ti, tj in zip(ts[:-1], ts[1:]):
        dt = tj - ti
        v = guided(head, x, ti, cond, uncond, w)
        alpha, sigma = ti, 1 - ti
        var = sigma**2 - alpha * (-1) * sigma
        score = (alpha * v - x) / var
        drift = v + (1 - ti) * score
        dw = next(draws) * torch.sqrt(dt)
        x = x + drift * dt + torch.sqrt(2 * (1 - ti)) * dw
        xs.append(x)
    v = guided(head, xs[-1], ts[-1], cond, uncond, w)
    x = xs[-1] + v * last_step_size
    xs.append(x)
    assert len(xs) == K
    return x


def official_v11(head, cond, uncond, w, draws, K, shift, noise_level=0.8):
    """NextStep-1.1 FlowMatchingHead.sample(sde_type="sde"): K steps on shift(linspace(0,1,K+1)[:-1]) + [1]."""
    x = next(draws)
    ts = torch.linspace(0, 1, K + 1)[:-1]
    ts = ts / (shift - (shift - 1) * ts)
    ts = torch.cat([ts, torch.ones(1)])
    sigma_max = ts[-2]
    for ti, tj in zip(ts[:-1], ts[1:]):
        v = guided(head, x, ti, cond, uncond, w)
        x0, x1 = x - v * ti, x + v * (1 - ti)
        sigma, dt = 1 - ti, tj - ti
        std = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        x = x0 * (1 - tj) + x1 * tj - std**2 * dt / (2 * sigma) * x0
        x = x + std * torch.sqrt(dt) * next(draws)
    return x


def setup(n=4, seeds=(3, 4, 5, 6), K=6):
    g = torch.Generator().manual_seed(11)
    cond, uncond = torch.randn(n, C, generator=g), torch.randn(n, C, generator=g)
    noise = randn(make_generators(list(seeds)), (K + 1, D))  # each sample's own stream: x_0, eps_0, eps_1, ...
    return cond, uncond, noise


@pytest.mark.parametrize("K,shift,w", [(6, 1.0, 7.5), (5, 3.2, 2.0), (2, 1.0, 1.5)])
def test_nextstep_v1_matches_the_official_loop(K, shift, w):
    head = StubHead()
    cond, uncond, noise = setup(K=K)
    fld = VelocityField(head, cond, CFGConfig(scale=w), torch.full((4,), w), uncond)
    ours = sample_tokens(fld, SamplerConfig("nextstep", K, 1.0, shift), noise).token
    ref = official_v1(head, cond, uncond, w, iter(noise.unbind(1)), K, shift)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=5e-5)  # fp32 rounding on chains reaching ~25; eta off by 0.01 moves 0.4


@pytest.mark.parametrize("K,shift,eta", [(6, 1.0, 0.8), (4, 3.0, 0.8), (3, 1.0, 1.3)])
def test_nextstep_v11_matches_the_official_loop(K, shift, eta):
    head = StubHead(1)
    cond, uncond, noise = setup(K=K)
    fld = VelocityField(head, cond, CFGConfig(scale=5.0), torch.full((4,), 5.0), uncond)
    ours = sample_tokens(fld, SamplerConfig("nextstep-1.1", K, eta, shift), noise).token
    ref = official_v11(head, cond, uncond, 5.0, iter(noise.unbind(1)), K, shift, eta)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=5e-5)  # fp32 rounding on chains reaching ~25; eta off by 0.01 moves 0.4


@pytest.mark.parametrize("kind", ["nextstep", "nextstep-1.1"])
def test_batched_means_equal_the_chain(kind):
    """Verification recomputes every step's mean in one batched call: it must agree with the sequential chain."""
    cond, uncond, noise = setup(K=5)
    fld = VelocityField(StubHead(), cond, CFGConfig(scale=3.0), torch.full((4,), 3.0), uncond)
    cfg = SamplerConfig(kind, 5, 0.8 if kind == "nextstep-1.1" else 1.0, 2.0)
    traj = sample_tokens(fld, cfg, noise)
    assert torch.allclose(transition_means(fld, cfg, traj.states), traj.means, atol=1e-6)


def test_density_and_mode_rules():
    require_density(SamplerConfig("nextstep-1.1", 8, 0.8))  # noise on every step: exact speculative decoding
    with pytest.raises(ValueError, match="nextstep-1.1"):
        require_density(SamplerConfig("nextstep", 8))
    with pytest.raises(ValueError, match="--mode baseline"):
        check_mode_settings("sd", "nextstep")
    check_mode_settings("sd", "nextstep-1.1")
    check_mode_settings("baseline", "nextstep")
    with pytest.warns(UserWarning, match="student"):
        check_mode_settings("fastardiff", "nextstep")
    check_mode_settings("dmd", "sde", "lowres")  # logged, not an error
    with pytest.raises(ValueError, match="no noise level"):
        SamplerConfig("nextstep", 8, noise_level=0.8)
    with pytest.raises(ValueError, match="num_steps >= 2"):
        SamplerConfig("nextstep", 1)


def test_cfg_schedules_follow_the_official_pipelines():
    N, cfg = 16, 7.5
    n = torch.arange(N)
    for sched, official in [
        ("linear", lambda L: 1 + (cfg - 1) * (N - L) / N),  # pipeline_nextstep.py (NextStep-1), vLLM-Omni 1.1
        ("linear-rising", lambda L: max(cfg / 2, 1 + (cfg - 1) * L / N)),  # inference/gen_pipeline.py (1.1)
        ("constant", lambda L: cfg),
    ]:
        want = torch.tensor([official(tokens_len) for tokens_len in range(N)], dtype=torch.float32)
        assert torch.allclose(guidance_scale(CFGConfig(scale=cfg, schedule=sched), n, N), want, atol=1e-6), sched
    w = guidance_scale(CFGConfig(scale=cfg, schedule="linear"), n, N)
    assert w[0] == cfg and bool((w[1:] < w[:-1]).all())  # official direction: full guidance first


def test_use_norm_layer_norm_has_the_official_eps():
    x = torch.randn(3, 64) * 1e-3  # small variance: eps matters
    want = torch.nn.functional.layer_norm(x, (64,), None, None, 1e-6)
    assert torch.allclose(token_layernorm(x), want, atol=1e-6)
    assert not torch.allclose(token_layernorm(x), torch.nn.functional.layer_norm(x, (64,)), atol=1e-3)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    assert torch.allclose(token_layernorm(x), (x - mu) / torch.sqrt(var + 1e-6), atol=1e-5)
