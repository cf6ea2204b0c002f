"""The student's CD -> DMD learning-rate switch (joint.stage_lr_lambda, wired in trainer._specs) and
train.on_nonfinite in every branch of the joint step that has its own finiteness check (issue #30, training maths).

Setup: the one-process joint step of tests/unit/test_train_step.py (plain modules behind the real `Engine` over
the DeepSpeed stand-in of _ds_like.py), but each engine gets the spec and lr lambda that trainer._specs gives it,
so the lr the optimizer really uses at each step is the trainer's.

Branches with their own check (joint.py `_check`): the AR branch ("L_reg + L_ent", draft), consistency
distillation ("L_cd", student + the CD target's EMA), the DMD generator ("L_dmd", student) and the DMD fake score
("L_fake", fake). A trained target AR (train.target_ar) is stepped through the surrogate of L_dist, so it must skip
with the student. A skipped update is counted per network (metric nonfinite/<network>, with a warning naming it), and
the step's metrics carry the non-finite loss value (loss/ar, loss/dist, fake/loss). A finite loss whose backward
overflows (bf16) makes DeepSpeed drop the update; the stand-in does the same (`FakeDS`), and the policy applies to it
too (on real bf16 ZeRO-3 engines: tests/unit/test_joint_deepspeed.py).
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from _ds_like import FakeDS, Frozen
from test_train_step import _batch  # the same (ids, mask, tokens) batch
from fastardiff_ds.engines.engine import Engine, scaled_lr_lambda
from fastardiff_ds.training import joint as J
from fastardiff_ds.training.joint import JointStep, NonFiniteLoss, alpha_schedule, stage_lr_lambda, stage_of
from fastardiff_ds.training.networks import Dispatch, TeacherNet, init_networks
from fastardiff_ds.training.trainer import _specs

LR = {"lr_draft": 3e-3, "lr_target": 2e-3, "lr_student_cd": 1e-2, "lr_student_dmd": 2.5e-3, "lr_fake": 4e-3}


class CountingEMA:
    """Records every update (the CD target's EMA and the exported EMA)."""

    def __init__(self):
        self.decays = []

    def update(self, decay):
        self.decays.append(decay)


def _engine(name, module, spec, lr_lambda, optimizer):
    """An `Engine` over FakeDS with the trainer's spec lr and lr lambda (SGD or AdamW, as in _ds_like)."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=spec.lr) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=1e-8, weight_decay=0.0))
    fn, box = scaled_lr_lambda(lr_lambda)
    return Engine(FakeDS(module, opt, fn, 1), spec, {}, lr_scale=box)


def _setup(tiny_cfg, *, target_ar=False, gen_every=1, alpha_mode="lr", policy="skip", optimizer="adamw"):
    from fastardiff_ds.models import build_head, build_target, nextstep_state

    cfg = copy.deepcopy(tiny_cfg)
    t = cfg.train
    t.target_ar, t.steps, t.cd_steps, t.gen_every, t.student_steps = target_ar, 6, 3, gen_every, 2
    t.alpha_mode, t.on_nonfinite, t.log_every, t.student_ema_decay = alpha_mode, policy, 1, 0.9
    for k, v in LR.items():
        setattr(t, k, v)
    torch.manual_seed(0)
    target, head = build_target(cfg), build_head(cfg)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    nets = init_networks(cfg, nextstep_state(target, head))
    teacher = Frozen(Dispatch(TeacherNet(target, head)).eval())
    specs = _specs(cfg)
    engines = {k: _engine(k, v, *specs[k], optimizer) for k, v in nets.items()}
    ema, export = CountingEMA(), CountingEMA()
    uncond = (torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    step_fn = JointStep(cfg, engines, teacher, ema, copy.deepcopy(nets["student"]).requires_grad_(False), uncond,
                        export_ema=export)
    return cfg, step_fn, engines, (ema, export)


# -- 1. stage_lr_lambda ---------------------------------------------------------------------------------------------
def test_stage_lr_lambda_values_around_the_switch(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.steps, cfg.train.cd_steps, cfg.train.lr_student_cd, cfg.train.lr_student_dmd = 10, 4, 1e-4, 2e-5
    fn = stage_lr_lambda(cfg)
    assert [fn(s) for s in (0, 1, 3)] == [1.0, 1.0, 1.0]  # stage 1 (CD): lr_student_cd itself
    for s in (4, 5, 9, 10, 1000):  # from step cd_steps on (stage 2, DMD): lr_student_dmd / lr_student_cd
        assert fn(s) == pytest.approx(0.2, rel=1e-12), s
    # the switch is where the stage changes
    assert [stage_of(cfg, s) for s in (3, 4)] == ["cd", "dmd"]
    # the trainer's student spec starts at lr_student_cd, so spec.lr x fn gives each stage's configured lr
    spec = _specs(cfg)["student"][0]
    assert spec.lr == cfg.train.lr_student_cd
    assert spec.lr * stage_lr_lambda(cfg)(3) == pytest.approx(1e-4, rel=1e-12)
    assert spec.lr * stage_lr_lambda(cfg)(4) == pytest.approx(2e-5, rel=1e-12)


@pytest.mark.parametrize("cd_steps, expect", [(0, [0.5, 0.5, 0.5]), (3, [1.0, 1.0, 1.0])],
                         ids=["dmd_only", "cd_only"])
def test_stage_lr_lambda_single_stage_runs(tiny_cfg, cd_steps, expect):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.steps, cfg.train.cd_steps, cfg.train.lr_student_cd, cfg.train.lr_student_dmd = 3, cd_steps, 4e-4, 2e-4
    assert [stage_lr_lambda(cfg)(s) for s in range(3)] == pytest.approx(expect, rel=1e-12)


def _expected_lrs(cfg, step):
    """The lr each engine's optimizer must use at optimizer step `step`: spec lr x stage factor (student only)
    x Eq. 9's lr factor in alpha_mode=lr (draft alpha, student and target 1 - alpha; fake never weighted)."""
    t, a = cfg.train, alpha_schedule(cfg)(step)
    w = {"draft": a, "student": 1 - a, "target": 1 - a} if t.alpha_mode == "lr" else {}
    base = {"draft": t.lr_draft, "target": t.lr_target, "fake": t.lr_fake,
            "student": t.lr_student_cd if step < t.cd_steps else t.lr_student_dmd}
    return {k: v * w.get(k, 1.0) for k, v in base.items()}


@pytest.mark.parametrize("alpha_mode", ["lr", "loss"])
def test_optimizer_lr_follows_the_stage_over_real_steps(tiny_cfg, alpha_mode):
    """Six joint steps (3 CD, 3 DMD with the generator at steps 3 and 5): every recorded optimizer step of every
    engine used the lr of its spec x the student's stage factor x Eq. 9's factor."""
    cfg, step_fn, engines, _ = _setup(tiny_cfg, target_ar=True, gen_every=2, alpha_mode=alpha_mode)
    ids, mask, tokens = _batch(cfg)
    gen = torch.Generator().manual_seed(0)
    stepped = {k: [] for k in engines}
    for step in range(6):
        n = {k: len(e.ds.records) for k, e in engines.items()}
        step_fn(ids, mask, tokens, step, gen)
        for k, e in engines.items():
            if len(e.ds.records) > n[k]:
                stepped[k].append(step)
                lr = e.ds.records[-1]["lr"]
                assert lr == pytest.approx([_expected_lrs(cfg, step)[k]] * len(lr), rel=1e-9), (k, step, lr)
    assert stepped["student"] == [0, 1, 2, 3, 5] and stepped["draft"] == list(range(6))
    assert stepped["fake"] == [3, 4, 5] and stepped["target"] == [0, 1, 2, 3, 5]
    lrs = [r["lr"][0] for r in engines["student"].ds.records]
    if alpha_mode == "loss":  # the switch itself, nothing else: lr_student_cd x3, then lr_student_dmd
        assert lrs == pytest.approx([1e-2] * 3 + [2.5e-3] * 2, rel=1e-12)


def test_student_lr_switch_follows_the_stage_after_a_skipped_cd_step(tiny_cfg, monkeypatch):
    """A skipped CD step (train.on_nonfinite=skip) is a student step that did not happen; the first DMD update must
    still use lr_student_dmd (the stage is the optimizer step's, stage_of), not the CD lr one update late."""
    cfg, step_fn, engines, _ = _setup(tiny_cfg, alpha_mode="loss", optimizer="sgd")
    _poison(monkeypatch, step_fn, "consistency_distillation_loss", {1}, float("nan"))
    ids, mask, tokens = _batch(cfg)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        step_fn(ids, mask, tokens, step, gen)
    lrs = [r["lr"][0] for r in engines["student"].ds.records]  # student steps 0, 2 (CD), 3, 4, 5 (DMD)
    assert lrs == pytest.approx([1e-2] * 2 + [2.5e-3] * 3, rel=1e-12)


# -- 2. train.on_nonfinite ------------------------------------------------------------------------------------------
def _poison(monkeypatch, step_fn, fn_name, bad_steps, value):
    """Make joint.<fn_name> (the library loss a branch calls) return a non-finite loss, still in the graph, at the
    optimizer steps in `bad_steps` (its own "<prefix>/loss" metric too, as a real non-finite loss would have)."""
    real = getattr(J, fn_name)

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        if step_fn.step_now not in bad_steps:
            return loss, metrics
        return loss + value, {k: v + value if k.endswith("/loss") else v for k, v in metrics.items()}

    monkeypatch.setattr(J, fn_name, poisoned)


# branch -> (joint.py's loss function, the victim engine, a step of that branch, the check's name, the metric)
BRANCHES = {
    "ar": ("feature_regression_loss", "draft", 1, "L_reg + L_ent", "loss/ar"),
    "cd": ("consistency_distillation_loss", "student", 1, "L_cd", "loss/dist"),
    "dmd": ("dmd_generator_loss", "student", 4, "L_dmd", "loss/dist"),
    "fake": ("dmd_fake_score_loss", "fake", 4, "L_fake", "fake/loss"),
}


def _snapshot(engine):
    opt = engine.ds.optimizer
    return {"params": copy.deepcopy(engine.module.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "records": len(engine.ds.records), "epoch": engine.ds.lr_scheduler.last_epoch}


def _same_state(engine, snap) -> bool:
    now = _snapshot(engine)
    if now["records"] != snap["records"] or now["epoch"] != snap["epoch"]:
        return False
    if any(not torch.equal(v, now["params"][k]) for k, v in snap["params"].items()):
        return False
    a, b = snap["opt"]["state"], now["opt"]["state"]
    return a.keys() == b.keys() and all(
        torch.equal(torch.as_tensor(a[i][k]), torch.as_tensor(b[i][k])) for i in a for k in a[i])


def _steppers(cfg, step) -> set:
    """The engines a normal step updates (gen_every=1 here, so every DMD step is a generator step)."""
    return {"draft", "student", "target"} | ({"fake"} if stage_of(cfg, step) == "dmd" else set())


def _finite(engine) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in engine.module.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_skip_leaves_the_branch_engine_untouched_and_the_next_step_proceeds(tiny_cfg, monkeypatch, branch, value):
    fn_name, victim, bad, name, key = BRANCHES[branch]
    cfg, step_fn, engines, (ema, export) = _setup(tiny_cfg, target_ar=True)
    _poison(monkeypatch, step_fn, fn_name, {bad}, value)
    ids, mask, tokens = _batch(cfg)
    gen = torch.Generator().manual_seed(0)
    for step in range(bad):
        step_fn(ids, mask, tokens, step, gen)
    # the engines L_dist trains skip together: the target AR only steps through the student's surrogate gradient
    skipped = {victim} | ({"target"} if victim == "student" else set())
    snaps = {k: _snapshot(e) for k, e in engines.items()}
    n_ema, n_export = len(ema.decays), len(export.decays)

    m = step_fn(ids, mask, tokens, bad, gen)  # the poisoned step: no exception under skip

    assert not math.isfinite(m[key])  # the non-finite value is reported in the step's metrics
    assert {k: m[f"nonfinite/{k}"] for k in engines} == {k: float(k == victim) for k in engines}  # per network
    for k, e in engines.items():
        if k in skipped:
            assert _same_state(e, snaps[k]), f"{k}: the skipped step changed its weights / optimizer / schedule"
            assert all(p.grad is None for p in e.module.parameters()), f"{k}: a skipped loss left gradients"
        else:  # the other branches of the same step are not skipped
            assert len(e.ds.records) == snaps[k]["records"] + (k in _steppers(cfg, bad)), k
    cd_student_step = stage_of(cfg, bad) == "cd" and victim != "student"
    assert len(ema.decays) == n_ema + cd_student_step  # the CD target follows only a real CD student step
    assert len(export.decays) == n_export + ("student" not in skipped)  # the exported EMA likewise

    snaps = {k: _snapshot(e) for k, e in engines.items()}
    m = step_fn(ids, mask, tokens, bad + 1, gen)  # the next, finite step proceeds normally
    assert math.isfinite(m[key]) and m[f"nonfinite/{victim}"] == 1.0  # the count is cumulative
    assert victim in _steppers(cfg, bad + 1)
    for k in _steppers(cfg, bad + 1):
        e = engines[k]
        assert len(e.ds.records) == snaps[k]["records"] + 1, k
        assert not _same_state(e, snaps[k]) and _finite(e), k
        assert e.ds.records[-1]["lr"][0] == pytest.approx(_expected_lrs(cfg, bad + 1)[k], rel=1e-9), k
    if victim in ("student", "fake"):  # AdamW's state counts the updates really taken: one was skipped
        steps = next(iter(engines[victim].ds.optimizer.state.values()))["step"]
        assert int(steps) == len(engines[victim].ds.records)


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_stop_raises_a_named_error_before_touching_the_engine(tiny_cfg, monkeypatch, branch):
    fn_name, victim, bad, name, _ = BRANCHES[branch]
    cfg, step_fn, engines, _ = _setup(tiny_cfg, target_ar=True, policy="stop")
    _poison(monkeypatch, step_fn, fn_name, {bad}, float("nan"))
    ids, mask, tokens = _batch(cfg)
    gen = torch.Generator().manual_seed(0)
    for step in range(bad):
        step_fn(ids, mask, tokens, step, gen)
    snap = _snapshot(engines[victim])
    said = f"loss '{name}' of network '{victim}' is not finite at step {bad}"
    with pytest.raises(NonFiniteLoss, match=re.escape(said)) as err:
        step_fn(ids, mask, tokens, bad, gen)
    assert "train.on_nonfinite=stop" in str(err.value) and "train.on_nonfinite=skip" in str(err.value)
    assert isinstance(err.value, FloatingPointError)
    assert _same_state(engines[victim], snap) and all(p.grad is None for p in engines[victim].module.parameters())


def test_skip_under_grad_accum_keeps_the_windows_aligned(tiny_cfg, monkeypatch):
    """A skipped CD micro-batch still takes its micro-step (student and the trained target AR with it), so every
    engine's optimizer steps at every window's end (before the fix the student's fell mid-window after a skip)."""
    cfg, step_fn, engines, _ = _setup(tiny_cfg, target_ar=True, optimizer="sgd")
    cfg.train.grad_accum = 2
    for e in engines.values():
        e.ds.gas = 2
    calls = []
    real = J.consistency_distillation_loss

    def first_micro_bad(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls.append(1)
        return (loss + float("nan") if len(calls) == 1 else loss), metrics

    monkeypatch.setattr(J, "consistency_distillation_loss", first_micro_bad)
    ids, mask, tokens = _batch(cfg)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        for _micro in range(2):
            step_fn(ids, mask, tokens, step, gen)
        # every engine's optimizer steps at the end of every window, the student's too
        counts = {k: len(e.ds.records) for k, e in engines.items() if k != "fake"}  # CD steps: no fake score
        assert set(counts.values()) == {step + 1}, counts
    # the skipped micro-batch added nothing: window 0's student gradient is the second micro-batch's alone
    first = engines["student"].ds.records[0]["grads"]
    assert first and all(torch.isfinite(g).all() for g in first.values())


class _InfGrad(torch.autograd.Function):
    """The identity in the forward, gradients times inf in the backward: a finite loss whose backward overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("policy", ["stop", "skip"])
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_overflowing_backward_goes_through_the_policy(tiny_cfg, monkeypatch, branch, policy):
    fn_name, victim, bad, _, _ = BRANCHES[branch]
    cfg, step_fn, engines, _ = _setup(tiny_cfg, policy=policy)
    real = getattr(J, fn_name)
    monkeypatch.setattr(J, fn_name, lambda *a, **k: (lambda loss, m: (
        _InfGrad.apply(loss) if step_fn.step_now == bad else loss, m))(*real(*a, **k)))
    ids, mask, tokens = _batch(cfg)
    gen = torch.Generator().manual_seed(0)
    for step in range(bad):
        step_fn(ids, mask, tokens, step, gen)
    snap = _snapshot(engines[victim])
    if policy == "stop":
        with pytest.raises(NonFiniteLoss, match=f"gradients of network '{victim}' are not finite at step {bad}"):
            step_fn(ids, mask, tokens, bad, gen)
    else:
        m = step_fn(ids, mask, tokens, bad, gen)
        assert m[f"nonfinite/{victim}"] == 1.0 and f"update/{victim}" not in m
    assert _same_state(engines[victim], snap) and _finite(engines[victim])  # the update was dropped
