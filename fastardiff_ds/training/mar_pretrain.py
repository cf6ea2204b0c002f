"""MAR pretraining (the MAR row's teacher, issue 28) on the shared runtime: one DeepSpeed engine + EMA, the same
loop, checkpoint and resume as stage 0 of the text-to-image job (training/pretrain.py).

MAR's training step (LTH14/mar `MAR.forward`, learned, not copied), per batch of B images of L tokens:
- one random generation order per image; one mask rate r per batch from a normal N(1, 0.25^2) truncated to
  [mask_ratio_min, 1] (scipy's truncnorm there; its inverse CDF here); the first ceil(r L) tokens of each order
  are masked;
- the class row is `fake_latent` with probability label_drop_prob (CFG), the class embedding otherwise;
- the encoder sees the buffer + visible tokens, the decoder gives a condition for every token; the DiffLoss is
  trained on the masked tokens, `batch_mul` noise draws each (losses/diffloss.py).
Every draw comes from the loop's generator, so a resumed run continues the same stream.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from .. import engines as E
from ..config.c2i import C2IConfig
from ..config.overrides import to_dict
from ..losses.common import metric, randn
from ..losses.diffloss import TRAIN_STEPS, diffloss_terms
from ..models.mar import MAR
from ..models.mar_checkpoint import save_mar_export
from ..sampling.diffloss import SpacedCosine
from ..sampling.mar_loop import random_orders
from .loop import LoopConfig, Trainer
from .networks import Dispatch
from .pretrain import build_fp32_ema


def mask_rate(generator: torch.Generator | None, lo: float) -> float:
    """One draw of N(1, 0.25^2) truncated to [lo, 1] (MAR's `mask_ratio_generator`), by its inverse CDF."""
    if lo >= 1:
        return 1.0
    a = torch.special.ndtr(torch.tensor((lo - 1.0) / 0.25, dtype=torch.float64))
    u = torch.rand((), generator=generator, device=generator.device if generator is not None else None)
    p = a + u.double().cpu() * (0.5 - a)
    return float(min(max(1.0 + 0.25 * torch.special.ndtri(p), lo), 1.0))


class MARTrainNet(nn.Module):
    """The engine's root module (`Dispatch(MARTrainNet)`: keys `inner.mar.*`, the official names below)."""

    def __init__(self, mar: MAR):
        super().__init__()
        self.mar = mar
        self.proc = SpacedCosine.make(str(TRAIN_STEPS))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, generator, batch_mul: int, mask_ratio_min: float,
             label_drop_prob: float):
        """tokens (B, L, C) clean, labels (B,) -> (loss, metrics)."""
        B, L, C = tokens.shape
        dev = tokens.device
        gdev = generator.device if generator is not None else dev
        orders = random_orders(B, L, generator).to(dev)
        n_masked = math.ceil(L * mask_rate(generator, mask_ratio_min))
        mask = torch.zeros(B, L, device=dev).scatter(1, orders[:, :n_masked], 1.0)
        drop = torch.rand(B, generator=generator, device=gdev).to(dev) < label_drop_prob
        z = self.mar(tokens, mask, labels=labels, drop=drop)  # (B, L, Dd), through __call__ (ZeRO-3 hooks)
        sel = mask.bool()
        x0 = tokens[sel].repeat(batch_mul, 1)  # only masked tokens carry loss (MAR's masked mean)
        zz = z[sel].repeat(batch_mul, 1)
        t = torch.randint(0, TRAIN_STEPS, (x0.shape[0],), generator=generator, device=gdev).to(dev)
        terms = diffloss_terms(self.mar.diffloss.net, x0, zz, t, randn(tuple(x0.shape), generator, like=x0), self.proc)
        loss = terms["loss"].mean()
        return loss, {"mar/loss": metric(loss), "mar/mse": metric(terms["mse"]), "mar/vb": metric(terms["vb"]),
                      "mar/mask_rate": n_masked / L}


@contextlib.contextmanager
def dropout_rng(generator: torch.Generator, device: torch.device):
    """The global RNG (MAR's dropouts draw from it) seeded from the loop's generator for one step, restored
    after: dropout masks become part of the checkpointed stream, so a resumed run repeats them exactly."""
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


def build_mar_train_net(cfg: C2IConfig) -> Dispatch:
    return Dispatch(MARTrainNet(MAR(cfg.model)))


def init_net(cfg: C2IConfig) -> Dispatch:
    """The training net holding pretrain.init's weights (a MAR export of the same model), whole (DeepSpeed
    partitions it at engine creation)."""
    from ..models.mar_checkpoint import load_mar_export
    from ..models.text_tokenizer import resolve_asset

    model, theirs = load_mar_export(resolve_asset(cfg.pretrain.init))
    if theirs.model != cfg.model:
        diff = [f.name for f in dataclasses.fields(cfg.model) if getattr(theirs.model, f.name) != getattr(cfg.model, f.name)]
        raise ValueError(f"pretrain.init={cfg.pretrain.init!r} is another MAR than this run's model (differs in "
                         f"model.{', model.'.join(diff)}): set those keys to the checkpoint's")
    net = build_mar_train_net(cfg)
    net.inner.mar.load_state_dict(model.state_dict())
    return net


class MARPretrainTask:
    """MAR's networks and step function for `training.loop.Trainer` (the `Task` protocol)."""

    name, progress_key = "mar-pretrain", "mar/loss"

    def __init__(self, rt, cfg: C2IConfig, tokenizer):
        self.rt, self.cfg, self.tokenizer, self.device = rt, cfg, tokenizer, rt.device
        pc = cfg.pretrain
        ds_base = E.load_ds_config(pc.ds_config)
        warm = max(pc.warmup_steps, 1)
        spec = E.EngineSpec("model", pc.lr, tuple(pc.betas), weight_decay=pc.weight_decay, grad_clip=pc.grad_clip,
                            schedule="constant")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank

        def build() -> Dispatch:
            net = build_mar_train_net(cfg)
            rt.rerun_init_partitioned(net.inner.mar, lambda m: m.init_weights())
            return net
        self.engine = rt.build_engine(init_net(cfg) if pc.init else build, spec, ds_base,
                                      micro_batch=cfg.data.batch_size, grad_accum=1,
                                      lr_lambda=lambda s: min(1.0, (s + 1) / warm))  # MAR: linear warmup, constant
        self.ema, self.ema_module = build_fp32_ema(rt, self.engine, lambda: build_mar_train_net(cfg), ds_base,
                                                   cfg.data.batch_size)
        self.engines, self.modules = {"model": self.engine}, {"ema": self.ema_module}
        self.step_fns = {"pretrain": self.pretrain_step}

    def stage_of(self, step: int) -> str:
        return "pretrain"

    def inputs(self, batch) -> tuple:
        if "labels" not in batch:
            raise KeyError("the batch has no class labels: set data.conditioning=class (shards need a .cls member "
                           "or an integer 'label' in each .json)")
        return self.tokenizer.encode(batch["pixels"].to(self.device)), batch["labels"].to(self.device)

    def pretrain_step(self, inputs: tuple, step: int, gen: torch.Generator) -> dict:
        pc = self.cfg.pretrain
        tokens, labels = inputs
        with dropout_rng(gen, self.device):  # forward and backward: the masks are drawn in forward
            loss, metrics = self.engine("loss", tokens, labels, gen, pc.batch_mul, pc.mask_ratio_min,
                                        pc.label_drop_prob)
            if not self.rt.all_finite(loss):
                raise FloatingPointError(f"MAR pretraining loss is not finite at step {step} (on some rank): "
                                         "lower pretrain.lr or check the data; the last checkpoint is intact "
                                         "(resume with --resume auto)")
            self.engine.backward(loss)
        self.engine.step()
        decay = E.ema_decay(pc.ema_decay, step)
        self.ema.update(decay)
        return {**metrics, "ema/decay": decay}

    def log_metrics(self, metrics: dict, inputs: tuple) -> tuple[dict, dict]:
        return dict(metrics), {}

    def finish(self, loader) -> dict:
        return {"weights": "ema", "ema_decay": self.cfg.pretrain.ema_decay}

    def export(self, meta: dict) -> Path | None:
        """The EMA weights as `run_dir/checkpoint` (config.json + model.safetensors, official MAR key names);
        collective."""
        state = self.rt.gathered_state_dict(self.ema_module)
        out = Path(self.cfg.run_dir) / "checkpoint"
        if self.rt.is_rank0:
            prefix = "inner.mar."
            mar_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            save_mar_export(out, self.cfg, mar_state, meta={"stage": "mar-pretrain", **meta})
        self.rt.barrier()
        return out if self.rt.is_rank0 else None


def mar_pretrain_trainer(rt, cfg: C2IConfig, tokenizer, logger_factory) -> Trainer:
    pc = cfg.pretrain
    loop = LoopConfig(steps=pc.steps, log_every=pc.log_every, save_every=pc.save_every,
                      sample_every=pc.sample_every, keep_last=pc.keep_last, max_minutes=pc.max_minutes)
    return Trainer(rt, MARPretrainTask(rt, cfg, tokenizer), loop, run_dir=cfg.run_dir, config=to_dict(cfg),
                   seed=cfg.seed, logger_factory=logger_factory)
