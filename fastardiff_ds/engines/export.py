"""Full (gathered) weights out of ZeRO-3 shards: for inference exports and frozen-module checkpoints.

Parameters are gathered one at a time (``GatheredParameters``, read-only) so peak memory is one full
tensor above the shards, never the whole model on every rank.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from fastardiff_ds.engines.dist import barrier, is_rank0


def _module_of(obj) -> nn.Module:
    return obj.module if hasattr(obj, "module") and not isinstance(obj, nn.Module) else obj


def gathered_state_dict(obj, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Full state dict on rank 0 (CPU, contiguous, untied copies); ``{}`` on other ranks.

    Collective: every rank of the module's partition group (and, for simplicity, the world) must call it.
    ``obj``: an ``nn.Module``, ``Engine`` or ``FrozenEngine``; ``dtype`` casts floating tensors.
    """
    import deepspeed

    module, out = _module_of(obj), {}
    seen: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights: safetensors stores each name as its own tensor
            if is_rank0():
                out[name] = out[seen[id(p)]].clone()
            continue
        seen[id(p)] = name
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            if is_rank0():
                out[name] = _to_cpu(p.detach(), dtype)
    if is_rank0():
        for name, b in module.named_buffers():
            out[name] = _to_cpu(b, dtype)
    return out


def _to_cpu(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to("cpu", copy=True).contiguous()
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def export_safetensors(obj, path: str | Path, dtype: torch.dtype | None = None) -> Path | None:
    """Write the gathered weights of an engine/module to ``path`` (rank 0). Collective; returns the path
    on rank 0, None elsewhere."""
    from safetensors.torch import save_file

    sd = gathered_state_dict(obj, dtype)
    path = Path(path)
    if is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path))
    barrier()
    return path if is_rank0() else None


def load_gathered_state_dict(obj, path: str | Path, strict: bool = True) -> None:
    """Load a full safetensors state dict into a (possibly partitioned) module. Collective.

    For each parameter, the first rank of its partition group reads the tensor (lazily, one at a time)
    and writes the full value; ``GatheredParameters(modifier_rank=0)`` re-partitions it on exit (direct
    ``.data`` writes to shards would be lost). Unpartitioned tensors are read by every rank.
    """
    import deepspeed
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found; re-export it with export_safetensors "
                                f"or resume from a checkpoint that contains it")
    module = _module_of(obj)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
        if strict and keys != names:
            raise KeyError(f"{path}: keys differ from the module: missing {sorted(names - keys)[:5]}, "
                           f"unexpected {sorted(keys - names)[:5]}; load the matching network's weights")
        for name, p in module.named_parameters():
            partitioned = hasattr(p, "ds_id")
            writer = not partitioned or _group_rank(p.ds_process_group) == 0
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=partitioned):
                if writer and name in keys:
                    with torch.no_grad():
                        p.copy_(f.get_tensor(name).to(p.dtype))
        for name, b in module.named_buffers():
            if name in keys:
                b.copy_(f.get_tensor(name).to(b.dtype))
    barrier()


def _group_rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group=group) if dist.is_initialized() else 0
