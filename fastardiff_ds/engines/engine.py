"""One DeepSpeed engine per trainable network (target AR, draft AR, student head, fake score).

Each engine has its own optimizer and lr schedule (``EngineSpec``); batch size and lr are injected
into the DeepSpeed dict from the experiment config (see ``ds_config``). Two optimizer paths:
- a client ``torch.optim.AdamW`` with ``zero_allow_untested_optimizer`` (torch's own multi-tensor kernels on
  a GPU: no JIT-built extension, see ``ds_config.client_optimizer``), bf16 when the JSON says ``"auto"`` and the
  GPU has it; on CPU gloo, fp32 unless the JSON forces bf16 (DeepSpeed 0.19.8's CPU accelerator supports it);
- ZeRO-Offload on a GPU: ``"optimizer": {"type": "AdamW"}`` in the resolved dict, so DeepSpeed builds its
  DeepSpeedCPUAdam.
The lr schedule carries a factor the trainer sets before a step (``set_lr_scale``: Eq. 9's α in
``train.alpha_mode=lr``); ``master_params`` exposes the fp32 shards the optimizer updates (update sizes).
Every method is collective under ZeRO-3: all ranks call the same engines in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from fastardiff_ds.engines.dist import accelerator_name, get_world_size
from fastardiff_ds.engines.ds_config import client_optimizer, train_ds_config
from fastardiff_ds.engines.groups import mpu_scope

ModelOrBuilder = nn.Module | Callable[[], nn.Module]
# fp32 master shards of DeepSpeed's ZeRO-3, ZeRO-1/2 and BF16 optimizer wrappers
_MASTER_ATTRS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")


@dataclass
class EngineSpec:
    """Optimizer, schedule and ZeRO knobs of one trainable network.

    ``warmup``/``total_steps`` count optimizer steps. ``grad_clip=None`` keeps the JSON's value;
    ``zero_stage=None`` keeps the JSON's stage; ``zero_overrides`` are merged into
    ``zero_optimization`` (e.g. ``{"stage3_param_persistence_threshold": 1e7}`` keeps a small head
    resident instead of all-gathering it at every one of its many calls per token).
    """

    name: str
    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 0
    total_steps: int = 0
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr at total_steps) or "constant" after warmup
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    zero_stage: int | None = None
    zero_overrides: dict = field(default_factory=dict)
    # (parameter-name prefix, lr) pairs: the parameters under a prefix get their own lr (e.g. the fake score's GAN
    # classifier, "inner.cls_head."); the schedule and set_lr_scale scale every group alike
    lr_groups: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.lr <= 0 or self.warmup < 0 or self.total_steps < 0:
            raise ValueError(f"EngineSpec {self.name!r}: need lr > 0, warmup >= 0, total_steps >= 0")
        if any(lr <= 0 for _, lr in self.lr_groups):
            raise ValueError(f"EngineSpec {self.name!r}: every lr of lr_groups must be > 0, got {self.lr_groups}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"EngineSpec {self.name!r}: schedule={self.schedule!r}, use 'cosine' or 'constant'")
        if self.schedule == "cosine" and self.total_steps <= self.warmup:
            raise ValueError(f"EngineSpec {self.name!r}: cosine schedule needs total_steps > warmup "
                             f"(got {self.total_steps} <= {self.warmup}); set total_steps or use 'constant'")


def default_lr_lambda(spec: EngineSpec) -> Callable[[int], float]:
    """Multiplier of ``spec.lr`` at optimizer step s: linear warmup, then cosine or constant."""

    def fn(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        if spec.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - spec.warmup) / (spec.total_steps - spec.warmup))
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def scaled_lr_lambda(fn: Callable[[int], float]) -> tuple[Callable[[int], float], list]:
    """``fn`` times a mutable factor: (lambda, its one-element box). A plain closure, so LambdaLR's state
    dict stores None for it (a callable object's ``__dict__`` would be pickled into the checkpoint)."""
    box = [1.0]

    def scaled(step: int) -> float:
        return fn(step) * box[0]

    return scaled, box


def param_groups(model: nn.Module, weight_decay: float,
                 lr_groups: tuple[tuple[str, float], ...] = ()) -> list[dict]:
    """Decay matrices only; biases and norm gains (ndim < 2) get no weight decay. `lr_groups`: (name prefix, lr)
    pairs, each prefix's parameters in groups of their own with that "lr" (the first matching prefix wins); the
    others carry no "lr" (the optimizer's default).

    Uses the full shape (``ds_shape``) of ZeRO-3 params: a partitioned param's own tensor is a 1-D stub.
    """
    def ndim(p):
        return len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim

    def lr_of(name):
        return next((lr for prefix, lr in lr_groups if name.startswith(prefix)), None)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for prefix, _ in lr_groups:
        if not any(n.startswith(prefix) for n, _ in named):
            raise ValueError(f"param_groups: no trainable parameter is named '{prefix}*' (lr_groups)")
    groups = []
    for lr in [None, *dict.fromkeys(lr for _, lr in lr_groups)]:
        mine = [(n, p) for n, p in named if lr_of(n) == lr]
        extra = {} if lr is None else {"lr": lr}
        groups += [{"params": [p for n, p in mine if ndim(p) >= 2], "weight_decay": weight_decay, **extra},
                   {"params": [p for n, p in mine if ndim(p) < 2], "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


def partition_numel(module: nn.Module) -> int:
    """Parameter elements held by this rank (its ZeRO-3 shards, or everything when not partitioned)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


class Engine:
    """Thin wrapper over a ``DeepSpeedEngine``: the only object the trainer steps.

    ``forward``/``backward``/``step`` run under this engine's data-parallel setting (see
    ``groups.mpu_scope``) so engines on different groups can live in one process.
    """

    def __init__(self, ds_engine, spec: EngineSpec, ds_config: dict, mpu=None, lr_scale: list | None = None):
        self.ds, self.spec, self.ds_config, self.mpu = ds_engine, spec, ds_config, mpu
        self._lr_scale = lr_scale  # the one-element box the lr lambda multiplies by (see scaled_lr_lambda)
        self.dropped = False  # the last step ended a window and DeepSpeed dropped it (non-finite gradients)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        with mpu_scope(self.mpu):
            return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        with mpu_scope(self.mpu):
            self.ds.backward(loss)

    def step(self) -> None:
        """Optimizer + lr-schedule step (DeepSpeed skips it inside a gradient-accumulation window).

        Sets ``dropped``: True when this was a window's last micro-step and DeepSpeed discarded the update
        because the gradients were not finite. Its ZeRO-3 optimizer does so for bf16 too (an inf/NaN global
        grad norm; DeepSpeed 0.19.8), silently, with no loss scale to lower: the caller decides what a dropped
        update means (training/joint.py: train.on_nonfinite)."""
        boundary = self.at_boundary()
        with mpu_scope(self.mpu):
            self.ds.step()
        self.dropped = boundary and not self.ds.was_step_applied()

    @property
    def lr(self) -> float:
        """The lr the next optimizer step uses (scheduled lr x the current ``set_lr_scale`` factor)."""
        return float(self.ds.get_lr()[0])

    def set_lr_scale(self, scale: float) -> None:
        """Multiply the scheduled lr by ``scale`` from the next optimizer step on (Eq. 9's α in lr mode).

        Rewrites the optimizer's lr now (LambdaLR only recomputes it after a step) and keeps the factor in
        the lambda, so the schedule and ``lr`` agree. Local, no collective; the factor is not checkpointed
        (the caller sets it from the step number before every step)."""
        if self._lr_scale is None:
            raise RuntimeError(f"engine {self.name!r} was built without a scalable lr schedule (build_engine)")
        if not scale >= 0.0:
            raise ValueError(f"engine {self.name!r}: lr scale must be >= 0, got {scale}")
        self._lr_scale[0] = float(scale)
        sched = self.ds.lr_scheduler
        for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)

    def at_boundary(self) -> bool:
        """Whether the next ``step`` ends a gradient-accumulation window (so the optimizer really steps)."""
        return bool(self.ds.is_gradient_accumulation_boundary())

    def master_params(self) -> list[torch.Tensor]:
        """The tensors the optimizer updates: this rank's fp32 master shards under ZeRO / bf16, else the
        module's parameters (replicated on every rank). ZeRO-3 lists its shards in the optimizer's param
        groups only during a step, hence the wrapper attributes (DeepSpeed 0.19.8 names)."""
        for attr in _MASTER_ATTRS:
            tensors = getattr(self.ds.optimizer, attr, None)
            if tensors:
                return list(tensors)
        return [p for g in self.ds.lr_scheduler.optimizer.param_groups for p in g["params"]]

    @property
    def dp_group(self):
        """The process group this engine's gradients are reduced over (None = the world)."""
        return None if self.mpu is None else self.mpu.get_data_parallel_group()

    @property
    def grad_norm(self) -> float | None:
        """Global grad norm before clipping, of the last optimizer step (None before the first)."""
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def partition_numel(self) -> int:
        return partition_numel(self.ds.module)

    def train(self, mode: bool = True) -> "Engine":
        self.ds.train(mode)
        return self

    def save(self, save_dir: str, tag: str, client_state: dict | None = None) -> None:
        """``DeepSpeedEngine.save_checkpoint`` into ``save_dir/tag/`` (collective; no ``latest`` file)."""
        with mpu_scope(self.mpu):
            self.ds.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, save_latest=False)

    def load(self, load_dir: str, tag: str, load_optimizer: bool = True) -> dict:
        """Load weights (+ optimizer and lr schedule); returns the engine's client state."""
        if not (Path(load_dir) / tag).is_dir():
            raise FileNotFoundError(f"engine {self.name!r}: checkpoint directory {Path(load_dir) / tag} is missing; "
                                    f"the checkpoint is damaged -- resume from an older one or start fresh")
        with mpu_scope(self.mpu):
            path, client = self.ds.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer,
                                                   load_lr_scheduler_states=load_optimizer)
        if path is None:
            raise FileNotFoundError(f"engine {self.name!r}: no DeepSpeed checkpoint in {load_dir}/{tag}; "
                                    f"pick another checkpoint or start without resume")
        return client or {}


def _construct(model: ModelOrBuilder, ds_config: dict, group=None) -> nn.Module:
    """Build (or take) the module; a builder runs under ``zero.Init`` when the stage is 3, so a 14B model
    is born partitioned instead of materialising on every rank."""
    if isinstance(model, nn.Module):
        return model
    if ds_config["zero_optimization"].get("stage", 0) != 3:
        return model()
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config, data_parallel_group=group):
        return model()


def build_engine(model: ModelOrBuilder, spec: EngineSpec, ds_base: dict, *, micro_batch: int,
                 grad_accum: int, world_size: int | None = None,
                 lr_lambda: Callable[[int], float] | None = None) -> Engine:
    """Wrap one trainable network in its own DeepSpeed engine on the world group.

    ``model``: a module, or a zero-arg builder (built under ``zero.Init`` for ZeRO-3).
    ``lr_lambda``: multiplier of ``spec.lr`` per optimizer step (default: ``default_lr_lambda``);
    pass ``schedules.lr``'s function to share the trainer's schedule definitions.
    """
    import deepspeed

    world = get_world_size()
    if world_size is not None and world_size != world:
        raise ValueError(f"build_engine({spec.name!r}): world_size={world_size} but the process group has {world} "
                         f"ranks; launch with {world_size} ranks or fix the config")
    device_type = accelerator_name()
    cfg = train_ds_config(ds_base, micro_batch=micro_batch, grad_accum=grad_accum, world_size=world,
                          device_type=device_type, grad_clip=spec.grad_clip, zero_stage=spec.zero_stage,
                          zero_overrides=spec.zero_overrides)
    fn, lr_scale = scaled_lr_lambda(lr_lambda or default_lr_lambda(spec))
    with mpu_scope(None):
        module = _construct(model, cfg)
        groups = param_groups(module, spec.weight_decay, spec.lr_groups)
        if not groups:
            raise ValueError(f"build_engine({spec.name!r}): the model has no trainable parameters")
        optimizer = None
        if client_optimizer(cfg, device_type):
            optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)
        else:
            cfg["optimizer"] = {"type": "AdamW", "params": {"lr": spec.lr, "betas": list(spec.betas),
                                                            "eps": spec.eps, "weight_decay": spec.weight_decay}}
        ds_engine, *_ = deepspeed.initialize(
            model=module, model_parameters=groups if optimizer is None else None, optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn), config=cfg)
    return Engine(ds_engine, spec, cfg, lr_scale=lr_scale)
