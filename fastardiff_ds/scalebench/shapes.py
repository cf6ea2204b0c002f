"""NextStep-1.x shapes shrunk by one knob, built with random weights; the bytes they need on a device.

`--scale s` multiplies the attention heads (head_dim 128 is kept, so the width is heads x 128), the KV heads,
the depth, the MLP width and the flow head's width and depth; the token grid (1024 tokens of 64 dims at 512 px),
the vocabulary and the draft's 1/8 depth are kept. A scale whose heads do not split into KV-head groups is refused
naming the nearest scales that work.
"""
from __future__ import annotations

import copy

import torch

from ..config import Config, get_preset
from ..models import DraftAR, TargetAR, build_head
from ..models.backbone import Qwen2Backbone

SHAPES = ("nextstep-1.1", "nextstep-1-large")
HEAD_DIM = 128
DRAFT_FRACTION = 8  # EAGLE-style draft at 1/8 of the target's depth (NextStep's 6 of 48)


def _scaled_ints(cfg: Config, scale: float) -> dict:
    ar, head = cfg.model.ar, cfg.model.head
    heads = round(ar.num_heads * scale)
    kv = max(1, round(ar.num_kv_heads * scale))
    layers = max(1, round(ar.num_layers * scale))
    hidden = heads * HEAD_DIM
    mlp = max(32, round(hidden * ar.intermediate_size / ar.hidden_size / 32) * 32)
    return dict(heads=heads, kv=kv, layers=layers, hidden=hidden, mlp=mlp,
                head_width=max(16, round(head.width * scale / 16) * 16), head_depth=max(1, round(head.depth * scale)))


def valid_scales(shape: str, near: float, count: int = 2) -> list[float]:
    """Scales on a 0.005 grid close to `near` whose heads and KV heads are valid."""
    cfg = get_preset(shape)
    ok = []
    for i in range(1, 201):
        s = i / 200
        d = _scaled_ints(cfg, s)
        if d["heads"] >= 1 and d["heads"] % d["kv"] == 0:
            ok.append(s)
    return sorted(ok, key=lambda s: abs(s - near))[:count]


def scaled_config(shape: str, scale: float, head_steps: int | None = None, student_steps: int = 4) -> Config:
    """The preset `shape` with width and depth times `scale` (0 < scale <= 1); ValueError on an invalid shape."""
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: choose one of {', '.join(SHAPES)}")
    if not 0 < scale <= 1:
        raise ValueError(f"--scale {scale}: must be in (0, 1] (1 = the full {shape} shape)")
    cfg = get_preset(shape)
    d = _scaled_ints(cfg, scale)
    if d["heads"] < 1 or d["heads"] % d["kv"]:
        raise ValueError(f"--scale {scale} gives {d['heads']} attention heads and {d['kv']} KV heads for {shape} "
                         f"({cfg.model.ar.num_heads}/{cfg.model.ar.num_kv_heads} at scale 1): the heads must be "
                         f">= 1 and split into KV-head groups; nearest valid scales: {valid_scales(shape, scale)}")
    cfg = copy.deepcopy(cfg)
    ar = cfg.model.ar
    ar.hidden_size, ar.num_heads, ar.num_kv_heads = d["hidden"], d["heads"], d["kv"]
    ar.num_layers, ar.intermediate_size = d["layers"], d["mlp"]
    cfg.model.head.width, cfg.model.head.depth = d["head_width"], d["head_depth"]
    dr = cfg.model.draft
    dr.num_layers = max(1, round(d["layers"] / DRAFT_FRACTION))
    dr.kind, dr.entropy_layer, dr.shallow_layer = "eagle", dr.num_layers - 1, 0
    if head_steps is not None:
        cfg.inference.num_steps = head_steps
    cfg.inference.student_steps = student_steps
    return cfg


def _fill_random(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights in place: N(0, 0.02) matrices and embeddings, zero biases, unit norm scales."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif "norm" in name or name.endswith("in_ln.weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def build_random(cfg: Config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """{"target", "draft", "head", "student"} with random weights, built on the meta device and materialised
    straight on `device` in `dtype` (no fp32 copy of a bf16 model is ever allocated)."""
    with torch.device("meta"):
        nets = {"target": TargetAR(cfg.model), "draft": DraftAR(cfg.model), "head": build_head(cfg),
                "student": build_head(cfg, student=True)}
    gen = torch.Generator(device=device).manual_seed(seed)
    for m in nets.values():
        m.to(dtype).to_empty(device=device)
        _fill_random(m, gen)
        if isinstance(m, Qwen2Backbone):
            m.rebuild_rope(device)  # the RoPE buffer is not a parameter: to_empty left it uninitialised
        m.eval().requires_grad_(False)
    return nets


def param_count(cfg: Config) -> dict[str, int]:
    """Parameters of each network of `build_random` (counted on the meta device)."""
    with torch.device("meta"):
        nets = {"target": TargetAR(cfg.model), "draft": DraftAR(cfg.model), "head": build_head(cfg),
                "student": build_head(cfg, student=True)}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}


def planned_bytes(cfg: Config, dtype: torch.dtype, prompt_len: int, gamma: int) -> dict[str, int]:
    """What a run allocates: weights, the KV caches (target at CFG batch 2, draft at batch 1) and a working margin
    (activations of a verify pass and of the largest head call, x4 for temporaries)."""
    el = torch.empty((), dtype=dtype).element_size()
    n = param_count(cfg)
    ar, N = cfg.model.ar, cfg.model.image.num_tokens
    slots = prompt_len + N + gamma + 2
    kv_row = 2 * slots * ar.num_kv_heads * HEAD_DIM * el  # keys + values of one row of one layer
    kv = kv_row * (2 * ar.num_layers + cfg.model.draft.num_layers)
    steps = max(cfg.inference.num_steps, cfg.inference.student_steps or 1)
    work = 4 * el * max(2 * (gamma + 1) * (ar.intermediate_size + 3 * ar.hidden_size) + 2 * ar.num_heads * slots,
                        2 * gamma * steps * 4 * cfg.model.head.width)
    out = {f"{k}_weights": v * el for k, v in n.items()}
    out.update(kv_caches=kv, working=work)
    out["total"] = sum(out.values())
    return out


def available_bytes(device) -> int:
    """Free bytes on a CUDA device, or the host's MemAvailable for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62  # unknown: do not refuse


def check_fits(plan: dict[str, int], device: torch.device) -> None:
    """Refuse a shape whose planned bytes exceed the device's free memory, before anything is allocated."""
    free = available_bytes(device)
    if plan["total"] > free:
        gib = 2**30
        raise MemoryError(f"this shape needs {plan['total'] / gib:.1f} GiB ({plan['total']} bytes planned: "
                          f"weights, KV caches, working memory) but {device} has {free / gib:.1f} GiB free "
                          f"({free} bytes); lower --scale")
