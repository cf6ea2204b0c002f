"""The MAR row's latency: seconds per image of MAR's own sampler (baseline) and of the distilled few-step student
(dmd), eager and torch.compile'd, on the same classes and seeds in one run (ratios side by side).

    python launcher/bench_c2i.py --ckpt runs/mar_dmd/export --batch 8 --reps 3 --threads 1 --json R.json
    python launcher/bench_c2i.py --ckpt runs/mar_dmd/export --no-compile ...       # eager only

Modes are timed interleaved (round r runs every mode once) after one warm-up generation each (compilation happens
there). `--ckpt` is a launcher/train_c2i.py export (teacher + student). Sampling knobs are the export's
(config.json `sampling`) unless overridden (sampling.num_iter=... etc.). Not a quality measurement:
eval_suites/c2i_eval.py is.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastardiff_ds.inference_c2i import MARPipeline, parse_sampling_overrides  # noqa: E402


class CompiledMAR:
    """What mar_generate reads of a MAR (cfg, class_embedding, __call__, diffloss.net) with the trunk and the
    DiffLoss net torch.compile'd; the weights are the original module's."""

    def __init__(self, model):
        from types import SimpleNamespace

        self.cfg, self.class_embedding = model.cfg, model.class_embedding
        self._forward = torch.compile(model, dynamic=True)
        self.diffloss = SimpleNamespace(net=torch.compile(model.diffloss.net, dynamic=True))

    def __call__(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


def compiled(pipe: MARPipeline) -> MARPipeline:
    """The same pipeline (same weights) with the MAR trunk and its heads torch.compile'd."""
    import copy

    out = copy.copy(pipe)  # a shallow copy of the pipeline object only: modules are wrapped, never mutated
    out.model = CompiledMAR(pipe.model)
    if pipe.student is not None:
        out.student = torch.compile(pipe.student, dynamic=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--batch", type=int, default=8, help="images per generation call (one class each)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="sampling.KEY=VALUE")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = parse_sampling_overrides(a.overrides)
    base = MARPipeline.from_pretrained(a.ckpt)
    dmd = MARPipeline.from_pretrained(a.ckpt, mode="dmd")
    pipes = {"baseline": base, "dmd": dmd}
    if not a.no_compile:
        pipes.update({"baseline_compiled": compiled(base), "dmd_compiled": compiled(dmd)})
    labels = [i % base.model.cfg.class_num for i in range(a.batch)]
    times = {k: [] for k in pipes}
    for name, pipe in pipes.items():  # warm-up (and compilation)
        pipe.generate_tokens(labels, seed=10_000, **({} if pipe.student is not None else overrides))
    for r in range(a.reps):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            pipe.generate_tokens(labels, seed=r, **({} if pipe.student is not None else overrides))
            times[name].append((time.perf_counter() - t0) / a.batch)
    res = {"ckpt": a.ckpt, "batch": a.batch, "reps": a.reps, "threads": torch.get_num_threads(),
           "device": "cpu", "num_iter": base.cfg.sampling.num_iter, "overrides": overrides,
           "student_steps": dmd.student_steps,
           "seconds_per_image": {k: statistics.median(v) for k, v in times.items()},
           "spread": {k: (min(v), max(v)) for k, v in times.items()}}
    s = res["seconds_per_image"]
    res["speedup_dmd_vs_baseline"] = s["baseline"] / s["dmd"]
    if "dmd_compiled" in s:
        res["speedup_dmd_vs_baseline_compiled"] = s["baseline_compiled"] / s["dmd_compiled"]
    print(json.dumps(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
