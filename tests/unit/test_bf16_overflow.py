"""A bf16 overflow on real DeepSpeed engines (ZeRO-3, bf16, gloo, one process) goes through train.on_nonfinite
and is reported per network.

Two ways a loss overflows under bf16:
- in the forward: the loss itself is inf, and the finiteness vote on the loss catches it (joint.py `_check`);
- in the backward: the loss is finite but its gradients overflow. DeepSpeed's ZeRO-3 optimizer then drops the
  update (an inf/NaN global grad norm; with bf16 there is no loss scale to lower), silently: before
  `Engine.dropped`, a run with the default train.on_nonfinite=stop went on with a fake score (or student) that
  never learned again, and nothing said so.
`_InfGrad` (test_joint_lr_nonfinite.py) injects the second kind exactly: the identity in the forward, gradients times inf in the backward.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import fastardiff_ds.training.joint as J
from fastardiff_ds import engines as E
from fastardiff_ds.training.joint import JointStep, NonFiniteLoss
from test_joint_lr_nonfinite import _InfGrad
from test_joint_deepspeed import LRS, UNCOND, _batch, _nets, _teacher, world  # noqa: F401

pytestmark = pytest.mark.slow  # ~25 s a test on one core (DeepSpeed engines in bf16)

LOSS_FNS = {"fake": "dmd_fake_score_loss", "student": "dmd_generator_loss"}


def _setup(tiny_cfg, tmp_path, policy):
    cfg, target, head, nets = _nets(tiny_cfg, cd_steps=0, on_nonfinite=policy)
    base = E.load_ds_config("zero3")
    base["bf16"]["enabled"] = True
    ema_module = copy.deepcopy(nets["student"]).requires_grad_(False)
    engines = {k: E.build_engine(nets[k], E.EngineSpec(k, LRS[k], schedule="constant"), base, micro_batch=2,
                                 grad_accum=1) for k in ("draft", "fake", "student")}
    teacher = _teacher(cfg, target, head, base, tmp_path / "teacher.safetensors", 2)
    return cfg, engines, JointStep(cfg, engines, teacher, E.EMA(engines["student"], ema_module), ema_module, UNCOND)


def _poison(monkeypatch, net: str, where: str, steps: set):
    """The loss of `net` overflows at the joint-step calls in `steps`: in the forward (x 1e38 twice, in bf16) or
    in the backward (finite value, inf gradients)."""
    real, calls = getattr(J, LOSS_FNS[net]), []

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls.append(1)
        if len(calls) - 1 in steps:
            loss = _InfGrad.apply(loss) if where == "backward" else (loss.bfloat16() * 1e38 * 1e38).float()
        return loss, metrics

    monkeypatch.setattr(J, LOSS_FNS[net], poisoned)


def _master(engine):
    return [p.detach().float().clone() for p in engine.master_params()]


@pytest.mark.parametrize("net,where", [("fake", "backward"), ("student", "backward"), ("fake", "forward")])
def test_bf16_overflow_stops_naming_the_network(world, tiny_cfg, tmp_path, monkeypatch, net, where):
    cfg, engines, step_fn = _setup(tiny_cfg, tmp_path, "stop")
    _poison(monkeypatch, net, where, {1})
    gen = torch.Generator().manual_seed(0)
    step_fn(*_batch(cfg, 0), 0, gen)
    before = _master(engines[net])
    said = (f"the gradients of network '{net}' are not finite at step 1" if where == "backward" else
            f"of network '{net}' is not finite at step 1")
    with pytest.raises(NonFiniteLoss, match=said) as err:
        step_fn(*_batch(cfg, 1), 1, gen)
    assert "train.on_nonfinite=skip" in str(err.value)
    after = _master(engines[net])  # the overflowing update never reached the weights
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and all(torch.isfinite(a).all() for a in after)


def test_bf16_backward_overflow_is_skipped_counted_and_named(world, tiny_cfg, tmp_path, monkeypatch, caplog):
    cfg, engines, step_fn = _setup(tiny_cfg, tmp_path, "skip")
    _poison(monkeypatch, "fake", "backward", {1, 2})
    gen = torch.Generator().manual_seed(0)
    rows, masters = [], []
    with caplog.at_level(logging.WARNING, logger="fastardiff_ds.training.joint"):
        for step in range(4):
            masters.append({k: _master(e) for k, e in engines.items()})
            rows.append(step_fn(*_batch(cfg, step), step, gen))
    masters.append({k: _master(e) for k, e in engines.items()})
    assert [r["nonfinite/fake"] for r in rows] == [0.0, 1.0, 2.0, 2.0]
    assert all(r["nonfinite/student"] == 0.0 and r["nonfinite/draft"] == 0.0 for r in rows)
    named = [r.getMessage() for r in caplog.records if "network 'fake'" in r.getMessage()]
    assert len(named) == 2 and "step 1" in named[0] and "step 2" in named[1], named
    assert "update/fake" not in rows[1] and rows[3]["update/fake"] > 0  # dropped twice, then trained again
    moved = lambda k, s: any(not torch.equal(a, b) for a, b in zip(masters[s][k], masters[s + 1][k]))  # noqa: E731
    assert [moved("fake", s) for s in range(4)] == [True, False, False, True]
    assert moved("student", 1) and moved("draft", 1)  # the other networks of the poisoned step still learn
    assert all(torch.isfinite(p).all() for e in engines.values() for p in e.master_params())
