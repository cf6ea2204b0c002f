"""Initialisation code that must see whole tensors, run on a module whose parameters were born partitioned.

Under ``zero.Init`` every parameter is split across the ranks as soon as its module's ``__init__`` returns, so a
parent's post-construction init (the flow head's adaLN-zero, ``flow_head.SimpleMLPAdaLN.reset_parameters``) finds
empty shards and skips. ``rerun_init_partitioned(module, fn)`` gathers the module's parameters (one module at a time, so
the peak is that module's size: the head, 157M at NextStep scale, not the 14B model), runs ``fn(module)`` on rank 0
and re-partitions, broadcasting rank 0's values. On a module that is not partitioned it does nothing: its
``__init__`` already ran the init on whole tensors (running it again would draw new random weights).
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn


def rerun_init_partitioned(module: nn.Module, fn: Callable[[nn.Module], None]) -> None:
    """Run ``fn(module)`` on whole parameters if they are ZeRO-3 partitioned (collective then), writing rank 0's
    result into every rank's shards; a no-op on a module that is not partitioned. Call it before
    ``deepspeed.initialize``: the optimizer's master copies are taken from the shards there."""
    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        fn(module)
