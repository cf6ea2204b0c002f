"""Launch a launcher script on 2 CPU ranks on 127.0.0.1 with the deepspeed runner (or, with num_ranks=0, as one
plain `python` process without any launcher), bounded in time."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(script: str, args: list[str], num_ranks: int = 2) -> list[str]:
    if num_ranks == 0:  # a lone process: no deepspeed runner, no RANK/WORLD_SIZE env
        return [sys.executable, str(ROOT / script), *args]
    runner = str(Path(sys.executable).parent / "deepspeed")
    return [runner, "--num_gpus", str(num_ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(ROOT / script), *args]


def env() -> dict:
    e = dict(os.environ, WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    return e


def run(script: str, args: list[str], timeout: float = 600, num_ranks: int = 2) -> subprocess.CompletedProcess:
    """Run to completion; kill the whole process group on timeout."""
    proc = subprocess.Popen(deepspeed_cmd(script, args, num_ranks), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{script} timed out after {timeout}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def run_until(script: str, args: list[str], done, timeout: float = 600, num_ranks: int = 2) -> str:
    """Start, wait until done() is true, then SIGKILL every process of the run (a node failure)."""
    proc = subprocess.Popen(deepspeed_cmd(script, args, num_ranks), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.time()
    try:
        while not done():
            if proc.poll() is not None or time.time() - t0 > timeout:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


def metrics_by_step(path) -> dict[int, dict]:
    """metrics.jsonl -> {step: row}; a resumed run re-logs steps, the last row of a step wins."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def killed_and_resumed(script: str, args, tmp_path, at: int, num_ranks: int = 2) -> tuple[dict, dict, Path]:
    """Run `script` to the end in tmp_path/ref; run it again in tmp_path/killed, SIGKILL it once its step-`at`
    checkpoint is the latest, resume with --resume auto. `args(run_dir)` gives the arguments. Checks that both
    finish on `num_ranks` ranks and that the resume started at `at`; returns (reference rows, resumed rows, ref dir)
    of metrics.jsonl."""
    ref = run(script, args(tmp_path / "ref"), num_ranks=num_ranks)
    assert ref.returncode == 0, ref.stdout[-5000:]
    assert f'"world_size": {max(num_ranks, 1)}' in ref.stdout
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    run_until(script, args(tmp_path / "killed"), num_ranks=num_ranks,
              done=lambda: latest.is_file() and latest.read_text().strip() == f"step_{at:06d}")
    res = run(script, [*args(tmp_path / "killed"), "--resume", "auto"], num_ranks=num_ranks)
    assert res.returncode == 0, res.stdout[-5000:]
    assert f'"resumed_at_step": {at}' in res.stdout
    return (metrics_by_step(tmp_path / "ref" / "metrics.jsonl"), metrics_by_step(tmp_path / "killed" / "metrics.jsonl"),
            tmp_path / "ref")
