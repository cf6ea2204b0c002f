"""Stage 0: teacher pretraining (AR + flow head, rectified flow) on DeepSpeed over N ranks, with EMA.

NextStep-1's image loss: the head is trained by flow matching on every image token, conditioned on
`image_out_projector(h)` of the position before it, with logit-normal t and `batch_mul` noise draws per token;
text is dropped with `data.drop_text_prob` (in the loader) so the model supports CFG. The text LM loss
(weight 0.01 in NextStep-1) is not used: we never generate text.

AR + head are one DeepSpeed engine ("model": AdamW, warmup-cosine lr, clipping at pretrain.grad_clip) under the
shared loop (training/loop.py, stage "pretrain"). An fp32 EMA of it is kept after every optimizer step (MAR and
NextStep-1 sample from EMA weights), partitioned like the engine under ZeRO-3, so its update needs no
communication. The export (`run_dir/checkpoint`: config.json + model.safetensors, the inference layout that
`train.teacher` and generate.py read) holds the EMA weights; the raw weights stay in the training checkpoints.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .. import engines as E
from ..config import Config, to_dict
from ..losses.common import randn
from ..losses.flow_matching import FlowMatchingConfig, head_flow_matching_loss
from ..models import (FlowHead, TargetAR, build_head, build_target, from_pretrained, load_config, resolve_asset,
                      save_pretrained)
from ..schedules.lr import LRSchedule, make_lr_lambda
from .batch import image_tokens
from .loop import LoopConfig, Trainer
from .networks import Dispatch


def noisy_inputs(tokens: torch.Tensor, generator, input_noise: float) -> torch.Tensor:
    """tokens + s * eps with s ~ U[0, input_noise] per sample (the AR's teacher-forcing inputs); tokens when 0."""
    if input_noise <= 0:
        return tokens
    s = torch.rand(tokens.shape[0], generator=generator, device=generator.device if generator is not None else None)
    s = s.to(tokens.device, tokens.dtype)[:, None, None] * input_noise
    return tokens + s * randn(tuple(tokens.shape), generator, like=tokens)


def pretrain_loss(target: TargetAR, head: FlowHead, input_ids, attention_mask, tokens, generator, batch_mul: int,
                  input_noise: float = 0.0):
    """tokens: (B,N,D) clean image tokens. Returns (loss, metrics). The AR reads `noisy_inputs(tokens)`, the head
    is trained on the clean tokens."""
    step = target.forward_train(input_ids, attention_mask, noisy_inputs(tokens, generator, input_noise))
    cond = step.cond.reshape(-1, step.cond.shape[-1])  # (B*N, C)
    fm = FlowMatchingConfig(batch_mul=batch_mul)
    return head_flow_matching_loss(head, tokens.reshape(-1, tokens.shape[-1]), cond, generator, config=fm)


class PretrainNet(nn.Module):
    """AR + flow head as one trainable root (`Dispatch(PretrainNet)`: keys `inner.ar.*`, `inner.head.*`)."""

    def __init__(self, ar: TargetAR, head: FlowHead):
        super().__init__()
        self.ar, self.head = ar, head

    def loss(self, input_ids, attention_mask, tokens, generator, batch_mul: int, input_noise: float = 0.0):
        return pretrain_loss(self.ar, self.head, input_ids, attention_mask, tokens, generator, batch_mul, input_noise)


def build_pretrain_net(cfg: Config) -> Dispatch:
    return Dispatch(PretrainNet(build_target(cfg), build_head(cfg)))


def init_pretrain_net(cfg: Config) -> Dispatch:
    """The stage-0 net, random or (pretrain.init) from an inference checkpoint of the same architecture, in fp32
    (the engine casts for bf16; the EMA stays fp32)."""
    if not cfg.pretrain.init:
        return build_pretrain_net(cfg)
    folder = Path(resolve_asset(cfg.pretrain.init))
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"pretrain.init='{cfg.pretrain.init}' holds no model.safetensors: pass an inference "
                                "checkpoint folder (e.g. assets/tiny_teacher or a run's run_dir/checkpoint)")
    theirs = load_config(folder)
    mine, other = to_dict(cfg.model), to_dict(theirs.model)
    keys = [f"{part}.{k}" for part in ("ar", "head", "image") for k in mine[part]
            if not k.endswith("path") and mine[part][k] != other[part].get(k)]
    if keys:
        raise ValueError(f"pretrain.init='{cfg.pretrain.init}' is another architecture than this run's model "
                         f"(differs in model.{', model.'.join(keys)}): start from a checkpoint of this preset, or "
                         "set the model keys to the checkpoint's")
    fp32 = copy.deepcopy(cfg)
    fp32.model.dtype = "float32"
    target, head = from_pretrained(folder, fp32)
    return Dispatch(PretrainNet(target, head))


def split_state(state: dict[str, torch.Tensor], target: nn.Module, head: nn.Module) -> tuple[dict, dict]:
    """Gathered `inner.ar.*` / `inner.head.*` weights -> the two modules' state dicts (non-persistent dropped)."""
    parts = []
    for prefix, module in (("inner.ar.", target), ("inner.head.", head)):
        keys = set(module.state_dict())
        parts.append({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in keys})
    return parts[0], parts[1]


def build_fp32_ema(rt, engine, build_fn, ds_base: dict, micro_batch: int):
    """(EMA tracker, its frozen module) of `engine`: fp32 (an EMA in bf16 would round away updates of size
    (1 - decay)), partitioned like the engine under ZeRO-3 (shard-wise update, no communication), replicated
    otherwise; starts as a copy of the engine. `build_fn` builds the engine's network."""
    base = copy.deepcopy(ds_base)
    base["bf16"] = {"enabled": False}
    sharded = ds_base.get("zero_optimization", {}).get("stage", 0) == 3
    ema = rt.build_frozen("ema", build_fn, base, micro_batch=micro_batch, replicate=not sharded)
    tracker = E.EMA(engine, ema)
    tracker.update(0.0)
    return tracker, ema


class PretrainTask:
    """Stage-0 networks and the "pretrain" step function for `training.loop.Trainer`."""

    name, progress_key = "pretrain", "fm/loss"

    def __init__(self, rt, cfg: Config, image):
        self.rt, self.cfg, self.image, self.device = rt, cfg, image, rt.device
        pc = cfg.pretrain
        ds_base = E.load_ds_config(pc.ds_config)
        sched = make_lr_lambda(LRSchedule("cosine", pc.warmup_steps, max(pc.steps, pc.warmup_steps + 1),
                                          pc.min_lr_ratio))
        spec = E.EngineSpec("model", pc.lr, tuple(pc.betas), weight_decay=pc.weight_decay, grad_clip=pc.grad_clip,
                            schedule="constant")  # the schedule is `sched` (schedules.lr, as before stage 0 ran here)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.engine = rt.build_engine(self._net(), spec, ds_base, micro_batch=cfg.data.batch_size,
                                      grad_accum=1, lr_lambda=sched)
        self.engines = {"model": self.engine}
        self.ema_module = self._build_ema(ds_base)
        self.modules = {"ema": self.ema_module}
        self.step_fns = {"pretrain": self.pretrain_step}

    def _net(self):
        """A builder for a random start: under ZeRO-3 the engine runs it inside zero.Init, so every rank holds its
        shard plus one module at a time, never the whole model. The head's adaLN-zero init (flow_head.py) runs
        after its layers are built, when they are already partitioned, so it is re-run on gathered weights (the
        same random draws as a whole build). pretrain.init loads a checkpoint whole (from_pretrained)."""
        if self.cfg.pretrain.init:
            return init_pretrain_net(self.cfg)

        def build() -> Dispatch:
            net = build_pretrain_net(self.cfg)
            self.rt.rerun_init_partitioned(net.inner.head.net, lambda m: m.reset_parameters())
            return net
        return build

    def _build_ema(self, ds_base: dict):
        self.ema, ema = build_fp32_ema(self.rt, self.engine, lambda: build_pretrain_net(self.cfg), ds_base,
                                       self.cfg.data.batch_size)
        return ema

    def stage_of(self, step: int) -> str:
        return "pretrain"

    def inputs(self, batch) -> tuple:
        """(ids (B,P), mask (B,P), clean image tokens (B,N,D)) on this rank's device; data.kind=latents batches
        carry cached tokens / latents (training/batch.py), pixel batches are encoded here."""
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        return ids, mask, image_tokens(batch, self.cfg.data.kind, self.image, self.cfg.model.image, self.device)

    def pretrain_step(self, inputs: tuple, step: int, gen: torch.Generator) -> dict:
        """One optimizer step of the flow-matching loss, then the EMA update."""
        pc = self.cfg.pretrain
        loss, metrics = self.engine("loss", *inputs, gen, pc.batch_mul, pc.input_noise)
        if not self.rt.all_finite(loss):  # every rank stops together
            raise FloatingPointError(f"pretrain flow-matching loss is not finite at step {step} (on some rank): "
                                     "lower pretrain.lr or check the data; the last checkpoint is intact "
                                     "(resume with --resume auto)")
        self.engine.backward(loss)
        self.engine.step()
        decay = E.ema_decay(self.cfg.pretrain.ema_decay, step)
        self.ema.update(decay)
        return {**metrics, "ema/decay": decay}

    def log_metrics(self, metrics: dict, inputs: tuple) -> tuple[dict, dict]:
        return dict(metrics), {}

    def finish(self, loader) -> dict:
        return {"weights": "ema", "ema_decay": self.cfg.pretrain.ema_decay}

    def export(self, meta: dict) -> Path | None:
        """The EMA weights as an inference checkpoint at `run_dir/checkpoint` (rank 0); collective."""
        state = self.rt.gathered_state_dict(self.ema_module)
        out = Path(self.cfg.run_dir) / "checkpoint"
        if self.rt.is_rank0:
            target, head = build_target(self.cfg), build_head(self.cfg)
            ar_sd, head_sd = split_state(state, target, head)
            target.load_state_dict(ar_sd)
            head.load_state_dict(head_sd)
            save_pretrained(out, self.cfg, target, head, meta={"stage": "pretrain", "weights": "ema", **meta})
        self.rt.barrier()
        return out if self.rt.is_rank0 else None


def pretrain_trainer(rt, cfg: Config, image, logger_factory) -> Trainer:
    """Stage 0: `PretrainTask` under the shared loop, cadence from `cfg.pretrain`."""
    pc = cfg.pretrain
    if (Path(cfg.run_dir) / "train_state.pt").is_file() and not (Path(cfg.run_dir) / "checkpoints").is_dir():
        raise FileExistsError(f"{cfg.run_dir} holds a run of the old single-process pretrainer (train_state.pt), "
                              "which this trainer cannot resume; its weights are in run_dir/checkpoint. Pick a new "
                              "run_dir (or delete train_state.pt to start over in this one)")
    loop = LoopConfig(steps=pc.steps, log_every=pc.log_every, save_every=pc.save_every,
                      sample_every=pc.sample_every, keep_last=pc.keep_last, max_minutes=pc.max_minutes)
    return Trainer(rt, PretrainTask(rt, cfg, image), loop, run_dir=cfg.run_dir, config=to_dict(cfg),
                   seed=cfg.seed, logger_factory=logger_factory)
