"""Eq. 9 reaches each engine as written, and α(t) reaches the update sizes.

What is compared. The joint step runs on separate engines (draft, student, target, fake; tests/unit/_ds_like.py,
DeepSpeed's accumulation semantics) with plain SGD at base lrs η_e (the student's times its stage factor,
joint.stage_lr_lambda, in DMD). The reference is one plain nn.Module holding every network; its loss is Eq. 9's
total L = α(L_reg + λ L_ent) + (1 − α) L_dist (mean over the micro-batches of one accumulation window), with
L_dist's gradient reaching the target AR straight through its features, and torch.autograd.grad gives ∇L.
Claim, in both alpha modes: each engine's optimizer step equals the SGD step of Eq. 9 on the reference, −η_e ∇_e L.
In mode "loss" that holds because the engine's gradient is the weighted one (draft α∇(L_reg + λL_ent), student and
target (1 − α)∇L_dist); in mode "lr" because the gradient is the unweighted one and the engine's lr is η_e·α
(draft) or η_e·(1 − α) (student, target) -- both are asserted.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _ds_like import Frozen, NoEMA, fake_engine
from fastardiff_ds.losses.consistency import ConsistencyConfig, consistency_distillation_loss
from fastardiff_ds.losses.dmd import DMDConfig, dmd_fake_score_loss, dmd_generator_loss, few_step_generate
from fastardiff_ds.losses.entropy import entropy_loss
from fastardiff_ds.losses.regression import feature_regression_loss
from fastardiff_ds.schedules.alpha import total_loss
from fastardiff_ds.schedules.timesteps import time_grid
from fastardiff_ds.training.joint import JointStep, alpha_schedule, stage_lr_lambda
from fastardiff_ds.training.networks import Dispatch, TeacherNet, init_networks

LRS = {"draft": 0.3, "student": 0.2, "target": 0.1, "fake": 0.05}  # distinct, so a swapped lr shows


def _setup(tiny_cfg, mode: str, grad_accum: int, optimizer: str = "sgd"):
    from fastardiff_ds.models import build_head, build_target, nextstep_state

    cfg = copy.deepcopy(tiny_cfg)
    t = cfg.train
    t.target_ar, t.steps, t.cd_steps, t.gen_every, t.student_steps = True, 6, 3, 1, 2
    t.alpha_mode, t.grad_accum, t.log_every = mode, grad_accum, 1
    torch.manual_seed(0)
    target, head = build_target(cfg), build_head(cfg)
    for p in head.parameters():
        nn.init.normal_(p, std=0.05)
    nets = init_networks(cfg, nextstep_state(target, head))
    ref_nets = copy.deepcopy(nets)  # the reference starts from the same weights and is never stepped
    teacher = Dispatch(TeacherNet(target, head)).eval().requires_grad_(False)
    ema = copy.deepcopy(nets["student"]).requires_grad_(False)
    scale = 1.0 if optimizer == "sgd" else 1e-3  # Adam steps ~lr per element
    engines = {k: fake_engine(k, v, LRS[k] * scale, grad_accum, optimizer) for k, v in nets.items()}
    uncond = (torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    step_fn = JointStep(cfg, engines, Frozen(teacher), NoEMA(), ema, uncond)
    return cfg, step_fn, engines, Eq9Reference(ref_nets, teacher, ema, uncond)


def _batch(cfg, seed: int, B: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (B, 6), generator=g)
    tokens = torch.randn(B, cfg.model.image.num_tokens, cfg.model.image.token_dim, generator=g).clamp(-1, 1)
    return ids, torch.ones_like(ids), tokens


class Eq9Reference(nn.Module):
    """Every network of the joint step in one module; `loss` is Eq. 9's total for one micro-batch."""

    def __init__(self, nets: dict, teacher: nn.Module, ema: nn.Module, uncond):
        super().__init__()
        self.nets, self.teacher, self.ema, self.uncond = nn.ModuleDict(nets), teacher, ema, uncond

    def head(self, module):
        return lambda x, t, c, guidance=None: module("forward", x, t, c, guidance)

    def loss(self, cfg, ids, mask, tokens, step: int, gen: torch.Generator) -> torch.Tensor:
        B, N, D = tokens.shape
        with torch.no_grad():
            cond_t, _ = self.teacher("features", ids, mask, tokens)
            cond_u, _ = self.teacher("features", self.uncond[0].expand(B, -1), self.uncond[1].expand(B, -1), tokens)
        out = self.nets["target"]("forward_train", ids, mask, tokens)
        cond = out.cond.reshape(B * N, -1)  # no detach: L_dist's gradient flows into the target directly
        layer = cfg.model.draft.entropy_layer % cfg.model.draft.num_layers
        d = self.nets["draft"]("forward_train", ids, mask, tokens, explicit_layer=layer)
        l_reg, _ = feature_regression_loss(d.hidden, out.hidden)  # stop-gradient on the target side (Eq. 4)
        l_ent, _, _ = entropy_loss(d.attn_probs, d.attn_valid)

        def guided(x, t, w):
            with torch.no_grad():
                v_c = self.teacher("velocity", x, t, cond_t.reshape(B * N, -1))
                v_u = self.teacher("velocity", x, t, cond_u.reshape(B * N, -1))
            return v_u + w[:, None] * (v_c - v_u)

        if step < cfg.train.cd_steps:
            t = cfg.train
            cd = ConsistencyConfig(delta=t.cd_delta, t_max=1 - t.cd_delta, guidance_min=t.guidance_min,
                                   guidance_max=t.guidance_max)
            l_dist, _ = consistency_distillation_loss(self.head(self.nets["student"]), self.head(self.ema), guided,
                                                      tokens.reshape(-1, D), cond, gen, config=cd)
        else:
            l_dist = self._dmd(cfg, cond, guided, step, gen, (B, N, D))
        return total_loss(alpha_schedule(cfg)(step), l_reg, l_ent, l_dist, cfg.train.lambda_ent)

    def _dmd(self, cfg, cond, guided, step, gen, shape):
        B, N, D = shape
        t = cfg.train
        w = torch.full((B * N,), float(t.dmd_guidance))
        noise = torch.randn(B * N, D, generator=gen)
        k = int(torch.randint(t.student_steps, (1,), generator=torch.Generator().manual_seed(cfg.seed + step)))
        x, _ = few_step_generate(self.head(self.nets["student"]), cond, noise, time_grid(t.student_steps)[:-1], gen,
                                 guidance=w, step_index=k)
        fake = self.head(self.nets["fake"])
        l_g, _ = dmd_generator_loss(x.reshape(B, N, D), lambda xx, tt: guided(xx, tt, w),
                                    lambda xx, tt: fake(xx, tt, cond.detach()), gen, config=DMDConfig())
        dmd_fake_score_loss(fake, x.detach(), cond.detach(), gen, config=DMDConfig())  # same RNG draws as the step
        return l_g


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("stage_step", [1, 4], ids=["cd", "dmd"])
@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("mode", ["lr", "loss"])
def test_engine_steps_equal_the_sgd_step_of_eq9(tiny_cfg, mode, grad_accum, stage_step):
    cfg, step_fn, engines, ref = _setup(tiny_cfg, mode, grad_accum)
    batches = [_batch(cfg, seed) for seed in range(grad_accum)]
    gen = torch.Generator().manual_seed(7)
    ref_gen = torch.Generator().manual_seed(7)
    total = sum(ref.loss(cfg, *b, stage_step, ref_gen) for b in batches) / grad_accum
    trained = {k: [(n, p) for n, p in ref.nets[k].named_parameters() if p.requires_grad]
               for k in ("draft", "student", "target")}
    flat = [p for k in trained for _, p in trained[k]]
    grads = iter(torch.autograd.grad(total, flat, allow_unused=True))
    ref_grad = {k: {n: g if g is not None else torch.zeros_like(p) for (n, p), g in zip(v, grads)}
                for k, v in trained.items()}
    before = {k: copy.deepcopy(engines[k].module.state_dict()) for k in trained}
    for b in batches:
        step_fn(*b, stage_step, gen)
    a = alpha_schedule(cfg)(stage_step)
    weight = {"draft": a, "student": 1 - a, "target": 1 - a}
    for k in trained:
        eta = LRS[k] * (stage_lr_lambda(cfg)(stage_step) if k == "student" else 1.0)  # the stage's student lr
        rec = engines[k].ds.records
        assert len(rec) == 1, (k, len(rec))  # one optimizer step per accumulation window
        lr_used = rec[0]["lr"][0]
        expect_lr = eta * (weight[k] if mode == "lr" else 1.0)
        assert lr_used == pytest.approx(expect_lr, rel=1e-12), (k, lr_used, expect_lr)
        upd = torch.cat([(-lr_used * rec[0]["grads"].get(n, torch.zeros_like(g))).flatten()
                         for n, g in ref_grad[k].items()])
        want = torch.cat([(-eta * g).flatten() for g in ref_grad[k].values()])
        real = torch.cat([(engines[k].module.state_dict()[n] - before[k][n]).flatten() for n in ref_grad[k]])
        theta = max(float(v.abs().max()) for v in before[k].values())
        err = _rel(upd, want)
        print(f"[eq9] mode={mode} ga={grad_accum} step={stage_step} {k}: lr={lr_used:.4g} "
              f"|update|={float(want.norm()):.3e} rel.err(update vs -eta*grad L)={err:.2e}")
        assert float(want.norm()) > 0, k  # the term does reach this engine
        assert err < 2e-4, (k, err)
        # the step was applied: theta_after - theta_before = update, to fp32 rounding of theta
        assert float((real - upd).abs().max()) <= 1e-4 * float(upd.abs().max()) + 4e-7 * theta, k


def _first_step_updates(tiny_cfg, mode: str, step: int) -> dict:
    """update/<engine> (‖Δθ‖/‖θ‖, as logged) of one AdamW step at `step`, from the same weights and batch."""
    cfg, step_fn, _, _ = _setup(tiny_cfg, mode, 1, optimizer="adamw")
    cfg.train.steps = cfg.train.cd_steps = 10  # a CD step, alpha(0) = 0.95, alpha(8) = 0.23
    step_fn.alpha = alpha_schedule(cfg)
    m = step_fn(*_batch(cfg, 0), step, torch.Generator().manual_seed(7))
    return {k.split("/")[1]: v for k, v in m.items() if k.startswith("update/")}


def test_update_sizes_follow_alpha(tiny_cfg):
    """Adam's first step is lr * g / (|g| + eps): its size is set by the lr alone, whatever scales the loss.
    So in mode lr the update sizes at two steps are in the ratio of the engines' Eq. 9 weights, while the
    literal loss weighting (mode loss) leaves them unchanged -- the reason lr is the default."""
    sched = alpha_schedule(_setup(tiny_cfg, "lr", 1)[0])
    sched = type(sched)(sched.kind, sched.alpha0, sched.alphaT, 10, sched.step_at)
    a0, a8 = sched(0), sched(8)
    want = {"draft": a8 / a0, "student": (1 - a8) / (1 - a0), "target": (1 - a8) / (1 - a0)}
    for mode in ("lr", "loss"):
        u0, u8 = _first_step_updates(tiny_cfg, mode, 0), _first_step_updates(tiny_cfg, mode, 8)
        for k, ratio in want.items():
            got = u8[k] / u0[k]
            print(f"[update] mode={mode} {k}: update@0={u0[k]:.3e} update@8={u8[k]:.3e} ratio={got:.4f} "
                  f"(Eq. 9 weight ratio {ratio:.4f})")
            if mode == "lr":
                assert got == pytest.approx(ratio, rel=1e-3), (k, got, ratio)
            else:  # Adam's eps lets the smallest gradients shrink a little; nowhere near the weight ratio
                assert 0.8 < got < 1.25, (k, got)
