"""The feature-level (EAGLE-style) draft: model.draft.kind=eagle.

Its inputs are the token embedding plus the target's hidden state of the previous position. Checked here: it starts
as the truncated draft, its KV-cached decode equals teacher forcing, speculative decoding hands it exactly the target
states teacher forcing would (and its own for drafted tokens), batching and padding change nothing, the joint step
trains its fuse from the teacher's states, and the export round-trips it.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from _ds_like import Frozen, NoEMA, fake_engine
from test_speculative_real_models import prompts  # 3 left-padded prompts + their unconditional rows
from fastardiff_ds.config.schema import ARConfig, DraftConfig, HeadConfig, ImageConfig, ModelConfig
from fastardiff_ds.models.ar import DraftAR, TargetAR
from fastardiff_ds.models.flow_head import FlowHead
from fastardiff_ds.sampling import speculative as sp
from fastardiff_ds.sampling.common import ARFlow, DecodeStats
from fastardiff_ds.sampling.flow import SamplerConfig
from fastardiff_ds.sampling.guidance import CFGConfig
from fastardiff_ds.sampling.noise import make_generators

SAMPLER = SamplerConfig(kind="sde", num_steps=3, noise_level=1.0)


def _cfg(kind="eagle"):
    return ModelConfig(ar=ARConfig(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64,
                                   vocab_size=40, max_position_embeddings=128),
                       head=HeadConfig(width=32, depth=2), image=ImageConfig(resolution=8, patch_size=2, channels=1),
                       draft=DraftConfig(num_layers=1, shallow_layer=0, kind=kind))


def build(randomise_fuse=True):
    torch.manual_seed(0)
    cfg = _cfg()
    target = TargetAR(cfg).double().eval()
    draft = DraftAR.from_target(target, cfg).double().eval()
    if randomise_fuse:  # a trained fuse: the features really enter
        with torch.no_grad():
            draft.feature_fuse.weight.add_(0.02 * torch.randn_like(draft.feature_fuse.weight))
    head = FlowHead(cfg.head, cfg.image.token_dim, cfg.ar.hidden_size).double()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.3)
    mode = CFGConfig(scale=2.0)
    return cfg, ARFlow(target, head, SAMPLER, mode), ARFlow(draft, head, SAMPLER, mode)


def test_eagle_draft_starts_as_the_truncated_draft():
    torch.manual_seed(0)
    cfg = _cfg()
    target = TargetAR(cfg).eval()
    eagle = DraftAR.from_target(target, cfg).eval()
    truncated = DraftAR.from_target(target, dataclasses.replace(cfg, draft=DraftConfig(num_layers=1))).eval()
    ids, mask = torch.randint(1, 40, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    tokens = torch.randn(2, 6, cfg.image.token_dim)
    feats = torch.randn(2, 10, cfg.ar.hidden_size)
    got = eagle.forward_train(ids, mask, tokens, feats=feats).hidden
    assert torch.allclose(got, truncated.forward_train(ids, mask, tokens).hidden, atol=1e-6)
    assert set(eagle.state_dict()) - set(truncated.state_dict()) == {"feature_fuse.weight", "feature_fuse.bias"}


def test_eagle_draft_names_missing_features():
    _, _, draft = build()
    ids, mask = prompts()
    with pytest.raises(ValueError, match="model.draft.kind=eagle"):
        draft.ar.forward_train(ids, mask, torch.randn(6, 4, 4, dtype=torch.float64))


def test_eagle_decode_equals_teacher_forcing():
    cfg, target, draft = build()
    ids, mask = prompts()
    tokens = torch.randn(6, 5, cfg.image.token_dim, dtype=torch.float64)
    feats = target.ar.forward_train(ids, mask, tokens, draft_feats=True).draft_feats
    full = draft.ar.forward_train(ids, mask, tokens, feats=feats).cond
    cache = draft.ar.new_cache(6, 16)
    P = ids.shape[1]
    first = draft.ar.prefill(ids, mask, cache, feats=feats[:, :P]).cond[:, -1:]
    rest = draft.ar.decode(tokens[:, :-1], cache, feats=feats[:, P:]).cond
    # the norms compute in float32 (Qwen2's RMSNorm): the fuse's ~1e-15 shape-dependent rounding can flip a float32 ulp
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-6)


def test_speculative_gives_the_draft_the_target_states_of_committed_tokens():
    cfg, target, draft = build()
    ids, mask = prompts()
    B, N = 3, 12
    ctx = sp.Ctx(target, draft, sp.SpecConfig(gamma=3, tau=-float("inf")), make_generators([4, 5, 6]), N,
                  torch.float64, DecodeStats())
    with torch.no_grad():
        st = sp.start(ctx, ids, mask)
        for _ in range(3):
            sp._round(ctx, st)
        assert len(set(st.n.tolist())) > 1 and ctx.stats.accepted > 0
        tokens = st.out.repeat(2, 1, 1)  # both CFG rows read the same tokens
        want = target.ar.forward_train(ids, mask, tokens).hidden  # (2B, N, H): state that conditioned token i
    for r in range(2 * B):
        n = int(st.n[r % B])
        assert torch.allclose(st.feat[r, :n], want[r, :n], atol=1e-9), r


def test_eagle_batched_equals_per_sample():
    _, target, draft = build()
    ids, mask = prompts()
    spec = sp.SpecConfig(gamma=3, tau=0.3)
    with torch.no_grad():
        batched = sp.speculative_generate(target, draft, ids, mask, 7, make_generators([1, 2, 3]), spec)
    assert batched.stats.drafted > 0
    for b in range(3):
        T0 = int(mask[b].eq(0).sum())
        one = sp.speculative_generate(target, draft, ids[[b, 3 + b], T0:], mask[[b, 3 + b], T0:], 7,
                                      make_generators([b + 1]), spec)
        assert torch.allclose(one.tokens[0], batched.tokens[b], atol=1e-8), b


def test_eagle_draft_needs_the_targets_unconditional_rows():
    _, target, draft = build()
    target = dataclasses.replace(target, cfg=CFGConfig(mode="none"))
    with pytest.raises(ValueError, match="unconditional hidden states"):
        sp.check_pair(target, draft, sp.SpecConfig(gamma=2))


def test_joint_step_trains_the_fuse_from_teacher_states(tiny_cfg):
    from fastardiff_ds.models import build_head, build_target, nextstep_state
    from fastardiff_ds.training.joint import JointStep
    from fastardiff_ds.training.networks import Dispatch, TeacherNet, init_networks

    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.draft.kind = "eagle"
    cfg.train.steps, cfg.train.cd_steps = 4, 4
    torch.manual_seed(0)
    target, head = build_target(cfg), build_head(cfg)
    nets = init_networks(cfg, nextstep_state(target, head))
    teacher = Frozen(Dispatch(TeacherNet(target, head)).eval())
    engines = {k: fake_engine(k, v, lr=3e-3) for k, v in nets.items()}
    fuse = nets["draft"].inner.feature_fuse.weight
    H = cfg.model.ar.hidden_size
    assert torch.equal(fuse[:, H:], torch.zeros(H, H))
    step = JointStep(cfg, engines, teacher, NoEMA(), copy.deepcopy(nets["student"]).requires_grad_(False),
                     (torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 300, (2, 6), generator=g)
    tokens = torch.randn(2, cfg.model.image.num_tokens, cfg.model.image.token_dim, generator=g).clamp(-1, 1)
    losses = [step(ids, torch.ones_like(ids), tokens, k, torch.Generator().manual_seed(k))["reg/loss"]
              for k in range(4)]
    assert fuse[:, H:].abs().sum() > 0  # the feature half learned from the teacher's states
    assert losses[-1] < losses[0]


def test_export_round_trips_the_eagle_draft(tmp_path, tiny_cfg):
    from fastardiff_ds.models import build_draft, build_head, build_target, load_pretrained, save_pretrained

    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.draft.kind = "eagle"
    torch.manual_seed(0)
    target, head = build_target(cfg), build_head(cfg)
    draft = build_draft(cfg, target)
    with torch.no_grad():
        draft.feature_fuse.weight.normal_()
    save_pretrained(tmp_path / "ckpt", cfg, target, head, draft=draft)
    bundle = load_pretrained(tmp_path / "ckpt")
    assert bundle.draft.reads_features and bundle.cfg.model.draft.kind == "eagle"
    assert torch.equal(bundle.draft.feature_fuse.weight, draft.feature_fuse.weight)


def test_folders_written_before_the_draft_kind_existed_load_truncated_drafts(tmp_path):
    """A tiny-bench export from before model.draft.kind (no such key) holds a truncated draft, while the preset's
    default is now the feature-level one."""
    import json

    from fastardiff_ds.config import get_preset
    from fastardiff_ds.models import build_draft, build_head, build_target, load_pretrained, save_pretrained

    cfg = get_preset("tiny-bench")
    assert cfg.model.draft.kind == "eagle"
    cfg.model.draft.kind = "truncated"
    cfg.model.ar.num_layers, cfg.model.ar.hidden_size, cfg.model.ar.intermediate_size = 2, 64, 128
    target = build_target(cfg)
    save_pretrained(tmp_path / "old", cfg, target, build_head(cfg), draft=build_draft(cfg, target))
    data = json.loads((tmp_path / "old" / "config.json").read_text())
    del data["model"]["draft"]["kind"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(data))
    bundle = load_pretrained(tmp_path / "old")
    assert bundle.cfg.model.draft.kind == "truncated" and not bundle.draft.reads_features


def test_unrolled_draft_loss_matches_plain_autograd(tiny_cfg):
    """train.draft_unroll=3: the draft's gradient is that of the mean SmoothL1 over three passes, pass k reading the
    draft's own detached states of pass k - 1 at the image positions and the target's at the prompt's."""
    import torch.nn.functional as F

    from fastardiff_ds.config import ConfigError
    from fastardiff_ds.config.resolve import apply_overrides
    from fastardiff_ds.models import build_head, build_target, nextstep_state
    from fastardiff_ds.training.joint import JointStep
    from fastardiff_ds.training.networks import Dispatch, TeacherNet, init_networks

    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.draft.kind = "eagle"
    cfg.train.steps, cfg.train.cd_steps, cfg.train.lambda_ent, cfg.train.draft_unroll = 2, 2, 0.0, 3
    torch.manual_seed(0)
    target, head = build_target(cfg), build_head(cfg)
    nets = init_networks(cfg, nextstep_state(target, head))
    with torch.no_grad():
        nets["draft"].inner.feature_fuse.weight.normal_(std=0.05)  # the feature half must matter
    reference = copy.deepcopy(nets["draft"].inner)
    engines = {k: fake_engine(k, v, lr=1e-3) for k, v in nets.items()}
    teacher = Frozen(Dispatch(TeacherNet(target, head)).eval())
    step = JointStep(cfg, engines, teacher, NoEMA(), copy.deepcopy(nets["student"]).requires_grad_(False),
                     (torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 300, (2, 6), generator=g)
    tokens = torch.randn(2, cfg.model.image.num_tokens, cfg.model.image.token_dim, generator=g).clamp(-1, 1)
    mask = torch.ones_like(ids)
    metrics = step(ids, mask, tokens, 0, torch.Generator().manual_seed(0))
    got = engines["draft"].ds.records[0]["grads"]

    with torch.no_grad():
        t_out = target.forward_train(ids, mask, tokens, draft_feats=True)
    feats, n = t_out.draft_feats, tokens.shape[1] - 1
    losses, hidden, fed = [], None, feats
    for k in range(3):
        if k:
            fed = torch.cat([feats[:, :-n], hidden[:, :-1].detach()], 1)
        hidden = reference.forward_train(ids, mask, tokens, feats=fed).hidden
        losses.append(F.smooth_l1_loss(hidden, t_out.hidden).mean())
    (sum(losses) / 3).backward()  # train.alpha_mode=lr: alpha sits on the lr, the loss is unweighted
    for name, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got["inner." + name], p.grad, rtol=1e-4, atol=1e-7)
    assert {"reg/cos", "reg/cos_pass2", "reg/cos_pass3"} <= set(metrics)
    with pytest.raises(ConfigError, match="train.draft_unroll=2 needs a draft that reads features"):
        apply_overrides(copy.deepcopy(tiny_cfg), ["model.draft.kind=truncated", "train.draft_unroll=2"])
