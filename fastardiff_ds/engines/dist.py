"""Process-group bootstrap and the collectives: the one place that starts torch.distributed (through DeepSpeed).

Every rank calls the same functions in the same order; nothing here branches on rank except logging.
CPU runs use gloo (``DS_ACCELERATOR=cpu``), GPU runs use nccl; the backend comes from the accelerator
DeepSpeed detected, so launch scripts never name it. The bottom of the engine layer: it imports no other engine
module (`runtime.Runtime` wraps these functions).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def accelerator_name() -> str:
    """``"cuda"`` or ``"cpu"`` (whatever DeepSpeed's accelerator resolved to)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def device() -> torch.device:
    """This rank's compute device (``cuda:<local_rank>`` or ``cpu``)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def default_backend() -> str:
    """gloo on CPU, nccl on CUDA (``DeepSpeed``'s own choice for other accelerators)."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return "gloo" if name == "cpu" else get_accelerator().communication_backend_name()


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> None:
    """Start the default process group from the launcher's env (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Idempotent: a second call (or a group started by torch elsewhere) is a no-op apart from DeepSpeed
    adopting it. A single process without launcher env becomes a world of one on 127.0.0.1.
    Must run before any model is built under ``zero.Init`` (DeepSpeed raises otherwise).
    """
    import deepspeed

    _skip_cpu_shm_op()
    if "RANK" not in os.environ and not dist.is_initialized():
        # Single process (tests, notebooks): a loopback world of one.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend=backend or default_backend(), verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    if accelerator_name() != "cpu":
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_device(local_rank())


def _skip_cpu_shm_op() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op at every process start-up (minutes of
    C++ on a busy 2-core machine, and a hang if a killed build leaves its lock file). It only speeds up
    inference all-reduces; training collectives run on gloo. Skip it unless FASTARDIFF_DS_SHM_OP=1."""
    if accelerator_name() == "cpu" and os.environ.get("FASTARDIFF_DS_SHM_OP", "0") != "1":
        import importlib

        # by module path: `deepspeed.comm.torch` as an attribute is the torch package itself
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for single-host launches and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", get_rank()))


def local_world_size() -> int:
    """Ranks on this node: ``LOCAL_WORLD_SIZE`` (torchrun), ``LOCAL_SIZE`` (DeepSpeed CPU) or the world."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    return get_world_size()


def is_rank0() -> bool:
    return get_rank() == 0


def barrier(group=None) -> None:
    """Collective barrier (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier(group=group)


def shutdown() -> None:
    """Wait for every rank, then tear the default process group down (no-op without one). A process that exits
    with the group alive leaves gloo's threads to static destruction, which can abort it after its work is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# The collectives, NCCL-correct by construction: each tensor moves to the communication device of its group and the
# result comes back on the caller's device. `runtime.Runtime` exposes them as methods; without a process group each
# is local (a world of one).
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def comm_device(group=None) -> torch.device:
    """Where a tensor must live for a collective on `group`: this rank's GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return device()
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """A new tensor: `tensor` reduced (sum | min | max) over `group`, returned on `tensor`'s device.

    The collective itself runs on `comm_device(group)` (a CPU tensor under nccl fails at the first call).
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce op={op!r}; expected one of {sorted(_REDUCE_OPS)}")
    out = tensor.detach().to(comm_device(group), copy=True)
    if dist.is_initialized():
        dist.all_reduce(out, op=_REDUCE_OPS[op], group=group)
    return out.to(tensor.device)


def reduce_scalar(value: float, op: str = "sum", group=None) -> float:
    """A Python number reduced over `group` (float64 on the communication device)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device(group))
    return float(all_reduce(t, op, group).item())


def all_gather_object(obj, group=None) -> list:
    """Every rank's picklable `obj`, in rank order (``[obj]`` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    """Rank `src`'s `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
