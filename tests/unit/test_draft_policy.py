"""The adaptive draft length: the gamma that pays (Leviathan et al. §3.5), retirement of hopeless drafts (its
exactness, with a broken control, is a variant of test_speculative_exact.py)."""
import pytest
import torch

from fastardiff_ds.sampling.common import ARFlow
from fastardiff_ds.sampling.draft_policy import DraftPolicy, choose_gamma, draft_cost_ratio, expected_speedup
from fastardiff_ds.sampling.flow import SamplerConfig
from fastardiff_ds.sampling.guidance import CFGConfig
from fastardiff_ds.sampling.noise import make_generators
from fastardiff_ds.sampling.speculative import SpecConfig, speculative_generate
from toy import GaussianFlowHead, ToyAR

D = 2
SAMPLER = SamplerConfig(kind="sde", num_steps=4, noise_level=1.0)


def pair(bias):
    return (ARFlow(ToyAR(D), GaussianFlowHead(D, 0.5), SAMPLER),
            ARFlow(ToyAR(D, bias=bias, entropy_gain=2.0), GaussianFlowHead(D, 0.5), SAMPLER))


def run(target, draft, spec, B, N, seeds=None):
    ids = torch.tensor([[3, 7, 5]]).repeat(B, 1)
    return speculative_generate(target, draft, ids, torch.ones_like(ids), N,
                                make_generators(seeds if seeds is not None else range(B)), spec)


def test_expected_speedup_known_values():
    # alpha = 0.5, gamma = 2, c = 0.25: (1 - 1/8) / (0.5 * 1.5) = 7/6
    got = expected_speedup(torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64), 0.25)
    assert got.item() == pytest.approx(7 / 6)
    assert expected_speedup(torch.tensor(0.3), torch.tensor(0.0), 0.5).item() == pytest.approx(1.0)


def test_choose_gamma_follows_the_cost_model():
    pol = DraftPolicy("adaptive", draft_cost=0.1, probe_drafts=0)
    acc, dft = torch.tensor([0, 9, 99, 0]), torch.tensor([100, 10, 100, 0])
    g = choose_gamma(pol, 6, acc, dft)
    # alpha ~ 0.01: drafting never pays; alpha ~ 0.83 / 0.98: long drafts pay; no evidence: the prior (0.5) -> 1..2
    assert g[0] == 0 and g[1] >= 3 and g[2] == 6 and 1 <= g[3] <= 2
    assert choose_gamma(DraftPolicy("adaptive", draft_cost=0.6, probe_drafts=0), 6, acc, dft)[3] == 0
    probing = DraftPolicy("adaptive", draft_cost=0.6, probe_drafts=4)
    assert choose_gamma(probing, 6, torch.tensor([0, 0]), torch.tensor([3, 4])).tolist() == [1, 0]
    assert choose_gamma(DraftPolicy(), 5, acc, dft).tolist() == [5] * 4  # fixed
    with pytest.raises(ValueError, match="draft_cost"):
        DraftPolicy("adaptive")


def test_adaptive_grows_to_full_gamma_for_a_perfect_draft():
    target, draft = pair(bias=0.0)
    out = run(target, draft, SpecConfig(gamma=3, policy="adaptive", draft_cost=0.2), B=4, N=30)
    s = out.stats
    assert s.accepted == s.drafted and s.resampled == 0 and s.policy_skips == 0
    # from the prior (alpha 0.5 -> gamma 1) it lengthens as drafts are accepted, then stays at gamma = 3
    per_round = torch.tensor(s.accepted_lengths).view(-1, 4)[:, 0]  # all samples move in lockstep
    assert per_round[0] == 1 and (per_round[3:-1] == 3).all()


def test_adaptive_retires_a_hopeless_draft_and_stops_reading():
    target, draft = pair(bias=5.0)
    fixed = run(target, draft, SpecConfig(gamma=3), B=4, N=24).stats
    adaptive = run(target, draft, SpecConfig(gamma=3, policy="adaptive", draft_cost=0.3, probe_drafts=2), B=4,
                   N=24).stats
    assert adaptive.drafted <= 4 * 2 < fixed.drafted
    assert adaptive.draft_forwards < fixed.draft_forwards / 4 and adaptive.policy_skips > 0


def test_draft_cost_ratio_from_parameters():
    lin = lambda n: torch.nn.Linear(n, n, bias=False)  # noqa: E731
    s4, s2 = SamplerConfig("sde", 4), SamplerConfig("consistency", 4, final_std=0.1)
    target = ARFlow(lin(10), lin(2), s4, CFGConfig(scale=3.0))  # 100 AR + 4 head params, two-pass CFG
    draft = ARFlow(lin(5), lin(2), s2, CFGConfig(scale=3.0, mode="distilled"))
    # (25 + 4*4 + 2*4*4) / (2 * (100 + 4*4)) = 73 / 232
    assert draft_cost_ratio(target, draft) == pytest.approx(73 / 232)
    with pytest.raises(ValueError, match="draft_cost"):
        draft_cost_ratio(*pair(0.0))


def test_adaptive_batched_equals_per_sample_runs():
    # each sample's gamma follows its own acceptance only: a batch gives each sample its single-sample result
    target, draft = pair(bias=0.3)
    spec = SpecConfig(gamma=3, tau=0.4, policy="adaptive", draft_cost=0.3, probe_drafts=2)
    seeds = [21, 22, 23, 24, 25, 26]
    batched = run(target, draft, spec, B=6, N=16, seeds=seeds)
    assert batched.stats.policy_skips > 0 and batched.stats.accepted > 0
    for b, seed in enumerate(seeds):
        one = run(target, draft, spec, B=1, N=16, seeds=[seed])
        assert torch.allclose(one.tokens[0], batched.tokens[b], atol=1e-10), b
