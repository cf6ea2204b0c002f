"""Run checkpoints: every engine, every rank's client state + RNG, the resolved config; a manifest; ``latest``.

Layout (systems.md §7.5)::

    <root>/step_000500/{target,draft,head,fake}/   engine.save_checkpoint (weights + optimizer + lr schedule):
                                                   zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt per rank
    <root>/step_000500/modules/<name>.safetensors  gathered frozen modules (EMA), written by rank 0
    <root>/step_000500/client/rank_00000.pt        client state of that rank + its RNG states
    <root>/step_000500/trainer_state.json          rank 0's client state, human-readable
    <root>/step_000500/config.json                 the resolved config
    <root>/step_000500/manifest.json               written last, atomically: sizes + xxh3-128 of every file
    <root>/latest                                  tag of the newest complete checkpoint (atomic rename)

Every call here is collective: all ranks save/load the same engines in the same (sorted) order. The
manifest and ``latest`` only appear after every rank finished every file (barrier) and the files were
hashed, so a crash mid-save leaves the previous checkpoint as the newest complete one. ``resume=auto``
verifies the newest checkpoint against its manifest (manifest.py) and falls back to the newest intact one
with a warning naming the bad file. A checkpoint written on W ranks loads on W' ranks: ZeRO-3 engines are
re-split at load time (reshard.py), ranks present in both runs get their own client state and RNG back,
and every rank receives all saved ranks' client states (``client["peers"]``) to re-split the data cursor.
The checkpoint directory must be on a file system every rank sees (it already had to be for ``latest``).
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from fastardiff_ds.engines.dist import all_gather_object, barrier, get_rank, get_world_size, is_rank0
from fastardiff_ds.engines.export import gathered_state_dict, load_gathered_state_dict
from fastardiff_ds.engines.manifest import (MANIFEST, HashingError, atomic_write, hash_files, read_manifest,
                                            verify, write_manifest)

log = logging.getLogger(__name__)
LATEST = "latest"


def step_tag(step: int) -> str:
    return f"step_{step:06d}"


def capture_rng_state() -> dict:
    """This rank's RNG states: python, numpy, torch CPU and (if present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointSaveError(OSError):
    """A save failed on some rank (a full disk, a quota, a read-only mount); the same error on every rank.
    The previous checkpoint and ``latest`` are untouched and the partial step dir is removed."""


def save_checkpoint(root: str | Path, step: int, engines: Mapping[str, object], *, client_state: dict,
                    config: dict | None = None, modules: Mapping[str, nn.Module] | None = None,
                    keep_last: int | None = 3) -> Path:
    """Save everything for exact resume at ``step``; returns the checkpoint directory.

    ``engines``: name -> ``Engine`` (weights, optimizer, lr schedule via DeepSpeed).
    ``client_state``: this rank's train state (step, stage, consumed samples, data cursor, W&B id...).
    ``modules``: frozen modules saved as gathered weights (EMA); ``keep_last``: rotation (None = keep all).

    A failed write (``OSError``: ENOSPC, EDQUOT, EROFS...) on any rank raises ``CheckpointSaveError`` on every
    rank after the ranks voted, naming the folder, the free bytes and the bytes a checkpoint needs.
    """
    root = Path(root)
    ckpt = root / step_tag(step)
    error = _first_error(lambda: _make_step_dir(ckpt))
    _raise_if_any_failed(root, ckpt, error)
    errors = [_save_engine(engines[name], ckpt, name) for name in sorted(engines)]
    for name in sorted(modules or {}):
        sd = gathered_state_dict(modules[name])  # collective: every rank, even after a failed write
        errors.append(_first_error(lambda: _save_module(ckpt, name, sd)))
    errors.append(_first_error(lambda: _save_client_files(ckpt, client_state, config)))
    # the vote doubles as the barrier: every rank has written (or failed) every file before they are hashed
    _raise_if_any_failed(root, ckpt, next((e for e in errors if e), None))
    try:  # collective: each rank hashes and fsyncs a share (a network file system may report ENOSPC only here)
        files = hash_files(ckpt, fsync=True)
    except HashingError as e:  # raised on every rank alike: vote with each rank's own part, commit nothing
        _raise_if_any_failed(root, ckpt, e.by_rank.get(get_rank()))
    error = _first_error(lambda: _commit(root, ckpt, step, engines, modules, files)) if is_rank0() else None
    _raise_if_any_failed(root, ckpt, error)  # also the closing barrier
    if is_rank0() and keep_last:
        rotate(root, keep_last)  # only after the new checkpoint is complete and named by `latest`
    barrier()
    return ckpt


# torch.save reports a failed write (a full disk) as a RuntimeError from its C++ zip writer, not as an OSError
_TORCH_WRITE_FAILURES = ("iostream error", "PytorchStreamWriter failed", "file write failed", "unexpected pos")


def _write_error(e: BaseException) -> str | None:
    """One line describing ``e`` if it is a failed write (kept for the vote); None for anything else (a bug)."""
    if isinstance(e, OSError):
        return f"{type(e).__name__}: {e}"
    if isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILURES):
        return f"torch.save could not write ({str(e).strip().splitlines()[0]}: a full disk or quota?)"
    if type(e).__name__ == "SafetensorError" and "I/O error" in str(e):  # safetensors' own error type
        return f"safetensors could not write: {e}"
    return None


def _first_error(fn) -> str | None:
    """Run ``fn``; a failed write becomes its one-line description, anything else raises."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- re-raised unless it is a failed write
        if (message := _write_error(e)) is None:
            raise
        return message
    return None


def _make_step_dir(ckpt: Path) -> None:
    if is_rank0():
        if ckpt.exists():  # re-saving a step (after a fallback): stale files of another world size must go
            shutil.rmtree(ckpt)
        ckpt.mkdir(parents=True)


def _save_engine(engine, ckpt: Path, name: str) -> str | None:
    """``engine.save`` on this rank. DeepSpeed's save_checkpoint runs its collectives (a barrier, the tag check)
    before its first write and one barrier after its last, so a rank whose write failed stands in for that closing
    barrier: the ranks stay in step and the failure is voted on afterwards instead of hanging a barrier."""
    error = _first_error(lambda: engine.save(str(ckpt), tag=name))
    if error:
        barrier()
    return error


def _save_module(ckpt: Path, name: str, sd: dict) -> None:
    if is_rank0():
        from safetensors.torch import save_file

        (ckpt / "modules").mkdir(exist_ok=True)
        save_file(sd, str(ckpt / "modules" / f"{name}.safetensors"))


def _commit(root: Path, ckpt: Path, step: int, engines: Mapping, modules: Mapping | None, files: dict) -> None:
    """Rank 0: the manifest marks the checkpoint complete, then ``latest`` names it (both atomic)."""
    write_manifest(ckpt, {"step": step, "engines": sorted(engines), "modules": sorted(modules or {}),
                          "world_size": get_world_size()}, files)
    atomic_write(root / LATEST, ckpt.name)


def _raise_if_any_failed(root: Path, ckpt: Path, error: str | None) -> None:
    """Collective vote. If any rank failed: rank 0 removes the partial step dir (its space is needed), and every
    rank raises the same ``CheckpointSaveError`` (the first failed rank's error, free and needed bytes)."""
    errors = all_gather_object(error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return
    written = _dir_bytes(ckpt)
    barrier()  # every rank has measured the partial dir before it goes
    if is_rank0():
        shutil.rmtree(ckpt, ignore_errors=True)
    barrier()
    raise CheckpointSaveError(save_failure_message(root, ckpt, failed, written))


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def previous_size(root: Path, exclude: str) -> tuple[str, int] | None:
    """(tag, bytes) of the newest complete checkpoint other than ``exclude``, from its manifest's sizes."""
    for old in reversed(complete_checkpoints(root)):
        if old.name != exclude:
            try:
                return old.name, sum(e["size"] for e in read_manifest(old).get("files", {}).values())
            except (ValueError, KeyError, TypeError):
                continue
    return None


def save_failure_message(root: Path, ckpt: Path, failed: list[tuple[int, str]], written: int) -> str:
    """One paragraph: what failed where, free vs needed bytes, what is left intact, what to do."""
    free = _free_bytes(root)
    prev = previous_size(root, ckpt.name)
    need = (f"a checkpoint needs about {_human(prev[1])} (the size of {prev[0]})" if prev else
            f"this one had written {_human(written)} when it failed (it needs more)")
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    kept = f"the previous checkpoint {root / latest} and {root / LATEST} are intact" if latest else \
        "no earlier checkpoint exists"
    ranks = ", ".join(str(r) for r, _ in failed)
    return (f"could not save checkpoint {ckpt.name} in {root} (failed on rank {ranks}: {failed[0][1]}); "
            f"{free} there, {need}; the partial {ckpt.name} was removed and {kept}. Free space there, or point "
            f"run_dir at a larger file system")


def _free_bytes(root: Path) -> str:
    try:
        return f"{_human(shutil.disk_usage(root).free)} free"
    except OSError:
        return "free space unknown"


def _human(n: int) -> str:
    return f"{n} bytes ({n / 2**20:.1f} MiB)"


def _save_client_files(ckpt: Path, client_state: dict, config: dict | None) -> None:
    import json

    (ckpt / "client").mkdir(exist_ok=True)
    torch.save({"client_state": client_state, "rng": capture_rng_state()},
               ckpt / "client" / f"rank_{get_rank():05d}.pt")
    if is_rank0():
        (ckpt / "trainer_state.json").write_text(json.dumps(client_state, indent=2, default=str))
        if config is not None:
            (ckpt / "config.json").write_text(json.dumps(config, indent=2, default=str))


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return -1


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints (a manifest present, not yet verified) under ``root``, oldest first."""
    return sorted((p.parent for p in Path(root).glob(f"step_*/{MANIFEST}")), key=_step_of)


def rotate(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)."""
    root = Path(root)
    latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    for old in complete_checkpoints(root)[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*"):  # leftovers of interrupted saves, older than the latest good one
        if latest and _step_of(stale) < _step_of(root / latest) and not (stale / MANIFEST).exists():
            shutil.rmtree(stale, ignore_errors=True)


def _warn(msg: str, *args) -> None:
    if is_rank0():  # every rank reaches the same verdict; one report is enough
        log.warning(msg, *args)


def latest_intact(root: str | Path, deep: bool = True) -> Path | None:
    """The newest checkpoint under ``root`` that matches its manifest; None when there is none at all.

    Newer damaged or incomplete checkpoints are skipped with a warning naming the bad file(s). Raises
    ``FileNotFoundError`` naming the folder when checkpoints exist but none is intact. ``deep``: verify
    checksums (collective, each rank hashes a share), else sizes only. Checkpoints without checksums
    (written before manifests had them) are accepted after a structural check, with a warning.
    """
    root = Path(root)
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), key=_step_of, reverse=True)
    damaged = []
    for ckpt in candidates:
        if not (ckpt / MANIFEST).is_file():
            damaged.append(f"{ckpt}: no {MANIFEST} (the save was interrupted)")
            _warn("checkpoint %s is incomplete (no %s: an interrupted save); trying an older one", ckpt, MANIFEST)
            continue
        problems = verify(ckpt, deep=deep)
        if not problems:
            if "files" not in read_manifest(ckpt):
                _warn("checkpoint %s predates checksummed manifests: checked structurally only", ckpt)
            return ckpt
        damaged.append("; ".join(problems))
        _warn("checkpoint %s is damaged, falling back to an older one: %s", ckpt, "; ".join(problems))
    if damaged:
        raise FileNotFoundError(f"no intact checkpoint in {root}: " + " | ".join(damaged) + ". Restore the named "
                                "files from a backup, or move the damaged step_* folders away and start fresh "
                                "with resume=none")
    return None


def resolve_resume(root: str | Path, resume: str | None, deep: bool = True) -> Path | None:
    """Map ``resume`` to a verified checkpoint dir: ``None``/"none" -> None; ``"auto"`` -> the newest intact
    checkpoint under ``root`` (None if there is none: a fresh run; see ``latest_intact``); a tag
    (``step_000500``) or a path -> that dir, which must be complete and intact (no silent fallback)."""
    import os

    if resume in (None, "", "none"):
        return None
    root = Path(root)
    if resume == "auto":
        if (root / LATEST).exists():
            named = root / (root / LATEST).read_text().strip()
            if not (named / MANIFEST).is_file():
                _warn("%s names %s, which is missing or incomplete; using the newest intact checkpoint",
                      root / LATEST, named)
        return latest_intact(root, deep=deep)
    ckpt = Path(resume) if Path(resume).is_dir() or os.sep in str(resume) else root / resume
    if not (ckpt / MANIFEST).is_file():
        done = [p.name for p in complete_checkpoints(ckpt.parent)] if ckpt.parent.is_dir() else []
        raise FileNotFoundError(f"checkpoint {ckpt} is missing or incomplete (no {MANIFEST}: the save was "
                                f"interrupted or the path is wrong); resume from one of {done} "
                                f"or start fresh with resume=none")
    problems = verify(ckpt, deep=deep)
    if problems:
        raise FileNotFoundError(f"checkpoint {ckpt} is damaged: {'; '.join(problems)}; resume=auto picks the "
                                f"newest intact checkpoint, or restore the named files")
    return ckpt


def load_checkpoint(ckpt: str | Path, engines: Mapping[str, object], *,
                    modules: Mapping[str, nn.Module] | None = None, load_optimizer: bool = True,
                    restore_rng: bool = True) -> dict:
    """Load every engine (+ optimizer and lr schedule) and module from ``ckpt``; return this rank's
    client state. Engines must be freshly built (DeepSpeed cannot reload ZeRO-3 into a used engine).

    On another world size (W saved, W' now) ZeRO-3 engines are re-split (reshard.py); rank r < W gets its
    own client state and RNG, a new rank r >= W gets rank 0's client state and RNG streams seeded from
    (rank 0's saved state, r), so no two ranks draw the same noise; the returned dict then also holds
    ``"peers"``: every saved rank's client state in rank order (for the data cursor, see
    ``StreamingLoader.resume_from``).

    Nothing is unpickled before ``ckpt`` matches its manifest (verified here unless ``resolve_resume`` did in
    this process; trusted.py): a missing, tampered or unlisted file raises ``UntrustedCheckpoint`` naming it.
    """
    from fastardiff_ds.engines.reshard import load_resharded
    from fastardiff_ds.engines.trusted import ensure_verified, load_client

    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    held = manifest["engines"] + manifest["modules"]
    missing = sorted(set(engines) - set(manifest["engines"])) + sorted(set(modules or {}) - set(manifest["modules"]))
    if missing:
        raise KeyError(f"checkpoint {ckpt} has no {missing} (it holds {held}): it was saved by a run with other "
                       f"networks; resume with the config it was saved with (its config.json; e.g. train.target_ar, "
                       f"train.student_ema_decay), or use a fresh run_dir")
    unused = sorted(set(held) - set(engines) - set(modules or {}))
    if unused and is_rank0():
        log.warning("checkpoint %s also holds %s, which this run does not build: they are not loaded, and this run "
                    "will not save them (its config differs from the one that saved the checkpoint)", ckpt, unused)
    saved_world, rank = manifest["world_size"], get_rank()
    same = saved_world == get_world_size()
    clients = [_client_file(ckpt, r) for r in (range(saved_world) if not same else [rank])]
    ensure_verified(ckpt)  # collective; before anything is unpickled, DeepSpeed's own load included (trusted.py)
    for name in sorted(engines):
        if same:
            engines[name].load(str(ckpt), tag=name, load_optimizer=load_optimizer)
        else:
            load_resharded(engines[name], ckpt / name, saved_world, load_optimizer=load_optimizer)
    for name in sorted(modules or {}):
        load_gathered_state_dict(modules[name], ckpt / "modules" / f"{name}.safetensors")
    saved = [load_client(path, ckpt) for path in clients]
    mine = saved[0] if same else saved[rank] if rank < saved_world else saved[0]
    if restore_rng and (same or rank < saved_world):
        restore_rng_state(mine["rng"])
    elif restore_rng:
        _seed_new_rank(mine["rng"], rank)
    barrier()
    client = dict(mine["client_state"])
    if not same:
        client["peers"] = [s["client_state"] for s in saved]
        if is_rank0():
            log.warning("resumed %s (written by %d ranks) on %d ranks: engines re-split", ckpt, saved_world,
                        get_world_size())
    return client


def _seed_new_rank(rng0: dict, rank: int) -> None:
    """A rank the saved run did not have: RNG streams seeded from (saved rank 0's torch state, rank)."""
    import hashlib

    seed = int.from_bytes(hashlib.blake2b(rng0["torch"].numpy().tobytes() + rank.to_bytes(4, "little"),
                                          digest_size=8).digest(), "little") >> 1
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _client_file(ckpt: Path, rank: int) -> Path:
    path = ckpt / "client" / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint {ckpt} is incomplete; resume from an older one")
    return path
