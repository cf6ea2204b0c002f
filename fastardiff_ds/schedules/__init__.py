"""Schedules: α(t) loss annealing (Fast-ARDiff Eqs. 8-9), timestep samplers/grids, lr multipliers.

All are pure functions of their inputs (step, config, generator).
"""

from fastardiff_ds.schedules.alpha import (ALPHA_KINDS, ALPHA_MODES, ENGINE_TERM, AlphaSchedule, Eq9Weights, alpha,
                                           eq9_weights, total_loss)
from fastardiff_ds.schedules.lr import LR_KINDS, LRSchedule, lr_multiplier, make_lr_lambda
from fastardiff_ds.schedules.timesteps import (
    sample_logit_normal,
    sample_timesteps,
    sample_uniform,
    shift_timesteps,
    time_grid,
)

__all__ = [
    "ALPHA_KINDS",
    "ALPHA_MODES",
    "ENGINE_TERM",
    "Eq9Weights",
    "eq9_weights",
    "AlphaSchedule",
    "alpha",
    "total_loss",
    "LR_KINDS",
    "LRSchedule",
    "lr_multiplier",
    "make_lr_lambda",
    "sample_logit_normal",
    "sample_timesteps",
    "sample_uniform",
    "shift_timesteps",
    "time_grid",
]
