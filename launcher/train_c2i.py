"""The class-conditional (MAR) main job: distil the teacher MAR's DiffLoss head into a few-step student by DMD on
DeepSpeed (student and fake-score engines, ZeRO-3 by default; the frozen teacher beside them).

    python launcher/train_c2i.py run_dir=runs/mar_dmd                                   # tiny default, bundled teacher
    deepspeed --num_gpus 2 launcher/train_c2i.py --ds_config ds_configs/zero3.json run_dir=runs/mar_dmd
    python launcher/train_c2i.py distill.teacher=runs/mar_tiny/checkpoint distill.student_steps=2 ...
    ... --resume auto                                                                   # continue (the default)

Without shards at `data.shards`, the mar-tiny preset writes the class-labelled shapes set there first. The teacher is
`distill.teacher` (default the bundled assets/tiny_mar, a launcher/pretrain_c2i.py export). Writes run_dir/export
(the teacher's config.json + model.safetensors + student_head.safetensors + meta.json; `launcher/generate.py --ckpt
run_dir/export --class-label N --mode dmd` samples it), run_dir/checkpoints (resumable), metrics.jsonl.
Not in this job yet (issue 28): the draft MAR, the alpha-annealed joint loss and speculative decoding over MAR steps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T_START = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import claim_run_dir  # noqa: E402
from pretrain_c2i import ensure_c2i_shapes  # noqa: E402
from fastardiff_ds.cli import add_c2i_args, c2i_config_from_args  # noqa: E402
from fastardiff_ds.config import save_config, to_dict  # noqa: E402
from fastardiff_ds.data.loader import build_loader  # noqa: E402
from fastardiff_ds.engines import Runtime  # noqa: E402
from fastardiff_ds.logging import make_logger  # noqa: E402
from fastardiff_ds.models import resolve_asset  # noqa: E402
from fastardiff_ds.models.image_tokenizers import build_c2i_tokenizer  # noqa: E402
from fastardiff_ds.training.mar_distill import mar_distill_trainer  # noqa: E402
from fastardiff_ds.training.preemption import PREEMPTED_EXIT_CODE, PreemptionWatcher  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_c2i_args(p, "distill", "distill.steps=100 distill.student_steps=2")
    args = p.parse_args(argv)
    cfg = c2i_config_from_args(args)
    if args.ds_config:
        cfg.distill.ds_config = args.ds_config
    cfg.distill.teacher = resolve_asset(cfg.distill.teacher)
    if args.threads:
        torch.set_num_threads(args.threads)
    preemption = PreemptionWatcher(cfg.distill.preempt_grace_s).install()
    with Runtime.start() as rt:
        claim_run_dir(cfg, rt)
        if rt.is_rank0:
            ensure_c2i_shapes(cfg)
            save_config(cfg, Path(cfg.run_dir) / "config.json")
        rt.barrier()
        tokenizer = build_c2i_tokenizer(cfg, rt.device)
        try:
            trainer = mar_distill_trainer(rt, cfg, tokenizer, lambda run_id: make_logger(
                cfg.wandb, cfg.run_dir, {"preset": cfg.preset, **to_dict(cfg)}, rt.rank, run_id, name="mar-dmd"))
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
        loader = build_loader(cfg.data, rank=rt.rank, world_size=rt.world_size, pad_id=0, tokenize=lambda s: [])
        resumed = trainer.resume("none" if args.resume == "never" else args.resume, loader)
        if rt.is_rank0:
            print(json.dumps({"resumed_at_step" if resumed else "fresh_run": trainer.step, "world_size": rt.world_size}))
        summary = trainer.fit(loader, T_START, preemption=preemption)
        if rt.is_rank0:
            print(json.dumps(summary))
    if summary.get("preempted"):
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
