"""Fast-ARDiff joint training on DeepSpeed (the main job).

    deepspeed launcher/train_t2i.py --ds_config ds_configs/zero3.json                  # tiny preset, 2+ ranks
    deepspeed --num_gpus 8 launcher/train_t2i.py --ds_config ds_configs/zero3.json --preset nextstep-1.1 \
        train.teacher=/weights/NextStep-1.1 data.shards=/data/cc3m/{00000..00331}.tar run_dir=runs/ns1
    ... --resume auto                                                                  # continue the same run

Trains draft AR (L_reg + L_ent), student head (CD then DMD) and optionally the target AR under the annealed
alpha(t) loss, against a frozen teacher on its own process group. Writes run_dir/checkpoints (every engine,
atomic `latest`), run_dir/export (inference checkpoint with tau), metrics.jsonl and samples/.

Preemption: on SIGTERM or SIGUSR1 (slurm: `--signal=USR1@120`) every rank stops at the next optimizer step, saves
a checkpoint (within train.preempt_grace_s, default 30 s, or a warning says why not) and the job exits with code
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

from _common import prepare_run, sample_callback  # noqa: E402
from fastardiff_ds.cli import add_config_args, config_from_args  # noqa: E402
from fastardiff_ds.config import to_dict  # noqa: E402
from fastardiff_ds.data.loader import build_loader  # noqa: E402
from fastardiff_ds.engines import Runtime  # noqa: E402
from fastardiff_ds.logging import make_logger  # noqa: E402
from fastardiff_ds.training.preemption import PREEMPTED_EXIT_CODE, PreemptionWatcher  # noqa: E402
from fastardiff_ds.training.trainer import joint_trainer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--ds_config", default=None, help="DeepSpeed engine knobs (default: train.ds_config)")
    p.add_argument("--resume", default="auto", help="auto (latest if any) | none | a checkpoint tag or path")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    cfg = config_from_args(args, adopt_teacher=True)  # the model is the train.teacher folder's
    if args.ds_config:
        cfg.train.ds_config = args.ds_config
    preemption = PreemptionWatcher(cfg.train.preempt_grace_s).install()  # before anything slow: setup counts
    with Runtime.start() as rt:
        text, image = prepare_run(cfg, rt)
        grid = cfg.model.image.grid
        trainer = joint_trainer(rt, cfg, text, image, lambda run_id: make_logger(
            cfg.wandb, cfg.run_dir, to_dict(cfg), rt.rank, run_id, name=Path(cfg.run_dir).name))
        loader = build_loader(cfg.data, rank=rt.rank, world_size=rt.world_size, pad_id=text.pad_id,
                              tokenize=lambda s: text.prompt_ids(s, grid, strict=False))
        resumed = trainer.resume(args.resume, loader)
        report = trainer.task.partition_report()
        if rt.is_rank0:
            print(json.dumps({"resumed_at_step" if resumed else "fresh_run": trainer.step, "partitions": report}))
            print(json.dumps({"deepspeed_memory_estimate_bytes_per_gpu": trainer.task.memory_estimate()}))
        summary = trainer.fit(loader, T_START, on_sample=sample_callback(cfg, rt, "fastardiff"), preemption=preemption)
        if rt.is_rank0:
            print(json.dumps(summary))
    if summary.get("preempted"):
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
