"""Acceptance vs draft-feature fidelity, teacher-forced on the target's own samples (fastardiff_ds/analysis/fidelity.py).

    python launcher/acceptance_study.py --ckpt runs/bench_joint/export --num-prompts 8 --head student \
        --mixes 0 0.5 0.8 0.9 0.95 0.99 1 --rules exact cspd --json runs/bench_joint/fidelity.json

For each mix lam the draft's condition is moved toward the target's, z = (1-lam) z_draft + lam z_target; the row
prints its cosine with z_target, the per-token acceptance alpha of each rule and the tokens a round of gamma drafts
commits. lam = 0 is the trained draft as it is; the table says what feature fidelity a given speedup needs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastardiff_ds.cli import add_vae_arg, vae_overrides
from fastardiff_ds.data.shapes import prompt_seeds
from fastardiff_ds.inference import load_pipeline
from fastardiff_ds.analysis.fidelity import acceptance_vs_fidelity


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="inference checkpoint with a draft (export of launcher/train_t2i.py)")
    p.add_argument("--preset", default=None, help="only for checkpoints without config.json")
    p.add_argument("--head", choices=("teacher", "student"), default="student",
                   help="teacher: the sd path (N-step SDE, two-pass CFG); student: the fastardiff path")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--mixes", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
    p.add_argument("--rules", nargs="+", choices=("exact", "cspd"), default=["exact", "cspd"])
    p.add_argument("--cspd-inner-temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    add_vae_arg(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. inference.student_final_std=0.3")
    a = p.parse_args(argv)
    a.overrides = [*vae_overrides(a.vae), *a.overrides]
    torch.set_num_threads(a.threads)
    mode = "dmd" if a.head == "student" else "baseline"
    pipe = load_pipeline(a.ckpt, a.preset, mode, a.overrides)
    if pipe.bundle.draft is None:
        raise SystemExit(f"{a.ckpt} has no draft AR (draft.safetensors): export one with launcher/train_t2i.py")
    prompts, seeds = prompt_seeds(a.num_prompts, a.seed)
    tokens = pipe.generate_tokens(prompts, seeds).tokens  # the target's own samples: in-distribution prefixes
    flow_of = pipe.student_flow if a.head == "student" else pipe.teacher_flow
    target, draft = flow_of(pipe.bundle.target), flow_of(pipe.bundle.draft)
    ids, mask = pipe.prompt_batch(prompts, target.cfg.batch_mult == 2)
    points = acceptance_vs_fidelity(target, draft, ids.to(tokens.device), mask.to(tokens.device), tokens, a.mixes,
                                    a.rules, a.cspd_inner_temperature, a.seed)
    gamma = pipe.bundle.cfg.inference.gamma
    rows = [{"mix": pt.mix, "cosine": pt.cosine, "rel_error": pt.rel_error, "alpha": pt.alpha,
             "tokens_per_round": pt.tokens_per_round(gamma)} for pt in points]
    print(f"{'mix':>5} {'cosine':>8} {'rel err':>8} " + " ".join(f"{'alpha ' + r:>12} {'tok/round':>9}" for r in a.rules))
    for r in rows:
        cols = " ".join(f"{r['alpha'][k]:12.4f} {r['tokens_per_round'][k]:9.2f}" for k in a.rules)
        print(f"{r['mix']:5.2f} {r['cosine']:8.4f} {r['rel_error']:8.4f} {cols}")
    inf = pipe.bundle.cfg.inference
    out = {"ckpt": a.ckpt, "head": a.head, "num_prompts": len(prompts), "tokens": int(tokens.shape[0] * tokens.shape[1]),
           "gamma": gamma, "student_final_std": inf.student_final_std, "noise_level": target.sampler.noise_level,
           "num_steps": inf.num_steps if a.head == "teacher" else inf.student_steps,
           "cspd_inner_temperature": a.cspd_inner_temperature, "points": rows}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
