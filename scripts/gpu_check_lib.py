"""Plumbing of scripts/gpu_check.py, standard library only (the check must print its JSON even where torch is broken).

- `Stage`: one named step of the check; times itself, turns any exception into ``{"ok": false, "error": ...}``,
  samples peak GPU memory while it runs, and says so loudly on stderr.
- `launch` / `run_logged`: child processes with their output in a log file, killed (whole process group) on timeout.
- `descendants` / `kill_a_rank`: find the training ranks under a deepspeed runner through /proc and SIGKILL one.
- `metric_rows`, `compare_losses`: metrics.jsonl rows by step and the resumed-vs-killed loss comparison.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path


class StageFailed(Exception):
    """A stage's own check failed (the message is the JSON `error`)."""


class GpuMemorySampler:
    """Peak used memory of GPU 0 (MiB, all processes) while a stage runs: NVML if importable, else nvidia-smi,
    else nothing (CPU dry run). The ranks are other processes, so torch's own counters cannot see them."""

    def __init__(self, period_s: float = 0.2):
        self.period_s, self.peak, self._stop = period_s, None, threading.Event()
        self._read = _nvml_reader() or _smi_reader()

    def __enter__(self):
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            used = self._read()
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)
            self._stop.wait(self.period_s)

    def __exit__(self, *exc):
        self._stop.set()
        if self._read is not None:
            self._thread.join(timeout=5)


def _nvml_reader():
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no NVML library, no GPU
        return None
    return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20


def _smi_reader():
    if shutil.which("nvidia-smi") is None:
        return None

    def read():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(out.split()[0])
        except Exception:
            return None
    return read if read() is not None else None


class Stage:
    """``with Stage(results, "name", deadline) as figures:`` -- figures is the dict that lands in the JSON."""

    def __init__(self, results: dict, name: str, deadline: float, needs: tuple[str, ...] = ()):
        self.results, self.name, self.deadline, self.needs = results, name, deadline, needs
        self.figures: dict = {}

    def __enter__(self) -> dict:
        missing = [n for n in self.needs if not self.results.get(n, {}).get("ok")]
        if missing:
            raise _Skip(f"skipped: needs stage(s) {missing}, which failed")
        if time.time() > self.deadline:
            raise _Skip("skipped: the check's time budget (--budget-s) is spent")
        self.t0 = time.time()
        self.mem = GpuMemorySampler().__enter__()
        print(f"[gpu_check] stage {self.name} ...", file=sys.stderr, flush=True)
        return self.figures

    def __exit__(self, exc_type, exc, tb):
        self.mem.__exit__(None, None, None)
        row = {"ok": exc is None, "seconds": round(time.time() - self.t0, 2), **self.figures}
        if self.mem.peak is not None:
            row["peak_gpu_mem_mib"] = round(self.mem.peak, 1)
        if exc is not None:
            row["error"] = str(exc) if isinstance(exc, StageFailed) else "".join(
                traceback.format_exception_only(exc_type, exc)).strip()
            print(f"[gpu_check] STAGE FAILED: {self.name}: {row['error']}", file=sys.stderr, flush=True)
        else:
            print(f"[gpu_check] stage {self.name} ok ({row['seconds']} s)", file=sys.stderr, flush=True)
        self.results[self.name] = row
        return exc is None or isinstance(exc, Exception)  # keep going; KeyboardInterrupt still propagates


class _Skip(Exception):
    pass


def stage(results: dict, name: str, deadline: float, fn, *args, needs: tuple[str, ...] = ()) -> None:
    """Run fn(figures, *args) as stage `name`; a skip (failed prerequisite, spent budget) is recorded, not raised."""
    try:
        with Stage(results, name, deadline, needs) as figures:
            fn(figures, *args)
    except _Skip as why:
        results[name] = {"ok": False, "seconds": 0.0, "error": str(why)}
        print(f"[gpu_check] STAGE FAILED: {name}: {why}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (each launch gets its own: a killed run's port may linger)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """Start cmd in its own process group, stdout+stderr into `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "w")
    handle.write("$ " + " ".join(cmd) + "\n")
    handle.flush()
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for proc; on timeout SIGKILL its whole process group and fail the stage."""
    try:
        return proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        killpg(proc)
        raise StageFailed(f"timed out after {timeout:.0f} s (process group killed)")


def killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_logged(cmd: list[str], log: Path, env: dict, cwd: Path, timeout: float) -> str:
    """Run to the end; returns the log text; a non-zero exit fails the stage with the log's tail."""
    rc = finish(launch(cmd, log, env, cwd), timeout)
    text = log.read_text(errors="replace")
    if rc != 0:
        raise StageFailed(f"exit code {rc}; log {log}; last lines:\n{tail(text)}")
    return text


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def json_lines(text: str) -> list[dict]:
    """Every stdout line that is a JSON object (the launchers print their summaries so)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def descendants(pid: int) -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process below `pid`, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "(comm) state"
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [(c, pid) for c in children.get(pid, [])]
    while todo:
        p, parent = todo.pop()
        try:
            cmd = (Path("/proc") / str(p) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append((p, parent, cmd))
        todo += [(c, p) for c in children.get(p, [])]
    return out


def kill_a_rank(runner: subprocess.Popen, script: str) -> int:
    """SIGKILL one training rank under `runner`: a node failure as the cluster sees it. A rank is a process
    running `script` whose parent does not (its forked data-loader workers share its command line) and which is no
    deepspeed launcher (their command lines name the script too). Returns the killed pid."""
    procs = descendants(runner.pid)
    runs = {p for p, _, c in procs if script in c and "deepspeed.launcher" not in c}
    ranks = sorted(p for p, parent, _ in procs if p in runs and parent not in runs)
    if not ranks:
        raise StageFailed(f"no rank process running {script} found under the deepspeed runner (pid {runner.pid})")
    os.kill(ranks[-1], signal.SIGKILL)
    return ranks[-1]


def metric_rows(path: Path) -> dict[int, dict]:
    """metrics.jsonl by step (a resumed run re-logs steps: the last row of a step wins)."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if isinstance(row.get("step"), int):
                rows[row["step"]] = row
    return rows


def loss_keys(row: dict) -> list[str]:
    return sorted(k for k, v in row.items() if "loss" in k and isinstance(v, (int, float)))


def compare_losses(before: dict[int, dict], after: dict[int, dict], steps: list[int]) -> tuple[float, int]:
    """Max relative difference over every logged loss of `steps` (killed run vs resumed run) and how many pairs."""
    worst, pairs = 0.0, 0
    for s in steps:
        for k in loss_keys(before[s]):
            if k in after.get(s, {}):
                a, b = before[s][k], after[s][k]
                worst = max(worst, abs(a - b) / max(abs(a), 1e-6))
                pairs += 1
    return worst, pairs


def all_finite(rows: dict[int, dict]) -> bool:
    return all(math.isfinite(v) for r in rows.values() for k, v in r.items() if isinstance(v, float))
