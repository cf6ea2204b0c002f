"""Where the few-step student leaves its teacher, teacher-forced on the teacher's samples (analysis/student_gap.py).

    python launcher/student_gap.py --ckpt assets/tiny_teacher --num-prompts 16 --json runs/gap/shipped.json

Prints, per student step j (time t_j): the squared distance per dimension between the student's jump from its own
state and the teacher's guided ODE run from that state (and the same for one teacher Euler jump, the reference);
then, over R draws per condition, the distance between the student's and the teacher's conditional means (per
dimension, and relative to the teacher's conditional variance, per image row) and their variance ratio.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastardiff_ds.analysis.student_gap import chain_gap
from fastardiff_ds.cli import add_vae_arg, vae_overrides
from fastardiff_ds.data.shapes import prompt_seeds
from fastardiff_ds.inference import load_pipeline


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="inference checkpoint with a student head (student_head.safetensors)")
    p.add_argument("--preset", default=None, help="only for checkpoints without config.json")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--ode-steps", type=int, default=64, help="teacher Euler steps over [0, 1] for the reference")
    p.add_argument("--draws", type=int, default=8, help="chains per condition for the distribution comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    add_vae_arg(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. inference.student_steps=2")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    overrides = [*vae_overrides(a.vae), *a.overrides]
    try:
        pipe = load_pipeline(a.ckpt, a.preset, "dmd", overrides)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"student_gap: {e}") from None
    prompts, seeds = prompt_seeds(a.num_prompts, a.seed)
    teacher = pipe.teacher_flow(pipe.bundle.target)
    student = pipe.student_flow(pipe.bundle.target)
    ids, mask = pipe.prompt_batch(prompts, teacher.cfg.batch_mult == 2)
    pipe.mode = "baseline"  # the teacher's own samples: in-distribution prefixes
    tokens = pipe.generate_tokens(prompts, seeds).tokens
    gap = chain_gap(teacher, student, ids, mask, tokens, pipe.bundle.cfg.model.image.grid, a.ode_steps, a.draws,
                    a.seed)
    print(f"{'step':>4} {'t':>6} {'gap student':>12} {'gap teacher Euler':>18} {'gap / teacher var':>18}")
    for j, t in enumerate(gap.t_grid):
        print(f"{j:4d} {t:6.3f} {gap.gap[j]:12.5f} {gap.gap_euler_teacher[j]:18.5f} {gap.gap_vs_var[j]:18.3f}")
    print(f"conditional means: dist {gap.mean_dist:.5f} per dim (teacher's conditional variance {gap.teacher_var:.5f}); "
          f"variance ratio student / teacher {gap.var_ratio:.3f}")
    print("mean distance / teacher variance per image row: " + " ".join(f"{v:.3f}" for v in gap.mean_dist_by_row))
    out = {"ckpt": a.ckpt, "num_prompts": len(prompts), "ode_steps": a.ode_steps, "seed": a.seed,
           "cfg_scale": pipe.inf.cfg_scale, "teacher_sampler": f"{teacher.sampler.kind} {teacher.sampler.steps}",
           **gap.as_dict()}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
