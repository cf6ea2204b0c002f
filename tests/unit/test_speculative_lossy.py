"""The paper's rules (spec_lossy.py), which are NOT target-distributed: what each one commits, on the toy AR.

Exactness is not claimed for them; these tests pin their mechanics (acceptance extremes, what `commit` emits, CSpD's
independent acceptance, token pre-filling, static shapes, batching) and the config errors. Their quality is measured
on the bundled model (docs/results/speculation.md)."""
import dataclasses

import pytest
import torch

from fastardiff_ds.config import ConfigError, resolve_config
from fastardiff_ds.sampling.common import ARFlow
from fastardiff_ds.sampling.flow import SamplerConfig, sample_tokens
from fastardiff_ds.sampling.noise import make_generators
from fastardiff_ds.sampling.speculative import SpecConfig, check_pair, speculative_generate
from test_speculative_behaviour import SAMPLER, pair, prompts, run
from toy import GaussianFlowHead, ToyAR

FEATURE_ALL = SpecConfig(gamma=3, accept="feature", feature_threshold=1e9)


def test_feature_rule_extremes():
    target, draft = pair(bias=0.3)
    s = run(target, draft, FEATURE_ALL, B=4, N=9).stats
    assert s.acceptance_rate == 1.0 and s.resampled == 0 and s.rounds == 2
    # rows = samples x chains x K steps: token 0, then one chain per round at the bonus position only (commit=draft)
    assert s.target_head.rows == 4 * (1 + 2) * SAMPLER.steps
    s = run(target, draft, dataclasses.replace(FEATURE_ALL, feature_threshold=0.0), B=4, N=9).stats
    assert s.accepted == 0 and s.drafted > 0
    same_t, same_d = pair(bias=0.0)  # identical models: equal conditions, distance 0, accepted at threshold 0
    s = run(same_t, same_d, dataclasses.replace(FEATURE_ALL, feature_threshold=0.0), B=4, N=9).stats
    assert s.accepted == s.drafted > 0


def test_feature_threshold_orders_acceptance():
    """A draft whose conditions weigh the previous token otherwise: its distance to the target's varies with the
    tokens, so the acceptance grows with the threshold (bounded by the tanh of the toy's conditions)."""
    target, _ = pair()
    draft = ARFlow(ToyAR(2, prev_coef=1.0), GaussianFlowHead(2, 0.5), SAMPLER)
    rates = [run(target, draft, dataclasses.replace(FEATURE_ALL, feature_threshold=t), B=32).stats.acceptance_rate
             for t in (0.5, 0.65, 0.8)]
    assert 0 < rates[0] < rates[1] < rates[2] == 1.0


def test_commit_target_uses_the_drafts_noise():
    """Identical models: the target's chain on the draft's noise IS the draft's token, so commit=target equals
    commit=draft; with a biased draft they differ (the target's own tokens are committed)."""
    same_t, same_d = pair(bias=0.0)
    a = run(same_t, same_d, FEATURE_ALL, B=4, N=9).tokens
    b = run(same_t, same_d, dataclasses.replace(FEATURE_ALL, commit="target"), B=4, N=9)
    assert torch.allclose(a, b.tokens, atol=1e-12)
    # token 0, then per round one batched chain over all gamma+1 = 4 positions
    assert b.stats.target_head.rows == 4 * (1 + 2 * 4) * SAMPLER.steps
    target, draft = pair(bias=0.3)
    c = run(target, draft, FEATURE_ALL, B=4, N=9).tokens
    d = run(target, draft, dataclasses.replace(FEATURE_ALL, commit="target"), B=4, N=9).tokens
    assert not torch.allclose(c, d, atol=1e-3)


def test_cspd_inner_temperature_relaxes_and_independent_commits_every_draft():
    target, draft = pair(bias=0.3)
    cspd = SpecConfig(gamma=3, accept="cspd")
    one = run(target, draft, cspd, B=32).stats.acceptance_rate
    hot = run(target, draft, dataclasses.replace(cspd, cspd_inner_temperature=42.0), B=32).stats.acceptance_rate
    assert one < hot
    s = run(target, draft, dataclasses.replace(cspd, cspd_independent=True), B=8, N=9).stats
    assert 0 < s.acceptance_rate < 1 and s.resampled > 0
    assert set(s.accepted_lengths) == {3}  # every round: 3 drafts (rejected ones resampled) + the bonus token


def test_prefill_ratio_leaves_the_prefix_to_the_target():
    target, draft = pair(bias=0.0)
    s = run(target, draft, dataclasses.replace(FEATURE_ALL, prefill_ratio=0.5), B=2, N=8).stats
    # tokens 0..3 from the target alone (token 0 at the prefill, then 3 one-token rounds), then 3 drafts + bonus
    assert s.rounds == 4 and s.drafted == 2 * 3 and s.draft_sessions == 2


@pytest.mark.parametrize("spec", [FEATURE_ALL, dataclasses.replace(FEATURE_ALL, commit="target"),
                                  SpecConfig(gamma=3, accept="cspd", cspd_inner_temperature=4.0)],
                         ids=["feature", "feature-commit-target", "cspd"])
def test_static_shapes_give_the_same_tokens(spec):
    """A model with a chain (compiled) gets padded verification and head batches; the committed tokens are the same."""
    target, draft = pair(bias=0.3)
    chained = dataclasses.replace(target, chain=sample_tokens)
    assert torch.allclose(run(target, draft, spec).tokens, run(chained, draft, spec).tokens, atol=1e-12)


@pytest.mark.parametrize("spec", [FEATURE_ALL, SpecConfig(gamma=3, accept="cspd", cspd_independent=True)],
                         ids=["feature", "cspd-independent"])
def test_batched_equals_per_sample(spec):
    target, draft = pair(bias=0.3)
    B, N = 4, 9
    batched = run(target, draft, spec, B=B, N=N, seeds=[7, 8, 9, 10])
    ids, mask = prompts(B)
    for b in range(B):
        one = speculative_generate(target, draft, ids[b:b + 1], mask[b:b + 1], N, make_generators([7 + b]), spec)
        assert torch.allclose(one.tokens[0], batched.tokens[b], atol=1e-12), b


def test_draft_chain_of_its_own_length_needs_the_feature_rule():
    target, draft = pair()
    short = ARFlow(draft.ar, draft.head, SamplerConfig(kind="sde", num_steps=2), draft.cfg)
    check_pair(target, short, FEATURE_ALL)
    out = run(target, short, FEATURE_ALL, B=2, N=6)
    assert out.stats.draft_head.rows == 2 * out.stats.drafted
    with pytest.raises(ValueError, match="inference.accept=feature"):
        check_pair(target, short, SpecConfig(gamma=3, accept="cspd"))


@pytest.mark.parametrize("override,match", [
    ("inference.accept=greedy", "inference.accept"),
    ("inference.feature_threshold=-0.1", "inference.feature_threshold"),
    ("inference.prefill_ratio=1.0", "inference.prefill_ratio"),
    ("inference.prefill_ratio=-0.1", "inference.prefill_ratio"),
    ("inference.relax_temperature=0.5", "inference.relax_temperature"),
    ("inference.feature_metric=dot", "inference.feature_metric"),
    ("inference.commit=both", "inference.commit"),
    ("inference.draft_steps=0", "inference.draft_steps"),
])
def test_bad_rule_settings_are_config_errors(override, match):
    """Refused when the config is resolved, before any model is built."""
    with pytest.raises(ConfigError, match=match):
        resolve_config("tiny", overrides=[override])


def test_relaxed_needs_a_temperature_and_exact_refuses_one():
    with pytest.raises(ValueError, match="T > 1"):
        SpecConfig(accept="relaxed")
    with pytest.raises(ValueError, match="only accept=relaxed"):
        SpecConfig(accept="exact", relax_temperature=2.0)
    assert not SpecConfig(accept="relaxed", relax_temperature=2.0).lossy  # relaxed runs the exact round
