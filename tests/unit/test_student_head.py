"""A student head larger than the teacher's (model.student_head): it starts as the teacher head's function, every
added weight can learn, it survives export and reload, and a shrinking or re-widened config is refused by name."""
from __future__ import annotations

import copy

import pytest
import torch

from fastardiff_ds.config import ConfigError
from fastardiff_ds.config.resolve import apply_overrides
from fastardiff_ds.models import (build_draft, build_head, build_target, grow_state, load_pretrained,
                                  nextstep_state, save_pretrained)
from fastardiff_ds.training.networks import init_networks


def _grown_cfg(tiny_cfg, depth=4, mlp_ratio=3.0):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.student_head.depth, cfg.model.student_head.mlp_ratio = depth, mlp_ratio
    return cfg


def _random_teacher(cfg):
    torch.manual_seed(0)
    target, head = build_target(cfg), build_head(cfg)
    for p in head.parameters():  # the fresh head is adaLN-zero: randomise it so that it computes something
        torch.nn.init.normal_(p, std=0.2)
    return target, head


@pytest.mark.parametrize("depth,mlp_ratio", [(None, None), (4, None), (None, 3.0), (5, 2.5)])
def test_grown_student_is_the_teacher_head_at_init(tiny_cfg, depth, mlp_ratio):
    cfg = _grown_cfg(tiny_cfg, depth, mlp_ratio)
    target, head = _random_teacher(cfg)
    student = init_networks(cfg, nextstep_state(target, head))["student"].inner
    assert len(student.net.res_blocks) == (depth or cfg.model.head.depth)
    inner = student.net.res_blocks[0].mlp[0].out_features
    assert inner == int(cfg.model.head.width * (mlp_ratio or cfg.model.head.mlp_ratio))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(7, 48, generator=g), torch.rand(7, generator=g)
    c = torch.randn(7, cfg.model.ar.hidden_size, generator=g)
    want = head(x, t, c)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(student(x, t, c, guidance=torch.full((7,), 3.0)), want, rtol=0, atol=1e-5)


def test_every_added_weight_learns(tiny_cfg):
    cfg = _grown_cfg(tiny_cfg, depth=3, mlp_ratio=2.0)
    target, head = _random_teacher(cfg)
    student = init_networks(cfg, nextstep_state(target, head))["student"].inner
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(16, 48, generator=g), torch.rand(16, generator=g)
    c, v = torch.randn(16, cfg.model.ar.hidden_size, generator=g), torch.randn(16, 48, generator=g)
    for _ in range(2):  # step 1 moves the zero gates / output columns; step 2 reaches what sits behind them
        opt.zero_grad()
        ((student(x, t, c, guidance=torch.full((16,), 3.0)) - v) ** 2).mean().backward()
        opt.step()
    new_block, old_block = student.net.res_blocks[2], student.net.res_blocks[0]
    inner_t = cfg.model.head.width
    assert new_block.adaLN_modulation[-1].weight.abs().sum() > 0
    assert new_block.mlp[0].weight.grad.abs().sum() > 0
    assert old_block.mlp[2].weight[:, inner_t:].abs().sum() > 0  # the extra hidden units' output weights
    assert old_block.mlp[0].weight.grad[inner_t:].abs().sum() > 0


def test_grown_student_round_trips_through_an_export(tiny_cfg, tmp_path):
    cfg = _grown_cfg(tiny_cfg)
    target, head = _random_teacher(cfg)
    student = init_networks(cfg, nextstep_state(target, head))["student"].inner
    save_pretrained(tmp_path / "ck", cfg, target, head, draft=build_draft(cfg, target), student=student)
    bundle = load_pretrained(tmp_path / "ck")
    assert bundle.cfg.model.student_head.depth == 4 and len(bundle.student.net.res_blocks) == 4
    for k, v in student.state_dict().items():
        assert torch.equal(bundle.student.state_dict()[k], v), k


def test_shrinking_or_rewidening_is_refused(tiny_cfg):
    with pytest.raises(ConfigError, match=r"model.student_head.depth=1 < model.head.depth=2"):
        apply_overrides(copy.deepcopy(tiny_cfg), ["model.student_head.depth=1"])
    with pytest.raises(ConfigError, match=r"model.student_head.mlp_ratio"):
        apply_overrides(copy.deepcopy(tiny_cfg), ["model.student_head.mlp_ratio=0.5"])
    cfg = apply_overrides(copy.deepcopy(tiny_cfg), ["model.student_head.depth=3", "model.student_head.mlp_ratio=2"])
    assert (cfg.model.student_head.depth, cfg.model.student_head.mlp_ratio) == (3, 2.0)
    teacher = build_head(tiny_cfg).state_dict()
    wider = copy.deepcopy(tiny_cfg)
    wider.model.head.width = 48
    with pytest.raises(ValueError, match="can only grow"):
        grow_state(build_head(wider).state_dict(), build_head(tiny_cfg, student=True).state_dict())
    assert set(grow_state(teacher, build_head(tiny_cfg, student=True).state_dict())) >= set(teacher)
