"""Compiled decode (sampling/compiled.py): the static KV cache and the compiled AR / head-chain steps give the eager
path's numbers, in every inference mode, and speculative decoding stays lossless with compilation on.

Most tests compile with backend 'aot_eager' (dynamo + AOT autograd tracing, no code generation: it checks that the
static-cache decode and the chain step trace as whole graphs, in seconds); `test_every_mode_inductor` generates
real inductor kernels, as `inference.compile=true` does on CPU.
"""
import copy
import dataclasses

import pytest
import torch

from fastardiff_ds.inference import Pipeline, random_init_bundle
from fastardiff_ds.sampling.common import ARFlow, sample_rows
from fastardiff_ds.sampling.compiled import CompiledAR, CompileOptions, Compiler, HeadChain, graphs_compiled
from fastardiff_ds.sampling.flow import SamplerConfig, sample_tokens
from fastardiff_ds.sampling.guidance import CFGConfig, HeadCounter, VelocityField
from fastardiff_ds.sampling.noise import make_generators

TRACE = CompileOptions(backend="aot_eager")


def test_static_cache_decode_matches_eager_with_rollback(tiny_models):
    target = tiny_models[1]
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = (ids != 0).long()
    eager, comp = target, CompiledAR(target, TRACE)
    caches = [m.new_cache(2, 16) for m in (eager, comp)]
    assert not caches[0].static and caches[1].static
    for m, c in zip((eager, comp), caches):
        m.prefill(ids, mask, c)
    torch.manual_seed(0)
    for width in (1, 3, 1, 2):  # one-token decodes and verification-width passes, with a per-row rollback between
        tokens = torch.randn(2, width, target.token_dim)
        a, b = (m.decode(tokens, c, explicit_layer=1) for m, c in zip((eager, comp), caches))
        for key in ("cond", "hidden", "entropy"):
            assert torch.allclose(a[key], b[key], atol=1e-5), key
        back = caches[0].lengths - torch.tensor([1, 0])
        for c in caches:
            c.rollback(back)
    assert torch.equal(caches[0].lengths, caches[1].lengths)


def _field(head, cond, mode, n, counter):
    scale = torch.full((n,), 3.0) if mode != "none" else None
    uncond = torch.randn_like(cond) if mode == "two_pass" else None
    return VelocityField(head, cond, CFGConfig(3.0 if mode != "none" else 1.0, mode=mode), scale, uncond, counter)


@pytest.mark.parametrize("mode,kind", [("two_pass", "sde"), ("none", "ode"), ("distilled", "consistency"),
                                       ("two_pass", "nextstep-1.1")])
def test_head_chain_matches_sample_tokens(tiny_cfg, mode, kind):
    from fastardiff_ds.models import build_head

    torch.manual_seed(1)
    head = build_head(tiny_cfg, student=mode == "distilled").eval()
    for p in head.parameters():  # adaLN-zero starts as a constant field: give every weight a value
        p.data.normal_(0, 0.2)
    steps = {"consistency": 2, "nextstep-1.1": 6}.get(kind, 5)
    sampler = SamplerConfig(kind, steps, noise_level=1.0 if kind != "nextstep-1.1" else 0.8,
                            final_std=0.05 if kind == "consistency" else 0.0)
    n, dim = 3, head.token_dim
    cond = torch.randn(n, tiny_cfg.model.ar.hidden_size)
    noise = torch.randn(n, sampler.steps + 1, dim)
    counters = HeadCounter(), HeadCounter()
    fld = _field(head, cond, mode, n, counters[0])
    with torch.no_grad():
        want = sample_tokens(fld, sampler, noise)
        got = HeadChain(head, TRACE)(dataclasses.replace(fld, counter=counters[1]), sampler, noise)
    assert torch.allclose(got.states, want.states, atol=1e-5)
    assert torch.allclose(got.means, want.means, atol=1e-5)
    assert torch.equal(got.stds, want.stds)
    assert counters[0] == counters[1]  # the same head-call counts as K VelocityField calls


def _bundle(tiny_cfg, head_std=0.05):
    """Random models whose tokens depend on every network. random_init_bundle's heads have zero adaLN / final layers
    (v = 0 for every input: tokens would be pure noise and every draft accepted), so every head weight is drawn
    from N(0, head_std^2); 0.05 keeps acceptance inside (0, 1) in sd and fastardiff modes
    (test_compared_tokens_depend_on_every_network)."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.draft.num_layers = 1
    cfg.model.draft.entropy_layer = cfg.model.draft.shallow_layer = 0
    cfg.model.image.resolution = 16  # 16 image tokens: AR feedback stays well conditioned in fp32
    cfg.inference.num_steps, cfg.inference.cfg_scale, cfg.inference.gamma = 6, 1.5, 3
    cfg.inference.draft_policy = "fixed"  # gamma drafts every round: verification and rollback run every round
    bundle = random_init_bundle(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for head in (bundle.head, bundle.student):
            for p in head.parameters():
                p.copy_(head_std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return bundle


def _tokens(bundle, mode, opts=None):
    b = dataclasses.replace(bundle, cfg=copy.deepcopy(bundle.cfg))
    b.cfg.inference.compile = opts is not None
    pipe = Pipeline(b, mode)
    if opts is not None:
        pipe.compiler = Compiler(opts)
    return pipe.generate_tokens(["a red circle", "two blue squares"], [3, 4])


def _perturbed(bundle, name, scale=0.01):
    b = dataclasses.replace(bundle, **{name: copy.deepcopy(getattr(bundle, name))})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in getattr(b, name).parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return b


MODE_NETWORKS = {"baseline": ("target", "head"), "sd": ("target", "head", "draft"), "dmd": ("target", "student"),
                 "fastardiff": ("target", "student", "draft")}


@pytest.mark.parametrize("mode", list(MODE_NETWORKS))
def test_compared_tokens_depend_on_every_network(tiny_cfg, mode):
    """The guard of the compiled == eager tests: with these models a 1 % weight perturbation of any network a mode
    uses moves its tokens by far more than the comparisons' atol (1e-4), and speculative modes both accept and
    reject drafts -- so a wrong compiled decode, cache rollback or verification pass cannot hide."""
    bundle = _bundle(tiny_cfg)
    ref = _tokens(bundle, mode)
    if mode in ("sd", "fastardiff"):
        assert 0.0 < ref.stats.acceptance_rate < 1.0 and ref.stats.drafted >= 20
    for name in MODE_NETWORKS[mode]:
        moved = (_tokens(_perturbed(bundle, name), mode).tokens - ref.tokens).abs().max()
        assert moved > 100 * 1e-4, f"{mode}: perturbing {name} moves the tokens by only {moved:.2e}"


@pytest.mark.parametrize("mode", list(MODE_NETWORKS))
def test_every_mode_traced_equals_eager(tiny_cfg, mode):
    bundle = _bundle(tiny_cfg)
    eager, comp = _tokens(bundle, mode), _tokens(bundle, mode, TRACE)
    assert torch.allclose(eager.tokens, comp.tokens, atol=1e-4)
    assert eager.stats.accepted == comp.stats.accepted and eager.stats.target_forwards == comp.stats.target_forwards
    assert eager.stats.resampled == comp.stats.resampled and eager.stats.drafted == comp.stats.drafted


@pytest.mark.parametrize("mode", ["sd", "fastardiff"])
def test_eagle_draft_traced_equals_eager(tiny_cfg, mode):
    """A feature-level draft's compiled decode reads the same target states as its eager one."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.draft.kind = "eagle"
    bundle = _bundle(cfg)
    with torch.no_grad():
        bundle.draft.feature_fuse.weight.add_(0.02 * torch.randn_like(bundle.draft.feature_fuse.weight))
    eager, comp = _tokens(bundle, mode), _tokens(bundle, mode, TRACE)
    assert eager.stats.drafted > 0 and 0.0 < eager.stats.acceptance_rate < 1.0
    assert torch.allclose(eager.tokens, comp.tokens, atol=1e-4)
    assert eager.stats.accepted == comp.stats.accepted and eager.stats.target_forwards == comp.stats.target_forwards


@pytest.mark.slow
def test_every_mode_inductor(tiny_cfg):
    """Real kernels (inductor, C++ on CPU): same tokens as eager; a second run compiles nothing. baseline and
    fastardiff between them compile every kind of step (target decode and verification, draft decode, teacher and
    student chains); sd and dmd are covered by the traced test above."""
    bundle = _bundle(tiny_cfg)
    opts = CompileOptions()
    for mode in ("baseline", "fastardiff"):
        eager, comp = _tokens(bundle, mode), _tokens(bundle, mode, opts)
        assert torch.allclose(eager.tokens, comp.tokens, atol=1e-4), mode
        before = graphs_compiled()
        again = _tokens(bundle, mode, opts)
        assert graphs_compiled() == before, f"{mode}: recompiled on a second identical run"
        assert torch.equal(again.tokens, comp.tokens)


def test_sample_rows_uses_the_chain():
    calls = []

    def chain(fld, cfg, noise):
        calls.append(noise.shape)
        return sample_tokens(fld, cfg, noise)

    from toy import GaussianFlowHead

    model = ARFlow(None, GaussianFlowHead(2, 0.5), SamplerConfig("sde", 3), chain=chain)
    gens = make_generators([0, 1])
    fld = VelocityField(model.head, torch.zeros(2, 2, dtype=torch.float64))
    sample_rows(model, fld, gens, torch.arange(2), torch.ones(2, dtype=torch.bool), torch.float64)
    assert calls == [torch.Size([2, 4, 2])]


def test_compile_mode_is_validated():
    with pytest.raises(ValueError, match="inference.compile_mode"):
        CompileOptions(mode="fast")


@pytest.mark.slow
def test_speculative_decoding_stays_lossless_with_compiled_chains():
    """The losslessness test of test_speculative_exact.py with every head chain (draft, target, residual proposals)
    run by compiled HeadChains (inductor kernels): tokens still distributed as target-only sampling; and its broken
    control, the relaxed rule on the same compiled chains, is rejected."""
    from test_speculative_exact import RELAXED, models, spec_vs_target

    from fastardiff_ds.sampling.speculative import SpecConfig

    target, draft = models()
    opts = CompileOptions()
    target = dataclasses.replace(target, chain=HeadChain(target.head, opts))
    draft = dataclasses.replace(draft, chain=HeadChain(draft.head, opts))
    out, p = spec_vs_target(target, draft, SpecConfig(gamma=3, tau=0.5), label="compiled chains")
    assert 0.3 < out.stats.acceptance_rate < 0.8 and out.stats.fallbacks == 0
    assert p > 0.01
    relaxed = SpecConfig(gamma=3, tau=0.5, accept="relaxed", relax_temperature=RELAXED)
    _, p = spec_vs_target(target, draft, relaxed, label="compiled chains BROKEN relaxed")
    assert p < 0.01
