"""Baseline AR loop: conditions flow token by token, CFG doubling, counts, seeding."""
import torch

from fastardiff_ds.sampling.ar_loop import generate_ar
from fastardiff_ds.sampling.common import ARFlow
from fastardiff_ds.sampling.flow import SamplerConfig
from fastardiff_ds.sampling.guidance import CFGConfig
from fastardiff_ds.sampling.noise import make_generators
from toy import GaussianFlowHead, ToyAR

D, S = 2, 0.5
ODE = SamplerConfig(kind="ode", num_steps=200)


def first_noise(seed, K, n_tokens):
    """x_0 of each token's chain: row 0 of each (K+1, D) block drawn from the sample's generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(K + 1, D, generator=g, dtype=torch.float64)[0] for _ in range(n_tokens)])


def expected_tokens(ar, ids, z, w=1.0):
    """ODE transport of N(mu, S^2) is mu + S z; mu follows the toy AR's history rule (uncond prompt = 0)."""
    prompt = ar.embed[ids].sum(0)
    toks = []
    for i in range(len(z)):
        if toks:
            hist = torch.stack(toks)
            mu_c = prompt + ar.prev_coef * torch.tanh(hist[-1]) + ar.mean_coef * hist.mean(0)
            mu_u = mu_c - prompt
        else:
            mu_c, mu_u = prompt, torch.zeros(D, dtype=torch.float64)
        toks.append(mu_u + w * (mu_c - mu_u) + S * z[i])
    return torch.stack(toks)


def test_tokens_follow_the_ar_conditions():
    ar = ToyAR(D)
    model = ARFlow(ar, GaussianFlowHead(D, S), ODE)
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    out = generate_ar(model, ids, torch.ones_like(ids), 5, make_generators([0, 1]))
    for b in range(2):
        want = expected_tokens(ar, ids[b], first_noise(b, ODE.steps, 5))
        assert torch.allclose(out.tokens[b], want, atol=2e-2), (out.tokens[b], want)
    assert out.stats.target_forwards == 5  # 1 prefill + 4 decodes
    assert out.stats.target_head.calls == 5 * ODE.steps and out.stats.target_head.rows == 2 * 5 * ODE.steps


def test_two_pass_cfg_doubles_the_batch():
    ar = ToyAR(D)
    model = ARFlow(ar, GaussianFlowHead(D, S), ODE, CFGConfig(scale=3.0))
    ids = torch.tensor([[3, 4, 5], [0, 0, 0]])  # row 1: the unconditional (empty) prompt
    out = generate_ar(model, ids, torch.ones_like(ids), 4, make_generators([7]))
    want = expected_tokens(ar, ids[0], first_noise(7, ODE.steps, 4), w=3.0)
    assert torch.allclose(out.tokens[0], want, atol=3e-2)
    assert out.stats.target_head.rows == 2 * 4 * ODE.steps


def test_batched_equals_per_sample_and_seeds_matter():
    model = ARFlow(ToyAR(D), GaussianFlowHead(D, S), SamplerConfig(kind="sde", num_steps=8, noise_level=0.7),
                   token_layernorm=True)
    ids = torch.randint(1, 16, (4, 3), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    batched = generate_ar(model, ids, mask, 6, make_generators([5, 6, 7, 8]), progress=True).tokens
    for b in range(4):
        one = generate_ar(model, ids[b : b + 1], mask[b : b + 1], 6, make_generators([5 + b])).tokens
        assert torch.allclose(one[0], batched[b], atol=1e-12)
    other = generate_ar(model, ids, mask, 6, make_generators([9, 6, 7, 8])).tokens
    assert not torch.allclose(other[0], batched[0]) and torch.equal(other[1:], batched[1:])
    # NextStep-1 use_norm: every emitted token is layer-normalised
    assert torch.allclose(batched.mean(-1), torch.zeros(4, 6, dtype=torch.float64), atol=1e-6)
