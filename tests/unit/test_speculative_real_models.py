"""Speculative decoding with the real tiny TargetAR / DraftAR / FlowHead: batching, KV-cache rollback."""
import pytest
import torch

from fastardiff_ds.config.schema import ARConfig, DraftConfig, HeadConfig, ImageConfig, ModelConfig
from fastardiff_ds.models.ar import DraftAR, TargetAR
from fastardiff_ds.models.flow_head import FlowHead
from fastardiff_ds.sampling import speculative as sp
from fastardiff_ds.sampling.common import ARFlow, DecodeStats
from fastardiff_ds.sampling.flow import SamplerConfig
from fastardiff_ds.sampling.guidance import CFGConfig
from fastardiff_ds.sampling.noise import make_generators

SAMPLER = SamplerConfig(kind="sde", num_steps=3, noise_level=1.0)


def build(draft_layers=1, token_layernorm=False):
    torch.manual_seed(0)
    cfg = ModelConfig(ar=ARConfig(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64,
                                  vocab_size=40, max_position_embeddings=128),
                      head=HeadConfig(width=32, depth=2),
                      image=ImageConfig(resolution=8, patch_size=2, channels=1),  # 4-d tokens
                      draft=DraftConfig(num_layers=draft_layers, shallow_layer=0))
    target = TargetAR(cfg).double().eval()
    draft = DraftAR.from_target(target, cfg).double().eval()
    head = FlowHead(cfg.head, cfg.image.token_dim, cfg.ar.hidden_size).double()
    with torch.no_grad():  # adaLN / final layers start at zero (v = 0): randomise so conditions matter
        for p in head.parameters():
            p.normal_(0.0, 0.3)
    mode = CFGConfig(scale=2.0)
    return (ARFlow(target, head, SAMPLER, mode, token_layernorm=token_layernorm),
            ARFlow(draft, head, SAMPLER, mode, token_layernorm=token_layernorm))


def prompts(B=3, T=5):
    ids = torch.randint(1, 40, (2 * B, T), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for b in range(B):
        mask[b, :b], ids[b, :b] = 0, 0  # sample b has b pads on the left
    ids[B:, :-1], mask[B:, :-1] = 0, 0  # unconditional prompt: a single token
    return ids, mask


def test_batched_equals_per_sample_with_real_models():
    target, draft = build()
    ids, mask = prompts()
    spec = sp.SpecConfig(gamma=3, tau=0.3)
    with torch.no_grad():
        batched = sp.speculative_generate(target, draft, ids, mask, 7, make_generators([1, 2, 3]), spec)
    assert batched.stats.drafted > 0 and batched.stats.resampled > 0
    for b in range(3):
        T0 = int(mask[b].eq(0).sum())
        one = sp.speculative_generate(target, draft, ids[[b, 3 + b], T0:], mask[[b, 3 + b], T0:], 7,
                                      make_generators([b + 1]), spec)
        assert torch.allclose(one.tokens[0], batched.tokens[b], atol=1e-8), b


def fresh_cache(model, ids, mask, tokens, b, B):
    """A cache built from scratch for sample b (both CFG rows, no padding) holding prompt + tokens."""
    rows = [b, B + b]
    T0 = int(mask[b].eq(0).sum())
    cache = model.ar.new_cache(2, 64)
    model.ar.prefill(ids[rows, T0:], mask[rows, T0:], cache)
    if tokens.shape[0]:
        model.ar.decode(tokens[None].repeat(2, 1, 1), cache)
    return cache, T0


@pytest.mark.parametrize("which", ["target", "draft"])
def test_cache_after_rollback_equals_fresh_cache(which):
    target, draft = build()
    ids, mask = prompts()
    B = 3
    ctx = sp.Ctx(target, draft, sp.SpecConfig(gamma=3, tau=-float("inf")), make_generators([4, 5, 6]), 12,
                  torch.float64, DecodeStats())
    with torch.no_grad():
        st = sp.start(ctx, ids, mask)
        for _ in range(2):
            sp._round(ctx, st)
        assert len(set(st.n.tolist())) > 1  # rows really sit at different lengths
        model, cache = (target, st.tcache) if which == "target" else (draft, st.dcache)
        keep = 1 if which == "target" else 2  # target: prompt + committed[:-1]; draft: + committed[:-2]
        if which == "draft":
            cache.rollback(torch.cat([st.d_base + st.n - 2] * 2))  # what the next round does first
        for b in range(B):
            fresh, T0 = fresh_cache(model, ids, mask, st.out[b, : int(st.n[b]) - keep], b, B)
            for r, fr in ((b, 0), (B + b, 1)):
                n_slots = int(cache.lengths[r]) - T0
                assert n_slots == int(fresh.lengths[fr])
                for layer in range(len(cache.keys)):
                    got_k = cache.keys[layer][r, T0 : int(cache.lengths[r])]
                    got_v = cache.values[layer][r, T0 : int(cache.lengths[r])]
                    assert torch.allclose(got_k, fresh.keys[layer][fr, :n_slots], atol=1e-10)
                    assert torch.allclose(got_v, fresh.values[layer][fr, :n_slots], atol=1e-10)
