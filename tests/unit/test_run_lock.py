"""engines/run_lock.py: one job per run_dir. The rules for a stale lock (a dead pid on this host, a reused pid, an
old heartbeat from another host, the same scheduler job requeued), release only of our own record, the heartbeat,
and the refusal naming host and pid. Two real processes: tests/integration/test_run_dir_lock.py."""
import json
import os
import socket
import subprocess
import sys
import time
import warnings

import pytest

from fastardiff_ds.engines import run_lock
from fastardiff_ds.engines.run_lock import LOCK_NAME, RunDirLocked, RunLock, stale_reason


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write(run_dir, **record):
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    full = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now, "job": None,
            "proc_start": None, **record}
    (run_dir / LOCK_NAME).write_text(json.dumps(full))
    return full


def test_live_holder_on_this_host_is_refused_naming_host_and_pid(tmp_path):
    _write(tmp_path, pid=os.getpid())  # this very process: alive
    with pytest.raises(RunDirLocked) as exc:
        RunLock(tmp_path).acquire()
    msg = str(exc.value)
    assert f"host {socket.gethostname()} pid {os.getpid()}" in msg and str(tmp_path) in msg
    assert "pick another run_dir=PATH" in msg and f"delete {tmp_path / LOCK_NAME}" in msg


def test_dead_pid_is_taken_over_with_a_warning(tmp_path):
    pid = _dead_pid()
    _write(tmp_path, pid=pid)
    with pytest.warns(UserWarning, match=rf"taking over the lock .*pid {pid}.*process {pid} is gone"):
        lock = RunLock(tmp_path).acquire()
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_reused_pid_is_stale(tmp_path):
    holder = _write(tmp_path, pid=os.getpid(), proc_start="1")  # our pid, but another process's start time
    assert "now belongs to another process" in stale_reason(holder)
    assert stale_reason({**holder, "proc_start": run_lock._proc_start(os.getpid())}) is None


def test_other_host_is_judged_by_its_heartbeat(tmp_path):
    now = time.time()
    fresh = {"host": "node-elsewhere", "pid": 1, "heartbeat": now - 10}
    old = {**fresh, "heartbeat": now - run_lock.STALE_S - 1}
    assert stale_reason(fresh, now) is None
    assert "heartbeat is" in stale_reason(old, now)
    _write(tmp_path, **fresh)
    with pytest.raises(RunDirLocked, match="host node-elsewhere pid 1"):
        RunLock(tmp_path).acquire()


def test_the_same_scheduler_job_requeued_takes_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    holder = _write(tmp_path, host="node-elsewhere", pid=1, job="4242")
    assert "4242" in stale_reason(holder)
    with pytest.warns(UserWarning, match="job 4242"):
        RunLock(tmp_path).acquire().release()


def test_release_leaves_another_jobs_lock_alone(tmp_path):
    lock = RunLock(tmp_path).acquire()
    other = _write(tmp_path, host="node-elsewhere", pid=7)  # e.g. a human deleted ours and another job took it
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == other


def test_heartbeat_refreshes_the_record(tmp_path):
    lock = RunLock(tmp_path).acquire()
    before = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.01)
    lock.heartbeat()
    after = json.loads((tmp_path / LOCK_NAME).read_text())
    assert after["heartbeat"] > before and after["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_half_written_lock_is_stale(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"host": ')  # a crash while writing it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RunLock(tmp_path).acquire().release()
    assert any("taking over" in str(w.message) for w in caught)
