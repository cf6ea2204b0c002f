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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from pretrain_c2i import run_c2i_job  # noqa: E402
from fastardiff_ds.cli import add_c2i_args, c2i_config_from_args  # noqa: E402
from fastardiff_ds.models import resolve_asset  # noqa: E402
from fastardiff_ds.training.mar_distill import mar_distill_trainer  # noqa: E402


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
    run_c2i_job(cfg, args, lambda rt, tok, logs: mar_distill_trainer(rt, cfg, tok, logs), "mar-dmd",
                cfg.distill.preempt_grace_s)


if __name__ == "__main__":
    main()
