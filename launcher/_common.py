"""Helpers shared by the launchers (kept out of the library: they touch files and the console).

`prepare_run` first claims the run dir, before any data, model or engine exists: every rank checks that it can
write there (a read-only run_dir otherwise fails at the first checkpoint, maybe hours in), and rank 0 takes the
one-job-per-run_dir lock (fastardiff_ds/engines/run_lock.py). The verdicts are gathered, so every rank stops
with the same one-line error and none waits in a barrier for a rank that already left.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path

from fastardiff_ds.config import Config

DEFAULT_SHAPES_SAMPLES = 60000


def ensure_shapes_data(cfg: Config, num_samples: int = DEFAULT_SHAPES_SAMPLES) -> None:
    """The tiny preset trains on the synthetic shapes set; generate it at `data.shards` if that folder is empty."""
    path = Path(cfg.data.shards)
    if cfg.data.kind == "latents":  # latent shards come from data_pipelines/encode_latents.py, never generated here
        return
    if not cfg.preset.startswith("tiny") or any(ch in cfg.data.shards for ch in "{*") or path.suffix in (".tar", ".txt"):
        return
    if path.is_dir() and any(path.glob("*.tar")):
        return
    from fastardiff_ds.data.synthetic import write_shapes_dataset

    print(f"no shards at '{path}': writing the synthetic shapes set ({num_samples} samples) there first")
    summary = write_shapes_dataset(str(path), num_samples, shard_size=2000, resolution=64, seed=cfg.seed,
                                   workers=min(8, os.cpu_count() or 1))
    print(json.dumps(summary))


SAMPLE_PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of a green triangle",
                  "a photo of a yellow diamond", "a photo of three circles", "a photo of two squares",
                  "a photo of a circle above a diamond", "a photo of a red triangle and a yellow square"]


def writable_problem(folder: str | Path, setting: str) -> str | None:
    """None if `folder` can be created and written (a file created and removed there), else one line naming
    `setting` and the fix."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe."):
            pass
    except OSError as e:
        return (f"{setting} {folder} is not writable ({e.strerror or e}): pick a writable folder with "
                f"{setting}=PATH (or fix its permissions / remount it read-write)")
    return None


def claim_run_dir(cfg: Config, rt):
    """Every rank: run_dir is writable; rank 0: takes the run_dir lock. Raises SystemExit with one line on every
    rank when any rank failed; returns the lock (rank 0) or None."""
    from fastardiff_ds.engines.run_lock import RunDirLocked, RunLock

    problem, lock = writable_problem(cfg.run_dir, "run_dir"), None
    if problem is None and rt.is_rank0:
        try:
            lock = RunLock(cfg.run_dir).acquire()
        except (RunDirLocked, OSError) as e:
            problem = str(e)
    verdicts = rt.all_gather_object(problem and f"{problem} [rank {rt.rank} on {socket.gethostname()}]")
    failed = [v for v in verdicts if v]
    if failed:
        if lock is not None:
            lock.release()
        raise SystemExit(f"error: {failed[0]}")
    return lock


def prepare_run(cfg: Config, rt):
    """Claim run_dir (writable, not in use); rank 0 writes the data (tiny presets) and the resolved config; then
    every rank builds the tokenizers."""
    from fastardiff_ds.cli import text_and_image_tokenizers
    from fastardiff_ds.config import save_config

    claim_run_dir(cfg, rt)
    if rt.is_rank0:
        ensure_shapes_data(cfg)
        save_config(cfg, Path(cfg.run_dir) / "config.json")
    rt.barrier()
    return text_and_image_tokenizers(cfg, rt.device)


def sample_callback(cfg: Config, rt, mode: str, prompts=SAMPLE_PROMPTS):
    """callback(trainer, logger, export_dir): rank 0 samples the exported checkpoint in `mode` (pretraining:
    `baseline`, from the EMA weights; the joint run: `fastardiff`) into samples/step_XXXXXX.png; others wait."""
    from fastardiff_ds.visual import make_grid

    def callback(trainer, logger, export_dir) -> None:
        if rt.is_rank0 and export_dir is not None:
            from fastardiff_ds.inference import load_pipeline

            pipe = load_pipeline(str(export_dir), mode=mode, device=str(rt.device))
            images = pipe.generate(prompts, list(range(len(prompts))))
            out = Path(cfg.run_dir) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"step_{trainer.step:06d}.png"
            make_grid(images, prompts, cols=4, scale=4, caption_height=12).save(path)
            logger.image(f"samples/{mode}", path, step=trainer.step)
        rt.barrier()

    return callback
