"""One job per run_dir: a lock file (``run_dir/run.lock``) that rank 0 takes before any work.

Two jobs on one run_dir would interleave checkpoints, rotate each other's files away and append to one
metrics.jsonl. The run dir usually lives on a file system shared by several nodes, where ``fcntl.flock`` is not
reliable (NFS, Lustre and GPFS differ), so the lock is a record instead, created atomically (written to a file
of its own, then hard-linked to the lock name; ``O_CREAT | O_EXCL`` where links are not supported): ``{"host", "pid", "started", "heartbeat", "job", "proc_start"}``. The holder refreshes
``heartbeat`` every ``HEARTBEAT_S`` seconds from a daemon thread and removes the file at exit (atexit; a normal
exit, an exception and ``sys.exit`` all run it). A job killed hard (SIGKILL, a node crash) leaves the file, and
the next job decides whether it is stale:

* holder on this host: stale when its pid is gone (``os.kill(pid, 0)``) or now belongs to another process (its
  start time in ``/proc`` differs from the recorded one);
* holder on another host (its pid cannot be probed from here): stale when the heartbeat is older than
  ``STALE_S``;
* the same scheduler job (``SLURM_JOB_ID``) requeued: stale, since the scheduler ended the old one first.

A stale lock is taken over with a warning naming the old holder; a live one is refused with one line naming its
host and pid. Two jobs taking over the same stale lock at the same moment: each renames the old file to a name
of its own and only the one that moved the record it judged goes on (the other finds a different record and
refuses).
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # a holder on another host whose heartbeat is this old is taken for dead


class RunDirLocked(RuntimeError):
    """Another live job holds the run dir."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _record() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
            "job": os.environ.get("SLURM_JOB_ID"), "proc_start": _proc_start(os.getpid())}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_reason(holder: dict, now: float | None = None) -> str | None:
    """Why ``holder``'s lock is stale (a sentence), or None while the holder may still run."""
    now = time.time() if now is None else now
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("job") == job:
        return f"it is this scheduler job ({job}) before a requeue"
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if not _pid_alive(pid):
            return f"process {pid} is gone"
        if holder.get("proc_start") and _proc_start(pid) not in (None, holder["proc_start"]):
            return f"pid {pid} now belongs to another process"
        return None
    age = now - float(holder.get("heartbeat", 0))
    return f"its heartbeat is {age:.0f}s old (stale after {STALE_S:.0f}s)" if age > STALE_S else None


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    job = f", job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')}{job}, started {started}"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # half written by a crash, or unreadable: nobody can be shown to hold it
        return {"host": "?", "pid": -1, "started": 0, "heartbeat": 0}


class RunLock:
    """``RunLock(run_dir).acquire()`` takes the lock or raises ``RunDirLocked``; ``release()`` (also at exit)."""

    def __init__(self, run_dir: str | Path, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.record, self._stop = heartbeat_s, None, threading.Event()
        self._mutex = threading.Lock()  # a heartbeat never rewrites the file after release removed it

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # create, or judge the holder and move a stale record away, then create again
            if self._create():
                atexit.register(self.release)
                threading.Thread(target=self._beat, daemon=True, name="run-lock-heartbeat").start()
                return self
            self._take_over_or_refuse()
        raise RunDirLocked(f"{self.path}: could not take the lock (another job keeps taking it); pick another "
                           f"run_dir or stop the other job")

    def _create(self) -> bool:
        """Write the record to a file of our own, then hard-link it to the lock name: the link is atomic, fails if
        the name exists (also over NFS), and a reader never sees half a record. Where hard links are not supported
        (some FUSE/SMB mounts), ``O_CREAT | O_EXCL``."""
        record = _record()
        tmp = self.path.with_name(f"{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}.new")
        tmp.write_text(json.dumps(record))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
        finally:
            tmp.unlink(missing_ok=True)
        self.record = record
        return True

    def _take_over_or_refuse(self) -> None:
        holder = _read(self.path)
        reason = stale_reason(holder)
        if reason is None:
            raise RunDirLocked(f"run_dir {self.path.parent} is in use by another job ({describe(holder)}; lock "
                               f"file {self.path}). Wait for it to finish or stop it, or pick another run_dir=PATH; "
                               f"if you are sure that job is dead, delete {self.path}")
        moved = self.path.with_name(f"{LOCK_NAME}.stale.{socket.gethostname()}.{os.getpid()}")
        try:
            os.replace(self.path, moved)
        except FileNotFoundError:  # another job moved it first: try to create
            return
        if _read(moved) != holder:  # we moved a newer record than the one judged: put it back, judge again
            os.replace(moved, self.path)
            return
        moved.unlink(missing_ok=True)
        warnings.warn(f"run_dir {self.path.parent}: taking over the lock of a job that is gone ({describe(holder)}:"
                      f" {reason})", stacklevel=3)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Refresh the heartbeat (atomic rewrite) while the file is still ours; errors (a full disk) are ignored:
        only a holder on another host is judged by it, and only after ``STALE_S``."""
        with self._mutex:
            if self.record is None or _read(self.path) != self.record:
                return
            record = {**self.record, "heartbeat": time.time()}
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(record))
                os.replace(tmp, self.path)
                self.record = record
            except OSError:
                tmp.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        with self._mutex:
            if self.record is not None and _read(self.path) == self.record:
                self.path.unlink(missing_ok=True)
            self.record = None
