"""NextStep-shaped networks with random weights, timed on this project's kernels; a cost model beside each row.

    python launcher/bench_scale.py --device cpu --scale 0.05 --json runs/scale_cpu.json       # CPU, minutes
    python launcher/bench_scale.py --shape nextstep-1.1 --exec eager cudagraphs --tokens 256 --json $OUT/s.json
    python launcher/bench_scale.py --cpu-dry-run --json /tmp/dry.json                         # seconds

Builds the target, an EAGLE-style draft at 1/8 depth and the teacher / student flow heads (fastardiff_ds/scalebench,
no weight files), times per-call costs (target decode at CFG batch 2, verify of k = 1..8, draft decode, head calls)
and per-image rows: baseline (the preset's head steps), dmd (4 steps) and fastardiff replayed at forced acceptances.
Writes one JSON (keys: shape, scale, device, per_call_ms, rows with measured and modelled s/image, max_model_error,
break_even_acceptance); see docs/results/scale.md.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from fastardiff_ds.scalebench.flows import EXECS
from fastardiff_ds.scalebench.run import ACCEPTANCES, BenchArgs, run_bench
from fastardiff_ds.scalebench.shapes import SHAPES


def parse(argv=None) -> BenchArgs:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="nextstep-1.1")
    p.add_argument("--scale", type=float, default=1.0, help="width and depth factor in (0, 1] (recorded)")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--exec", nargs="+", choices=EXECS, default=None, dest="executions",
                   help="eager, compiled (sampling/compiled.py), cudagraphs (its CUDA-graph mode); default: eager "
                        "on CPU, eager cudagraphs on CUDA")
    p.add_argument("--accept", nargs="+", type=float, default=None, help=f"forced acceptances (default {ACCEPTANCES})")
    p.add_argument("--tokens", type=int, default=None, help="time a prefix of this many of the 1024 image tokens "
                   "and extrapolate (said in the JSON)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gamma", type=int, default=None, help="drafts per round (default: the preset's)")
    p.add_argument("--reps", type=int, default=10, help="repetitions per per-call timing (their mean)")
    p.add_argument("--repeats", type=int, default=1, help="images per row (their mean)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="CPU, the smallest valid scale, 64 tokens, 2 acceptances (unless given): the whole path in seconds")
    p.add_argument("--shared-machine", action="store_true", help="record that other jobs shared the machine")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args = BenchArgs(a.shape, a.scale, dev, tuple(a.executions or (("eager", "cudagraphs") if dev == "cuda"
                                                                   else ("eager",))),
                     tuple(a.accept or ACCEPTANCES), a.tokens, a.prompt_len, a.gamma, reps=a.reps, repeats=a.repeats, json=a.json,
                     notes={"threads": a.threads, "shared_machine": a.shared_machine})
    if a.cpu_dry_run:
        args.device, args.tokens, args.executions = "cpu", a.tokens or 64, ("eager",)
        args.scale = a.scale if a.scale != 1.0 else 0.025  # an explicit --scale is kept
        args.acceptances, args.reps, args.prompt_len = tuple(a.accept or (0.4, 0.95)), 2, 16
        args.notes["cpu_dry_run"] = True
    torch.set_num_threads(a.threads)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    try:
        out = run_bench(args)
    except (ValueError, MemoryError) as e:  # a bad shape or scale, or a shape the device cannot hold
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = out["rows"]
    print(json.dumps({k: out[k] for k in ("shape", "scale", "max_model_error", "break_even_acceptance")}))
    for name, r in rows.items():
        print(f"{name:28s} measured {r['measured_s_per_image']:9.3f} s  modelled {r['modelled_s_per_image']:9.3f} s"
              f"  error {100 * r['model_error']:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
