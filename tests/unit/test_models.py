"""Model math: KV-cache decoding equals a full forward, causality, draft = target's first k layers, the backbone
equals transformers' Qwen2Model, NextStep-1 key layout round trip, preset sizes."""
from __future__ import annotations

import json

import pytest
import torch

from fastardiff_ds.models import (build_head, build_target, count_params, from_pretrained, load_pretrained,
                                  row_entropy, save_pretrained)


def _prompt(B=3, P=7, vocab=300, pads=(3, 1, 0)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    for b, n in enumerate(pads):
        mask[b, :n] = 0
    return ids, mask


def _incremental(model, ids, mask, tokens, chunk=1):
    cache = model.new_cache(ids.shape[0], ids.shape[1] + tokens.shape[1])
    conds = [model.prefill(ids, mask, cache).cond[:, -1:]]
    for i in range(0, tokens.shape[1] - 1, chunk):
        conds.append(model.decode(tokens[:, i:min(i + chunk, tokens.shape[1] - 1)], cache).cond)
    return torch.cat(conds, 1)


@pytest.mark.parametrize("which", ["target", "draft"])
@pytest.mark.parametrize("chunk", [1, 5])
def test_kv_cache_decode_equals_full_forward(tiny_models, which, chunk):
    cfg, target, draft, _ = tiny_models
    model = target if which == "target" else draft
    ids, mask = _prompt()
    tokens = torch.randn(3, cfg.model.image.num_tokens, cfg.model.image.token_dim)
    with torch.no_grad():
        full = model.forward_train(ids, mask, tokens).cond
        inc = _incremental(model, ids, mask, tokens, chunk)
    torch.testing.assert_close(inc, full, atol=2e-5, rtol=1e-4)


def test_rows_at_different_lengths_and_rollback(tiny_models):
    """Rows advanced by different amounts, then rolled back, match a fresh cache fed the same tokens."""
    cfg, target, _, _ = tiny_models
    ids, mask = _prompt()
    tokens = torch.randn(3, 12, cfg.model.image.token_dim)
    with torch.no_grad():
        cache = target.new_cache(3, 40)
        target.prefill(ids, mask, cache)
        target.decode(tokens[:, :6], cache)  # 6 "drafted" tokens
        keep = torch.tensor([2, 5, 0])
        cache.rollback(cache.lengths - 6 + keep)
        new = torch.randn(3, 1, cfg.model.image.token_dim)
        out = target.decode(new, cache).cond[:, 0]
        for b in range(3):
            seq = torch.cat([tokens[b:b + 1, :keep[b]], new[b:b + 1]], 1)
            fresh = target.new_cache(1, 40)
            target.prefill(ids[b:b + 1], mask[b:b + 1], fresh)
            ref = target.decode(seq, fresh).cond[0, -1]
            torch.testing.assert_close(out[b], ref, atol=2e-5, rtol=1e-4)


def test_causality(tiny_models):
    cfg, target, _, _ = tiny_models
    ids, mask = _prompt()
    tokens = torch.randn(3, cfg.model.image.num_tokens, cfg.model.image.token_dim)
    j = 20
    changed = tokens.clone()
    changed[:, j] += 1.0
    with torch.no_grad():
        a = target.forward_train(ids, mask, tokens).hidden
        b = target.forward_train(ids, mask, changed).hidden
    # output position i conditions token i and has seen tokens < i: positions <= j are unchanged
    torch.testing.assert_close(a[:, : j + 1], b[:, : j + 1], atol=0, rtol=0)
    assert (a[:, j + 1] - b[:, j + 1]).abs().max() > 1e-4


def test_draft_reproduces_target_layer_k(tiny_models):
    cfg, target, draft, _ = tiny_models
    k = cfg.model.draft.num_layers
    ids, mask = _prompt()
    tokens = torch.randn(3, 16, cfg.model.image.token_dim)
    with torch.no_grad():
        t = target.forward_train(ids, mask, tokens, return_layers=(k,)).layer_hidden[k]
        d = draft.forward_train(ids, mask, tokens, return_layers=(k,)).layer_hidden[k]
    torch.testing.assert_close(d, t, atol=1e-6, rtol=1e-6)


def test_explicit_attention_layer_matches_sdpa(tiny_models):
    """The one layer that materialises softmax(QK^T) gives the same output as fused SDPA, probs sum to 1."""
    cfg, _, draft, _ = tiny_models
    ids, mask = _prompt()
    tokens = torch.randn(3, 10, cfg.model.image.token_dim)
    with torch.no_grad():
        draft.explicit_layer = None  # the draft reports its shallow layer's entropy by default
        plain = draft.forward_train(ids, mask, tokens)
        explicit = draft.forward_train(ids, mask, tokens, explicit_layer=0)
    torch.testing.assert_close(explicit.hidden, plain.hidden, atol=1e-5, rtol=1e-5)
    sums = explicit.attn_probs.sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert not explicit.attn_probs.masked_fill(explicit.attn_valid[:, None], 0).any()  # pads get no mass


def test_row_entropy_known_values():
    K = 8
    valid = torch.ones(1, 2, K, dtype=torch.bool)
    probs = torch.zeros(1, 2, 2, K)
    probs[..., 0, :] = 1.0 / K  # uniform row -> 1
    probs[..., 1, 3] = 1.0  # one-hot row -> 0
    ent = row_entropy(probs, valid)
    torch.testing.assert_close(ent, torch.tensor([[1.0, 0.0]]))


def test_backbone_equals_transformers_qwen2(tiny_models):
    from transformers import Qwen2Model

    cfg, target, _, _ = tiny_models
    hf = Qwen2Model(target.config).eval()
    missing, unexpected = hf.load_state_dict(target.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"image_in_projector.weight", "image_in_projector.bias",
                                                "image_out_projector.weight", "image_out_projector.bias"}
    ids = torch.randint(5, 300, (2, 11))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state
        cache = target.new_cache(2, 11)
        ours = target.prefill(ids, mask, cache).hidden
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_nextstep_layout_round_trip(tmp_path, tiny_models):
    """A checkpoint written in NextStep-1's sharded layout (no `model.` prefix, lm_head, image_head.net.*) loads."""
    from safetensors.torch import save_file

    cfg, target, _, head = tiny_models
    state = {k: v.clone() for k, v in target.state_dict().items()}
    state.update({"image_head." + k: v.clone() for k, v in head.state_dict().items()})
    state["lm_head.weight"] = torch.randn(cfg.model.ar.vocab_size, cfg.model.ar.hidden_size)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, str(tmp_path / name))
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert any(k.startswith("image_head.net.res_blocks.0.adaLN_modulation.1") for k in state)
    t2, h2 = from_pretrained(tmp_path, cfg)
    for k, v in target.state_dict().items():
        torch.testing.assert_close(t2.state_dict()[k], v, atol=0, rtol=0)
    for k, v in head.state_dict().items():
        torch.testing.assert_close(h2.state_dict()[k], v, atol=0, rtol=0)


def test_own_checkpoint_round_trip_and_errors(tmp_path, tiny_models):
    cfg, target, draft, head = tiny_models
    save_pretrained(tmp_path / "ck", cfg, target, head, draft=draft, meta={"tau": 0.12})
    b = load_pretrained(tmp_path / "ck")
    assert b.meta["tau"] == 0.12 and b.draft is not None and b.student is None
    assert b.cfg.model.ar.hidden_size == cfg.model.ar.hidden_size
    with pytest.raises(FileNotFoundError, match="--ckpt"):
        load_pretrained(tmp_path / "nope")
    cfg.model.ar.num_layers = 4  # the checkpoint has 3 layers
    with pytest.raises(ValueError, match="missing"):
        from_pretrained(tmp_path / "ck", cfg)


def test_flow_head_init_and_guidance(tiny_cfg):
    head = build_head(tiny_cfg)
    x, t, c = torch.randn(5, 48), torch.rand(5), torch.randn(5, tiny_cfg.model.ar.hidden_size)
    assert torch.count_nonzero(head(x, t, c)) == 0  # zero-initialised output layer
    student = build_head(tiny_cfg, student=True)
    with pytest.raises(ValueError, match="guidance"):
        student(x, t, c)
    assert student(x, t, c, guidance=torch.full((5,), 3.0)).shape == (5, 48)


@pytest.mark.parametrize("preset", ["nextstep-1-large", "nextstep-1.1"])
def test_large_preset_sizes_on_meta_device(preset):
    from fastardiff_ds.config import get_preset

    cfg = get_preset(preset)
    with torch.device("meta"):
        ar, head = build_target(cfg), build_head(cfg)
    assert abs(count_params(ar) / 14e9 - 1) < 0.02
    assert abs(count_params(head) / 157e6 - 1) < 0.02
    assert cfg.model.image.token_dim == 64 and cfg.model.image.num_tokens == 1024  # 512 px: 64^2 latent, patch 2
