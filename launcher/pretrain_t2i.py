"""Stage 0: pretrain a teacher (AR + flow head) with rectified flow on DeepSpeed, for presets without public weights.

    python launcher/pretrain_t2i.py --preset tiny run_dir=runs/tiny_teacher pretrain.steps=3000      # one process
    deepspeed --num_gpus 8 launcher/pretrain_t2i.py --preset tiny run_dir=runs/tiny_teacher          # 8 ranks
    ... --resume auto                                                                               # continue

Without shards at `data.shards`, the tiny preset generates the synthetic shapes set there first.
Writes run_dir/checkpoint (config.json + model.safetensors = the EMA weights, loadable by generate.py and as
train.teacher), run_dir/checkpoints (resumable: engine, optimizer, EMA, data cursor, RNG), metrics.jsonl, samples/.

Preemption: on SIGTERM or SIGUSR1 (slurm: `--signal=USR1@120`) every rank stops at the next optimizer step, saves
a checkpoint (within pretrain.preempt_grace_s, default 30 s, or a warning says why not) and the job exits with code
75 (EX_TEMPFAIL, `PREEMPTED_EXIT_CODE`): requeue it with `--resume auto`. Signal the ranks (srun: every task)
or the launcher's process group; see fastardiff_ds/training/preemption.py for the `deepspeed` launcher's part.
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

from _common import prepare_run, sample_callback  # noqa: E402
from fastardiff_ds.cli import add_config_args, config_from_args  # noqa: E402
from fastardiff_ds.config import to_dict  # noqa: E402
from fastardiff_ds.data.loader import build_loader  # noqa: E402
from fastardiff_ds.engines import Runtime  # noqa: E402
from fastardiff_ds.logging import make_logger  # noqa: E402
from fastardiff_ds.training.preemption import PREEMPTED_EXIT_CODE, PreemptionWatcher  # noqa: E402
from fastardiff_ds.training.pretrain import pretrain_trainer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--ds_config", default=None, help="DeepSpeed engine knobs (default: pretrain.ds_config)")
    p.add_argument("--resume", default="auto", help="auto (latest if any) | none | a checkpoint tag or path")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.ds_config:
        cfg.pretrain.ds_config = args.ds_config
    if args.threads:
        torch.set_num_threads(args.threads)
    preemption = PreemptionWatcher(cfg.pretrain.preempt_grace_s).install()  # before anything slow: setup counts
    with Runtime.start() as rt:
        text, image = prepare_run(cfg, rt)
        trainer = pretrain_trainer(rt, cfg, image, lambda run_id: make_logger(
            cfg.wandb, cfg.run_dir, {"preset": cfg.preset, **to_dict(cfg)}, rt.rank, run_id, name="pretrain"))
        grid = cfg.model.image.grid
        loader = build_loader(cfg.data, rank=rt.rank, world_size=rt.world_size, pad_id=text.pad_id,
                              tokenize=lambda s: text.prompt_ids(s, grid, strict=False))
        resumed = trainer.resume("none" if args.resume == "never" else args.resume, loader)
        if rt.is_rank0:
            print(json.dumps({"resumed_at_step" if resumed else "fresh_run": trainer.step, "world_size": rt.world_size}))
        summary = trainer.fit(loader, T_START, on_sample=sample_callback(cfg, rt, "baseline"), preemption=preemption)
        if rt.is_rank0:
            print(json.dumps(summary))
    if summary.get("preempted"):
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
