"""`Runtime`: the one object that owns a run's distributed side effects (STYLE.md principle 6).

Init, groups, collectives, barriers, engine construction, checkpoint I/O and teardown all go through it;
nothing outside `fastardiff_ds.engines` imports `torch.distributed` or `deepspeed` (tests/unit/test_runtime.py
scans the sources). The primitives live below it (`dist`: process-group bootstrap and the collectives; `checkpoint`:
the on-disk format; `engine`/`teacher`: DeepSpeed engines); the Runtime is the entry point the trainers and launchers
hold, and nothing under it imports it back.

Collectives are NCCL-correct by construction: every tensor is moved to the communication device of the group
(`comm_device`: this rank's GPU under nccl, the CPU under gloo) and the result comes back on the caller's device.
Without a process group (unit tests, notebooks) a Runtime is a world of one and every collective is local.

    rt = Runtime.start()                  # deepspeed.init_distributed (nccl on GPU, gloo on CPU); world of 1 alone
    engine = rt.build_engine(net, spec, ds_base, micro_batch=4, grad_accum=1)
    if not rt.all_finite(loss): ...       # every rank takes the same branch
    rt.save_checkpoint(root, step, {"model": engine}, client_state=..., modules={"ema": ema})
    rt.close()
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from fastardiff_ds.engines import checkpoint as ckpt_io
from fastardiff_ds.engines import dist as D
from fastardiff_ds.engines import export as export_io
from fastardiff_ds.engines.engine import Engine, EngineSpec, build_engine
from fastardiff_ds.engines.groups import contiguous_groups
from fastardiff_ds.engines.partitioned_init import rerun_init_partitioned
from fastardiff_ds.engines.teacher import FrozenEngine, build_frozen, build_teacher


class Runtime:
    """A handle over this process's place in the job (torch.distributed state is process-wide).

    `Runtime()` only reads the current state: a world of one until `Runtime.start()` (or anything else)
    started the default process group. Every collective method must be called by every rank of its group,
    in the same order; rank-dependent branching is only allowed around local work (`is_rank0` file writes).
    """

    def __init__(self) -> None:
        self._started_here = False

    @classmethod
    def start(cls, backend: str | None = None, timeout_s: float = 1800.0) -> "Runtime":
        """Start (or adopt) the default process group from the launcher's env; a lone process is a world of 1.

        Backend: gloo on CPU (``DS_ACCELERATOR=cpu`` or no GPU), nccl on CUDA (see `dist.default_backend`).
        """
        started_before = dist.is_initialized()
        D.init_distributed(backend=backend, timeout_s=timeout_s)
        rt = cls()
        rt._started_here = not started_before
        return rt

    # -- where am I ---------------------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return dist.is_initialized()

    @property
    def rank(self) -> int:
        return D.get_rank()

    @property
    def world_size(self) -> int:
        return D.get_world_size()

    @property
    def local_rank(self) -> int:
        return D.local_rank()

    @property
    def local_world_size(self) -> int:
        return D.local_world_size()

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's compute device: ``cuda:<local_rank>`` or ``cpu``."""
        return D.device() if self.initialized else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.initialized else None

    def comm_device(self, group=None) -> torch.device:
        """Where a tensor must live for a collective on `group`: this rank's GPU under nccl, else the CPU."""
        return D.comm_device(group)

    # -- collectives (implemented in `dist`) ----------------------------------------------------------------------
    def barrier(self, group=None) -> None:
        D.barrier(group)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
        """A new tensor: `tensor` reduced (sum | min | max) over `group`, returned on `tensor`'s device
        (the collective runs on `comm_device(group)`)."""
        return D.all_reduce(tensor, op, group)

    def reduce_scalar(self, value: float, op: str = "sum", group=None) -> float:
        """A Python number reduced over `group` (float64 on the communication device)."""
        return D.reduce_scalar(value, op, group)

    def all_finite(self, value: torch.Tensor, group=None) -> bool:
        """True on every rank iff `value` is finite on every rank (a rank-local decision would desynchronise
        ZeRO-3). The flag is computed where `value` lives, then reduced on the communication device."""
        bad = (~torch.isfinite(value.detach()).all()).to(torch.float32).reshape(1)
        return self.all_reduce(bad, "max", group).item() == 0.0

    def any_rank(self, flag: bool, group=None) -> bool:
        """True on every rank iff `flag` is true on at least one rank (e.g. a wall-clock limit reached)."""
        return self.reduce_scalar(1.0 if flag else 0.0, "max", group) > 0.0

    def all_gather_object(self, obj: Any, group=None) -> list:
        """Every rank's picklable `obj`, in rank order (``[obj]`` without a process group)."""
        return D.all_gather_object(obj, group)

    def broadcast_object(self, obj: Any, src: int = 0, group=None) -> Any:
        """Rank `src`'s `obj` on every rank."""
        return D.broadcast_object(obj, src, group)

    # -- groups and engines -------------------------------------------------------------------------------------
    def contiguous_groups(self, group_size: int) -> tuple[object, list[int]]:
        """This rank's (group, ranks) among consecutive blocks of `group_size` ranks (collective)."""
        return contiguous_groups(group_size)

    def build_engine(self, model, spec: EngineSpec, ds_base: dict, **kwargs) -> Engine:
        """One DeepSpeed engine over the world (see `engines.engine.build_engine`); collective."""
        return build_engine(model, spec, ds_base, **kwargs)

    def build_teacher(self, build_fn: Callable[[], nn.Module], ds_base: dict, **kwargs) -> FrozenEngine:
        """The frozen teacher on its own group (see `engines.teacher.build_teacher`); collective."""
        return build_teacher(build_fn, ds_base, **kwargs)

    def build_frozen(self, name: str, build_fn: Callable[[], nn.Module], ds_base: dict, **kwargs) -> FrozenEngine:
        """A frozen network partitioned over the world (or replicated); collective."""
        return build_frozen(name, build_fn, ds_base, **kwargs)

    def rerun_init_partitioned(self, module: nn.Module, fn: Callable[[nn.Module], None]) -> None:
        """``fn(module)`` on whole parameters of a module built under ``zero.Init`` (rank 0's result is kept
        everywhere; a no-op when not partitioned; see `engines.partitioned_init`); collective when partitioned."""
        rerun_init_partitioned(module, fn)

    def gathered_state_dict(self, obj, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Full weights of an engine/module on rank 0 (``{}`` elsewhere); collective."""
        return export_io.gathered_state_dict(obj, dtype)

    def load_gathered_state_dict(self, obj, path: str | Path, strict: bool = True) -> None:
        """Full safetensors weights into a (possibly partitioned) module; collective."""
        export_io.load_gathered_state_dict(obj, path, strict=strict)

    # -- checkpoint I/O (the format is engines/checkpoint.py's) ---------------------------------------------------
    def save_checkpoint(self, root: str | Path, step: int, engines: Mapping[str, object], *, client_state: dict,
                        config: dict | None = None, modules: Mapping[str, nn.Module] | None = None,
                        keep_last: int | None = 3) -> Path:
        """Every engine, module and this rank's client state + RNG at `root/step_XXXXXX`; collective."""
        return ckpt_io.save_checkpoint(root, step, engines, client_state=client_state, config=config,
                                       modules=modules, keep_last=keep_last)

    def resolve_resume(self, root: str | Path, resume: str | None) -> Path | None:
        """``auto`` | ``none`` | a tag or path -> the checkpoint directory to load (None: start fresh)."""
        return ckpt_io.resolve_resume(root, resume)

    def load_checkpoint(self, ckpt: str | Path, engines: Mapping[str, object], *,
                        modules: Mapping[str, nn.Module] | None = None, **kwargs) -> dict:
        """Load `ckpt` into freshly built engines/modules; returns this rank's client state; collective."""
        return ckpt_io.load_checkpoint(ckpt, engines, modules=modules, **kwargs)

    # -- teardown -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for every rank, then tear the process group down (only if this Runtime started it)."""
        if self.initialized and self._started_here:
            self.barrier()
            dist.destroy_process_group()
            self._started_here = False

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # on an error other ranks may sit in a collective: a barrier would hang
            self.close()
