"""Helpers shared by the launchers (kept out of the library: they touch files and the console)."""
from __future__ import annotations

import json
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
    summary = write_shapes_dataset(str(path), num_samples, shard_size=2000, resolution=64, seed=cfg.seed)
    print(json.dumps(summary))


SAMPLE_PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of a green triangle",
                  "a photo of a yellow diamond", "a photo of three circles", "a photo of two squares",
                  "a photo of a circle above a diamond", "a photo of a red triangle and a yellow square"]


def sample_grid_callback(cfg: Config, trainer, text, image, logger, prompts=SAMPLE_PROMPTS):
    """A callback(step) that samples the current teacher (baseline mode) and writes samples/step_XXXXXX.png."""
    from fastardiff_ds.inference import Pipeline
    from fastardiff_ds.models import ModelBundle
    from fastardiff_ds.visual import make_grid

    out = Path(cfg.run_dir) / "samples"

    def callback(step: int) -> None:
        trainer.target.eval()
        trainer.head.eval()
        try:
            bundle = ModelBundle(cfg, trainer.target, trainer.head)
            pipe = Pipeline(bundle, "baseline", trainer.device)
            images = pipe.generate(prompts, list(range(len(prompts))))
        finally:
            trainer.target.train()
            trainer.head.train()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step_{step:06d}.png"
        make_grid(images, prompts, cols=4, scale=4, caption_height=12).save(path)
        logger.image("samples", path, step=step)

    return callback


def joint_sample_callback(cfg: Config, prompts=SAMPLE_PROMPTS):
    """callback(trainer, logger, export_dir): rank 0 samples the exported checkpoint in `fastardiff` mode (the
    student + draft + target verification) and writes samples/step_XXXXXX.png; the other ranks wait."""
    from fastardiff_ds import engines as E
    from fastardiff_ds.visual import make_grid

    def callback(trainer, logger, export_dir) -> None:
        if E.is_rank0() and export_dir is not None:
            from fastardiff_ds.inference import load_pipeline

            pipe = load_pipeline(str(export_dir), mode="fastardiff", device=str(E.device()))
            images = pipe.generate(prompts, list(range(len(prompts))))
            out = Path(cfg.run_dir) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"step_{trainer.step:06d}.png"
            make_grid(images, prompts, cols=4, scale=4, caption_height=12).save(path)
            logger.image("samples/fastardiff", path, step=trainer.step)
        E.barrier()

    return callback
