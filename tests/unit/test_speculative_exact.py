"""Speculative decoding is lossless: its tokens are distributed as target-only sampling (DESIGN.md §4).

Toy: continuous tokens (2-d, 4 per sequence), analytic Gaussian heads, a causal toy AR whose next-token condition
depends on the history; the draft is the same AR with its condition shifted by 0.3 (data std 0.5), so its proposals
are visibly wrong and about half are rejected. One fixed prompt, so each group is i.i.d. and the permutation
p-values are exact. The statistic is `two_sample_test`: the energy distance and a max-|z| test of per-coordinate
first and second moments (the one that sees the small mean / spread errors lossy rules make), Bonferroni-combined.

Power is shown, not assumed: every exactness variant (early stop, CFG teacher + distilled draft, the NextStep-1.1
sampler, the adaptive policy, NextStep's token layer norm, the real tiny TargetAR/DraftAR/FlowHead, the EAGLE
draft; compiled chains in test_compiled.py) runs twice, once exact (must pass) and once with the relaxed rule
min(1, (P/Q)^(1/2)) (must be rejected). On the plain toy the test must also reject always-accept, resampling from
P instead of the residual, CSpD's published rule (inner temperature 42) and CSpD's rule with unequal chain stds.
"""
import pytest
import torch

from fastardiff_ds.analysis.two_sample import two_sample_test
from fastardiff_ds.sampling import spec_exact
from fastardiff_ds.sampling.ar_loop import generate_ar
from fastardiff_ds.sampling.common import ARFlow
from fastardiff_ds.sampling.flow import SamplerConfig
from fastardiff_ds.sampling.guidance import CFGConfig
from fastardiff_ds.sampling.noise import make_generators
from fastardiff_ds.sampling.speculative import SpecConfig, speculative_generate
from toy import GaussianFlowHead, ToyAR

N_SAMPLES, N_TOKENS, D = 2000, 4, 2
SAMPLER = SamplerConfig(kind="sde", num_steps=4, noise_level=1.0)
RELAXED = 2.0  # relax_temperature of the broken control: lossy by design (acceptance.exact_log_ratio)


def models(draft_bias=0.3, target_cfg=CFGConfig(mode="none"), draft_cfg=CFGConfig(mode="none"), sampler=SAMPLER,
           draft_sampler=None, dim=D, token_layernorm=False):
    target = ARFlow(ToyAR(dim), GaussianFlowHead(dim, 0.5), sampler, target_cfg, token_layernorm=token_layernorm)
    draft = ARFlow(ToyAR(dim, bias=draft_bias, entropy_gain=2.0), GaussianFlowHead(dim, 0.5),
                   draft_sampler or sampler, draft_cfg, token_layernorm=token_layernorm)
    return target, draft


def prompts(rows):
    ids = torch.tensor([[3, 7, 5]]).repeat(rows, 1)
    if rows == 2 * N_SAMPLES:  # unconditional (empty) prompts as rows [B, 2B)
        ids[N_SAMPLES:] = 0
    return ids, torch.ones_like(ids)


def reference(target, rows=N_SAMPLES, num_tokens=N_TOKENS):
    ids, mask = prompts(rows)
    gens = make_generators(range(10**6, 10**6 + N_SAMPLES))  # seeds disjoint from the speculative runs'
    with torch.no_grad():
        return generate_ar(target, ids, mask, num_tokens, gens).tokens.flatten(1)


def spec_vs_target(target, draft, spec, rows=N_SAMPLES, label="exact", num_tokens=N_TOKENS):
    ids, mask = prompts(rows)
    out = speculative_generate(target, draft, ids, mask, num_tokens, make_generators(range(N_SAMPLES)), spec)
    p_e, p_m, p = two_sample_test(out.tokens.flatten(1), reference(target, rows, num_tokens))
    print(f"\n[{label}: accept={spec.accept} T={spec.relax_temperature} tau={spec.tau}] "
          f"acceptance={out.stats.acceptance_rate:.3f} p_energy={p_e:.3f} p_moment={p_m:.3f} p={p:.3f} "
          f"fallbacks={out.stats.fallbacks}")
    return out, p


# --- the exactness variants: (target, draft, spec, prompt rows, tokens per sequence) -------------------------------

def _plain():
    return (*models(), SpecConfig(gamma=3), N_SAMPLES, N_TOKENS)


def _early_stop():  # tau = 0.5 stops drafting on the draft's (token-dependent) entropy
    return (*models(), SpecConfig(gamma=3, tau=0.5), N_SAMPLES, N_TOKENS)


def _cfg_distilled_draft():
    # target: two-pass CFG (per-token schedule: w = 1, 1.25, 1.5, 1.75) on a doubled AR batch; draft: guidance-input
    # student, no uncond pass
    pair = models(target_cfg=CFGConfig(scale=2.0, schedule="linear-rising"),
                  draft_cfg=CFGConfig(scale=2.0, schedule="linear-rising", mode="distilled"))
    return (*pair, SpecConfig(gamma=3), 2 * N_SAMPLES, N_TOKENS)


def _nextstep_1_1():  # the official NextStep-1.1 SDE (noise on every step, eta 0.8, shifted grid)
    official = SamplerConfig(kind="nextstep-1.1", num_steps=4, noise_level=0.8, time_shift=2.0)
    return (*models(sampler=official), SpecConfig(gamma=3), N_SAMPLES, N_TOKENS)


def _adaptive():
    # c = 0.35: one rejected probe (alpha_hat 1/3) retires a sample, one accepted probe (2/3) moves it to gamma 2
    spec = SpecConfig(gamma=3, policy="adaptive", draft_cost=0.35, probe_drafts=1)
    return (*models(), spec, N_SAMPLES, 6)


def _token_layernorm():
    # NextStep's use_norm: emitted and fed-back tokens are layer_norm(x_K); 4-d tokens. The draft's shift varies by
    # coordinate: a uniform one would be centred away by the norm and leave the tokens' law unchanged.
    bias = torch.tensor([0.3, -0.3, 0.15, -0.15], dtype=torch.float64)
    return (*models(draft_bias=bias, dim=4, token_layernorm=True), SpecConfig(gamma=3), N_SAMPLES, N_TOKENS)


def _real_models():  # TargetAR / truncated DraftAR / FlowHead (random, non-zero), two-pass CFG, 4-d tokens
    from test_speculative_real_models import build

    return (*build(), SpecConfig(gamma=3), 2 * N_SAMPLES, 3)


def _real_models_layernorm():
    # NextStep's token layer norm, as the NextStep presets run, on real models. With unit-norm tokens fed back the
    # 1-layer truncated draft is hopeless here (acceptance 0), so the draft is the full-depth copy with its weights
    # moved by N(0, 0.006^2)
    from test_speculative_real_models import build

    target, draft = build(draft_layers=3, token_layernorm=True)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in draft.ar.parameters():
            p.add_(0.006 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return target, draft, SpecConfig(gamma=3), 2 * N_SAMPLES, 3


def _eagle():  # feature-level draft reading the target's hidden states, its fuse moved off the truncated draft
    from test_eagle_draft import build

    _, target, draft = build(randomise_fuse=False)
    torch.manual_seed(1)
    with torch.no_grad():
        draft.ar.feature_fuse.weight.add_(0.01 * torch.randn_like(draft.ar.feature_fuse.weight))
    return target, draft, SpecConfig(gamma=3), 2 * N_SAMPLES, 3


VARIANTS = {"plain": _plain, "early-stop": _early_stop, "cfg-distilled-draft": _cfg_distilled_draft,
            "nextstep-1.1": _nextstep_1_1, "adaptive": _adaptive, "token-layernorm": _token_layernorm,
            "real-models": _real_models, "real-models-layernorm": _real_models_layernorm,
            "eagle": _eagle}
@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_rule_is_lossless(variant):
    target, draft, spec, rows, num_tokens = VARIANTS[variant]()
    out, p = spec_vs_target(target, draft, spec, rows, f"{variant} exact", num_tokens)
    assert 0.15 < out.stats.acceptance_rate < 0.9  # the draft is really different, and really used
    assert out.stats.fallbacks == 0
    assert (out.stats.early_stops > 0) == (spec.tau > float("-inf"))
    assert (out.stats.policy_skips > 0) == (spec.policy == "adaptive")
    assert p > 0.01


@pytest.mark.parametrize("variant", VARIANTS)
def test_relaxed_rule_is_detected(variant):
    """The broken control of each variant: the same run with acceptance min(1, (P/Q)^(1/2)) must fail the test."""
    import dataclasses

    target, draft, spec, rows, num_tokens = VARIANTS[variant]()
    relaxed = dataclasses.replace(spec, accept="relaxed", relax_temperature=RELAXED)
    _, p = spec_vs_target(target, draft, relaxed, rows, f"{variant} BROKEN relaxed", num_tokens)
    assert p < 0.01


def test_always_accept_is_detected(monkeypatch):
    target, draft = models()
    monkeypatch.setattr(spec_exact, "exact_log_ratio", lambda *a, **k: torch.tensor(float("inf"), dtype=torch.float64))
    out, p = spec_vs_target(target, draft, SpecConfig(gamma=3), label="BROKEN always-accept")
    assert out.stats.acceptance_rate == 1.0
    assert p < 0.01


def test_resampling_from_target_instead_of_residual_is_detected(monkeypatch):
    target, draft = models()
    monkeypatch.setattr(spec_exact, "residual_accept_prob", lambda log_q, log_p: torch.ones_like(log_q))
    _, p = spec_vs_target(target, draft, SpecConfig(gamma=3), label="BROKEN resample-from-P")
    assert p < 0.01


def test_hopeless_draft_is_rejected_and_still_lossless():
    target, draft = models(draft_bias=5.0)
    out, p = spec_vs_target(target, draft, SpecConfig(gamma=2), label="hopeless draft")
    assert out.stats.acceptance_rate < 0.01
    assert out.stats.resample_tries < 1.05 * out.stats.resampled  # residual ~ P: about one try each
    assert p > 0.01


def test_cspd_published_rule_is_detected():
    # CSpD's code divides the last step's z-scores by an inner temperature of 42: nearly every draft is accepted
    target, draft = models()
    out, p = spec_vs_target(target, draft, SpecConfig(gamma=3, accept="cspd", cspd_inner_temperature=42.0),
                            label="CSpD T_in=42")
    assert out.stats.acceptance_rate > 0.9
    assert p < 0.01


def test_cspd_rule_with_unequal_chain_stds_is_detected():
    # a draft chain with less noise (eta 0.6 against the target's 1.0): CSpD's factor prod_{k<K-1} (s_p/s_q)^D
    # inflates the ratio, and the output is far from the target's
    quiet = SamplerConfig(kind="sde", num_steps=4, noise_level=0.6)
    target, draft = models(draft_sampler=quiet)
    exact, p_exact = spec_vs_target(target, draft, SpecConfig(gamma=3), label="exact, draft eta 0.6")
    cspd, p = spec_vs_target(target, draft, SpecConfig(gamma=3, accept="cspd"), label="CSpD, draft eta 0.6")
    assert p_exact > 0.01 and exact.stats.fallbacks == 0
    assert cspd.stats.acceptance_rate > exact.stats.acceptance_rate
    assert p < 0.01


def test_cspd_rule_at_unit_temperature_and_equal_stds_is_exact():
    """Why CSpD at T_in = 1 passes on the plain toy, and is not a gap in the test's power: with shared noise and the
    same transition stds in both chains, CSpD's test is, given the noise of the first K-1 steps, ordinary
    speculative sampling between the two last-step Gaussians N(m_q, s^2) and N(m_p, s^2), whose std factor is 1;
    and the target's chain driven by that noise is a target sample. So the output is exactly target-distributed --
    up to fallbacks, which use the shared-noise token. Any other T_in or unequal stds break this (tests above)."""
    target, draft = models()
    out, p = spec_vs_target(target, draft, SpecConfig(gamma=3, accept="cspd"), label="CSpD T_in=1, equal stds")
    assert 0.2 < out.stats.acceptance_rate < 0.9 and out.stats.fallbacks == 0
    assert p > 0.01
