"""Load a ZeRO-3 engine checkpoint written by W ranks into an engine running on W' ranks.

Why our own reshard and not ``ds_to_universal`` + ``load_universal``: the universal route is an offline step
that writes a second full copy of the optimizer state (~12 bytes/param: ~170 GB at 14B) per conversion and
needs ``checkpoint.load_universal`` in the DeepSpeed config before the engine is built. The ZeRO-3 layout is
simple enough to re-split at load time straight from the ordinary checkpoint:

    old rank r's flat fp32 (and exp_avg, exp_avg_sq) = concat over params p (order: ``param_shapes``) of
    full(p)[r*s : r*s + s] zero-padded to s = ceil(numel(p) / W)        (DeepSpeed's zero_to_fp32 protocol)

Each new rank r' builds its own flats for s' = ceil(numel(p) / W') by reading only the overlapping slices of
the old files, memory-mapped (``torch.load(mmap=True)``): the state is read about once in total, and no rank
holds more than its own partition plus one parameter's slice. The result goes through the optimizer's own
``load_state_dict`` (fp32 master -> bit16 partitions -> params), so nothing below DeepSpeed's checkpoint
entry points is touched. Frozen parameters (e.g. the draft's tied embedding) are re-split from their saved
fragments, buffers copied, and the lr schedule, step counters and Adam ``step`` restored from rank 0's files.
Sub-groups (``sub_group_size``) may split differently on W' ranks: the re-split is per parameter.
Works on any backend (it only reads files; the single collective is DeepSpeed's persistent-param gather).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
MODEL_FMT = "zero_pp_rank_{}_mp_rank_00_model_states.pt"


def optim_files(engine_dir: Path, world: int) -> list[Path]:
    """The ZeRO optimizer-state file of each of the ``world`` saving ranks, in rank order."""
    found = {int(m.group(1)): p for p in engine_dir.iterdir() if (m := OPTIM_RE.match(p.name))}
    if sorted(found) != list(range(world)):
        raise FileNotFoundError(f"{engine_dir}: ZeRO optimizer files for ranks {sorted(found)}, the manifest says "
                                f"{world} ranks; the checkpoint is incomplete -- resume from an older one")
    return [found[r] for r in range(world)]


def _load(path: Path, ckpt: Path) -> dict:
    """A ZeRO file, memory-mapped; full unpickling, so only from a verified checkpoint (trusted.py)."""
    from fastardiff_ds.engines.trusted import load_verified

    return load_verified(path, ckpt, map_location="cpu", mmap=True)


class _OldLayout:
    """Read access to the full (unpartitioned) values of one state key across the W old flat partitions."""

    def __init__(self, flats_per_rank: list[list[torch.Tensor]], shapes: dict[str, torch.Size]):
        self.flats, self.world = flats_per_rank, len(flats_per_rank)
        self.bounds = [0]
        for t in flats_per_rank[0]:  # sub-group flats are contiguous in the rank's virtual flat
            self.bounds.append(self.bounds[-1] + t.numel())
        self.offset, off = {}, 0
        for name, shape in shapes.items():
            self.offset[name] = off
            off += math.ceil(shape.numel() / self.world)
        if off > self.bounds[-1]:
            raise ValueError(f"saved flat partitions hold {self.bounds[-1]} elements, the saved parameter shapes "
                             f"need {off}: the checkpoint does not match its own metadata")

    def _virtual(self, rank: int, start: int, length: int) -> torch.Tensor:
        """``length`` elements from ``start`` of old rank ``rank``'s concatenated flats."""
        parts, end = [], start + length
        for k, t in enumerate(self.flats[rank]):
            lo, hi = max(start, self.bounds[k]), min(end, self.bounds[k + 1])
            if lo < hi:
                parts.append(t.reshape(-1)[lo - self.bounds[k]: hi - self.bounds[k]])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def read(self, name: str, numel: int, a: int, b: int) -> torch.Tensor:
        """Full-parameter elements ``[a, b)`` of ``name`` (``numel`` elements in all), float32 copy."""
        s, out = math.ceil(numel / self.world), []
        for r in range(a // s, min(self.world, math.ceil(b / s))):
            lo, hi = max(a, r * s), min(b, r * s + s, numel)
            if lo < hi:
                out.append(self._virtual(r, self.offset[name] + lo - r * s, hi - lo).float())
        return torch.cat(out) if out else torch.empty(0)


def _new_flat(layout: _OldLayout, params: list, names: dict, rank: int, world: int) -> torch.Tensor:
    """This rank's flat partition of ``params`` (one sub-group) on ``world`` ranks, zero-padded per param."""
    chunks = []
    for p in params:
        n, s = p.ds_numel, math.ceil(p.ds_numel / world)
        a, b = min(rank * s, n), min(rank * s + s, n)
        piece = layout.read(names[p], n, a, b)
        chunks.append(torch.cat([piece, piece.new_zeros(s - piece.numel())]) if piece.numel() < s else piece)
    return torch.cat(chunks) if chunks else torch.empty(0)


def load_resharded(engine, engine_dir: str | Path, old_world: int, load_optimizer: bool = True) -> None:
    """Fill a freshly built ZeRO-3 ``Engine`` from ``engine_dir``, written by ``old_world`` ranks. Collective."""
    ds, engine_dir = engine.ds, Path(engine_dir)
    if ds.zero_optimization_stage() != 3:
        raise ValueError(f"engine {engine.name!r} runs ZeRO stage {ds.zero_optimization_stage()}: a checkpoint "
                         f"from another world size can only be re-split for ZeRO-3 engines; resume on the "
                         f"saved world size or set zero_stage=3 for this engine")
    if ds.zero_nvme_offload_optimizer():
        raise ValueError(f"engine {engine.name!r} swaps its optimizer state to NVMe: a checkpoint from another "
                         f"world size cannot be re-split into the swap files; resume on the saved world size "
                         f"or without NVMe offload")
    import torch.distributed as dist

    from fastardiff_ds.engines.trusted import ensure_verified

    ensure_verified(engine_dir.parent)  # collective; after load_checkpoint's own check, one stat per file
    opt = ds.optimizer
    rank, world = dist.get_rank(group=opt.dp_process_group), dist.get_world_size(group=opt.dp_process_group)
    optim = [_load(f, engine_dir.parent) for f in optim_files(engine_dir, old_world)]
    model = [_load(engine_dir / MODEL_FMT.format(r), engine_dir.parent) for r in range(old_world)]
    zero_sd = [o["optimizer_state_dict"] for o in optim]  # ZeRO-3's own dict: fp32 flats + the base optimizer's
    shapes = {k: v for group in model[0]["param_shapes"] for k, v in group.items()}
    names = ds.param_names  # param -> name, as DeepSpeed wrote them into param_shapes
    missing = sorted(set(names[p] for g in opt.fp16_groups for p in g) - set(shapes))
    if missing:
        raise KeyError(f"{engine_dir}: no saved state for trainable parameters {missing[:5]}; the checkpoint "
                       f"was written by a different network -- resume with the same model config")
    first = zero_sd[0]["optimizer_state_dict"]["state"].get(0, {})  # empty when saved before the first step
    keys = ["fp32"] + sorted(k for k, v in first.items() if torch.is_tensor(v) and v.dim() == 1)
    new = {}
    for key in keys:
        flats = [(o["fp32_flat_groups"] if key == "fp32" else
                  [st[key] for _, st in sorted(o["optimizer_state_dict"]["state"].items())]) for o in zero_sd]
        layout = _OldLayout(flats, shapes)
        new[key] = [_new_flat(layout, g, names, rank, world) for g in opt.fp16_groups]
    state_dict = _state_dict(zero_sd[0], new, opt)
    if hasattr(opt, "checkpoint_event_prologue"):
        opt.checkpoint_event_prologue()
    _load_frozen(ds, model, names, rank, world)
    sd_list = [None] * world
    sd_list[rank] = state_dict
    opt.load_state_dict(sd_list, load_optimizer_states=load_optimizer)
    if hasattr(opt, "checkpoint_event_epilogue"):
        opt.checkpoint_event_epilogue()
    _load_engine_counters(ds, model[0], load_optimizer)


def _state_dict(old0: dict, new: dict, opt) -> dict:
    """The per-rank ZeRO-3 state dict ``_rigid_load_state_dict`` expects, with re-split tensors."""
    old_state = old0["optimizer_state_dict"]
    scalars = {k: v for k, v in old_state["state"].get(0, {}).items() if k not in new}  # Adam's step
    groups = []
    for g, saved in enumerate(old_state["param_groups"]):
        ids = [k for k in range(len(opt.fp16_groups)) if opt.sub_group_to_group_id[k] == g]
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    state = {k: {**{key: new[key][k] for key in new if key != "fp32"},
                 **{s: (v.clone() if torch.is_tensor(v) else v) for s, v in scalars.items()}}
             for k in range(len(opt.fp16_groups))} if len(new) > 1 or scalars else {}
    return {**{k: v for k, v in old0.items() if k not in ("optimizer_state_dict", "fp32_flat_groups")},
            "optimizer_state_dict": {"state": state, "param_groups": groups},
            "fp32_flat_groups": new["fp32"]}


@torch.no_grad()
def _load_frozen(ds, model: list[dict], names: dict, rank: int, world: int) -> None:
    """Frozen (optimizer-less) params: re-split their saved per-rank fragments; buffers: copy rank 0's."""
    shapes = model[0].get("frozen_param_shapes") or {}
    by_name = {n: p for p, n in names.items()}
    for name, shape in shapes.items():
        p, numel = by_name.get(name), shape.numel()
        if p is None:
            continue
        frags = [m["frozen_param_fragments"][name].reshape(-1) for m in model]
        full = torch.cat(frags)[:numel]  # partitioned: padded shards in rank order; else rank 0's full copy
        if hasattr(p, "ds_tensor"):
            s = math.ceil(numel / world)
            piece = full[rank * s: min(rank * s + s, numel)]
            p.ds_tensor.zero_()
            p.ds_tensor.reshape(-1)[: piece.numel()].copy_(piece.to(p.ds_tensor.dtype))
        else:
            p.data.copy_(full.view(shape))
    saved = model[0].get("module") or {}
    for name, b in ds.module.named_buffers():
        if name in saved and saved[name].shape == b.shape:
            b.copy_(saved[name])


def _load_engine_counters(ds, model0: dict, load_optimizer: bool) -> None:
    """lr schedule position and DeepSpeed's step/sample counters (world-size independent values)."""
    if load_optimizer and ds.lr_scheduler is not None and model0.get("lr_scheduler") is not None:
        ds.lr_scheduler.load_state_dict(model0["lr_scheduler"])
    ds.global_steps = model0["global_steps"]
    ds.global_samples = model0.get("global_samples", ds.global_steps * ds.train_batch_size())
    ds.skipped_steps = model0["skipped_steps"]
