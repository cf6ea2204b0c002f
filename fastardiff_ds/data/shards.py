"""Shard lists and raw tar reading in webdataset's convention (``KEY.ext`` members grouped by KEY).

Nothing here decodes: a raw sample is ``{"__key__", "__shard__", "__bytes__", ext: bytes, ...}``.
Tar damage (truncation, bad headers, a file that ends without the end-of-archive block, as an interrupted
img2dataset download leaves it) never raises: the samples before the damage are used, the damage is
counted once in a `SkipCounter` (reason "truncated_tar") and logged with the shard. `scan_tar` counts the
samples `iter_tar` would yield from the headers alone.
"""
from __future__ import annotations

import glob
import io
import logging
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import braceexpand

log = logging.getLogger(__name__)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: key = up to first dot


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard paths from a brace pattern, a directory (its ``*.tar``), a ``.txt`` list file or a list.

    Raises ValueError naming `spec` when nothing matches or a listed shard is missing.
    """
    if isinstance(spec, (list, tuple)):
        paths = [p for s in spec for p in expand_shards(s)]
    elif not spec:
        raise ValueError("empty shard pattern: set DataConfig.shards to a brace pattern, a directory or a list file")
    elif os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif spec.endswith(".txt") and os.path.isfile(spec):
        root = os.path.dirname(os.path.abspath(spec))
        with open(spec, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        paths = [p if os.path.isabs(p) else os.path.join(root, p) for ln in lines for p in braceexpand.braceexpand(ln)]
    else:
        paths = [p for part in spec.split("::") for p in braceexpand.braceexpand(part)]
    if not paths:
        raise ValueError(f"shard pattern {spec!r} matched no shards (expected *.tar files)")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"shard pattern {spec!r}: {len(missing)} of {len(paths)} shards do not exist, e.g. {missing[0]!r}")
    return paths


class SkipCounter:
    """Counts skipped samples by reason and logs each with its key (the first `log_limit` per reason)."""

    def __init__(self, log_limit: int = 20):
        self.counts: Counter[str] = Counter()
        self.log_limit = log_limit

    def skip(self, reason: str, key: str, shard: str, detail: str = "") -> None:
        self.counts[reason] += 1
        level = logging.WARNING if self.counts[reason] <= self.log_limit else logging.DEBUG
        log.log(level, "skipping sample %r in %s: %s%s", key, shard, reason, f" ({detail})" if detail else "")


def _split(name: str) -> tuple[str, str] | None:
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def _groups_of(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, ext, member) of every sample member in file order; raises ReadError when the archive is cut short.

    A tar whose last member ends the file without an end-of-archive block (two zero blocks; we ask for one)
    was cut short at a member boundary -- tarfile treats that as a clean end, so it is checked here.
    """
    for member in tar:
        parts = _split(member.name) if member.isfile() else None
        if parts is None or os.path.basename(parts[0]).startswith("__"):
            continue
        yield parts[0], parts[1], member
    # tarfile stopped at tar.offset after trying to read one header block: a zero block means a proper end
    if tar.fileobj.tell() - tar.offset < tarfile.BLOCKSIZE:
        raise tarfile.ReadError("no end-of-archive block: the file was cut short")


def iter_tar(path: str, skips: SkipCounter) -> Iterator[dict]:
    """Yield raw samples of one tar in file order; damage ends the shard with reason 'truncated_tar'.

    The group being read when the error hit is dropped (it may be incomplete); earlier ones are kept.
    """
    current: dict | None = None
    reading = "<shard start>"  # key of the member being read, for the warning
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for key, ext, member in _groups_of(tar):
                reading = key
                if current is not None and current["__key__"] != key:  # a new key: the previous sample is whole
                    yield current
                    current = None
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} short by {member.size - len(data)} bytes")
                if current is None:
                    current = {"__key__": key, "__shard__": path, "__bytes__": 0}
                current[ext] = data
                current["__bytes__"] += len(data)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        skips.skip("truncated_tar", reading, path, f"{type(e).__name__}: {e}; the samples before it are used")
        return
    if current is not None:
        yield current


@dataclass
class TarScan:
    """Result of `scan_tar`: complete samples (what `iter_tar` yields) and the damage, if any."""

    samples: int
    truncated: bool
    error: str = ""


def scan_tar(path: str) -> TarScan:
    """Count the samples `iter_tar` would yield, reading headers only (uncompressed tars seek over data).

    A sample is a run of members with one key; on damage the run being read is not counted (as in iter_tar).
    """
    samples, key = 0, None
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:*") as tar:
            plain = isinstance(tar.fileobj, io.BufferedReader)  # uncompressed: offsets are file offsets
            for k, _, member in _groups_of(tar):
                if k != key:
                    samples, key = samples + (key is not None), k
                if plain and member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} runs past the end of the file")
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        return TarScan(samples, True, f"{type(e).__name__}: {e}")
    return TarScan(samples + (key is not None), False)
