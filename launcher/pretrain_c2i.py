"""Pretrain a class-conditional MAR (the MAR row's teacher) on DeepSpeed: MAR's masked-token DiffLoss training.

    python launcher/pretrain_c2i.py run_dir=runs/mar_tiny                         # the tiny default, one process
    deepspeed --num_gpus 2 launcher/pretrain_c2i.py --ds_config ds_configs/zero3.json run_dir=runs/mar_tiny
    python launcher/pretrain_c2i.py --preset mar-large data.shards=/data/imagenet/{00000..01023}.tar \
        image.vae_path=pretrained_models/vae/kl16.ckpt                           # ImageNet 256 px, KL-16 tokens
    ... --resume auto                                                            # continue (the default)
    python launcher/pretrain_c2i.py pretrain.init=assets/tiny_mar run_dir=runs/mar_tiny2   # continue the bundled one

Data: webdataset shards with a class label per sample (`KEY.cls`, or an integer "label" in `KEY.json`). Without
shards at `data.shards`, the mar-tiny preset writes the class-labelled shapes set there first (one object an image,
40 classes = 4 shapes x 10 colours). Writes run_dir/checkpoint (config.json + model.safetensors = the EMA weights,
official MAR key names; `launcher/generate.py --ckpt ... --class-label N` samples it), run_dir/checkpoints
(resumable), metrics.jsonl and samples/ (a class grid). Preemption and exit code 75 as launcher/pretrain_t2i.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

T_START = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import claim_run_dir  # noqa: E402
from fastardiff_ds.cli import add_c2i_args, c2i_config_from_args  # noqa: E402
from fastardiff_ds.config import save_config, to_dict  # noqa: E402
from fastardiff_ds.data.loader import build_loader  # noqa: E402
from fastardiff_ds.engines import Runtime  # noqa: E402
from fastardiff_ds.logging import make_logger  # noqa: E402
from fastardiff_ds.models.c2i_tokenizer import build_c2i_tokenizer  # noqa: E402
from fastardiff_ds.training.mar_pretrain import mar_pretrain_trainer  # noqa: E402
from fastardiff_ds.training.preemption import PREEMPTED_EXIT_CODE, PreemptionWatcher  # noqa: E402

C2I_SHAPES_SAMPLES = 20000


def ensure_c2i_shapes(cfg, num_samples: int = C2I_SHAPES_SAMPLES) -> None:
    """mar-tiny trains on the class-labelled shapes set: write it at `data.shards` if that folder is empty."""
    path = Path(cfg.data.shards)
    if cfg.preset != "mar-tiny" or any(ch in cfg.data.shards for ch in "{*") or path.suffix in (".tar", ".txt"):
        return
    if path.is_dir() and any(path.glob("*.tar")):
        return
    from fastardiff_ds.data.synthetic import write_shapes_dataset

    print(f"no shards at '{path}': writing the class-labelled shapes set ({num_samples} samples) there first")
    print(json.dumps(write_shapes_dataset(str(path), num_samples, shard_size=2000, resolution=64, seed=cfg.seed,
                                          workers=min(8, os.cpu_count() or 1), task="single_object")))


def run_c2i_job(cfg, args, make_trainer, name: str, grace_s: float, on_sample=None) -> None:
    """The class-conditional launchers' body: claim run_dir, write the data (mar-tiny) and the config, build the
    tokenizer, the trainer (`make_trainer(rt, tokenizer, logger_factory)`; a missing / mismatched checkpoint exits
    with its message) and the loader, resume, fit; preemption exits 75."""
    preemption = PreemptionWatcher(grace_s).install()
    with Runtime.start() as rt:
        claim_run_dir(cfg, rt)
        if rt.is_rank0:
            ensure_c2i_shapes(cfg)
            save_config(cfg, Path(cfg.run_dir) / "config.json")
        rt.barrier()
        tokenizer = build_c2i_tokenizer(cfg, rt.device)
        try:
            trainer = make_trainer(rt, tokenizer, lambda run_id: make_logger(
                cfg.wandb, cfg.run_dir, {"preset": cfg.preset, **to_dict(cfg)}, rt.rank, run_id, name=name))
        except (FileNotFoundError, ValueError) as e:  # the teacher / pretrain.init: missing or another architecture
            raise SystemExit(f"error: {e}") from None
        loader = build_loader(cfg.data, rank=rt.rank, world_size=rt.world_size, pad_id=0, tokenize=lambda s: [])
        resumed = trainer.resume("none" if args.resume == "never" else args.resume, loader)
        if rt.is_rank0:
            print(json.dumps({"resumed_at_step" if resumed else "fresh_run": trainer.step, "world_size": rt.world_size}))
        summary = trainer.fit(loader, T_START, on_sample=on_sample(rt) if on_sample else None, preemption=preemption)
        if rt.is_rank0:
            print(json.dumps(summary))
    if summary.get("preempted"):
        sys.exit(PREEMPTED_EXIT_CODE)


def sample_callback(cfg, rt, labels=tuple(range(0, 40, 5)), seeds=(0, 1)):
    """Rank 0 samples the exported checkpoint: one row per seed, one column per class, into samples/."""
    from fastardiff_ds.inference_c2i import MARPipeline
    from fastardiff_ds.visual import make_grid

    def callback(trainer, logger, export_dir) -> None:
        if rt.is_rank0 and export_dir is not None:
            pipe, images, names = MARPipeline.from_pretrained(export_dir, str(rt.device)), [], []
            for seed in seeds:
                images += pipe.generate(list(labels), seed=seed)
                names += [f"class {c}" for c in labels]
            out = Path(cfg.run_dir) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"step_{trainer.step:06d}.png"
            make_grid(images, names, cols=len(labels), scale=4, caption_height=12).save(path)
            logger.image("samples/mar", path, step=trainer.step)
        rt.barrier()

    return callback


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_c2i_args(p, "pretrain", "pretrain.steps=100 model.enc_depth=4")
    args = p.parse_args(argv)
    cfg = c2i_config_from_args(args)
    if args.ds_config:
        cfg.pretrain.ds_config = args.ds_config
    if args.threads:
        torch.set_num_threads(args.threads)
    run_c2i_job(cfg, args, lambda rt, tok, logs: mar_pretrain_trainer(rt, cfg, tok, logs), "mar-pretrain",
                cfg.pretrain.preempt_grace_s, lambda rt: sample_callback(cfg, rt))


if __name__ == "__main__":
    main()
