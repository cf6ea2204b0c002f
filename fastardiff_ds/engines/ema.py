"""Exponential moving average of a (ZeRO-3 partitioned) network, e.g. the consistency-distillation target.

``ema <- decay * ema + (1 - decay) * online``, per parameter. The update is elementwise, so when both
networks are partitioned the same way (same group, same shapes) it is applied shard by shard with no
communication at all. Otherwise the DeepSpeed-Chat/OpenRLHF pattern is used: gather the online
parameter (read-only ``GatheredParameters``), and write the EMA parameter on the first rank of its
group with ``GatheredParameters(modifier_rank=0)``, which re-partitions it on exit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def _module(obj) -> nn.Module:
    return obj if isinstance(obj, nn.Module) else obj.module


def _ranks(p) -> list[int] | None:
    if not hasattr(p, "ds_id"):
        return None
    return dist.get_process_group_ranks(p.ds_process_group)


def same_partitioning(p: nn.Parameter, q: nn.Parameter) -> bool:
    """True when both are ZeRO-3 params split identically and not resident in full (persistent params
    keep a full copy that a shard-only write would leave stale), so their shards line up elementwise."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    def sharded(t):
        return hasattr(t, "ds_tensor") and t.ds_status == ZeroParamStatus.NOT_AVAILABLE and not t.ds_persist

    return (sharded(p) and sharded(q) and p.ds_shape == q.ds_shape
            and p.ds_tensor.numel() == q.ds_tensor.numel() and _ranks(p) == _ranks(q))


def ema_decay(decay: float, step: int) -> float:
    """EMA decay at optimizer step `step`, warmed up as (1 + s) / (10 + s) (diffusers `EMAModel`), so a short
    run's EMA is not stuck at the initial weights; `decay` is the ceiling."""
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """Tracks ``online`` (an ``nn.Module``/``Engine``) into ``ema`` (an ``nn.Module``/``FrozenEngine``).

    Both must have the same parameter names and shapes. ``update`` is collective when either side is
    partitioned (all ranks call it, every step, in the same order).
    """

    def __init__(self, online, ema):
        self.online, self.ema = _module(online), _module(ema)
        on, em = dict(self.online.named_parameters()), dict(self.ema.named_parameters())
        if on.keys() != em.keys():
            raise KeyError(f"EMA: parameter names differ: online-only {sorted(on.keys() - em.keys())[:5]}, "
                           f"ema-only {sorted(em.keys() - on.keys())[:5]}; build the EMA from the same network")
        self.pairs = [(on[n], em[n]) for n in on]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """One EMA step (``decay=0`` copies the online weights)."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay={decay} must be in [0, 1]")
        for p, q in self.pairs:
            if same_partitioning(p, q):
                q.ds_tensor.lerp_(p.ds_tensor.to(q.ds_tensor.dtype), 1.0 - decay)
            else:
                self._update_gathered(p, q, decay)
        for b_on, b_em in zip(self.online.buffers(), self.ema.buffers()):
            b_em.copy_(b_on)

    @staticmethod
    def _update_gathered(p: nn.Parameter, q: nn.Parameter, decay: float) -> None:
        import deepspeed

        p_part, q_part = hasattr(p, "ds_id"), hasattr(q, "ds_id")
        with deepspeed.zero.GatheredParameters([p], enabled=p_part):
            with deepspeed.zero.GatheredParameters([q], modifier_rank=0, enabled=q_part):
                if not q_part or dist.get_rank(group=q.ds_process_group) == 0:
                    q.data.lerp_(p.data.to(q.dtype), 1.0 - decay)
