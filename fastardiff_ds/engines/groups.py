"""Process groups for networks sharded over less than the world, and DeepSpeed's global-group trap.

DeepSpeed keeps the data-parallel group of "the" model in a process-wide global
(``deepspeed.utils.groups.mpu``): ``deepspeed.initialize(mpu=M)`` overwrites it and checkpointing,
gradient-norm reduction, etc. read it later. With a teacher on a sub-group and trainable engines on
the world in one process, whichever engine was built last would silently decide the group of the
others. So every call into an engine runs inside :func:`mpu_scope` with that engine's own mpu
(``None`` = the world), which makes the result independent of build order (tested).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.distributed as dist

from fastardiff_ds.engines.dist import get_rank, get_world_size


class GroupMPU:
    """Minimal Megatron-style ``mpu`` answering with ``group`` as the data-parallel group.

    Model parallelism is always 1 here (each rank is its own model-parallel group); the teacher's
    ZeRO-3 shards live on ``group`` only, so its all-gathers never leave it (e.g. stay inside a node).
    """

    def __init__(self, group, ranks: list[int]):
        self.group, self.ranks = group, list(ranks)

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_world_size(self) -> int:
        return len(self.ranks)

    def get_data_parallel_rank(self) -> int:
        return self.ranks.index(get_rank())

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.ranks)

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_group(self):
        # Never used with model-parallel size 1 by the inference-only engines this mpu serves.
        return None


def contiguous_groups(group_size: int) -> tuple[object, list[int]]:
    """Split the world into consecutive blocks of ``group_size`` ranks; return this rank's (group, ranks).

    Collective: torch requires every rank to enter ``new_group`` for *every* group, in the same order,
    members or not. With ranks laid out node by node, ``group_size = ranks per node`` keeps a group
    inside one node.
    """
    world = get_world_size()
    if group_size < 1 or world % group_size:
        raise ValueError(f"teacher.group_size={group_size} must divide the world size {world}; "
                         f"use a divisor of {world} (e.g. the number of ranks per node)")
    mine, my_ranks = None, []
    for start in range(0, world, group_size):
        ranks = list(range(start, start + group_size))
        group = dist.new_group(ranks=ranks) if dist.is_initialized() else None
        if get_rank() in ranks:
            mine, my_ranks = group, ranks
    return mine, my_ranks


@contextlib.contextmanager
def mpu_scope(mpu) -> Iterator[None]:
    """Make ``mpu`` (``None`` = world group) DeepSpeed's global data-parallel setting for the block."""
    from deepspeed.utils import groups

    previous = groups.mpu
    groups.mpu = mpu
    try:
        yield
    finally:
        groups.mpu = previous
