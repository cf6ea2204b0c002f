"""Model-state memory per GPU: DeepSpeed's ZeRO-3 estimator for trainable networks, bf16 shards for frozen.

Trainable (ZeRO-3, mixed precision, Adam): ``4 * largest_layer + 18 * params / total_gpus`` bytes per GPU,
or ``4 * largest_layer + 2 * params / total_gpus`` with the optimizer offloaded to CPU
(``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``, the function that
``estimate_zero3_model_states_mem_needs_all_cold`` prints). Frozen (inference engine, bf16):
``2 * params / group_size + 2 * largest_layer`` (its shard + one gathered layer). Activations are extra.
``precision="fp32"`` (DeepSpeed on CPU: bf16 is off there, ds_config.bf16_enabled) counts what ZeRO-3 holds in
fp32 instead: ``4 * largest_layer + 20 * params / total_gpus`` (fp32 shard, its fp32 master copy, fp32 gradient
partition, Adam m and v) and ``4 * params / group_size + 4 * largest_layer`` frozen; scripts/rss_build.py checks it
against host RSS.
Param counts are taken by id, so modules on the meta device work (DeepSpeed's own ``model_to_params``
deduplicates by ``data_ptr``, which is 0 for every meta tensor).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch.nn as nn

GIB = 2**30


@dataclass
class NetSize:
    """Size of one network: total parameters and the largest single module's own parameters."""

    total: int
    largest_layer: int
    trainable: bool = True
    group_size: int | None = None  # frozen nets: GPUs it is sharded over (None = all, 1 = replicated)


def count_params(module: nn.Module) -> tuple[int, int]:
    """(total params, largest layer params) of a module; shared params counted once; meta-safe."""
    total = sum({id(p): p.numel() for p in module.parameters()}.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    return total, largest


def _as_size(x) -> NetSize:
    if isinstance(x, NetSize):
        return x
    if isinstance(x, nn.Module):
        return NetSize(*count_params(x))
    if isinstance(x, int):
        return NetSize(x, x)  # unknown layering: assume one layer (upper bound)
    if isinstance(x, tuple) and len(x) == 2:
        return NetSize(int(x[0]), int(x[1]))
    raise TypeError(f"estimate_memory: cannot size {type(x).__name__}; pass an nn.Module, a param count, "
                    f"a (total, largest_layer) tuple or a NetSize")


def ds_estimator_report(total: int, largest_layer: int, num_gpus_per_node: int, num_nodes: int) -> str:
    """DeepSpeed's own printed table (all offload options) for a trainable network, as a string."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        estimate_zero3_model_states_mem_needs_all_cold(total, largest_layer, num_gpus_per_node, num_nodes)
    return buf.getvalue()


def estimate_memory(models: dict, num_gpus_per_node: int, num_nodes: int = 1,
                    offload_optimizer: bool = False, precision: str = "bf16") -> dict:
    """Per-GPU model-state bytes of each network and their sum.

    ``models``: name -> ``nn.Module`` | param count | (total, largest_layer) | ``NetSize`` (use
    ``NetSize(trainable=False, group_size=g)`` for a frozen network sharded over g GPUs).
    Returns ``{name: {"params", "largest_layer", "trainable", "gpu_bytes", "cpu_bytes"}, "total_gpu_bytes": int}``.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    if precision not in ("bf16", "fp32") or (precision == "fp32" and offload_optimizer):
        raise ValueError(f"estimate_memory: precision={precision!r} (bf16 | fp32; fp32 without optimizer offload)")
    total_gpus = num_gpus_per_node * num_nodes
    out: dict = {}
    for name, spec in models.items():
        s = _as_size(spec)
        if precision == "fp32":
            g = total_gpus if s.trainable else min(s.group_size or total_gpus, total_gpus)
            gpu = (4 * s.largest_layer + 20 * s.total // g if s.trainable
                   else 4 * s.total // g + (4 * s.largest_layer if g > 1 else 0))
            cpu = 0
        elif s.trainable:
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                s.total, s.largest_layer, num_gpus_per_node, num_nodes, cpu_offload=offload_optimizer,
                cpu_offload_params=False, zero_init=True)
        else:
            g = min(s.group_size or total_gpus, total_gpus)
            gpu, cpu = 2 * s.total // g + (2 * s.largest_layer if g > 1 else 0), 0
        out[name] = {"params": s.total, "largest_layer": s.largest_layer, "trainable": s.trainable,
                     "gpu_bytes": int(gpu), "cpu_bytes": int(cpu)}
    out["total_gpu_bytes"] = sum(v["gpu_bytes"] for v in out.values())
    return out


def qwen2_size(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
               tied: bool = False) -> tuple[int, int]:
    """(total, largest layer) of a Qwen2 decoder (q/k/v biases, SwiGLU MLP, RMSNorm, untied lm head)."""
    kv = hidden // heads * kv_heads
    attn = hidden * hidden + hidden + 2 * (hidden * kv + kv) + hidden * hidden
    block = attn + 3 * hidden * intermediate + 2 * hidden
    embed = vocab * hidden
    total = layers * block + embed * (1 if tied else 2) + hidden
    return total, max(embed, hidden * intermediate)


# NextStep-1-large (DESIGN.md §5): Qwen2.5-14B backbone; flow head SimpleMLPAdaLN 12 x 1536 (~157M).
NEXTSTEP_LARGE = dict(hidden=5120, layers=48, heads=40, kv_heads=8, intermediate=13824, vocab=152064)
HEAD_157M = (157_000_000, 1536 * 3 * 1536 + 3 * 1536)  # largest layer: one adaLN modulation Linear


def nextstep_large_networks(draft_layers: int = 6, teacher_group_size: int = 8) -> dict[str, NetSize]:
    """The networks of a NextStep-1-large Fast-ARDiff run. The draft counts its own embeddings and
    lm head (untied copies of the target's); the teacher head is replicated (157M, ~0.3 GB bf16)."""
    target = qwen2_size(**NEXTSTEP_LARGE)
    draft = qwen2_size(**{**NEXTSTEP_LARGE, "layers": draft_layers})
    return {
        "target": NetSize(*target),
        "draft": NetSize(*draft),
        "head": NetSize(*HEAD_157M),
        "fake": NetSize(*HEAD_157M),
        "teacher_ar": NetSize(*target, trainable=False, group_size=teacher_group_size),
        "teacher_head": NetSize(*HEAD_157M, trainable=False, group_size=1),
    }


def nextstep_large_table(nodes: tuple[int, ...] = (1, 2, 4, 8), gpus_per_node: int = 8,
                         gpu_gib: float = 80.0) -> str:
    """Markdown table of per-GPU model-state memory of a NextStep-1-large run on ``nodes`` x 8 GPUs."""
    nets = nextstep_large_networks(teacher_group_size=gpus_per_node)
    trainable = [n for n, s in nets.items() if s.trainable]
    rows = ["| nodes | GPUs | trainable states / GPU | + optimizer offload | frozen teacher / GPU | "
            f"total / GPU (no offload) | fits {gpu_gib:.0f} GB? |", "|---:|---:|---:|---:|---:|---:|:---|"]
    for n in nodes:
        est = estimate_memory(nets, gpus_per_node, n)
        off = estimate_memory({k: nets[k] for k in trainable}, gpus_per_node, n, offload_optimizer=True)
        train = sum(est[k]["gpu_bytes"] for k in trainable) / GIB
        frozen = sum(v["gpu_bytes"] for k, v in est.items() if k in nets and not nets[k].trainable) / GIB
        total = est["total_gpu_bytes"] / GIB
        fits = "yes" if total < gpu_gib else ("with offload" if off["total_gpu_bytes"] / GIB + frozen < gpu_gib
                                              else "no")
        rows.append(f"| {n} | {n * gpus_per_node} | {train:.1f} GiB | {off['total_gpu_bytes'] / GIB:.1f} GiB | "
                    f"{frozen:.1f} GiB | {total:.1f} GiB | {fits} |")
    p = {k: f"{v.total / 1e9:.2f}B" for k, v in nets.items()}
    note = (f"\nModel states only (activations, buffers and fragmentation are extra). Trainable: target {p['target']}, "
            f"draft {p['draft']} (6 layers + own embeddings/lm head), student head and fake score {p['head']} each, "
            f"ZeRO-3 over all GPUs (DeepSpeed estimator, 18 B/param). Frozen: teacher AR {p['teacher_ar']} bf16 "
            f"sharded over one node, teacher head replicated.")
    return "\n".join(rows) + "\n" + note
