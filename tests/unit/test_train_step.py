"""The joint step on one process (plain modules behind engines.Engine over a DeepSpeed stand-in): stage routing, alpha
weighting, NaN handling, and that each loss reaches only its own network."""
from __future__ import annotations

import copy

import pytest
import torch

from _ds_like import Frozen, NoEMA, fake_engine
from fastardiff_ds.training.joint import JointStep, NonFiniteLoss, stage_of
from fastardiff_ds.training.networks import Dispatch, TeacherNet, init_networks


def _setup(tiny_cfg, target_ar=False):
    from fastardiff_ds.models import build_head, build_target, nextstep_state

    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.target_ar, cfg.train.steps, cfg.train.cd_steps, cfg.train.gen_every = target_ar, 6, 3, 2
    cfg.train.student_steps = 2
    torch.manual_seed(0)
    target, head = build_target(cfg), build_head(cfg)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    nets = init_networks(cfg, nextstep_state(target, head))
    teacher = Frozen(Dispatch(TeacherNet(target, head)).eval())
    engines = {k: fake_engine(k, v, lr=1e-2) for k, v in nets.items()}
    ema = copy.deepcopy(nets["student"]).requires_grad_(False)
    uncond = (torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    return cfg, JointStep(cfg, engines, teacher, NoEMA(), ema, uncond), engines, teacher


def _batch(cfg, B=2):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 300, (B, 6), generator=g)
    tokens = torch.randn(B, cfg.model.image.num_tokens, cfg.model.image.token_dim, generator=g).clamp(-1, 1)
    return ids, torch.ones_like(ids), tokens


def test_stage_routing_and_engine_steps(tiny_cfg):
    cfg, step_fn, engines, _ = _setup(tiny_cfg)
    ids, mask, tokens = _batch(cfg)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for step in range(6):
        m = step_fn(ids, mask, tokens, step, gen)
        seen.append((stage_of(cfg, step), "cd/loss" in m, "dmd/loss" in m, "fake/loss" in m))
        assert m["alpha"] == pytest.approx(0.95 - 0.9 * step / 6)
    assert seen[:3] == [("cd", True, False, False)] * 3
    assert [s[2] for s in seen[3:]] == [True, False, True]  # generator every gen_every=2 DMD steps
    assert all(s[3] for s in seen[3:])  # fake score every DMD step
    steps = {k: len(e.ds.records) for k, e in engines.items()}
    assert steps["draft"] == 6 and steps["fake"] == 3 and steps["student"] == 3 + 2


def test_losses_reach_only_their_network(tiny_cfg):
    cfg, step_fn, engines, teacher = _setup(tiny_cfg, target_ar=True)
    before = {k: copy.deepcopy(e.module.state_dict()) for k, e in engines.items()}
    t_before = copy.deepcopy(teacher.module.state_dict())
    ids, mask, tokens = _batch(cfg)
    step_fn(ids, mask, tokens, 0, torch.Generator().manual_seed(0))  # a CD step
    changed = {k: any(not torch.equal(v, engines[k].module.state_dict()[n]) for n, v in s.items())
               for k, s in before.items()}
    assert changed == {"draft": True, "student": True, "fake": False, "target": True}
    assert all(torch.equal(v, teacher.module.state_dict()[n]) for n, v in t_before.items())


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_or_skips_with_a_named_loss(tiny_cfg, policy):
    cfg, step_fn, engines, teacher = _setup(tiny_cfg)
    cfg.train.on_nonfinite = policy
    with torch.no_grad():
        teacher.module.inner.ar.norm.weight.fill_(float("nan"))  # NaN target features -> NaN L_reg
    ids, mask, tokens = _batch(cfg)
    draft_before = copy.deepcopy(engines["draft"].module.state_dict())
    if policy == "stop":
        with pytest.raises(NonFiniteLoss, match="L_reg"):
            step_fn(ids, mask, tokens, 0, torch.Generator().manual_seed(0))
    else:
        step_fn(ids, mask, tokens, 0, torch.Generator().manual_seed(0))
        assert len(engines["draft"].ds.records) == 0
        assert all(torch.equal(v, engines["draft"].module.state_dict()[n]) for n, v in draft_before.items())


def test_entropy_alignment_pulls_the_draft_entropy_toward_the_target(tiny_cfg):
    """train.entropy_objective=align: the draft's entropy rows move toward the target's (at the layer of the same
    relative depth), where the paper's L_ent drives them toward 1."""
    from fastardiff_ds.config.rules import align_layer

    gaps = {}
    for objective in ("maximize", "align"):
        cfg = copy.deepcopy(tiny_cfg)
        cfg.train.entropy_objective, cfg.train.lambda_ent = objective, 50.0
        cfg, step_fn, engines, teacher = _setup(cfg)
        step_fn.cfg.train.cd_steps = step_fn.cfg.train.steps  # CD only: this test is about the draft
        ids, mask, tokens = _batch(cfg)
        layer = align_layer(cfg)
        assert layer == 1  # draft layer 0 of 2 -> target layer round(1 * 3 / 2) - 1 of 3
        target = teacher.module("entropy", ids, mask, tokens, layer)
        gen = torch.Generator().manual_seed(0)
        for step in range(6):
            m = step_fn(ids, mask, tokens, step, gen)
        gaps[objective] = m
        if objective == "align":
            assert "ent/gap" in m and m["ent/loss"] >= 0
            assert abs(m["ent/mean"] - float(target.detach().mean())) < m["ent/gap"] + 1e-6
    assert gaps["align"]["ent/mean"] < gaps["maximize"]["ent/mean"]


def test_dmd_regression_term_adds_the_weighted_cd_gradient(tiny_cfg):
    """train.dmd_reg_weight (DMD1): the generator step's gradient is the DMD gradient + weight x the regression
    term's gradient (same draws whatever the weight), so it is affine in the weight; weight 0 is DMD2's step."""
    grads, metrics = {}, {}
    for lam in (0.0, 1.0, 3.0):
        cfg, step_fn, engines, _ = _setup(tiny_cfg)
        cfg.train.dmd_reg_weight = lam
        ids, mask, tokens = _batch(cfg)
        student = engines["student"]
        student.step = lambda: None  # keep the gradient of this one generator step
        metrics[lam] = step_fn(ids, mask, tokens, 3, torch.Generator().manual_seed(0), stage="dmd")
        grads[lam] = torch.cat([p.grad.flatten() for p in student.module.parameters() if p.grad is not None])
    assert "dmd/reg_loss" not in metrics[0.0] and metrics[1.0]["dmd/reg_loss"] > 0
    assert metrics[1.0]["dmd/reg_loss"] == pytest.approx(metrics[3.0]["dmd/reg_loss"])
    g_reg = grads[1.0] - grads[0.0]
    assert g_reg.abs().sum() > 0  # the term reaches the student
    torch.testing.assert_close(grads[3.0] - grads[0.0], 3.0 * g_reg, rtol=1e-4, atol=1e-7)


def test_export_ema_follows_every_student_step_with_the_warmed_up_decay(tiny_cfg):
    from fastardiff_ds.engines import EMA, ema_decay

    cfg, plain, engines, teacher = _setup(tiny_cfg)
    cfg.train.student_ema_decay = 0.9
    online = engines["student"].module
    ema = copy.deepcopy(online).requires_grad_(False).float()
    uncond = (plain.uncond_ids, plain.uncond_mask)
    step_fn = JointStep(cfg, engines, teacher, NoEMA(), copy.deepcopy(ema), uncond, export_ema=EMA(online, ema))
    ids, mask, tokens = _batch(cfg)
    gen = torch.Generator().manual_seed(0)
    expect = {n: p.detach().clone() for n, p in ema.named_parameters()}
    start, updates = copy.deepcopy(expect), 0
    for step in range(6):  # 3 CD steps (student every step), 3 DMD steps (generator at steps 3 and 5)
        n = len(engines["student"].ds.records)
        step_fn(ids, mask, tokens, step, gen)
        if len(engines["student"].ds.records) > n:
            updates, d = updates + 1, ema_decay(0.9, step)
            for name, p in online.named_parameters():
                expect[name] = d * expect[name] + (1 - d) * p.detach().float()
    assert updates == 5
    lag = moved = 0.0
    for name, p in ema.named_parameters():
        torch.testing.assert_close(p, expect[name], rtol=1e-6, atol=1e-9)
        now = online.state_dict()[name].float()
        lag += float((p - now).square().sum())
        moved += float((start[name] - now).square().sum())
    assert moved > 0 and lag > 1e-4 * moved, (lag, moved)  # an average that lags, not a copy of the online weights
