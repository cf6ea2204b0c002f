"""Frozen networks: the teacher (original AR + flow head) and EMA copies -- inference only, no optimizer.

The teacher is ZeRO-3-partitioned over its *own* process group of ``group_size`` consecutive ranks
(default: the ranks of one node), so its all-gathers stay inside a node while the trainable engines
shard over the world (DESIGN.md §2). Construction follows what was seen to work with DeepSpeed 0.19.8:
``zero.Init(data_parallel_group=teacher_group)`` around ``build_fn()``, then
``deepspeed.initialize(model, config, mpu=GroupMPU(teacher_group))`` with no optimizer -- an engine is
required, since only an engine's hooks gather a partitioned module in forward (diffusers #3076).
Small networks can be replicated instead (``replicate=True``): a 157M head that runs ~50 times per
token would otherwise be all-gathered at every call.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from fastardiff_ds.engines.dist import accelerator_name, device, get_world_size, local_world_size
from fastardiff_ds.engines.ds_config import inference_ds_config
from fastardiff_ds.engines.engine import partition_numel
from fastardiff_ds.engines.groups import GroupMPU, contiguous_groups, mpu_scope


class FrozenEngine:
    """A frozen module, partitioned over ``ranks`` (or replicated); forward runs under ``no_grad``.

    Collective when partitioned: every rank of its group must call forward the same number of times
    with the same module sequence (pad with dummy batches rather than skipping).
    """

    def __init__(self, name: str, module: nn.Module, ds_engine=None, mpu=None, ranks: list[int] | None = None):
        self.name, self._module, self.ds, self.mpu = name, module, ds_engine, mpu
        self.ranks = ranks or list(range(get_world_size()))

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def partitioned(self) -> bool:
        return self.ds is not None

    @property
    def group_size(self) -> int:
        return len(self.ranks) if self.partitioned else 1

    def partition_numel(self) -> int:
        return partition_numel(self._module)

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        if self.ds is None:
            return self._module(*args, **kwargs)
        with mpu_scope(self.mpu):
            return self.ds(*args, **kwargs)

    def memory_bytes(self) -> int:
        """Bytes of parameters this rank holds for the network (what the design asks to report)."""
        return sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).nbytes for p in self._module.parameters())


def build_frozen(name: str, build_fn: Callable[[], nn.Module], ds_base: dict, *, micro_batch: int,
                 group=None, ranks: list[int] | None = None, replicate: bool = False,
                 zero_overrides: dict | None = None) -> FrozenEngine:
    """Build a frozen network partitioned over ``group`` (``None`` = world) or replicated.

    ``build_fn() -> nn.Module`` is called under ``zero.Init`` so parameters are born partitioned;
    it must create the same weights on every rank or load them (zero.Init broadcasts from group rank 0).
    """
    import deepspeed

    cfg = inference_ds_config(ds_base, micro_batch=micro_batch, device_type=accelerator_name(),
                              zero_overrides=zero_overrides)
    if replicate:
        module = build_fn().to(device()).eval().requires_grad_(False)
        if cfg["bf16"]["enabled"]:
            module = module.to(torch.bfloat16)
        return FrozenEngine(name, module)
    mpu = None if group is None else GroupMPU(group, ranks)
    with mpu_scope(mpu):
        with deepspeed.zero.Init(config_dict_or_path=cfg, data_parallel_group=group):
            module = build_fn()
        module.requires_grad_(False).eval()
        ds_engine, *_ = deepspeed.initialize(model=module, config=cfg, mpu=mpu)
    ds_engine.eval()
    return FrozenEngine(name, ds_engine.module, ds_engine, mpu, ranks)


def build_teacher(build_fn: Callable[[], nn.Module], ds_base: dict, *, micro_batch: int,
                  group_size: int | None = None, replicate: bool = False,
                  zero_overrides: dict | None = None) -> FrozenEngine:
    """The teacher on its own group of ``group_size`` consecutive ranks (default: ranks per node).

    Collective over the world (group creation), whether or not the teacher is replicated, so the order
    of ``new_group`` calls stays the same on every rank.
    """
    size = group_size or local_world_size()
    group, ranks = contiguous_groups(size)
    return build_frozen("teacher", build_fn, ds_base, micro_batch=micro_batch, group=group, ranks=ranks,
                        replicate=replicate, zero_overrides=zero_overrides)
