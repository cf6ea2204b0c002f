"""The GPU check: the main job on one GPU over NCCL, killed and resumed, exported, sampled in every mode eager and
compiled, benchmarked; prints ONE JSON (per stage: ok / error, seconds, figures). Run it through the wrapper,
which finds or installs the Python environment first:

    bash scripts/gpu_check.sh                      # one GPU, at most ~10 min (--budget-s)
    bash scripts/gpu_check.sh --cpu-dry-run        # the same stages on CPU / gloo with tiny settings (tests)

Stages (each fails loudly on stderr and the check goes on; later stages that need a failed one are skipped):
env, data, train_kill (deepspeed launcher/train_t2i.py on the tiny preset with the bundled teacher, SIGKILL a rank
after a checkpoint), resume (--resume auto: the re-run steps must reproduce the killed run's logged losses, the run
ends), export, generate_<mode>[_compiled] (launcher/generate.py, inference.compile=true), bench
(launcher/bench_inference.py --compile both). The JSON also goes to $OUT/gpu_check.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_lib import (StageFailed, all_finite, compare_losses, finish, free_port, json_lines,  # noqa: E402
                           kill_a_rank, killpg, launch, metric_rows, run_logged, stage)
from gpu_check_settings import ENV_PROBE, MODES, settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = "launcher/train_t2i.py"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="CPU, gloo, tiny settings: tests the check itself")
    p.add_argument("--work", default=None, help="work folder (default: a new temporary folder)")
    p.add_argument("--budget-s", type=float, default=None, help="start no stage after this many seconds; a running "
                   "one is stopped 45 s later (default 450 on GPU: the JSON comes within ~8.5 min; 1200 dry run)")
    p.add_argument("--json", default=None, help="also write the JSON here ($OUT/gpu_check.json is written anyway)")
    return p.parse_args(argv)


class Check:
    """The check's state: settings, paths, child environment, the results dict the JSON is made of."""

    def __init__(self, a):
        self.dry = a.cpu_dry_run
        self.s = settings(self.dry)
        self.work = Path(a.work or tempfile.mkdtemp(prefix="fastardiff_gpu_check_")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs, self.run_dir = self.work / "logs", self.work / "run"
        self.t0 = time.time()
        self.deadline = self.t0 + (a.budget_s or self.s["budget_s"])
        self.results: dict = {}
        env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        if self.dry:
            env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
            # dynamo traces every graph (counts, recompiles) but no C++ kernels are built: minutes saved per mode
            env.setdefault("FASTARDIFF_COMPILE_BACKEND", "aot_eager")
        else:  # a DS_ACCELERATOR=cpu left in the shell would put the "GPU" check on gloo
            env["DS_ACCELERATOR"] = "cuda"
        self.env = env

    def left(self, cap: float) -> float:
        """Seconds a child may run: its own cap, never past the budget plus 45 s of grace."""
        return max(10.0, min(cap, self.deadline + 45 - time.time()))

    def py(self, script: str, *args: str) -> list[str]:
        return [sys.executable, str(ROOT / script), *args]

    def train_cmd(self, *extra: str) -> list[str]:
        runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_addr", "127.0.0.1",
                  "--master_port", str(free_port())]
        return [*runner, str(ROOT / TRAIN), "--ds_config", "ds_configs/zero3.json", f"run_dir={self.run_dir}",
                f"data.shards={self.work / 'shapes'}", *self.s["train"], *extra]


def s_env(f: dict, c: Check) -> None:
    text = run_logged([sys.executable, "-c", ENV_PROBE], c.logs / "env.log", c.env, ROOT, c.left(120))
    f.update(json_lines(text)[-1])
    if not c.dry and not f.get("cuda_available"):
        raise StageFailed("torch sees no CUDA device (use --cpu-dry-run on a machine without a GPU)")
    if f.get("comm_backend") != ("gloo" if c.dry else "nccl"):
        raise StageFailed(f"DeepSpeed's accelerator is {f.get('deepspeed_accelerator')!r} with backend "
                          f"{f.get('comm_backend')!r}; the check needs {'gloo' if c.dry else 'nccl'}")


def s_data(f: dict, c: Check) -> None:
    n = c.s["samples"]
    run_logged(c.py("data_pipelines/make_shapes.py", "--out", str(c.work / "shapes"), "--num-samples", str(n),
                    "--shard-size", str(max(n // 4, 1)), "--resolution", "32", "--seed", "0"),
               c.logs / "data.log", c.env, ROOT, c.left(300))
    f["samples"] = n


def s_train_kill(f: dict, c: Check) -> None:
    """Start the main job; once a checkpoint exists and a step past it is logged, SIGKILL a rank."""
    latest, metrics = c.run_dir / "checkpoints" / "latest", c.run_dir / "metrics.jsonl"
    proc = launch(c.train_cmd(), c.logs / "train_kill.log", c.env, ROOT)
    t_end, killed = time.time() + c.left(c.s["train_timeout_s"]), None
    while time.time() < t_end and proc.poll() is None:
        saved = tag_step(latest.read_text().strip()) if latest.is_file() else None
        steps = metric_rows(metrics)
        if saved is not None and steps and max(steps) > saved:
            killed = kill_a_rank(proc, TRAIN)
            break
        time.sleep(0.05)
    if killed is None:
        rc = proc.poll()
        killpg(proc)
        raise StageFailed(f"no kill: the run {'ended with exit code %s' % rc if rc is not None else 'timed out'} "
                          f"before a step past a checkpoint was logged; see {c.logs / 'train_kill.log'}")
    rc = finish(proc, 120)  # the launcher notices the dead rank, stops the others and fails
    rows = metric_rows(metrics)
    (c.work / "killed_metrics.jsonl").write_text(metrics.read_text())
    f.update(killed_pid=killed, launcher_exit_code=rc, last_logged_step=max(rows), steps=c.s["steps"],
             latest_checkpoint=latest.read_text().strip(), losses_at_kill=_losses(rows[max(rows)]))
    if rc == 0:
        raise StageFailed("the launcher exited 0 after a rank was SIGKILLed: the failure went unnoticed")
    if (c.run_dir / "export" / "meta.json").is_file():
        raise StageFailed("the run had already finished (export written) when the rank was killed")


def tag_step(tag: str) -> int | None:
    """The step a checkpoint tag names (`step_000010` -> 10), None if it names none."""
    m = re.search(r"(\d+)$", tag)
    return int(m.group(1)) if m else None


def s_resume(f: dict, c: Check) -> None:
    """--resume auto: starts after the latest checkpoint, re-runs the steps the killed run logged past it with the
    same losses (relative tolerance: 1e-5 on CPU, exact there; 1e-2 on GPU, bf16 with order-dependent atomics)."""
    text = run_logged(c.train_cmd("--resume", "auto"), c.logs / "resume.log", c.env, ROOT,
                      c.left(c.s["train_timeout_s"]))
    info = json_lines(text)
    at = next((j["resumed_at_step"] for j in info if "resumed_at_step" in j), None)
    summary = next((j for j in reversed(info) if "steps_per_s" in j or "export" in j), {})
    before = metric_rows(c.work / "killed_metrics.jsonl")
    after = {s: r for s, r in metric_rows(c.run_dir / "metrics.jsonl").items()}
    if at is None:
        raise StageFailed("the resumed run did not say resumed_at_step: it started fresh")
    overlap = [s for s in sorted(before) if s > at]
    worst, pairs = compare_losses(before, after, overlap)
    tol = c.s["resume_rtol"]
    tau = summary.get("tau", {})
    f.update(resumed_at_step=at, compared_steps=overlap, compared_losses=pairs, max_rel_diff=worst, rtol=tol,
             final_step=max(after), final_losses=_losses(after[max(after)]), steps_per_s=summary.get("steps_per_s"),
             first_step_s=summary.get("first_step_s"), tau=tau.get("tau") if isinstance(tau, dict) else tau,
             peak_rss_mib_per_rank=summary.get("peak_rss_mib_per_rank"))
    missing = [s for s in range(at + 1, c.s["steps"] + 1) if s not in after]
    if missing:
        raise StageFailed(f"the resumed run logged no row for steps {missing}")
    if not all_finite({s: after[s] for s in range(at + 1, c.s["steps"] + 1)}):
        raise StageFailed("a resumed step logged a non-finite value")
    if worst > tol:
        raise StageFailed(f"resumed losses differ from the killed run's on steps {overlap}: max rel diff {worst:.3g}"
                          f" > {tol}")


def _losses(row: dict) -> dict:
    return {k: v for k, v in row.items() if "loss" in k and isinstance(v, (int, float))}


def s_export(f: dict, c: Check) -> None:
    exp = c.run_dir / "export"
    if not (exp / "meta.json").is_file():
        raise StageFailed(f"no {exp / 'meta.json'}: the run did not export")
    meta = json.loads((exp / "meta.json").read_text())
    files = sorted(p.name for p in exp.iterdir())
    f.update(tau=meta.get("tau"), files=files, mib=round(sum(p.stat().st_size for p in exp.rglob("*") if p.is_file())
                                                          / 2**20, 2))
    if not isinstance(f["tau"], (int, float)):
        raise StageFailed(f"meta.json has no numeric tau: {meta.get('tau')!r}")
    needed = ("student", "draft")
    if not all(any(n in name for name in files) for n in needed):
        raise StageFailed(f"the export lacks a {needed} file: {files}")


def s_generate(f: dict, c: Check, mode: str, compiled: bool) -> None:
    out = c.work / "gen" / (mode + ("_compiled" if compiled else ""))
    prompts = [x for p in c.s["prompts"] for x in ("--prompt", p)]
    cmd = c.py("launcher/generate.py", "--ckpt", str(c.run_dir / "export"), "--mode", mode, "--out", str(out),
               "--num-images", "1", *prompts, *c.s["infer"], *(["inference.compile=true"] if compiled else []))
    t0 = time.time()
    run_logged(cmd, c.logs / f"generate_{out.name}.log", c.env, ROOT, c.left(c.s["generate_timeout_s"]))
    stats = json.loads((out / "stats.json").read_text())
    f.update(wall_s=round(time.time() - t0, 2), images=stats["images"], s_per_image=stats["seconds_per_image"])
    eager = c.results.get(f"generate_{mode}", {})
    if compiled and eager.get("ok"):  # the first batch's compilation is inside the compiled run's time
        f["compile_overhead_s"] = round(f["s_per_image"] * f["images"] - eager["s_per_image"] * eager["images"], 2)
    if stats["images"] != len(c.s["prompts"]):
        raise StageFailed(f"{stats['images']} images written, expected {len(c.s['prompts'])}")


def s_bench(f: dict, c: Check) -> None:
    out = c.work / "bench.json"
    run_logged(c.py("launcher/bench_inference.py", "--ckpt", str(c.run_dir / "export"), "--compile", "both",
                    "--num-prompts", str(c.s["bench_prompts"]), "--batch-size", "1", "--json", str(out),
                    "--threads", str(c.s["threads"]), *c.s["infer"]),
               c.logs / "bench.log", c.env, ROOT, c.left(c.s["bench_timeout_s"]))
    rows = json.loads(out.read_text())["modes"]
    keep = ("latency_s_per_image_median", "speedup_vs_baseline", "speedup_vs_compiled_baseline", "acceptance_rate",
            "warmup_s", "graphs_compiled_warmup", "recompiles_timed")
    f["rows"] = {label: {k: r.get(k) for k in keep} for label, r in rows.items()}
    expected = [m + sfx for sfx in ("", "-compiled") for m in MODES]
    if sorted(rows) != sorted(expected):
        raise StageFailed(f"bench rows {sorted(rows)}; expected {expected}")


def plan(c: Check) -> list[tuple]:
    """(name, fn, args, needs) in order: the bench before the compiled generations, so a spent budget costs the
    latter (the bench has compiled rows of every mode too), which then reuse its inductor cache (same batch)."""
    def gen(m: str, comp: bool) -> tuple:
        return f"generate_{m}" + ("_compiled" if comp else ""), s_generate, (c, m, comp), ("export",)

    return [("env", s_env, (c,), ()), ("data", s_data, (c,), ("env",)),
            ("train_kill", s_train_kill, (c,), ("data",)), ("resume", s_resume, (c,), ("train_kill",)),
            ("export", s_export, (c,), ("resume",)), *[gen(m, False) for m in MODES],
            ("bench", s_bench, (c,), ("export",)), *[gen(m, True) for m in MODES]]


def report(c: Check, done: bool) -> dict:
    r = c.results
    return {"check": "fastardiff-ds gpu_check", "mode": "cpu-dry-run" if c.dry else "gpu", "complete": done,
            "ok": done and all(v["ok"] for v in r.values()), "failed": [k for k, v in r.items() if not v["ok"]],
            "total_seconds": round(time.time() - c.t0, 1), "work": str(c.work),
            "compile_backend": c.env.get("FASTARDIFF_COMPILE_BACKEND", "inductor"), "stages": r}


def write(rep: dict, paths: list[Path]) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rep, indent=1, default=str) + "\n")


def main(argv=None) -> int:
    a = parse(argv)
    c = Check(a)
    paths = [Path(p) for p in (os.environ.get("OUT") and Path(os.environ["OUT"]) / "gpu_check.json", a.json) if p]
    for name, fn, args, needs in plan(c):
        stage(c.results, name, c.deadline, fn, *args, needs=needs)
        write(report(c, done=False), paths)  # a run killed from outside still leaves the stages it finished
    rep = report(c, done=True)
    write(rep, paths)
    print(json.dumps(rep, default=str), flush=True)
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
