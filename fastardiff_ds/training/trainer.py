"""The Fast-ARDiff joint run as a task of the shared loop (training/loop.py): engines, teacher, EMA, tau, export.

Stages "cd" (steps < train.cd_steps) and "dmd" are `JointStep.cd_step` / `JointStep.dmd_step` (joint.py). Every
distributed side effect goes through the `Runtime` (engines/runtime.py); every rank runs the same sequence of
engine calls.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import engines as E
from ..config import Config, to_dict
from ..models import DraftAR, build_head, build_target, save_pretrained
from ..schedules.lr import LRSchedule, make_lr_lambda
from .batch import image_tokens
from .joint import JointStep, stage_of
from .loop import LoopConfig, Trainer
from .networks import build_teacher_net, init_networks, load_teacher_state
from .tau import collect_batches, measure_tau

ENGINE_ORDER = ("draft", "fake", "student", "target")


def _specs(cfg: Config) -> dict[str, tuple[E.EngineSpec, object]]:
    t = cfg.train
    flat = make_lr_lambda(LRSchedule("constant", t.warmup_steps))
    spec = lambda name, lr, groups=(): E.EngineSpec(name, lr, tuple(t.betas), weight_decay=t.weight_decay,  # noqa: E731
                                                     warmup=t.warmup_steps, schedule="constant", lr_groups=groups)
    disc = (("inner.cls_head.", t.lr_disc),) if t.gan_weight > 0 and t.lr_disc is not None else ()
    return {"draft": (spec("draft", t.lr_draft), flat), "target": (spec("target", t.lr_target), flat),
            "student": (spec("student", t.lr_student_cd), make_lr_lambda(LRSchedule("constant"))),  # JointStep: x stage
            "fake": (spec("fake", t.lr_fake, disc), flat)}


def _strip(state: dict, like: torch.nn.Module) -> dict:
    """Gathered `inner.*` weights -> the plain module's state-dict keys (drops non-persistent buffers)."""
    keys = set(like.state_dict())
    return {k.removeprefix("inner."): v for k, v in state.items() if k.removeprefix("inner.") in keys}


class JointTask:
    """The joint run's networks and step functions for `training.loop.Trainer` (stages "cd" and "dmd").

    Engines: draft, fake, student [, target] on the world; the frozen teacher on its own group; the student's EMA
    (the CD target) as a checkpointed module."""

    name, progress_key = "fast-ardiff", "loss/ar"

    def __init__(self, rt, cfg: Config, text, image):
        self.rt, self.cfg, self.text, self.image = rt, cfg, text, image
        self.run_dir, self.device = Path(cfg.run_dir), rt.device
        self.ds_base = E.load_ds_config(cfg.train.ds_config)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        teacher_state = load_teacher_state(cfg)
        nets = init_networks(cfg, teacher_state)
        self.ema_module = copy.deepcopy(nets["student"]).requires_grad_(False).to(self.device)
        # the exported student when train.student_ema_decay > 0: its own EMA, fp32 (as pretraining's), checkpointed
        student_ema = (copy.deepcopy(nets["student"]).requires_grad_(False).to(self.device, torch.float32)
                       if cfg.train.student_ema_decay > 0 else None)
        # train.gan_weight: a plain replicated copy of the fake-score network for the generator's GAN term (copied
        # from the engine before each generator step; derived state, not checkpointed)
        disc_copy = (copy.deepcopy(nets["fake"]).requires_grad_(False).to(self.device)
                     if cfg.train.gan_weight > 0 else None)
        micro, accum = cfg.data.batch_size, cfg.train.grad_accum
        self.engines = {}
        for name in ENGINE_ORDER:
            if name in nets:
                spec, fn = _specs(cfg)[name]
                self.engines[name] = rt.build_engine(nets[name], spec, self.ds_base, micro_batch=micro,
                                                     grad_accum=accum, lr_lambda=fn)
        self.teacher = self._build_teacher(teacher_state, micro)
        self.ema = E.EMA(self.engines["student"], self.ema_module)
        self.modules = {"ema": self.ema_module}
        export_ema = None
        if student_ema is not None:
            self.modules["student_ema"] = student_ema
            export_ema = E.EMA(self.engines["student"], student_ema)
        # the DMD teacher's unconditional rows: the negative prompt baseline generation uses ("" by default)
        ids, mask = text.batch([cfg.inference.negative_prompt], cfg.model.image.grid, strict=False)
        self.step_fn = JointStep(cfg, self.engines, self.teacher, self.ema, self.ema_module, (ids, mask), rt=rt,
                                 export_ema=export_ema, disc_copy=disc_copy)
        self.step_fns = {"cd": self.step_fn.cd_step, "dmd": self.step_fn.dmd_step}

    def stage_of(self, step: int) -> str:
        return stage_of(self.cfg, step)

    def _build_teacher(self, state: dict, micro: int):
        """Teacher on its own group; weights written once in the wrapped key layout, then loaded by every rank."""
        t, rt = self.cfg.train, self.rt
        teacher = rt.build_teacher(lambda: build_teacher_net(self.cfg), self.ds_base, micro_batch=micro,
                                   group_size=t.teacher_group_size or None, replicate=t.teacher_replicate)
        path = self.run_dir / "init" / "teacher.safetensors"
        if rt.is_rank0:
            with torch.device("meta"):  # names only: no full-size (fp32) teacher on rank 0
                full = build_teacher_net(self.cfg)
            full.inner.ar.rebuild_rope("cpu")  # the one non-persistent buffer, written with the weights
            keys = {n: n.removeprefix("inner.") for n in full.state_dict()}
            wrapped = {n: (state[k.removeprefix("ar.")] if k.startswith("ar.") else state["image_head." + k[5:]])
                       for n, k in keys.items()}
            wrapped.update({n: b for n, b in full.named_buffers() if n not in wrapped})
            path.parent.mkdir(parents=True, exist_ok=True)
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in wrapped.items()}, str(path))
        rt.barrier()
        rt.load_gathered_state_dict(teacher, path)
        return teacher

    # -- reporting ------------------------------------------------------------------------------------------------
    def partition_report(self) -> list[dict]:
        """Per-rank parameter elements held for every network (proves the sharding); gathered to every rank."""
        mine = {name: e.partition_numel() for name, e in self.engines.items()}
        mine.update(teacher=self.teacher.partition_numel(), teacher_group_size=self.teacher.group_size,
                    rank=self.rt.rank)
        return self.rt.all_gather_object(mine)

    def memory_estimate(self) -> dict:
        """DeepSpeed's ZeRO-3 model-state estimate per GPU for this run's networks (sized on the meta device)."""
        cfg, local = self.cfg, self.rt.local_world_size
        with torch.device("meta"):
            target = build_target(cfg)
            sizes = {"draft": DraftAR(cfg.model), "student": build_head(cfg, student=True),
                     "fake": build_head(cfg, discriminator=cfg.train.gan_weight > 0)}
            if cfg.train.target_ar:
                sizes["target"] = target
            sizes["teacher"] = E.NetSize(*E.count_params(torch.nn.ModuleList([target, build_head(cfg)])),
                                         trainable=False, group_size=self.teacher.group_size)
        est = E.estimate_memory(sizes, local, max(1, self.rt.world_size // local))
        return {k: (v if k == "total_gpu_bytes" else v["gpu_bytes"]) for k, v in est.items()}

    # -- the loop's hooks -----------------------------------------------------------------------------------------
    def inputs(self, batch) -> tuple:
        """(ids (B,P), mask (B,P), clean image tokens (B,N,D)) on this rank's device; data.kind=latents batches
        carry cached tokens / latents (training/batch.py), pixel batches are encoded here."""
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        return ids, mask, image_tokens(batch, self.cfg.data.kind, self.image, self.cfg.model.image, self.device)

    def log_metrics(self, metrics: dict, inputs: tuple) -> tuple[dict, dict]:
        """The step's metrics plus both networks' entropy statistics; the teacher forward is collective."""
        ids, mask, tokens = inputs
        layer = (self.cfg.model.ar.num_layers - 2) % self.cfg.model.ar.num_layers  # target's penultimate layer
        target_ents = self.teacher("entropy", ids, mask, tokens, layer).reshape(-1)
        row = dict(metrics)
        ents = row.pop("_draft_entropy")
        row.update({"entropy/target_mean": float(target_ents.mean()), "entropy/draft_mean": float(ents.mean())})
        return row, {"entropy/draft": ents.float().cpu().numpy(), "entropy/target": target_ents.float().cpu().numpy()}

    def finish(self, loader) -> dict:
        """Eq. 10 on a fresh pass over the training data (tau.py): never fails the run; tau=-inf without data."""
        layer = self.cfg.model.draft.shallow_layer % self.cfg.model.draft.num_layers

        eagle = self.cfg.model.draft.kind == "eagle"

        def entropy(batch):  # the shallow layer's entropy at the N image-conditioning rows, as inference reads it
            ids, mask, tokens = self.inputs(batch)
            feats = self.teacher("features_and_entropy", ids, mask, tokens, None, True)[3] if eagle else None
            out = self.engines["draft"]("forward_train", ids, mask, tokens, explicit_layer=layer, feats=feats)
            return out.entropy.float().cpu(), (out.attn_valid.sum(-1) >= 2).cpu()  # (B, N) each

        tau = measure_tau(entropy, collect_batches(loader, self.cfg.train.tau_batches), rt=self.rt)
        return {**tau, "teacher": self.cfg.train.teacher}

    def export(self, meta: dict) -> Path | None:
        """Gather every trained network (collective) and write an inference checkpoint on rank 0."""
        cfg, rt = self.cfg, self.rt
        out = Path(cfg.train.export_dir or self.run_dir / "export")
        gathered = {n: rt.gathered_state_dict(e) for n, e in self.engines.items()}
        if rt.is_rank0:
            from ..models import from_pretrained

            target, head = from_pretrained(cfg.train.teacher, cfg)
            if "target" in gathered:
                target.load_state_dict(_strip(gathered["target"], target))
            draft, student = DraftAR(cfg.model), build_head(cfg, student=True)
            draft.load_state_dict(_strip(gathered["draft"], draft))
            ema = self.modules.get("student_ema")
            student.load_state_dict(_strip(ema.state_dict() if ema is not None else gathered["student"], student))
            if ema is not None:
                meta = {**meta, "student_weights": "ema", "student_ema_decay": cfg.train.student_ema_decay}
            save_pretrained(out, cfg, target, head, draft=draft, student=student, meta=meta)
        rt.barrier()
        return out if rt.is_rank0 else None


def joint_trainer(rt, cfg: Config, text, image, logger_factory) -> Trainer:
    """The joint run: `JointTask` under the shared loop, cadence from `cfg.train`."""
    t = cfg.train
    loop = LoopConfig(steps=t.steps, log_every=t.log_every, save_every=t.save_every, sample_every=t.sample_every,
                      keep_last=t.keep_last, grad_accum=t.grad_accum)
    return Trainer(rt, JointTask(rt, cfg, text, image), loop, run_dir=cfg.run_dir, config=to_dict(cfg),
                   seed=cfg.seed, logger_factory=logger_factory)
