"""One stateful training loop for every stage: stage-0 pretraining and the joint CD -> DMD run.

A *task* (training/pretrain.py `PretrainTask`, training/trainer.py `JointTask`) supplies the networks and one
step function per stage; the `Trainer` owns the state, the order of events and the checkpoint:

    for batch in loader:                                   # Trainer.fit, the same on every rank
        inputs  = task.inputs(batch)                       # device tensors (ids, mask, image tokens)
        metrics = task.step_fns[task.stage_of(step)](inputs, step, gen)   # pretrain | cd | dmd
        step += 1; log, save, sample -- decided by the step number only, so every rank agrees
    task.finish(loader) -> meta (e.g. tau, Eq. 10);  task.export(meta) -> inference checkpoint

Checkpoint (one format, written by `Runtime.save_checkpoint` -> engines/checkpoint.py), named state:
    <name>/           every engine: weights, optimizer, lr schedule (DeepSpeed)
    modules/<name>    gathered frozen modules (the EMA)
    client/rank_k.pt  {"train": TrainState, "stage", "loader": the data cursor, "generator": the step RNG}
                      + this rank's python/numpy/torch/CUDA RNG states
    config.json       the resolved config
Resume is exact (tests/distributed/test_pretrain.py, test_train_joint.py): same losses as the uninterrupted run.

Preemption (training/preemption.py): with a `PreemptionWatcher` passed to `fit`, a SIGTERM / SIGUSR1 on any rank
stops every rank at the same optimizer-step boundary (`any_rank`), which saves and returns `preempted: True` at
once: the tau measurement, export and sampling of a finished run are left to the resumed run.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from .preemption import PREEMPTED_EXIT_CODE, grace_warning, late_save_warning


@dataclass
class TrainState:
    """What the loop itself must restore: the counters and the W&B run id."""

    step: int = 0
    consumed_samples: int = 0  # over all ranks
    seconds: float = 0.0  # training wall time over every resume
    run_id: str | None = None


@dataclass
class LoopConfig:
    """The loop's cadence (from `cfg.pretrain` or `cfg.train`); every value counts optimizer steps."""

    steps: int
    log_every: int = 10
    save_every: int = 100
    sample_every: int = 0  # 0 = only at the end
    keep_last: int | None = 2
    max_minutes: float = 0.0  # > 0: save, export and stop after this much training time
    grad_accum: int = 1  # micro-batches per optimizer step; each is given the step index of its window


class Task(Protocol):
    """What a stage family gives the loop (see PretrainTask, JointTask)."""

    name: str
    engines: dict  # name -> Engine (checkpointed with optimizer and lr schedule)
    modules: dict  # name -> nn.Module / FrozenEngine (checkpointed as gathered weights: the EMA)
    step_fns: dict[str, Callable[[tuple, int, torch.Generator], dict]]

    def stage_of(self, step: int) -> str: ...
    def inputs(self, batch: dict) -> tuple: ...
    def log_metrics(self, metrics: dict, inputs: tuple) -> tuple[dict, dict]: ...  # (row, histograms); collective
    def finish(self, loader) -> dict: ...
    def export(self, meta: dict) -> Path | None: ...


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    """The loop over a `Task`. `logger_factory(run_id) -> logger` (W&B or its no-op twin), created in `fit`."""

    def __init__(self, rt, task: Task, loop: LoopConfig, *, run_dir: str | Path, config: dict, seed: int,
                 logger_factory: Callable):
        self.rt, self.task, self.loop = rt, task, loop
        self.run_dir, self.config, self.logger_factory = Path(run_dir), config, logger_factory
        self.state = TrainState()
        self.failed_saves = 0  # consecutive failed saves (see `save`)
        self.gen = torch.Generator().manual_seed(seed * 1000 + rt.rank)  # the step functions' noise, per rank

    @property
    def step(self) -> int:
        return self.state.step

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def client_state(self, loader) -> dict:
        return {"train": dataclasses.asdict(self.state), "stage": self.task.stage_of(self.state.step),
                "loader": loader.state_dict(), "generator": self.gen.get_state()}

    MAX_FAILED_SAVES = 3  # consecutive failed saves (a full disk) before the run stops

    def save(self, loader, final: bool = False) -> Path | None:
        """Save a checkpoint. A failed save (`CheckpointSaveError`, the same on every rank) keeps the previous
        checkpoint: training goes on with a warning and retries at the next `save_every`, so a disk that fills up
        for a while costs no progress; the last save of a run, or the `MAX_FAILED_SAVES`-th failure in a row,
        stops the run with the error (a full disk that stays full needs a person)."""
        from fastardiff_ds.engines.checkpoint import CheckpointSaveError

        try:
            ckpt = self.rt.save_checkpoint(self.run_dir / "checkpoints", self.state.step, self.task.engines,
                                           client_state=self.client_state(loader), config=self.config,
                                           modules=self.task.modules, keep_last=self.loop.keep_last)
        except CheckpointSaveError as e:
            self.failed_saves += 1
            if final or self.failed_saves >= self.MAX_FAILED_SAVES:
                raise SystemExit(f"error: {e} ({self.failed_saves} failed save(s) in a row; the run stops: "
                                 f"resume it with --resume auto once there is space)") from None
            self._warn(f"{e}. Training goes on; the next save at step {self.state.step + self.loop.save_every} "
                       f"retries (the run stops after {self.MAX_FAILED_SAVES} failed saves in a row)")
            return None
        self.failed_saves = 0
        return ckpt

    def resume(self, resume: str | None, loader) -> bool:
        """Load `resume` (auto | none | tag | path) into the freshly built task; False when starting fresh."""
        try:  # a damaged checkpoint, or one saved by a run with other networks: one line naming it and the fix
            ckpt = self.rt.resolve_resume(self.run_dir / "checkpoints", resume)
            if ckpt is None:
                return False
            client = self.rt.load_checkpoint(ckpt, self.task.engines, modules=self.task.modules)
        except (FileNotFoundError, KeyError) as e:
            raise SystemExit(f"error: cannot resume {self.run_dir}: {e.args[0] if e.args else e}") from None
        self.state = TrainState(**client["train"])
        peers = client.get("peers")  # every saved rank's client state, when the world size changed
        if peers is None:
            loader.load_state_dict(client["loader"])
        else:
            loader.resume_from([p["loader"] for p in peers])  # the epoch continues on the new ranks
        if peers is None or self.rt.rank < len(peers):  # a new rank keeps its own freshly seeded noise stream
            self.gen.set_state(client["generator"])
        return True

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self, loader, t_start: float | None = None, on_sample=None, preemption=None) -> dict:
        """Train to `loop.steps` (or `max_minutes`), then finish and export. `on_sample(trainer, logger, export)`
        runs at `sample_every` and at the end; it is called on every rank. `preemption` (a PreemptionWatcher):
        stop, save and return `preempted: True` at the first optimizer step after a signal on any rank."""
        loop, st = self.loop, self.state
        logger = self.logger_factory(st.run_id)
        st.run_id = getattr(logger, "run_id", None)
        t0, samples0, step0, seconds0 = time.time(), st.consumed_samples, st.step, st.seconds
        first_step_s, t_step, grace_checked = None, time.time(), False
        from tqdm import tqdm

        bar = tqdm(total=loop.steps, initial=st.step, desc=self.task.name, disable=not self.rt.is_rank0,
                   dynamic_ncols=True)
        done, micro = st.step >= loop.steps, 0
        while not done:
            for batch in loader:
                inputs = self.task.inputs(batch)
                # every micro-batch of an accumulation window sees the same optimizer-step index (alpha, stage)
                metrics = self.task.step_fns[self.task.stage_of(st.step)](inputs, st.step, self.gen)
                st.consumed_samples += inputs[0].shape[0] * self.rt.world_size
                micro += 1
                if micro < loop.grad_accum:
                    continue
                micro = 0
                st.step += 1
                st.seconds, step_s = seconds0 + time.time() - t0, time.time() - t_step
                first_step_s = first_step_s or time.time() - (t_start or t0)
                bar.update(1)
                out_of_time = loop.max_minutes > 0 and self.rt.any_rank(st.seconds > loop.max_minutes * 60)
                preempted = preemption is not None and self.rt.any_rank(preemption.requested)
                done = st.step >= loop.steps or out_of_time or preempted
                if st.step % loop.log_every == 0 or st.step == 1:
                    self._log(metrics, inputs, logger, bar, (t0, samples0, first_step_s))
                if st.step % loop.save_every == 0 or done:
                    t_save = time.time()
                    ckpt = self.save(loader, final=done)
                    step_save_s = (step_s, time.time() - t_save)
                    if preempted:
                        bar.close()
                        return self._preempted(logger, preemption, ckpt, step_save_s, (t0, samples0, step0),
                                               first_step_s)
                    if preemption is not None and not grace_checked:  # once: a step and a save are measured
                        self._warn(grace_warning(preemption.grace_s, *step_save_s))
                        grace_checked = True
                if on_sample is not None and loop.sample_every and st.step % loop.sample_every == 0 and not done:
                    on_sample(self, logger, self.task.export({"step": st.step}))
                if done:
                    break
                t_step = time.time()
        bar.close()
        summary = self._throughput(time.time() - t0, st.consumed_samples - samples0, st.step - step0)
        meta = {**self.task.finish(loader), "step": st.step, "stage": self.task.stage_of(st.step)}
        export = self.task.export(meta)
        if on_sample is not None:
            on_sample(self, logger, export)
        logger.log({k: v for k, v in meta.items() if isinstance(v, (int, float))}, step=st.step)
        logger.finish()
        return {**summary, "meta": meta, "export": str(export) if export else None, "first_step_s": first_step_s,
                "step": st.step}

    def _preempted(self, logger, preemption, ckpt, step_save_s, start, first_step_s) -> dict:
        """After the preemption save: say where it stopped (and whether within the grace), close the logger."""
        st, (step_s, save_s), (t0, samples0, step0) = self.state, step_save_s, start
        since = self.rt.reduce_scalar(preemption.seconds_since_signal(), "max")  # the earliest signal of any rank
        self._warn(late_save_warning(preemption.grace_s, since, step_s, save_s))
        if self.rt.is_rank0:
            print(f"preempted ({preemption.signal_name if preemption.requested else 'a signal on another rank'}): "
                  f"stopped at step {st.step}, checkpoint {ckpt} complete {since:.1f}s after the signal (step "
                  f"{step_s:.1f}s, save {save_s:.1f}s); exit code {PREEMPTED_EXIT_CODE}; continue with --resume auto",
                  file=sys.stderr, flush=True)
        logger.log({"preempted_at_step": st.step}, step=st.step)
        logger.finish()
        summary = self._throughput(time.time() - t0, st.consumed_samples - samples0, st.step - step0)
        return {**summary, "preempted": True, "step": st.step, "checkpoint": str(ckpt),
                "signal_to_saved_s": since, "export": None, "first_step_s": first_step_s}

    def _warn(self, message: str | None) -> None:
        if message and self.rt.is_rank0:
            warnings.warn(message, stacklevel=2)

    def _throughput(self, seconds: float, samples: int, steps: int) -> dict:
        """Steps/s and samples/s of this fit call, and every rank's peak resident memory (gathered)."""
        return {"steps_per_s": steps / max(seconds, 1e-9), "samples_per_s": samples / max(seconds, 1e-9),
                "peak_rss_mib_per_rank": self.rt.all_gather_object(_peak_rss_mib())}

    def _log(self, metrics: dict, inputs: tuple, logger, bar, timing) -> None:
        t0, samples0, first_step_s = timing
        row, histograms = self.task.log_metrics(metrics, inputs)  # collective on every rank (e.g. the teacher)
        st = self.state
        row.update(step=st.step, consumed_samples=st.consumed_samples,
                   samples_per_s=(st.consumed_samples - samples0) / max(time.time() - t0, 1e-9),
                   peak_rss_mib=_peak_rss_mib(), time_to_first_step_s=first_step_s)
        for name, e in self.task.engines.items():
            row[f"lr/{name}"] = e.lr
            row[f"grad_norm/{name}"] = e.grad_norm
        if self.rt.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with (self.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            logger.log(row, step=st.step)
            for key, values in histograms.items():
                logger.histogram(key, values, step=st.step)
            key = getattr(self.task, "progress_key", None)
            if key in row:
                bar.set_postfix({key: f"{row[key]:.4f}"})
