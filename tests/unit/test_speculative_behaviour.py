"""Speculative decoding mechanics on the toy AR: acceptance extremes, entropy early stop, batching, validation."""
import pytest
import torch

from fastardiff_ds.sampling.ar_loop import generate_ar
from fastardiff_ds.sampling.common import ARFlow
from fastardiff_ds.sampling.flow import SamplerConfig
from fastardiff_ds.sampling.guidance import CFGConfig
from fastardiff_ds.sampling.noise import make_generators
from fastardiff_ds.sampling.speculative import SpecConfig, speculative_generate
from toy import GaussianFlowHead, ToyAR

D = 2
SAMPLER = SamplerConfig(kind="sde", num_steps=4, noise_level=1.0)
INF = float("inf")


def pair(bias=0.3, entropy_gain=2.0, cfg=CFGConfig(mode="none"), draft_cfg=None, sampler=SAMPLER):
    target = ARFlow(ToyAR(D), GaussianFlowHead(D, 0.5), sampler, cfg)
    draft = ARFlow(ToyAR(D, bias=bias, entropy_gain=entropy_gain), GaussianFlowHead(D, 0.5), sampler,
                   draft_cfg or cfg)
    return target, draft


def prompts(B, rows=None):
    ids = torch.randint(1, 16, (rows or B, 3), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def run(target, draft, spec, B=8, N=9, seeds=None, rows=None):
    ids, mask = prompts(B, rows)
    return speculative_generate(target, draft, ids, mask, N, make_generators(seeds or range(B)), spec)


def test_draft_equal_to_target_is_always_accepted():
    target, draft = pair(bias=0.0)
    out = run(target, draft, SpecConfig(gamma=3), B=4, N=9)
    s = out.stats
    assert s.drafted == 4 * 6 and s.accepted == s.drafted and s.resampled == 0
    # token 0 from the prefill, then 2 rounds of 3 drafts + 1 bonus token: 1 prefill + 2 verification passes
    assert s.rounds == 2 and s.target_forwards == 3 and s.mean_accepted_length == 4.0
    assert s.draft_forwards == 1 + 2 * 3  # prefill; per round: the window + the first two drafts


def test_cspd_shared_noise_accepts_identical_models():
    target, draft = pair(bias=0.0)
    out = run(target, draft, SpecConfig(gamma=3, accept="cspd"), B=4, N=9)
    assert out.stats.accepted == out.stats.drafted > 0


def test_tau_plus_inf_never_drafts_and_equals_the_baseline():
    target, draft = pair()
    ids, mask = prompts(6)
    base = generate_ar(target, ids, mask, 7, make_generators(range(6))).tokens
    out = run(target, draft, SpecConfig(gamma=4, tau=INF), B=6, N=7)
    assert out.stats.drafted == 0 and out.stats.draft_forwards == 0
    assert torch.equal(out.tokens, base)


def test_entropy_below_tau_everywhere_stops_every_session():
    target, draft = pair()
    out = run(target, draft, SpecConfig(gamma=4, tau=1.01), B=6, N=7)  # entropy is in [0, 1]
    assert out.stats.drafted == 0 and out.stats.early_stop_rate == 1.0
    ids, mask = prompts(6)
    assert torch.equal(out.tokens, generate_ar(target, ids, mask, 7, make_generators(range(6))).tokens)


@pytest.mark.parametrize("tau", [-INF, 0.0])
def test_tau_minus_inf_never_stops_early(tau):
    target, draft = pair(bias=0.0)
    out = run(target, draft, SpecConfig(gamma=3, tau=tau), B=4, N=9)
    assert out.stats.early_stops == 0 and out.stats.drafted == 4 * 6


def test_partial_early_stop_and_stats():
    target, draft = pair()
    out = run(target, draft, SpecConfig(gamma=4, tau=0.5), B=16, N=12)
    s = out.stats
    assert 0.0 < s.early_stop_rate < 1.0 and 0 < s.drafted
    assert len(s.accepted_lengths) == 16 * 11 - sum(s.accepted_lengths)  # every sample-round commits a+1 tokens
    assert s.tokens == 16 * 12 and out.tokens.shape == (16, 12, D)


def test_batched_equals_per_sample_runs():
    # two-pass CFG target, distilled draft, early stop on, left-padded prompts of different lengths
    target, draft = pair(cfg=CFGConfig(scale=2.0, schedule="linear"),
                         draft_cfg=CFGConfig(scale=2.0, schedule="linear", mode="distilled"))
    B, N, seeds = 5, 8, [11, 12, 13, 14, 15]
    ids = torch.randint(1, 16, (2 * B, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for b in range(B):  # left padding: sample b has 4 - b % 3 real prompt tokens
        mask[b, : b % 3] = 0
        ids[b, : b % 3] = 0
    ids[B:], mask[B:] = 0, 1
    spec = SpecConfig(gamma=3, tau=0.4)
    batched = speculative_generate(target, draft, ids, mask, N, make_generators(seeds), spec)
    assert batched.stats.resampled > 0 and batched.stats.early_stops > 0
    for b in range(B):
        pad = b % 3  # the single-sample prompt carries no padding at all
        one = speculative_generate(target, draft, ids[[b, B + b], pad:], mask[[b, B + b], pad:], N,
                                   make_generators([seeds[b]]), spec)
        assert torch.allclose(one.tokens[0], batched.tokens[b], atol=1e-10), b


def test_relaxed_rule_accepts_more():
    target, draft = pair()
    exact = run(target, draft, SpecConfig(gamma=3), B=64).stats.acceptance_rate
    relaxed = run(target, draft, SpecConfig(gamma=3, accept="relaxed", relax_temperature=4.0), B=64).stats.acceptance_rate
    assert relaxed > exact + 0.1


def test_validation_errors():
    target, draft = pair()
    with pytest.raises(ValueError, match="std 0"):
        run(*pair(sampler=SamplerConfig(kind="ode", num_steps=4)), SpecConfig())
    with pytest.raises(ValueError, match="std 0"):
        run(*pair(sampler=SamplerConfig(kind="consistency", num_steps=2)), SpecConfig())
    short = ARFlow(draft.ar, draft.head, SamplerConfig(kind="sde", num_steps=2))
    with pytest.raises(ValueError, match="same length"):
        run(target, short, SpecConfig())
    no_entropy = ARFlow(ToyAR(D), draft.head, SAMPLER)
    with pytest.raises(ValueError, match="entropy"):
        run(target, no_entropy, SpecConfig(tau=0.5))
    run(target, no_entropy, SpecConfig(tau=-INF), B=2, N=3)  # no entropy needed without early stop
    cfg_target = ARFlow(target.ar, target.head, SAMPLER, CFGConfig(scale=2.0))
    with pytest.raises(ValueError, match="unconditional"):
        run(cfg_target, draft, SpecConfig(), B=4)  # two-pass CFG but only B prompt rows
    for bad in (dict(gamma=-1), dict(accept="greedy"), dict(accept="relaxed", relax_temperature=0.5), dict(relax_temperature=2.0), dict(prefill_ratio=1.0), dict(feature_threshold=-0.1), dict(accept="feature", feature_metric="dot"), dict(commit="both"), dict(tau=float("nan"))):
        with pytest.raises(ValueError):
            SpecConfig(**bad)
