"""The MAR row's head distillation on the shared runtime (launcher/train_c2i.py): DiffLoss -> a few-step student.

Per step (every engine call in the same order on every rank; branching on the step number only):
- real images -> tokens; a mask per image at a uniform step of the cosine generation schedule (masked fraction
  cos(pi/2 u), at least one token); the frozen teacher MAR gives the conditions z of the masked tokens (and,
  with guidance > 1, the unconditional ones from `fake_latent`);
- the student (an engine over a `DiffLossFlow` copy of the teacher's DiffLoss net) makes few-step samples from
  noise (DMD2's backward simulation: the trained step k is reached by its own earlier steps);
- every `gen_every` steps the student takes DMD's generator loss (losses/dmd.py) against the teacher's guided
  velocity and the fake score; every step the fake score (another engine, same start) takes flow matching on the
  detached samples.
Not in this run yet (the rest of issue 28): the draft MAR and its L_reg + L_ent, alpha(t) between them, CD before
DMD, and speculative decoding over MAR steps.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from torch import nn

from .. import engines as E
from ..config.c2i import C2IConfig
from ..config.overrides import to_dict
from ..losses.consistency import consistency_function
from ..losses.dmd import DMDConfig, dmd_fake_score_loss, dmd_generator_loss
from ..losses.flow_matching import FlowMatchingConfig, interpolate
from ..models.mar import MAR, diffloss_net
from ..models.mar_checkpoint import EXPORT_WEIGHTS
from ..sampling.diffloss_flow import DiffLossFlow, guided_velocity
from ..sampling.mar_loop import random_orders, student_grid
from .loop import LoopConfig, Trainer
from .networks import Dispatch, head_fn

STUDENT_WEIGHTS = "student_head.safetensors"


def schedule_mask(B: int, L: int, generator: torch.Generator) -> torch.Tensor:
    """(B, L) float masks at one uniform step of the cosine schedule for the batch (MAR's encoder needs the same
    count per row, as a generation step has): the first max(1, floor(L cos(pi/2 u))) tokens of random orders."""
    orders = random_orders(B, L, generator).cpu()
    u = float(torch.rand((), generator=generator, device=generator.device))
    n = max(1, math.floor(L * math.cos(math.pi / 2 * u)))
    return torch.zeros(B, L).scatter(1, orders[:, :n], 1.0)


def student_samples(student, z, noise, grid, generator, k: int) -> torch.Tensor:
    """Few-step samples (N, C) with the gradient through step k only (DMD2's backward simulation: steps 0..k-1
    run under no_grad from `noise`, started at grid[0] = s_min, as `few_step_tokens` samples)."""
    n = noise.shape[0]
    x = interpolate(torch.zeros_like(noise), noise, grid[0].expand(n))
    with torch.no_grad():
        for j in range(k):
            x1 = consistency_function(x, grid[j].expand(n), student(x, grid[j].expand(n), z))
            x = interpolate(x1, torch.randn(tuple(x.shape), generator=generator).to(x.device), grid[j + 1].expand(n))
    return consistency_function(x, grid[k].expand(n), student(x, grid[k].expand(n), z))


class MARTeacher(nn.Module):
    """The frozen teacher: conditions from the MAR trunk, velocities from its DiffLoss head read as a flow."""

    def __init__(self, mar: MAR):
        super().__init__()
        self.mar = mar
        self.flow = DiffLossFlow(mar.diffloss.net)

    def conditions(self, tokens, mask, labels):
        return self.mar(tokens, mask, labels=labels)

    def velocity(self, x, s, cond):
        return self.flow(x, s, cond)


def head_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "diffloss.net."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class MARDistillTask:
    """Student + fake-score engines and the frozen teacher for `training.loop.Trainer` (stage "dmd")."""

    name, progress_key = "mar-dmd", "dmd/loss"

    def __init__(self, rt, cfg: C2IConfig, tokenizer):
        from safetensors.torch import load_file

        self.rt, self.cfg, self.tokenizer, self.device = rt, cfg, tokenizer, rt.device
        d = cfg.distill
        folder = Path(d.teacher)
        if not (folder / EXPORT_WEIGHTS).is_file():
            raise FileNotFoundError(f"distill.teacher={d.teacher!r} holds no {EXPORT_WEIGHTS}: pretrain one with "
                                    "launcher/pretrain_c2i.py (its run_dir/checkpoint) or pass the bundled "
                                    "assets/tiny_mar")
        state = load_file(str(folder / EXPORT_WEIGHTS))
        ds_base = E.load_ds_config(d.ds_config)
        heads = {}
        for name, lr in (("student", d.lr_student), ("fake", d.lr_fake)):
            head = diffloss_net(cfg.model)
            head.load_state_dict(head_state(state))
            net = Dispatch(DiffLossFlow(head))
            spec = E.EngineSpec(name, lr, tuple(d.betas), schedule="constant")
            heads[name] = rt.build_engine(net, spec, ds_base, micro_batch=cfg.data.batch_size, grad_accum=1)
        self.engines = heads

        def build_teacher():
            mar = MAR(cfg.model)
            if d.teacher_replicate:
                mar.load_state_dict(state)
            return Dispatch(MARTeacher(mar))
        self.teacher = rt.build_frozen("teacher", build_teacher, ds_base, micro_batch=cfg.data.batch_size,
                                       replicate=d.teacher_replicate)
        if not d.teacher_replicate:
            rt.load_gathered_state_dict(self.teacher.module.inner.mar, folder / EXPORT_WEIGHTS)
        self.modules = {}
        # the fake score learns on [t_min, 1) too: below it an eps-net's x0 estimate is ill-conditioned (sqrt(abar) ~ 0)
        self.dmd = DMDConfig(t_min=d.t_min, t_max=d.t_max,
                             fake=FlowMatchingConfig(batch_mul=1, t_dist="uniform", t_min=d.t_min, t_max=1.0))
        self.step_fns = {"dmd": self.dmd_step}
        self.last_generator: dict = {}  # the last generator step's metrics, logged on every step (log_every need
        # not be aligned with gen_every)

    def stage_of(self, step: int) -> str:
        return "dmd"

    def inputs(self, batch) -> tuple:
        if "labels" not in batch:
            raise KeyError("the batch has no class labels: set data.conditioning=class")
        return self.tokenizer.encode(batch["pixels"].to(self.device)), batch["labels"].to(self.device)

    def _conditions(self, tokens, labels, gen):
        B, L, _ = tokens.shape
        mask = schedule_mask(B, L, gen).to(self.device)
        sel = mask.bool()
        z = self.teacher("conditions", tokens, mask, labels)[sel]
        zu = self.teacher("conditions", tokens, mask, None)[sel] if self.cfg.distill.guidance != 1.0 else None
        return z, zu, sel

    def dmd_step(self, inputs: tuple, step: int, gen: torch.Generator) -> dict:
        d = self.cfg.distill
        tokens, labels = inputs
        z, zu, sel = self._conditions(tokens, labels, gen)
        student, fake = self.engines["student"], self.engines["fake"]
        grid = student_grid(d.student_steps, d.t_min, self.device)
        gen_step = step % d.gen_every == 0
        noise = torch.randn(z.shape[0], tokens.shape[-1], generator=gen).to(self.device)
        # the trained step sets how often the student engine runs (collective): from the step number, not the RNG
        k = int(torch.randint(d.student_steps, (1,), generator=torch.Generator().manual_seed(self.cfg.seed + step)))
        with torch.set_grad_enabled(gen_step):
            x = student_samples(head_fn(student), z, noise, grid, gen, k)
        metrics = {"dmd/student_step": k}
        if gen_step:
            teacher_head = lambda xx, ss, cc: self.teacher("velocity", xx, ss, cc)  # noqa: E731
            real = guided_velocity(teacher_head, z, zu, d.guidance)
            fake_v = lambda xx, tt: head_fn(fake)(xx, tt, z)  # noqa: E731
            l_g, m = dmd_generator_loss(x, real, fake_v, gen, config=self.dmd)
            self._finite(l_g, "student DMD loss", step)
            student.backward(l_g)
            student.step()
            self.last_generator = m
        metrics.update(self.last_generator)
        l_f, m_f = dmd_fake_score_loss(head_fn(fake), x.detach(), z, gen, config=self.dmd)
        self._finite(l_f, "fake-score loss", step)
        fake.backward(l_f)
        fake.step()
        metrics.update(m_f)
        return metrics

    def _finite(self, loss, what: str, step: int) -> None:
        if not self.rt.all_finite(loss):
            raise FloatingPointError(f"{what} is not finite at step {step} (on some rank): lower distill.lr_student"
                                     " / lr_fake; the last checkpoint is intact (resume with --resume auto)")

    def log_metrics(self, metrics: dict, inputs: tuple) -> tuple[dict, dict]:
        return dict(metrics), {}

    def finish(self, loader) -> dict:
        d = self.cfg.distill
        return {"student_steps": d.student_steps, "student_s_min": d.t_min, "guidance": d.guidance}

    def export(self, meta: dict) -> Path | None:
        """run_dir/export: the teacher's files + the student head (`student_head.safetensors`, DiffLoss-net keys)
        and meta.json saying its steps and built-in guidance; collective."""
        import json

        from safetensors.torch import save_file

        state = self.rt.gathered_state_dict(self.engines["student"])
        out = Path(self.cfg.run_dir) / "export"
        if self.rt.is_rank0:
            out.mkdir(parents=True, exist_ok=True)
            for name in (EXPORT_WEIGHTS, "config.json"):
                shutil.copyfile(Path(self.cfg.distill.teacher) / name, out / name)
            prefix = "inner.net."
            save_file({k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)},
                      str(out / STUDENT_WEIGHTS))
            (out / "meta.json").write_text(json.dumps({"stage": "mar-dmd", "teacher": self.cfg.distill.teacher,
                                                       **meta}, indent=2, default=str))
        self.rt.barrier()
        return out if self.rt.is_rank0 else None


def mar_distill_trainer(rt, cfg: C2IConfig, tokenizer, logger_factory) -> Trainer:
    d = cfg.distill
    loop = LoopConfig(steps=d.steps, log_every=d.log_every, save_every=d.save_every, sample_every=0,
                      keep_last=d.keep_last, max_minutes=d.max_minutes)
    return Trainer(rt, MARDistillTask(rt, cfg, tokenizer), loop, run_dir=cfg.run_dir, config=to_dict(cfg),
                   seed=cfg.seed, logger_factory=logger_factory)
