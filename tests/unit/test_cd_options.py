"""Consistency-distillation options of issue 25: t on the student's sampling grid, several noise draws per token."""
from __future__ import annotations

import copy

import pytest
import torch

from fastardiff_ds.losses.consistency import ConsistencyConfig, consistency_distillation_loss
from test_train_step import _batch, _setup


def test_cd_on_grid_draws_t_from_the_step_start_times_only():
    seen = []

    def student(x, t, cond, w):
        seen.append(t.clone())
        return torch.zeros_like(x)

    cfg = ConsistencyConfig(delta=1.0, solver_steps=2, t_grid=(0.0, 0.25, 0.5, 0.75))
    teacher = lambda x, t, w: -x  # noqa: E731
    consistency_distillation_loss(student, student, teacher, torch.randn(400, 3), torch.randn(400, 2),
                                  torch.Generator().manual_seed(0), config=cfg)
    t = seen[0]
    assert set(t.tolist()) == {0.0, 0.25, 0.5, 0.75}
    counts = torch.stack([(t == g).sum() for g in (0.0, 0.25, 0.5, 0.75)]).float()
    assert float(counts.min()) > 70  # ~100 each of 400
    with pytest.raises(ValueError, match="t_grid"):
        ConsistencyConfig(t_grid=(0.0, 1.0))


def test_joint_step_passes_the_students_grid_when_asked(tiny_cfg):
    for on, grid in ((False, ()), (True, (0.0, 0.5))):
        cfg = copy.deepcopy(tiny_cfg)
        cfg.train.cd_on_grid = on
        _, step_fn, _, _ = _setup(cfg)  # student_steps = 2
        assert step_fn.cd.t_grid == pytest.approx(grid)


@pytest.mark.parametrize("m", [1, 3])
def test_cd_batch_mul_uses_each_condition_m_times_with_its_own_teacher_rows(tiny_cfg, m):
    """With m draws per token, every student row and its teacher target use the condition of the same token: the
    step's CD loss equals the loss over the m-times repeated tokens with the m-times repeated conditions."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.cd_batch_mul = m
    cfg, step_fn, engines, teacher = _setup(cfg)
    ids, mask, tokens = _batch(cfg)
    metrics = step_fn(ids, mask, tokens, 0, torch.Generator().manual_seed(0), stage="cd")
    B, N, D = tokens.shape
    # the reference: the same draws, computed from the repeated rows directly (before the step moved the student)
    cfg2, step2, engines2, teacher2 = _setup(copy.deepcopy(cfg))
    C = cfg.model.ar.hidden_size
    uids = step2.uncond_ids.expand(B, -1)
    umask = step2.uncond_mask.expand(B, -1)
    cond_t, _ = teacher2("features", ids, mask, tokens)
    cond_u, _ = teacher2("features", uids, umask, tokens)
    gen = torch.Generator().manual_seed(0)
    # the AR branch draws nothing from the generator: the CD loss gets its first draws
    guided = step2.teacher_velocity(cond_t.reshape(-1, C).repeat(m, 1), cond_u.reshape(-1, C).repeat(m, 1))
    from fastardiff_ds.training.networks import head_fn

    ref, _ = consistency_distillation_loss(head_fn(engines2["student"]), step2.ema_head, guided,
                                           tokens.reshape(-1, D).repeat(m, 1), cond_t.reshape(-1, C).repeat(m, 1), gen,
                                           config=step2.cd)
    assert metrics["cd/loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
