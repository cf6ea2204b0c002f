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
