"""Side-by-side inference benchmark: baseline | sd | dmd | fastardiff on the same prompts and seeds.

    python launcher/bench_inference.py --ckpt runs/default/export --num-prompts 16 --batch-size 1 --json bench.json
    python launcher/bench_inference.py --preset tiny-bench --ckpt runs/bench/export --num-prompts 16 --json b.json
    python launcher/bench_inference.py --ckpt runs/bench/export --modes baseline dmd fastardiff \
        --variant fastardiff-cspd=fastardiff:inference.accept=cspd   # extra rows: a mode with its own overrides

Prints and writes JSON: per mode latency per image (median, p90), speedup vs baseline, target/draft forward counts,
mean accepted length, acceptance rate, early-stop rate, head evaluations, share of time in AR vs head, the upper
bound on speedup the counts imply; plus the per-token AR:head FLOP split of this preset next to nextstep-1-large's.
Rows are warmed up first and then timed interleaved, batch by batch (a drifting machine load slows every row
alike). Every row runs eager and again compiled (`--compile both`, the default: LABEL-compiled rows use a static KV cache and
torch.compile'd AR and head steps, inference.compile=true), with warm-up (compile) seconds, graphs compiled during
warm-up and recompilations during the timed runs; speedups are given over the eager and over the compiled baseline.
Last, the same rows as a markdown table (fastardiff_ds.benchmark.markdown_table).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import copy
import dataclasses

from fastardiff_ds.benchmark import (ModeResult, SectionTimer, decode_seconds, flops_per_token, large_preset_split,
                                     markdown_table, parse_variant, per_call_ms, round_cost_model, sum_stats,
                                     summarize)
from fastardiff_ds.cli import add_vae_arg, vae_overrides
from fastardiff_ds.config import apply_overrides
from fastardiff_ds.data.shapes import prompt_seeds
from fastardiff_ds.inference import MODES, Pipeline, load_pipeline
from fastardiff_ds.sampling.compiled import graphs_compiled


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="inference checkpoint (export of launcher/train_t2i.py)")
    p.add_argument("--preset", default=None, help="only for checkpoints without config.json "
                   "(official NextStep folders are read from their own config.json)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=MODE[:key=value,...]",
                   help="an extra row: MODE with its own inference overrides (repeatable), e.g. "
                        "fastardiff-cspd=fastardiff:inference.accept=cspd")
    p.add_argument("--prompts-file", default=None, help="one prompt per line (default: held-out shapes prompts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the tiny matmuls do not split)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--compile", choices=("both", "off", "on"), default="both",
                   help="both (default): every row eager and again compiled (LABEL-compiled: static KV cache + "
                        "torch.compile, inference.compile=true); speedups are also given over the compiled baseline")
    add_vae_arg(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. inference.gamma=6 inference.noise_level=1.5")
    a = p.parse_args(argv)
    a.overrides = [*vae_overrides(a.vae), *a.overrides]
    torch.set_num_threads(a.threads)
    listed = [l.strip() for l in Path(a.prompts_file).read_text().splitlines() if l.strip()] if a.prompts_file else None
    prompts, seeds = prompt_seeds(a.num_prompts, a.seed, listed)
    try:  # a bad folder, override or variant: one line naming it, before anything is timed
        rows = [(m, m, []) for m in a.modes] + [parse_variant(v, MODES) for v in a.variant]
        base = load_pipeline(a.ckpt, a.preset, "baseline", [*a.overrides, f"inference.batch_size={a.batch_size}"])
        for _, _, overrides in rows:
            _with_overrides(base.bundle, overrides)
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    rows = _compile_rows(rows, a.compile)
    bundle = base.bundle
    timer = SectionTimer()
    for name, m in (("ar", bundle.target), ("ar", bundle.draft), ("head", bundle.head), ("head", bundle.student)):
        if m is not None:
            timer.watch(name, m)
    results, skipped, rules, pipes = {}, {}, {}, {}
    for label, mode, overrides in rows:  # build and warm up every row first ...
        try:
            pipe = base if label == "baseline" else Pipeline(_with_overrides(bundle, overrides), mode, base.device)
        except ValueError as e:  # e.g. no draft / student in the checkpoint
            skipped[label] = str(e)
            continue
        r = ModeResult()
        if pipe.compiler is not None:
            pipe.compiler.timer = timer
        g0, t0 = graphs_compiled(), time.perf_counter()
        warm = a.batch_size * (2 if pipe.compiler is not None else 1)  # 2 batches: shapes that vary turn dynamic
        pipe.generate(prompts[:warm], seeds[:warm])  # warm-up (and compilation), excluded
        r.warmup_s, r.graphs_warmup = time.perf_counter() - t0, graphs_compiled() - g0
        pipe.stats.clear()
        results[label], rules[label], pipes[label] = r, pipe.rule(), pipe
    for i in range(0, len(prompts), a.batch_size):  # ... then time them interleaved, batch by batch, so that a
        for label, pipe in pipes.items():  # machine whose load drifts slows every row alike
            r, g0, before = results[label], graphs_compiled(), dict(timer.seconds)
            t0 = time.perf_counter()
            images = pipe.generate(prompts[i:i + a.batch_size], seeds[i:i + a.batch_size])
            r.latencies.append((time.perf_counter() - t0) / len(images))
            r.ar_seconds += timer.seconds["ar"] - before["ar"]
            r.head_seconds += timer.seconds["head"] - before["head"]
            r.recompiles += graphs_compiled() - g0
    for label, r in results.items():
        r.stats = sum_stats(pipes[label].stats)
        print(f"{label}: {statistics_line(r)}", flush=True)
    cfg = bundle.cfg
    decode = {"target_s": decode_seconds(bundle.target, cfg.model.image.token_dim)}
    if bundle.draft is not None:
        decode["draft_s"] = decode_seconds(bundle.draft, cfg.model.image.token_dim)
        decode["draft_over_target"] = decode["draft_s"] / decode["target_s"]
    out = {"ckpt": a.ckpt, "preset": cfg.preset, "device": str(base.device), "threads": a.threads,
           "num_prompts": len(prompts), "batch_size": a.batch_size, "inference": vars(cfg.inference),
           "tau": bundle.meta.get("tau"), "decode_batch1_eager": decode, "variants": {lb: {"mode": m, "overrides": o} for lb, m, o in rows if o},
           "modes": summarize(results, len(prompts)), "skipped": skipped,
           "flops_per_token": {cfg.preset: flops_per_token(cfg), "nextstep-1-large": large_preset_split()}}
    if bundle.draft is not None and bundle.student is not None:  # what a round's calls cost, eager and compiled
        calls = {}
        for label, compiled in (("eager", False), ("compiled", True)):
            if (a.compile == "off" and compiled) or (a.compile == "on" and not compiled):
                continue
            pipe = Pipeline(_with_overrides(bundle, [f"inference.compile={str(compiled).lower()}"]), "fastardiff",
                            base.device)
            ms = per_call_ms(pipe, cfg.inference.gamma)
            calls[label] = {"per_call_ms": ms, "model": round_cost_model(ms, cfg.inference.gamma)}
        out["round_calls"] = calls
    for label, rule in rules.items():  # the rule and tolerances that made each row's images
        out["modes"][label]["rule"] = rule
    text = json.dumps(out, indent=2, default=str)
    print(text)
    print(markdown_table(out["modes"]))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")


def _compile_rows(rows, which: str):
    """Each (label, mode, overrides) row eager, compiled (LABEL-compiled), or both, eager first."""
    on = lambda r: (f"{r[0]}-compiled", r[1], [*r[2], "inference.compile=true"])  # noqa: E731
    if which == "off":
        return rows
    if which == "on":
        return [on(r) for r in rows]
    return rows + [on(r) for r in rows]


def _with_overrides(bundle, overrides: list[str]):
    """The same models with a config of their own (a variant's inference overrides leave the others alone)."""
    if not overrides:
        return bundle
    cfg = copy.deepcopy(bundle.cfg)
    apply_overrides(cfg, overrides)
    return dataclasses.replace(bundle, cfg=cfg)


def statistics_line(r: ModeResult) -> str:
    import statistics

    return f"{statistics.median(r.latencies):.3f} s/image over {len(r.latencies)} batches"


if __name__ == "__main__":
    main()
