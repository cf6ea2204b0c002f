"""Stage 0: teacher pretraining (AR + flow head, rectified flow) for presets without public weights.

NextStep-1's image loss: the head is trained by flow matching on every image token, conditioned on
`image_out_projector(h)` of the position before it, with logit-normal t and `batch_mul` noise draws per token;
text is dropped with `data.drop_text_prob` (in the loader) so the model supports CFG. The text LM loss
(weight 0.01 in NextStep-1) is not used: we never generate text.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, save_config
from ..losses.flow_matching import FlowMatchingConfig, head_flow_matching_loss
from ..models import FlowHead, TargetAR, save_pretrained
from ..schedules.lr import LRSchedule, make_lr_lambda
from .batch import image_tokens


def pretrain_loss(target: TargetAR, head: FlowHead, input_ids, attention_mask, tokens, generator, batch_mul: int):
    """tokens: (B,N,D) clean image tokens. Returns (loss, metrics)."""
    step = target.forward_train(input_ids, attention_mask, tokens)
    cond = step.cond.reshape(-1, step.cond.shape[-1])  # (B*N, C)
    fm = FlowMatchingConfig(batch_mul=batch_mul)
    return head_flow_matching_loss(head, tokens.reshape(-1, tokens.shape[-1]), cond, generator, config=fm)


@dataclass
class PretrainState:
    step: int = 0
    samples: int = 0
    seconds: float = 0.0


class Pretrainer:
    """Single-process loop (CPU or one GPU): AdamW over AR + head, warmup-cosine lr, JSONL log, resumable."""

    def __init__(self, cfg: Config, target: TargetAR, head: FlowHead, image_tokenizer, loader, device="cpu",
                 logger=None):
        self.cfg, self.target, self.head = cfg, target.to(device), head.to(device)
        self.image_tokenizer, self.loader, self.device, self.logger = image_tokenizer, loader, device, logger
        pc = cfg.pretrain
        params = [p for m in (target, head) for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=pc.lr, betas=tuple(pc.betas), weight_decay=pc.weight_decay)
        sched = LRSchedule("cosine", pc.warmup_steps, max(pc.steps, pc.warmup_steps + 1), pc.min_lr_ratio)
        self.lr = torch.optim.lr_scheduler.LambdaLR(self.opt, make_lr_lambda(sched))
        self.state = PretrainState()
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.run_dir = Path(cfg.run_dir)

    # -- checkpointing -------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Inference weights (config.json + model.safetensors) and the resumable train state, atomically."""
        save_pretrained(self.run_dir / "checkpoint", self.cfg, self.target, self.head,
                        meta={"stage": "pretrain", "step": self.state.step})
        tmp = self.run_dir / "train_state.pt.tmp"
        torch.save({"opt": self.opt.state_dict(), "lr": self.lr.state_dict(), "state": self.state.__dict__,
                    "loader": self.loader.state_dict(), "generator": self.generator.get_state(),
                    "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(self.run_dir / "train_state.pt")
        return self.run_dir / "checkpoint"

    def resume(self) -> bool:
        path = self.run_dir / "train_state.pt"
        if not path.is_file():
            return False
        from ..models import from_pretrained

        target, head = from_pretrained(self.run_dir / "checkpoint", self.cfg)
        self.target.load_state_dict(target.state_dict())
        self.head.load_state_dict(head.state_dict())
        blob = torch.load(path, weights_only=False)
        self.opt.load_state_dict(blob["opt"])
        self.lr.load_state_dict(blob["lr"])
        self.state = PretrainState(**blob["state"])
        self.loader.load_state_dict(blob["loader"])
        self.generator.set_state(blob["generator"])
        torch.set_rng_state(blob["torch_rng"])
        return True

    # -- the loop ------------------------------------------------------------------------------------------------
    def train_step(self, batch) -> dict:
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        tokens = image_tokens(batch, self.cfg.data.kind, self.image_tokenizer, self.cfg.model.image, self.device)
        loss, metrics = pretrain_loss(self.target, self.head, ids, mask, tokens, self.generator,
                                      self.cfg.pretrain.batch_mul)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain flow-matching loss is {loss.item()} at step {self.state.step}: "
                                     "lower pretrain.lr or check the data; the last checkpoint is intact")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.pretrain.grad_clip)
        self.opt.step()
        self.lr.step()
        return {**metrics, "grad_norm": float(gnorm), "lr": self.lr.get_last_lr()[0]}

    def fit(self, on_sample=None) -> PretrainState:
        pc, t0 = self.cfg.pretrain, time.time()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.json")
        log = (self.run_dir / "metrics.jsonl").open("a")
        from tqdm import tqdm

        bar = tqdm(total=pc.steps, initial=self.state.step, desc="pretrain", dynamic_ncols=True)
        start_seconds = self.state.seconds
        while self.state.step < pc.steps:
            for batch in self.loader:
                metrics = self.train_step(batch)
                self.state.step += 1
                self.state.samples += batch["input_ids"].shape[0]
                self.state.seconds = start_seconds + time.time() - t0
                bar.update(1)
                if self.state.step % pc.log_every == 0 or self.state.step == 1:
                    row = {"step": self.state.step, "samples": self.state.samples,
                           "samples_per_s": self.state.samples / max(self.state.seconds, 1e-9), **metrics}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{metrics['fm/loss']:.4f}")
                    if self.logger is not None:
                        self.logger.log(row, step=self.state.step)
                out_of_time = pc.max_minutes > 0 and self.state.seconds > pc.max_minutes * 60
                done = self.state.step >= pc.steps or out_of_time
                if self.state.step % pc.save_every == 0 or done:
                    self.save()
                if on_sample is not None and (self.state.step % pc.sample_every == 0 or done):
                    on_sample(self.state.step)
                if done:
                    bar.close()
                    return self.state
        bar.close()
        return self.state
