"""Run a W&B sweep YAML locally, without a W&B server (grid or random), one run after another.

    python launcher/sweep_local.py sweeps/alpha_schedule.yaml --dry-run
    python launcher/sweep_local.py sweeps/alpha_schedule.yaml --method random --max-runs 4 --extra train.steps=40

Expands `parameters` (values lists; min/max ranges for random), substitutes ${env} ${program} ${args}
${args_no_hyphens} in `command`, gives each run its own run_dir, runs it, and writes summary.json with the
sweep metric's last value per run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import yaml


def expand(params: dict, method: str, max_runs: int | None, seed: int) -> list[dict]:
    """Grid: the cartesian product of every `values` list. Random: `max_runs` draws (values / uniform min-max)."""
    for key, spec in params.items():
        if not isinstance(spec, dict) or not ({"values", "value"} & spec.keys() or {"min", "max"} <= spec.keys()):
            raise ValueError(f"sweep parameter '{key}' needs `values`, `value` or `min`/`max`")
    if method == "grid":
        keys = list(params)
        lists = [params[k].get("values", [params[k].get("value")]) if "min" not in params[k] else None for k in keys]
        if any(v is None for v in lists):
            raise ValueError("grid sweeps need `values` lists (min/max ranges only work with method: random)")
        runs = [dict(zip(keys, combo)) for combo in itertools.product(*lists)]
        return runs[:max_runs] if max_runs else runs
    if method == "random":
        rng, runs = random.Random(seed), []
        for _ in range(max_runs or 10):
            run = {}
            for k, spec in params.items():
                if "values" in spec:
                    run[k] = rng.choice(spec["values"])
                elif "value" in spec:
                    run[k] = spec["value"]
                else:
                    lo, hi = spec["min"], spec["max"]
                    run[k] = rng.randint(lo, hi) if isinstance(lo, int) and isinstance(hi, int) else rng.uniform(lo, hi)
            runs.append(run)
        return runs
    raise ValueError(f"method '{method}' is not supported locally (grid | random); bayes needs the W&B server")


def command_for(sweep: dict, run: dict, extra: list[str]) -> list[str]:
    args = [f"{k}={v}" for k, v in run.items()] + extra
    out = []
    for item in sweep.get("command", ["${env}", sys.executable, "${program}", "${args}"]):
        if item == "${env}":
            continue
        if item == "${program}":
            out.append(sweep["program"])
        elif item == "${args}":
            out += ["--" + a for a in args]
        elif item == "${args_no_hyphens}":
            out += args
        else:
            out.append(item)
    return out


def last_metric(run_dir: Path, name: str):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    values = [json.loads(line).get(name) for line in path.read_text().splitlines()]
    values = [v for v in values if v is not None]
    return values[-1] if values else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="W&B sweep YAML")
    p.add_argument("--method", default=None, help="override the YAML's method (grid | random)")
    p.add_argument("--max-runs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/sweep", help="parent of the per-run run_dirs")
    p.add_argument("--extra", nargs="*", default=[], help="overrides appended to every run, e.g. train.steps=40")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args(argv)
    sweep = yaml.safe_load(Path(a.sweep).read_text())
    runs = expand(sweep["parameters"], a.method or sweep.get("method", "grid"), a.max_runs, a.seed)
    metric = sweep.get("metric", {}).get("name")
    summary = []
    for i, run in enumerate(runs):
        run_dir = Path(a.out) / f"run_{i:03d}"
        cmd = command_for(sweep, run, [f"run_dir={run_dir}", *a.extra])
        print(" ".join(cmd), flush=True)
        if a.dry_run:
            continue
        rc = subprocess.call(cmd)
        summary.append({"run": i, "params": run, "returncode": rc, metric: last_metric(run_dir, metric)})
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not a.dry_run and metric:
        done = [s for s in summary if s[metric] is not None]
        goal = sweep["metric"].get("goal", "minimize")
        if done:
            best = (min if goal == "minimize" else max)(done, key=lambda s: s[metric])
            print(json.dumps({"best": best}))
    return summary


if __name__ == "__main__":
    main()
