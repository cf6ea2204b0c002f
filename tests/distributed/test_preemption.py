"""Preemption of the joint run on 2 CPU ranks under the `deepspeed` launcher, with real signals sent the two ways a
cluster sends them (training/preemption.py): to every rank process (slurm signals every task), at slightly
different times, and to the launcher's whole process group. Every rank stops at the same step and saves an intact
checkpoint there; signalled ranks exit 75, which the launcher passes on; `--resume auto` continues the loss curve
of the uninterrupted run exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from _launch import ROOT, deepspeed_cmd, env, metrics_by_step, run
from test_train_joint import COMMON as JOINT_COMMON, setup  # noqa: F401  (the tiny teacher + shapes fixture)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PREEMPTED = 75  # fastardiff_ds.training.preemption.PREEMPTED_EXIT_CODE (not imported: today's code must fail here)
COMMON = [*JOINT_COMMON, "train.steps=8", "train.save_every=100"]  # one save: the signal's


def _args(setup, run_dir, *extra):
    return ["--ds_config", "ds_configs/zero3.json", f"train.teacher={setup / 'teacher'}",
            f"data.shards={setup / 'shapes'}", f"run_dir={run_dir}", *COMMON, *extra]


def _start_and_wait(args, run_dir, min_step=2, timeout=300):
    """Start the run (output to run_dir.log), wait until rank 0 logged step >= min_step; (proc, rank processes)."""
    log = open(f"{run_dir}.log", "w")
    proc = subprocess.Popen(deepspeed_cmd("launcher/train_t2i.py", args), cwd=ROOT, env=env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    metrics, t0 = run_dir / "metrics.jsonl", time.time()
    while not (metrics.is_file() and max(metrics_by_step(metrics), default=0) >= min_step):
        if proc.poll() is not None or time.time() - t0 > timeout:
            _kill(proc)
            raise AssertionError(f"the run ended or stalled before step {min_step}:\n{_log(run_dir)[-4000:]}")
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=" in " ".join(p.cmdline())]
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    return proc, ranks


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _log(run_dir) -> str:
    return open(f"{run_dir}.log").read()


def _stopped_step(run_dir) -> int:
    """The step the run stopped at: its last logged step (train.log_every=1), which must be its newest checkpoint."""
    step = max(metrics_by_step(run_dir / "metrics.jsonl"))
    assert 2 <= step < 8, step  # stopped by the signal, not by train.steps
    from fastardiff_ds.engines.checkpoint import resolve_resume

    tag = f"step_{step:06d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag
    assert resolve_resume(run_dir / "checkpoints", tag) == run_dir / "checkpoints" / tag  # every file hashes right
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")] == [tag]
    assert not (run_dir / "export").exists()  # the end-of-run export is left to the resumed run
    return step


def test_sigterm_to_every_rank_saves_exits_75_and_resumes_on_the_same_curve(setup, tmp_path):
    ref = run("launcher/train_t2i.py", _args(setup, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stdout[-5000:]
    run_dir = tmp_path / "preempted"
    proc, ranks = _start_and_wait(_args(setup, run_dir), run_dir)
    t_signal = time.time()
    try:
        ranks[1].send_signal(signal.SIGTERM)  # slurm signals every task; they need not hear it at the same moment
        time.sleep(0.3)
        try:
            ranks[0].send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:  # already gone: the exit code below says why
            pass
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            _kill(proc)
    seconds = time.time() - t_signal
    out = _log(run_dir)
    assert code == PREEMPTED, (code, out[-5000:])
    step = _stopped_step(run_dir)
    assert f"preempted (SIGTERM): stopped at step {step}" in out, out[-3000:]
    print(f"signal -> launcher exit {seconds:.1f}s, stopped at step {step}")
    assert seconds < 30, seconds  # the default grace, and the deepspeed launcher's wait before its SIGKILL

    res = run("launcher/train_t2i.py", _args(setup, run_dir, "--resume", "auto"))
    assert res.returncode == 0, res.stdout[-5000:]
    assert f'"resumed_at_step": {step}' in res.stdout
    a, b = metrics_by_step(tmp_path / "ref" / "metrics.jsonl"), metrics_by_step(run_dir / "metrics.jsonl")
    compared = set()
    for s in range(step + 1, 9):  # every logged loss after the resume is the uninterrupted run's
        keys = [k for k in a[s] if "loss" in k]
        assert set(keys) == {k for k in b[s] if "loss" in k}, s
        for key in keys:
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-5, abs=1e-7), (s, key)
        compared.update(keys)
    assert {"reg/loss", "ent/loss", "fake/loss", "dmd/loss"} <= compared, compared
    meta = json.loads((run_dir / "export" / "meta.json").read_text())  # the resumed run did the end-of-run work
    assert meta["step"] == 8


def test_sigterm_to_the_launchers_process_group_saves_before_the_launcher_kills(setup, tmp_path):
    """`kill -TERM -<pgid>`: DeepSpeed's runner dies at once (no handler on one node: -15), launch.py forwards a
    second SIGTERM to each rank and SIGKILLs them after 30 s; the ranks must save and exit before that."""
    run_dir = tmp_path / "preempted"
    proc, ranks = _start_and_wait(_args(setup, run_dir), run_dir)
    t_signal = time.time()
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
        gone, alive = psutil.wait_procs(ranks, timeout=60)
    finally:
        _kill(proc)
    seconds = time.time() - t_signal
    assert not alive, alive
    out = _log(run_dir)
    step = _stopped_step(run_dir)
    assert f"preempted (SIGTERM): stopped at step {step}" in out, out[-3000:]
    summaries = [json.loads(l) for l in out.splitlines() if l.startswith('{"steps_per_s"')]
    assert summaries and summaries[-1]["preempted"] and summaries[-1]["step"] == step, out[-3000:]
    print(f"signal -> ranks gone {seconds:.1f}s, stopped at step {step}")
    assert seconds < 30, seconds  # before launch.py's SIGKILL


def test_sigusr1_preempts_the_pretraining_launcher(setup, tmp_path):
    """slurm's `--signal=USR1@<s>` to a lone `python launcher/pretrain_t2i.py` (one task, no deepspeed runner)."""
    run_dir = tmp_path / "pretrain"
    args = ["--preset", "tiny", f"run_dir={run_dir}", f"data.shards={setup / 'shapes'}", "data.batch_size=2",
            "data.num_workers=0", "pretrain.steps=50", "pretrain.log_every=1", "pretrain.save_every=100",
            "pretrain.sample_every=0", "wandb.enabled=false", "--threads", "1"]
    proc = subprocess.Popen(deepspeed_cmd("launcher/pretrain_t2i.py", args, num_ranks=0), cwd=ROOT, env=env(),
                            stdout=open(f"{run_dir}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        while not ((run_dir / "metrics.jsonl").is_file() and max(metrics_by_step(run_dir / "metrics.jsonl")) >= 2):
            assert proc.poll() is None and time.time() - t0 < 300, _log(run_dir)[-4000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            _kill(proc)
    step = max(metrics_by_step(run_dir / "metrics.jsonl"))
    assert code == PREEMPTED and step < 50, (code, _log(run_dir)[-4000:])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:06d}"
    assert f"preempted (SIGUSR1): stopped at step {step}" in _log(run_dir)
    assert not (run_dir / "checkpoint").exists()  # no end-of-run export
