"""Truly read-only folders and small file systems for fault tests.

Root ignores permission bits, so ``chmod 0o555`` alone proves nothing when the tests run as root (this machine);
there a read-only bind mount of the folder onto itself is used, elsewhere (CI as a normal user) chmod. Either way
the folder is checked to refuse a write, or the test is skipped. ``small_tmpfs`` mounts a size-limited tmpfs
(root only, skipped elsewhere). Everything mounted is unmounted in ``finally``.
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


def _refuses_writes(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return False


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextmanager
def read_only(folder: Path):
    """Make ``folder`` (already filled) refuse writes for the duration; skip when this machine cannot."""
    folder = Path(folder)
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            if not _refuses_writes(folder):
                pytest.skip(f"cannot make {folder} read-only here")
            yield folder
        finally:
            folder.chmod(mode)
        return
    if not _mount("--bind", str(folder), str(folder)):
        pytest.skip("root, but bind mounts are not allowed here: no way to make a folder read-only")
    try:
        if not _mount("-o", "remount,ro,bind", str(folder)) or not _refuses_writes(folder):
            pytest.skip("could not remount a bind mount read-only here")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@contextmanager
def small_tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` (e.g. "8m") at ``folder``; skipped where mounting is not allowed (not root, CI)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)):
        pytest.skip("mounting a small tmpfs needs root (and a machine that allows it)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
