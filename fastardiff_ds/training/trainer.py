"""The Fast-ARDiff joint run on DeepSpeed: engines, data, the step loop, checkpoints, tau, export.

All DeepSpeed calls go through `fastardiff_ds.engines`. Every rank runs the same sequence of engine calls.
"""
from __future__ import annotations

import copy
import json
import resource
import time
from pathlib import Path

import torch

from .. import engines as E
from ..config import Config, to_dict
from ..models import DraftAR, build_head, build_target, save_pretrained
from ..schedules.lr import LRSchedule, make_lr_lambda
from .batch import image_tokens
from .joint import JointStep, stage_lr_lambda, stage_of
from .networks import build_teacher_net, init_networks, load_teacher_state
from .tau import collect_batches, measure_tau

ENGINE_ORDER = ("draft", "fake", "student", "target")


def _specs(cfg: Config) -> dict[str, tuple[E.EngineSpec, object]]:
    t = cfg.train
    flat = make_lr_lambda(LRSchedule("constant", t.warmup_steps))
    spec = lambda name, lr: E.EngineSpec(name, lr, tuple(t.betas), weight_decay=t.weight_decay,  # noqa: E731
                                          warmup=t.warmup_steps, schedule="constant")
    return {"draft": (spec("draft", t.lr_draft), flat), "target": (spec("target", t.lr_target), flat),
            "student": (spec("student", t.lr_student_cd), stage_lr_lambda(cfg)),
            "fake": (spec("fake", t.lr_fake), flat)}


def _strip(state: dict, like: torch.nn.Module) -> dict:
    """Gathered `inner.*` weights -> the plain module's state-dict keys (drops non-persistent buffers)."""
    keys = set(like.state_dict())
    return {k.removeprefix("inner."): v for k, v in state.items() if k.removeprefix("inner.") in keys}


class JointTrainer:
    def __init__(self, cfg: Config, text, image, logger_factory):
        self.cfg, self.text, self.image = cfg, text, image
        self.rank, self.world = E.get_rank(), E.get_world_size()
        self.run_dir, self.device = Path(cfg.run_dir), E.device()
        self.ds_base = E.load_ds_config(cfg.train.ds_config)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        teacher_state = load_teacher_state(cfg)
        nets = init_networks(cfg, teacher_state)
        self.ema_module = copy.deepcopy(nets["student"]).requires_grad_(False).to(self.device)
        micro, accum = cfg.data.batch_size, cfg.train.grad_accum
        self.engines = {}
        for name in ENGINE_ORDER:
            if name in nets:
                spec, fn = _specs(cfg)[name]
                self.engines[name] = E.build_engine(nets[name], spec, self.ds_base, micro_batch=micro,
                                                    grad_accum=accum, lr_lambda=fn)
        self.teacher = self._build_teacher(teacher_state, micro)
        self.ema = E.EMA(self.engines["student"], self.ema_module)
        # the DMD teacher's unconditional rows: the negative prompt baseline generation uses ("" by default)
        ids, mask = text.batch([cfg.inference.negative_prompt], cfg.model.image.grid, strict=False)
        self.step_fn = JointStep(cfg, self.engines, self.teacher, self.ema, self.ema_module, (ids, mask))
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.step, self.consumed, self.run_id = 0, 0, None
        self.logger_factory = logger_factory

    def _build_teacher(self, state: dict, micro: int):
        """Teacher on its own group; weights written once in the wrapped key layout, then loaded by every rank."""
        t = self.cfg.train
        teacher = E.build_teacher(lambda: build_teacher_net(self.cfg), self.ds_base, micro_batch=micro,
                                  group_size=t.teacher_group_size or None, replicate=t.teacher_replicate)
        path = self.run_dir / "init" / "teacher.safetensors"
        if E.is_rank0():
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
        E.barrier()
        E.load_gathered_state_dict(teacher, path)
        return teacher

    # -- reporting ------------------------------------------------------------------------------------------------
    def partition_report(self) -> list[dict]:
        """Per-rank parameter elements held for every network (proves the sharding); gathered to every rank."""
        mine = {name: e.partition_numel() for name, e in self.engines.items()}
        mine.update(teacher=self.teacher.partition_numel(), teacher_group_size=self.teacher.group_size,
                    rank=self.rank)
        return E.all_gather_object(mine)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def client_state(self, loader) -> dict:
        return {"step": self.step, "stage": stage_of(self.cfg, self.step), "consumed_samples": self.consumed,
                "loader": loader.state_dict(), "generator": self.gen.get_state(), "wandb_run_id": self.run_id}

    def save(self, loader) -> Path:
        return E.save_checkpoint(self.run_dir / "checkpoints", self.step, self.engines,
                                 client_state=self.client_state(loader), config=to_dict(self.cfg),
                                 modules={"ema": self.ema_module}, keep_last=self.cfg.train.keep_last)

    def resume(self, resume: str, loader) -> bool:
        ckpt = E.resolve_resume(self.run_dir / "checkpoints", resume)
        if ckpt is None:
            return False
        client = E.load_checkpoint(ckpt, self.engines, modules={"ema": self.ema_module})
        self.step, self.consumed, self.run_id = client["step"], client["consumed_samples"], client["wandb_run_id"]
        peers = client.get("peers")  # every saved rank's client state, when the world size changed
        if peers is None:
            loader.load_state_dict(client["loader"])
        else:
            loader.resume_from([p["loader"] for p in peers])  # the epoch continues on the new ranks
        if peers is None or self.rank < len(peers):  # a new rank keeps its own freshly seeded noise stream
            self.gen.set_state(client["generator"])
        return True

    # -- tau and export -------------------------------------------------------------------------------------------
    def measure_tau(self, loader) -> dict:
        """Eq. 10 on a fresh pass over the training data (tau.py): never fails the run; tau=-inf without data."""
        layer = self.cfg.model.draft.shallow_layer % self.cfg.model.draft.num_layers

        def entropy(batch):  # the shallow layer's entropy at the N image-conditioning rows, as inference reads it
            ids, mask, tokens = self._inputs(batch)
            out = self.engines["draft"]("forward_train", ids, mask, tokens, explicit_layer=layer)
            return out.entropy.float().cpu(), (out.attn_valid.sum(-1) >= 2).cpu()  # (B, N) each

        return measure_tau(entropy, collect_batches(loader, self.cfg.train.tau_batches))

    def export(self, meta: dict) -> Path | None:
        """Gather every trained network (collective) and write an inference checkpoint on rank 0."""
        cfg = self.cfg
        out = Path(cfg.train.export_dir or self.run_dir / "export")
        gathered = {n: E.gathered_state_dict(e) for n, e in self.engines.items()}
        if E.is_rank0():
            from ..models import from_pretrained

            target, head = from_pretrained(cfg.train.teacher, cfg)
            if "target" in gathered:
                target.load_state_dict(_strip(gathered["target"], target))
            draft, student = DraftAR(cfg.model), build_head(cfg, student=True)
            draft.load_state_dict(_strip(gathered["draft"], draft))
            student.load_state_dict(_strip(gathered["student"], student))
            save_pretrained(out, cfg, target, head, draft=draft, student=student, meta=meta)
        E.barrier()
        return out if E.is_rank0() else None

    def memory_estimate(self) -> dict:
        """DeepSpeed's ZeRO-3 model-state estimate per GPU for this run's networks (sized on the meta device)."""
        cfg, local = self.cfg, E.local_world_size()
        with torch.device("meta"):
            target = build_target(cfg)
            sizes = {"draft": DraftAR(cfg.model), "student": build_head(cfg, student=True), "fake": build_head(cfg)}
            if cfg.train.target_ar:
                sizes["target"] = target
            sizes["teacher"] = E.NetSize(*E.count_params(torch.nn.ModuleList([target, build_head(cfg)])),
                                         trainable=False, group_size=self.teacher.group_size)
        est = E.estimate_memory(sizes, local, max(1, self.world // local))
        return {k: (v if k == "total_gpu_bytes" else v["gpu_bytes"]) for k, v in est.items()}

    # -- the loop -------------------------------------------------------------------------------------------------
    def _inputs(self, batch):
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        return ids, mask, image_tokens(batch, self.cfg.data.kind, self.image, self.cfg.model.image, self.device)

    def fit(self, loader, t_start: float, on_sample=None) -> dict:
        cfg, t = self.cfg, self.cfg.train
        logger = self.logger_factory(self.run_id)
        self.run_id = logger.run_id
        log_path = self.run_dir / "metrics.jsonl"
        first_step_s, t0, samples0, step0 = None, time.time(), self.consumed, self.step
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=self.step, desc="fast-ardiff", disable=self.rank != 0, dynamic_ncols=True)
        while self.step < t.steps:
            for batch in loader:
                ids, mask, tokens = self._inputs(batch)
                metrics = self.step_fn(ids, mask, tokens, self.step, self.gen)
                self.step += 1
                self.consumed += ids.shape[0] * self.world
                first_step_s = first_step_s or time.time() - t_start
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == 1:
                    layer = (cfg.model.ar.num_layers - 2) % cfg.model.ar.num_layers  # target's penultimate layer
                    metrics["_target_entropy"] = self.teacher("entropy", ids, mask, tokens, layer)
                    self._log(metrics, logger, log_path, t0, samples0, first_step_s)
                if self.step % t.save_every == 0 or self.step == t.steps:
                    self.save(loader)
                if on_sample is not None and t.sample_every and self.step % t.sample_every == 0:
                    on_sample(self, logger, self.export({"step": self.step, "tau": None}))
                if self.step >= t.steps:
                    break
        bar.close()
        throughput = self._throughput(time.time() - t0, self.consumed - samples0, self.step - step0)
        tau = self.measure_tau(loader)
        meta = {**tau, "step": self.step, "stage": stage_of(cfg, self.step), "teacher": cfg.train.teacher}
        export = self.export(meta)
        if on_sample is not None:
            on_sample(self, logger, export)
        logger.log({"tau": tau["tau"]}, step=self.step)
        logger.finish()
        return {"tau": tau, "export": str(export) if export else None, "first_step_s": first_step_s, **throughput}

    def _throughput(self, seconds: float, samples: int, steps: int) -> dict:
        """Steps/s and samples/s of this fit call, and every rank's peak resident memory (gathered)."""
        peak = E.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return {"steps_per_s": steps / max(seconds, 1e-9), "samples_per_s": samples / max(seconds, 1e-9),
                "peak_rss_mib_per_rank": peak}

    def _log(self, metrics, logger, log_path, t0, samples0, first_step_s):
        ents, target_ents = metrics.pop("_draft_entropy"), metrics.pop("_target_entropy").reshape(-1)
        metrics.update({"entropy/target_mean": float(target_ents.mean()), "entropy/draft_mean": float(ents.mean())})
        row = {k: v for k, v in metrics.items()}
        row.update(step=self.step, consumed_samples=self.consumed,
                   samples_per_s=(self.consumed - samples0) / max(time.time() - t0, 1e-9),
                   peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   time_to_first_step_s=first_step_s)
        for name, e in self.engines.items():
            row[f"lr/{name}"] = e.lr
            row[f"grad_norm/{name}"] = e.grad_norm
        if self.rank == 0:
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            logger.log(row, step=self.step)
            logger.histogram("entropy/draft", ents.cpu().numpy(), step=self.step)
            logger.histogram("entropy/target", target_ents.cpu().numpy(), step=self.step)
