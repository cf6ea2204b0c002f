"""Run checkpoints: every engine, every rank's client state + RNG, the resolved config; atomic ``latest``.

Layout (systems.md §7.5)::

    <root>/step_000500/{target,draft,head,fake}/   engine.save_checkpoint (weights + optimizer + lr schedule)
    <root>/step_000500/modules/<name>.safetensors  gathered frozen modules (EMA), written by rank 0
    <root>/step_000500/client/rank_00000.pt        client state of that rank + its RNG states
    <root>/step_000500/trainer_state.json          rank 0's client state, human-readable
    <root>/step_000500/config.json                 the resolved config
    <root>/step_000500/manifest.json               written last: the checkpoint is complete
    <root>/latest                                  tag of the newest complete checkpoint (atomic rename)

Every call here is collective: all ranks save/load the same engines in the same (sorted) order.
``latest`` only moves after every rank finished every engine (barrier), so a crash mid-save leaves
the previous checkpoint as ``latest``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from fastardiff_ds.engines.dist import barrier, get_rank, get_world_size, is_rank0
from fastardiff_ds.engines.export import gathered_state_dict, load_gathered_state_dict

MANIFEST, LATEST = "manifest.json", "latest"


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


def save_checkpoint(root: str | Path, step: int, engines: Mapping[str, object], *, client_state: dict,
                    config: dict | None = None, modules: Mapping[str, nn.Module] | None = None,
                    keep_last: int | None = 3) -> Path:
    """Save everything for exact resume at ``step``; returns the checkpoint directory.

    ``engines``: name -> ``Engine`` (weights, optimizer, lr schedule via DeepSpeed).
    ``client_state``: this rank's train state (step, stage, consumed samples, data cursor, W&B id...).
    ``modules``: frozen modules saved as gathered weights (EMA); ``keep_last``: rotation (None = keep all).
    """
    root = Path(root)
    ckpt = root / step_tag(step)
    if is_rank0():
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / MANIFEST).unlink(missing_ok=True)  # re-saving a step: incomplete until the end
    barrier()
    for name in sorted(engines):
        engines[name].save(str(ckpt), tag=name)
    for name in sorted(modules or {}):
        sd = gathered_state_dict(modules[name])
        if is_rank0():
            from safetensors.torch import save_file

            (ckpt / "modules").mkdir(exist_ok=True)
            save_file(sd, str(ckpt / "modules" / f"{name}.safetensors"))
    _save_client_files(ckpt, client_state, config)
    barrier()  # every rank has written every file before the checkpoint becomes visible
    if is_rank0():
        manifest = {"step": step, "engines": sorted(engines), "modules": sorted(modules or {}),
                    "world_size": get_world_size()}
        _atomic_write(ckpt / MANIFEST, json.dumps(manifest, indent=2))
        _atomic_write(root / LATEST, ckpt.name)
        if keep_last:
            rotate(root, keep_last)
    barrier()
    return ckpt


def _save_client_files(ckpt: Path, client_state: dict, config: dict | None) -> None:
    (ckpt / "client").mkdir(exist_ok=True)
    torch.save({"client_state": client_state, "rng": capture_rng_state()},
               ckpt / "client" / f"rank_{get_rank():05d}.pt")
    if is_rank0():
        (ckpt / "trainer_state.json").write_text(json.dumps(client_state, indent=2, default=str))
        if config is not None:
            (ckpt / "config.json").write_text(json.dumps(config, indent=2, default=str))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half of one


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    return sorted(p.parent for p in Path(root).glob(f"step_*/{MANIFEST}"))


def rotate(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)."""
    root = Path(root)
    latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    for old in complete_checkpoints(root)[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*"):  # leftovers of interrupted saves, older than the latest good one
        if latest and stale.name < latest and not (stale / MANIFEST).exists():
            shutil.rmtree(stale, ignore_errors=True)


def resolve_resume(root: str | Path, resume: str | None) -> Path | None:
    """Map ``resume`` to a checkpoint dir: ``None``/"none" -> None; ``"auto"`` -> ``root/latest`` (None if
    absent: a fresh run); a tag (``step_000500``) or a path -> that dir, which must be complete."""
    if resume in (None, "", "none"):
        return None
    root = Path(root)
    if resume == "auto":
        if not (root / LATEST).exists():
            return None
        ckpt = root / (root / LATEST).read_text().strip()
    else:
        ckpt = Path(resume) if Path(resume).is_dir() or os.sep in str(resume) else root / resume
    if not (ckpt / MANIFEST).is_file():
        done = [p.name for p in complete_checkpoints(ckpt.parent)] if ckpt.parent.is_dir() else []
        raise FileNotFoundError(f"checkpoint {ckpt} is missing or incomplete (no {MANIFEST}: the save was "
                                f"interrupted or the path is wrong); resume from one of {done} "
                                f"or start fresh with resume=none")
    return ckpt


def load_checkpoint(ckpt: str | Path, engines: Mapping[str, object], *,
                    modules: Mapping[str, nn.Module] | None = None, load_optimizer: bool = True,
                    restore_rng: bool = True) -> dict:
    """Load every engine (+ optimizer and lr schedule) and module from ``ckpt``; return this rank's
    client state. Engines must be freshly built (DeepSpeed cannot reload ZeRO-3 into a used engine)."""
    ckpt = Path(ckpt)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    missing = sorted(set(engines) - set(manifest["engines"])) + sorted(set(modules or {}) - set(manifest["modules"]))
    if missing:
        raise KeyError(f"checkpoint {ckpt} has no {missing} (it holds {manifest['engines'] + manifest['modules']}); "
                       f"resume with the same networks enabled or load_module_only from an export")
    if manifest["world_size"] != get_world_size():
        raise ValueError(f"checkpoint {ckpt} was written by {manifest['world_size']} ranks, this run has "
                         f"{get_world_size()}; resume with the same world size (or convert with ds_to_universal)")
    for name in sorted(engines):
        engines[name].load(str(ckpt), tag=name, load_optimizer=load_optimizer)
    for name in sorted(modules or {}):
        load_gathered_state_dict(modules[name], ckpt / "modules" / f"{name}.safetensors")
    saved = torch.load(ckpt / "client" / f"rank_{get_rank():05d}.pt", weights_only=False)
    if restore_rng:
        restore_rng_state(saved["rng"])
    barrier()
    return saved["client_state"]
