"""A converted copy of a checkpoint, cached as safetensors beside it or in a user cache folder.

The cache file records the source's size and mtime and a converter version in its safetensors metadata; a stale
or foreign file is ignored and rewritten. A read-only source folder falls back to the user cache
(`$XDG_CACHE_HOME` or `~/.cache`, then `fastardiff_ds/vae/<hash of the source path>/`); if nothing is writable (a
read-only VAE folder and a read-only or missing home / cache), the conversion is used from memory with one warning
naming the folders tried and `XDG_CACHE_HOME`, the setting that moves the cache; never a traceback.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

CACHE_NAME = "checkpoint.diffusers.safetensors"


def user_cache_dir() -> Path | None:
    """`$XDG_CACHE_HOME` or `~/.cache`, + fastardiff_ds/vae; None when there is no home to expand `~` to."""
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastardiff_ds" / "vae"
    except RuntimeError:  # no HOME and no passwd entry (some containers)
        return None


def cache_candidates(source: Path, cache_dir: str | Path | None = None) -> list[Path]:
    """Where the converted file may live: beside the source first, then the user cache."""
    source = Path(source).resolve()
    digest = hashlib.sha1(str(source).encode()).hexdigest()[:16]
    base = Path(cache_dir) if cache_dir is not None else user_cache_dir()
    return [source.parent / CACHE_NAME] + ([base / digest / CACHE_NAME] if base is not None else [])


def _fingerprint(source: Path, version: str) -> dict:
    st = Path(source).stat()
    return {"source": str(Path(source).resolve()), "size": str(st.st_size), "mtime_ns": str(st.st_mtime_ns),
            "converter": version}


def _read_if_fresh(path: Path, meta: dict) -> dict | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            stored = f.metadata() or {}
        if any(stored.get(k) != v for k, v in meta.items() if k != "source"):
            return None
        return load_file(str(path))
    except Exception:  # a truncated or foreign file: convert again
        return None


def write_atomic(path: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """Write to a temporary name, then rename, so a killed run never leaves half a cache file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_cached_state(source: Path, cache_dir: str | Path | None, version: str,
                      convert: Callable[[], dict]) -> dict[str, torch.Tensor]:
    """The converted state of `source`: from a fresh cache file if one exists, else `convert()` and cache it."""
    meta = _fingerprint(source, version)
    candidates = cache_candidates(source, cache_dir)
    for path in candidates:
        state = _read_if_fresh(path, meta)
        if state is not None:
            return state
    state = convert()
    errors = []
    for path in candidates:
        try:
            write_atomic(path, state, meta)
            return state
        except OSError as e:
            errors.append(f"{path.parent}: {e.strerror or e}")
    warnings.warn(f"could not cache the converted {source.name} ({'; '.join(errors)}): using it from memory, it "
                  "will be converted again on the next load. To keep it, set XDG_CACHE_HOME to a writable folder "
                  f"(or make {Path(source).parent} writable)", stacklevel=2)
    return state
