"""Known values of the α(t), lr and timestep schedules."""

import math

import pytest
import torch

from fastardiff_ds.schedules import (
    AlphaSchedule,
    LRSchedule,
    alpha,
    lr_multiplier,
    make_lr_lambda,
    sample_logit_normal,
    sample_timesteps,
    sample_uniform,
    shift_timesteps,
    time_grid,
    total_loss,
)

T = 1000


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("linear", (0.95, 0.50, 0.05)),  # Eq. 8: 0.95 - 0.9 * t / T
        ("cosine", (0.95, 0.50, 0.05)),
        ("step", (0.95, 0.05, 0.05)),  # switches at step_at * T = T/2
        ("constant", (0.95, 0.95, 0.95)),
    ],
)
def test_alpha_known_values(kind, expected):
    sched = AlphaSchedule(kind=kind, total_steps=T, step_at=0.5)
    got = (alpha(0, sched), alpha(T // 2, sched), alpha(T, sched))
    assert got == pytest.approx(expected, abs=1e-12)
    assert sched(T * 3) == pytest.approx(expected[2])  # held after T


def test_alpha_linear_and_cosine_shapes():
    lin = AlphaSchedule("linear", total_steps=T)
    cos = AlphaSchedule("cosine", total_steps=T)
    assert alpha(250, lin) == pytest.approx(0.95 - 0.9 * 0.25)
    assert alpha(250, cos) == pytest.approx(0.05 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    step = AlphaSchedule("step", total_steps=T, step_at=0.8)
    assert alpha(799, step) == 0.95 and alpha(800, step) == 0.05
    vals = [alpha(s, lin) for s in range(0, T + 1, 50)]
    assert all(a > b for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize(
    "kwargs", [dict(kind="exp"), dict(alpha0=1.5), dict(alphaT=-0.1), dict(total_steps=0), dict(step_at=0.0)]
)
def test_alpha_schedule_rejects_bad_config(kwargs):
    with pytest.raises(ValueError, match="AlphaSchedule"):
        AlphaSchedule(**kwargs)
    with pytest.raises(ValueError):
        alpha(-1, AlphaSchedule())


def test_total_loss_eq9():
    l_reg, l_ent, l_dist = torch.tensor(2.0), torch.tensor(-1.0), torch.tensor(4.0)
    assert total_loss(0.5, l_reg, l_ent, l_dist, lambda_ent=0.5).item() == pytest.approx(0.5 * 1.5 + 0.5 * 4.0)
    assert total_loss(1.0, l_reg, l_ent, l_dist).item() == pytest.approx(1.0)
    assert total_loss(0.0, l_reg, l_ent, l_dist).item() == pytest.approx(4.0)
    with pytest.raises(ValueError):
        total_loss(1.2, l_reg, l_ent, l_dist)


def test_lr_warmup_cosine_values():
    s = LRSchedule("cosine", warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert lr_multiplier(0, s) == pytest.approx(0.1)
    assert lr_multiplier(9, s) == pytest.approx(1.0)
    assert lr_multiplier(10, s) == pytest.approx(1.0)
    assert lr_multiplier(60, s) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, s) == pytest.approx(0.1)
    assert lr_multiplier(10_000, s) == pytest.approx(0.1)
    lin = LRSchedule("linear", warmup_steps=0, total_steps=100)
    assert lr_multiplier(25, lin) == pytest.approx(0.75)
    const = LRSchedule("constant", warmup_steps=4)
    assert [lr_multiplier(i, const) for i in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_lr_lambda_drives_lambdalr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = LRSchedule("cosine", warmup_steps=2, total_steps=12)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(sched))
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        lr_sched.step()
    assert seen == pytest.approx([2.0 * lr_multiplier(i, sched) for i in range(12)])
    with pytest.raises(ValueError, match="total_steps"):
        LRSchedule("cosine", warmup_steps=10, total_steps=10)


def test_logit_normal_statistics_and_reproducibility():
    g = torch.Generator().manual_seed(0)
    t = sample_logit_normal(200_000, g, mean=0.5, std=0.8)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)
    again = sample_logit_normal(200_000, torch.Generator().manual_seed(0), mean=0.5, std=0.8)
    assert torch.equal(t, again)
    u = sample_uniform(100_000, torch.Generator().manual_seed(1), 0.02, 0.98)
    assert u.min() >= 0.02 and u.max() < 0.98 and u.mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="unknown timestep"):
        sample_timesteps(3, None, "beta")
    with pytest.raises(ValueError):
        sample_uniform(3, None, 0.5, 0.1)


def test_shift_and_grid():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert shift_timesteps(t, 3.0).tolist() == pytest.approx([0.0, 0.25, 1.0])  # 0.5 / (3 - 2*0.5)
    assert torch.equal(shift_timesteps(t, 1.0), t)
    grid = time_grid(4)
    assert grid.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    shifted = time_grid(8, shift=3.2)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted.diff() > 0).all())
    assert shifted[4].item() == pytest.approx(1 / 4.2)
    with pytest.raises(ValueError):
        time_grid(0)
    with pytest.raises(ValueError):
        shift_timesteps(t, 0.0)
