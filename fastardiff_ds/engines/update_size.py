"""Relative update size ‖Δθ‖ / ‖θ‖ of one optimizer step: the metric that shows α(t) reaching the weights.

Measured on the optimizer's own tensors (``Engine.master_params``): the fp32 master shards under ZeRO / bf16,
so a step far below bf16's resolution (~4e-3 relative) still measures. Each rank sums its shards' squares and
one all-reduce over the engine's data-parallel group adds them up; replicated (unsharded) parameters count
once per rank in both sums, which leaves the ratio unchanged. Cost: one transient copy of this rank's master
shard per measured step, so callers measure on logging steps only.
"""
from __future__ import annotations

import math

import torch

from fastardiff_ds.engines.dist import all_reduce


def step_with_update_size(engine, measure: bool = True) -> float | None:
    """``engine.step()``; with ``measure`` and at an accumulation boundary, also return ‖Δθ‖ / ‖θ‖ of that
    step over every rank's shards (collective over ``engine.dp_group``: all ranks must pass the same ``measure``).
    Returns None when not measured (no optimizer step happened, or ``measure`` is False)."""
    if not (measure and engine.at_boundary()):
        engine.step()
        return None
    params = engine.master_params()
    before = [p.detach().clone() for p in params]
    engine.step()
    dev = before[0].device if before else torch.device("cpu")
    sums = torch.zeros(2, dtype=torch.float64, device=dev)
    for p, b in zip(params, before):
        sums[0] += (p.detach().double() - b.double()).pow(2).sum().to(dev)
        sums[1] += b.double().pow(2).sum().to(dev)
    delta2, norm2 = all_reduce(sums, "sum", engine.dp_group).tolist()
    return math.sqrt(delta2 / norm2) if norm2 > 0 else float("nan")
