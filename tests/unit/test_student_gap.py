"""analysis/student_gap.py on an exact Gaussian flow: a student that is the teacher's Euler jump has exactly the
teacher's few-step gaps, one that is the exact flow map has none and the teacher's conditional distribution, and an
offset student is off by its offset."""
from __future__ import annotations

import pytest
import torch

from fastardiff_ds.analysis.student_gap import chain_gap
from fastardiff_ds.sampling.common import ARFlow
from fastardiff_ds.sampling.flow import SamplerConfig
from fastardiff_ds.sampling.guidance import CFGConfig
from toy import GaussianFlowHead, ToyAR

D, S, B, GRID = 2, 0.5, 6, 2
N = GRID * GRID


class FlowMap(GaussianFlowHead):
    """A student whose jump x + (1 - t) v is the exact ODE endpoint of N(mu, s^2) from x at t, plus `offset`."""

    def __init__(self, offset: float = 0.0):
        super().__init__(D, S)
        self.offset = offset

    def __call__(self, x, t, cond, guidance=None):
        mu = cond[:, :D].to(x.dtype)
        t = t.to(x.dtype)[:, None]
        sigma = torch.sqrt(t**2 * S**2 + (1 - t) ** 2)
        end = mu + S / sigma * (x - t * mu) + self.offset
        return (end - x) / (1 - t)


def _flows(student_head, steps=4):
    ar = ToyAR(D, dtype=torch.float32)
    teacher = ARFlow(ar, GaussianFlowHead(D, S), SamplerConfig("sde", 200), CFGConfig(scale=1.0, mode="none"))
    student = ARFlow(ar, student_head, SamplerConfig("consistency", steps), CFGConfig(scale=1.0, mode="distilled"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 16, (B, 5), generator=g)
    tokens = torch.randn(B, N, D, generator=g)
    return teacher, student, ids, torch.ones_like(ids), tokens


def test_an_euler_student_has_the_teachers_few_step_gaps():
    gap = chain_gap(*_flows(GaussianFlowHead(D, S)), GRID, ode_steps=200, draws=4)
    assert gap.steps == 4 and gap.t_grid == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert gap.gap == pytest.approx(gap.gap_euler_teacher, rel=1e-6)
    assert gap.gap[0] > 1e-3  # one Euler jump from noise is far from the ODE endpoint


def test_the_exact_flow_map_has_no_gap_and_the_teachers_distribution():
    gap = chain_gap(*_flows(FlowMap()), GRID, ode_steps=400, draws=64)
    assert max(gap.gap) < 1e-4 < min(gap.gap_euler_teacher)
    assert gap.teacher_var == pytest.approx(S**2, rel=0.15)
    assert gap.var_ratio == pytest.approx(1.0, abs=0.15)
    assert gap.mean_dist < 0.1 * gap.teacher_var


def test_an_offset_student_is_off_by_its_offset():
    """One step (with more steps the offset compounds: each jump starts from an offset state)."""
    gap = chain_gap(*_flows(FlowMap(offset=1.0), steps=1), GRID, ode_steps=400, draws=16)
    assert gap.gap[0] == pytest.approx(1.0, rel=1e-2)
    assert gap.mean_dist == pytest.approx(1.0, rel=0.2)
    assert len(gap.mean_dist_by_row) == GRID and min(gap.mean_dist_by_row) > 1.0
