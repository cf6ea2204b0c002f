"""scripts/gpu_check.sh tested on CPU: the whole check in --cpu-dry-run (gloo, 6 steps, 2 sampler steps) prints one
JSON with every stage ok, the kill/resume comparison made on real losses, eight bench rows; its plumbing
(stages that fail but let the check go on, the loss comparison, the process-tree search, the environment
fallback) is tested on its own, fast."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check_lib as lib  # noqa: E402


def _env(**extra):
    e = dict(os.environ, FASTARDIFF_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    e.pop("OUT", None)
    return {**e, **extra}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cpu_dry_run_passes_every_stage_and_prints_one_json(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--cpu-dry-run", "--work", str(tmp_path / "w"),
                          "--budget-s", "900"],
                         cwd=ROOT, env=_env(OUT=str(out)), capture_output=True, text=True, timeout=1100)
    lines = res.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report == json.loads((out / "gpu_check.json").read_text())
    assert res.returncode == 0 and report["ok"] and report["complete"], (report["failed"], res.stderr[-4000:])
    assert len(lines) == 1  # stdout is the JSON alone; progress and the children's logs go elsewhere
    st = report["stages"]
    assert st["train_kill"]["launcher_exit_code"] != 0 and st["train_kill"]["killed_pid"] > 0
    resume = st["resume"]
    assert resume["resumed_at_step"] == int(st["train_kill"]["latest_checkpoint"].split("_")[-1])
    assert resume["compared_losses"] > 0 and resume["max_rel_diff"] <= 1e-5  # exact resume on CPU
    assert resume["final_step"] == 6
    for mode in ("baseline", "sd", "dmd", "fastardiff"):
        assert st[f"generate_{mode}"]["images"] == 1 and "compile_overhead_s" in st[f"generate_{mode}_compiled"]
    rows = st["bench"]["rows"]
    assert len(rows) == 8 and rows["fastardiff-compiled"]["graphs_compiled_warmup"] > 0
    assert rows["baseline"]["speedup_vs_baseline"] == pytest.approx(1.0)


def test_a_failing_stage_is_recorded_and_the_next_runs():
    results, deadline = {}, time.time() + 60

    def bad(figures):
        figures["partial"] = 1
        raise lib.StageFailed("boom")

    lib.stage(results, "a", deadline, bad)
    lib.stage(results, "b", deadline, lambda f: f.update(x=2))
    lib.stage(results, "c", deadline, lambda f: None, needs=("a",))
    lib.stage(results, "d", time.time() - 1, lambda f: None)
    assert results["a"]["ok"] is False and results["a"]["error"] == "boom" and results["a"]["partial"] == 1
    assert results["b"] == {"ok": True, "seconds": results["b"]["seconds"], "x": 2}
    assert "needs stage(s) ['a']" in results["c"]["error"] and "budget" in results["d"]["error"]


def test_loss_comparison_reads_killed_and_resumed_rows(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "reg/loss": 1.0}\n{"step": 2, "reg/loss": 2.0, "cd/loss": 4.0, "lr": 3}\n'
                   '{"step": 3, "re')
    before = lib.metric_rows(log)  # the line cut by the kill is dropped
    assert sorted(before) == [1, 2]
    after = {2: {"step": 2, "reg/loss": 2.0, "cd/loss": 4.0 * (1 + 1e-3)}}
    worst, pairs = lib.compare_losses(before, after, [2])
    assert pairs == 2 and worst == pytest.approx(1e-3)


def test_rank_search_kills_the_rank_not_its_forked_worker(tmp_path):
    script = tmp_path / "fake_rank.py"  # a "rank" that forks a "data-loader worker" with the same command line
    script.write_text("import os, time\nif os.fork() == 0:\n    time.sleep(60)\nelse:\n    time.sleep(60)\n")
    runner = subprocess.Popen(["bash", "-c", f"{sys.executable} {script} & wait"], start_new_session=True)
    try:
        for _ in range(200):
            if sum("fake_rank.py" in c for _, _, c in lib.descendants(runner.pid)) == 2:
                break
            time.sleep(0.05)
        procs = {p: parent for p, parent, _ in lib.descendants(runner.pid)}
        pid = lib.kill_a_rank(runner, "fake_rank.py")
        assert procs[pid] == runner.pid  # the rank (bash's child), not the worker it forked
        assert runner.wait(timeout=10) == 0  # bash's `wait` returned: the rank is dead (the worker is left)
    finally:
        lib.killpg(runner)


def test_wrapper_prints_a_json_when_no_python_can_run_the_project(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--cpu-dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=_env(FASTARDIFF_PYTHON="/bin/false", OUT=str(tmp_path)))
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert res.returncode == 1 and report["ok"] is False and report["failed"] == ["environment"]
    assert "cannot import" in report["stages"]["environment"]["error"]
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == report
