"""The one door to full unpickling: only files of a checkpoint this process verified against its manifest.

``torch.load(weights_only=False)`` runs whatever a pickle names (``__reduce__``), so a planted or swapped
``.pt`` in a run directory would run code at resume. DeepSpeed's ZeRO files need full unpickling (DeepSpeed's
own ``load_checkpoint`` reads them so, and they hold DeepSpeed objects), so the rule is: a file is unpickled only
if it belongs to a checkpoint whose every file matched its size and xxh3-128 checksum in a deep
``manifest.verify`` in this process, every file in the folder is listed in the manifest, and the file has not
changed since (same size, mtime and inode, else it is hashed again). ``ensure_verified`` checks a checkpoint
before DeepSpeed touches it; ``load_verified`` is the only ``weights_only=False`` in the library (a source scan,
tests/unit/test_trusted_load.py, keeps it so). Client files (python / numpy / torch RNG states, counters) need no
pickle: they load with ``weights_only=True`` and numpy's array reconstructors allowed (``load_client``).

What this guards: foreign or tampered files in a checkpoint folder (copied in, swapped after the save, a
truncated or bit-flipped file). It does not make a checkpoint from someone else safe: a manifest is a plain
file, and whoever can write the folder can write a matching one -- load only checkpoints your runs wrote.
Checkpoints from before checksummed manifests (format 1) are refused; ``python -m fastardiff_ds.engines.trusted
DIR`` adds checksums to one you wrote yourself.
"""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from fastardiff_ds.engines.manifest import (HASH, MANIFEST, file_digest, hash_files, list_files, read_manifest,
                                            stat_of, verified_record, verify, write_manifest)

FIX = ("resume only from checkpoints your runs wrote: restore the named files from a backup, or move the "
       "checkpoint folder away and resume from an older one (resume=auto) or start fresh (resume=none)")


class UntrustedCheckpoint(FileNotFoundError):
    """A checkpoint file that may not be unpickled. A FileNotFoundError, as a damaged checkpoint is: callers that
    report those in one line (the training loop's resume) report this one too."""


def ensure_verified(ckpt: str | Path) -> None:
    """Make sure ``ckpt`` may be unpickled: verify it deeply unless this process already did (collective then:
    every rank calls it), refuse files the manifest does not list, re-hash files changed since. Raises
    ``UntrustedCheckpoint`` naming the files and the fix."""
    ckpt = Path(ckpt)
    if verified_record(ckpt) is None:
        _verify_now(ckpt)
    record = verified_record(ckpt)
    if record is None:  # the manifest was replaced while it was being verified
        raise UntrustedCheckpoint(f"{ckpt / MANIFEST} changed while it was verified; {FIX}")
    extra = sorted(set(list_files(ckpt)) - set(record["files"]))
    if extra:
        raise UntrustedCheckpoint(f"checkpoint {ckpt} holds files its {MANIFEST} does not list (added after the "
                                  f"save): {[str(ckpt / n) for n in extra[:5]]}; remove them, or {FIX}")
    for name in sorted(record["files"]):
        _unchanged(ckpt, name, record)


def _verify_now(ckpt: Path) -> None:
    try:
        manifest = read_manifest(ckpt)
    except ValueError as e:
        raise UntrustedCheckpoint(f"{e}: its pickled files cannot be checked, so they are not loaded; {FIX}") from None
    if "files" not in manifest:
        raise UntrustedCheckpoint(f"checkpoint {ckpt} has no checksums ({ckpt / MANIFEST} predates format 2), so "
                                  f"its pickled files cannot be checked against what the run wrote; if your run "
                                  f"wrote it, add them with `python -m fastardiff_ds.engines.trusted {ckpt}`, else "
                                  f"{FIX}")
    problems = verify(ckpt, deep=True)
    if problems:
        raise UntrustedCheckpoint(f"checkpoint {ckpt} does not match its {MANIFEST}, so its pickled files are not "
                                  f"loaded: {'; '.join(problems)}; {FIX}")


def _unchanged(ckpt: Path, name: str, record: dict) -> None:
    """``name`` is as verified: same stat, or (touched since) the same checksum."""
    path = ckpt / name
    try:
        same = stat_of(path) == record["stats"][name]
    except OSError:
        raise UntrustedCheckpoint(f"{path} is gone since checkpoint {ckpt} was verified; {FIX}") from None
    if not same and (path.stat().st_size != record["files"][name]["size"]
                     or file_digest(path) != record["files"][name][HASH]):
        raise UntrustedCheckpoint(f"{path} changed after checkpoint {ckpt} was verified (its checksum no longer "
                                  f"matches {MANIFEST}); it is not loaded; {FIX}")


def load_verified(path: str | Path, ckpt: str | Path, **kwargs):
    """``torch.load(path, weights_only=False)`` for a file of checkpoint ``ckpt`` verified in this process
    (``ensure_verified``, or a deep ``verify`` such as ``resolve_resume``'s); anything else is refused."""
    path, ckpt = Path(path), Path(ckpt)
    record = verified_record(ckpt)
    if record is None:
        raise UntrustedCheckpoint(f"{path}: checkpoint {ckpt} was not verified against its {MANIFEST} in this "
                                  f"process, so its pickles are not loaded; load it through load_checkpoint or "
                                  f"resolve_resume (they verify it first)")
    try:
        name = path.resolve().relative_to(ckpt.resolve()).as_posix()
    except ValueError:
        raise UntrustedCheckpoint(f"{path} is not inside checkpoint {ckpt}; it is not loaded") from None
    if name not in record["files"]:
        raise UntrustedCheckpoint(f"{path} is not listed in {ckpt / MANIFEST} (added after the save); it is not "
                                  f"loaded; remove it, or {FIX}")
    _unchanged(ckpt, name, record)
    return torch.load(path, weights_only=False, **kwargs)


def numpy_globals() -> list:
    """What a pickled numpy array or scalar (``np.random.get_state()``'s key array) references."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    found = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: a class per dtype, pickled by name
    return found + ([getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes else [])


def load_client(path: str | Path, ckpt: str | Path) -> dict:
    """A client file (client state + RNG states): ``weights_only=True`` with numpy's reconstructors allowed;
    a client state holding other objects falls back to ``load_verified``."""
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5: scoped to this load
        with torch.serialization.safe_globals(numpy_globals()):
            return _weights_only_or_verified(path, ckpt)
    torch.serialization.add_safe_globals(numpy_globals())  # torch 2.4
    return _weights_only_or_verified(path, ckpt)


def _weights_only_or_verified(path, ckpt):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return load_verified(path, ckpt, map_location="cpu")


def add_checksums(ckpt: str | Path) -> bool:
    """Give a format-1 checkpoint (no checksums) a format-2 manifest of its files as they are now; False if it
    already has one. Only for checkpoints your own runs wrote: this vouches for whatever the folder holds."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    if "files" in manifest:
        return False
    meta = {k: v for k, v in manifest.items() if k not in ("format", "version", "hash", "files")}
    write_manifest(ckpt, meta, hash_files(ckpt))
    return True


def main(argv: list[str] | None = None) -> None:
    dirs = sys.argv[1:] if argv is None else argv
    if not dirs:
        sys.exit("usage: python -m fastardiff_ds.engines.trusted CHECKPOINT_DIR... (adds checksums to format-1 "
                 "checkpoints your own runs wrote)")
    for d in dirs:
        try:
            done = add_checksums(d)
        except ValueError as e:
            sys.exit(f"error: {e}")
        print(json.dumps({"checkpoint": str(d), "checksums_added": done}))


if __name__ == "__main__":
    main()
