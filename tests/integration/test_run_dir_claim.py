"""The launchers claim run_dir before any work, with real processes: a live job holding run_dir makes a second
start refuse at once naming the holder's host and pid; after the holder is SIGKILLed the next start takes the
lock over with a warning. A read-only run_dir / generate --out is one error line before anything is built."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from readonly_dirs import read_only

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
HOLD = "import sys, time; from fastardiff_ds.engines.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(600)"


def _pretrain(run_dir: Path, shards: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launcher/pretrain_t2i.py"), "--preset", "tiny",
                           f"run_dir={run_dir}", f"data.shards={shards}"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_second_start_refuses_then_takes_over_a_dead_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = _pretrain(run_dir, tmp_path / "shards")
        assert refused.returncode != 0
        line = f"error: run_dir {run_dir} is in use by another job (host {socket.gethostname()} pid {holder.pid}"
        assert line in refused.stderr, refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr
        assert not (tmp_path / "shards").exists() and not (run_dir / "config.json").exists()  # no work was done
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    taken = _pretrain(run_dir, tmp_path / "missing.tar")  # fails later, on the missing shard: past the lock
    assert f"taking over the lock of a job that is gone (host {socket.gethostname()} pid {holder.pid}" in taken.stderr
    assert f"process {holder.pid} is gone" in taken.stderr and (run_dir / "config.json").is_file()
    assert not (run_dir / "run.lock").exists()  # released at exit


def test_read_only_run_dir_is_refused_before_any_work(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only(parent):
        proc = _pretrain(parent / "run", tmp_path / "shards")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"error: run_dir {parent / 'run'} is not writable" in proc.stderr and "run_dir=PATH" in proc.stderr
    assert not (tmp_path / "shards").exists()  # refused before generating the data


def test_read_only_generate_out_is_refused_before_loading(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only(parent):
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / "launcher/generate.py"), "--ckpt", str(tmp_path / "none"),
                               "--prompt", "a red circle", "--out", str(parent / "out")], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: --out {parent / 'out'} is not writable" in proc.stderr and "--out=PATH" in proc.stderr
    assert time.time() - t0 < 120


def test_injected_unwritable_generate_out(tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    sys.path.insert(0, str(ROOT / "launcher"))
    import generate

    def eacces(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", eacces)
    with pytest.raises(SystemExit) as exc:
        generate.main(["--random-init", "--prompt", "x", "--out", str(tmp_path / "out")])
    assert str(exc.value.code).startswith(f"error: --out {tmp_path / 'out'} is not writable (Permission denied)")
