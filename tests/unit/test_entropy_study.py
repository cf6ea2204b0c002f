"""Entropy study (Fig. 6) and tau calibration: the math on synthetic studies, the study on real tiny models."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastardiff_ds.config.schema import ARConfig, DraftConfig, HeadConfig, ImageConfig, ModelConfig
from fastardiff_ds.models.ar import DraftAR, TargetAR
from fastardiff_ds.models.flow_head import FlowHead
from fastardiff_ds.sampling.common import ARFlow
from fastardiff_ds.analysis.entropy_study import EntropyStudy, calibrate_tau, entropy_study
from fastardiff_ds.sampling.flow import SamplerConfig
from fastardiff_ds.sampling.guidance import CFGConfig


def _study(e, a):
    e, a = torch.tensor(e), torch.tensor(a)
    return EntropyStudy(e, torch.zeros_like(e), a)


def test_calibrated_tau_keeps_exactly_the_drafts_that_pay():
    st = _study([0.9, 0.8, 0.7, 0.3, 0.2, 0.1], [0.9, 0.8, 0.6, 0.1, 0.05, 0.0])
    tau = calibrate_tau(st, cost=0.3)
    assert tau == pytest.approx(0.7)
    s = st.summary(tau)
    assert s["kept"] == pytest.approx(0.5) and s["alpha_kept"] == pytest.approx(2.3 / 3)


def test_calibrated_tau_extremes():
    assert calibrate_tau(_study([0.5, 0.4, 0.1], [0.9, 0.8, 0.7]), cost=0.2) == float("-inf")  # all pay
    assert calibrate_tau(_study([0.5, 0.4, 0.1], [0.1, 0.1, 0.1]), cost=0.2) == float("inf")  # none pays


def test_eq10_tau():
    st = _study([0.2, 0.4, 0.6], [0.5, 0.5, 0.5])
    assert st.eq10_tau() == pytest.approx(0.3 * 0.4 - 0.1 * 0.2)


def _flows(draft_layers: int, kind: str = "truncated"):
    torch.manual_seed(0)
    cfg = ModelConfig(ar=ARConfig(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64,
                                  vocab_size=40, max_position_embeddings=128),
                      head=HeadConfig(width=32, depth=2), image=ImageConfig(resolution=8, patch_size=2, channels=1),
                      draft=DraftConfig(num_layers=draft_layers, shallow_layer=0, entropy_layer=0, kind=kind))
    target = TargetAR(cfg).eval()
    draft = DraftAR.from_target(target, cfg).eval()
    if draft_layers == 3:  # the whole target: its norm too (the draft's own final norm starts as the target's)
        draft.load_state_dict({**draft.state_dict(), "norm.weight": target.norm.weight.clone()})
    head = FlowHead(cfg.head, cfg.image.token_dim, cfg.ar.hidden_size)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.3)
    sampler = SamplerConfig(kind="sde", num_steps=3, noise_level=1.0)
    return cfg, ARFlow(target, head, sampler, CFGConfig(scale=2.0)), ARFlow(draft, head, sampler, CFGConfig(scale=2.0))


def _inputs(cfg, B=3):
    ids = torch.randint(1, 40, (2 * B, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2], ids[0, :2] = 0, 0
    tokens = torch.randn(B, cfg.image.num_tokens, cfg.image.token_dim, generator=torch.Generator().manual_seed(2))
    return ids, mask, tokens


def test_a_draft_equal_to_the_target_is_always_accepted():
    cfg, target, draft = _flows(3)
    ids, mask, tokens = _inputs(cfg)
    st = entropy_study(target, draft, ids, mask, tokens, target_layer=0)
    B, N = tokens.shape[:2]
    assert st.alpha.shape == st.draft_entropy.shape == st.target_entropy.shape == (B * (N - 1),)
    assert torch.allclose(st.alpha, torch.ones_like(st.alpha), atol=1e-4)
    assert torch.allclose(st.draft_entropy, st.target_entropy, atol=1e-5)  # same layer 0, same inputs


def test_a_shallow_draft_is_accepted_less_and_eagle_needs_no_extra_input():
    for kind in ("truncated", "eagle"):
        cfg, target, draft = _flows(1, kind)
        ids, mask, tokens = _inputs(cfg)
        st = entropy_study(target, draft, ids, mask, tokens, target_layer=2)
        assert float(st.alpha.mean()) < 0.99 and bool(((st.alpha >= 0) & (st.alpha <= 1)).all())
        assert bool(((st.draft_entropy >= 0) & (st.draft_entropy <= 1)).all())


def test_study_refuses_mismatched_flows():
    cfg, target, draft = _flows(1)
    ids, mask, tokens = _inputs(cfg)
    with pytest.raises(ValueError, match="same sampler"):
        entropy_study(target, dataclasses.replace(draft, cfg=CFGConfig(mode="none")), ids, mask, tokens, 0)
