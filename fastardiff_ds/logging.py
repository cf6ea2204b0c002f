"""Rank-0 metrics fan-out: stdout/JSONL always, W&B when enabled (offline unless the user says otherwise).

W&B mode: `WANDB_MODE` wins when set (tests set `disabled`); otherwise `wandb.mode` from the config (default
"offline": runs are written under the run directory and can be uploaded later with `wandb sync`). A resumed run
passes the stored run id so the curve continues in the same W&B run. Non-zero ranks get a NullLogger.

Training never stops for logging (metrics.jsonl in the run directory holds every logged row anyway):
  * an online `wandb.init` is bounded by `wandb.init_timeout_s` (wandb's `Settings(init_timeout=...)`; without
    it wandb waits 90 s, and a host that drops packets can stall it longer); when it fails (no network, no API
    key, a refused host) the run is re-initialised offline under the run directory with one warning naming the
    folder to `wandb sync` later. If offline fails too (or wandb is not installed), W&B is off, with one warning.
  * any exception from `log` / `image` / `histogram` / `finish` becomes one warning, and the logger is a no-op
    from then on (tests/unit/test_wandb_fallback.py).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "fastardiff-ds"
    entity: str = ""
    mode: Literal["offline", "online", "disabled"] = "offline"  # WANDB_MODE overrides
    group: str = ""
    tags: tuple[str, ...] = ()
    init_timeout_s: float = 60.0  # online: give up on the server after this long and log offline instead


class NullLogger:
    run_id: str | None = None

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def image(self, key: str, path: str | Path, step: int | None = None) -> None:
        pass

    def histogram(self, key: str, values, step: int | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


def _reason(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def init_run(wandb, cfg: WandbConfig, run_dir: str | Path, config: dict, run_id: str | None, name: str, mode: str):
    """`wandb.init` in `mode`; online bounded by `cfg.init_timeout_s` and falling back to offline with one warning."""
    kwargs = dict(project=cfg.project, entity=cfg.entity or None, group=cfg.group or None,
                  tags=list(cfg.tags) or None, dir=str(run_dir), config=config, id=run_id,
                  resume="allow" if run_id else None, name=name or None)
    if mode != "online":
        return wandb.init(mode=mode, **kwargs)
    try:
        return wandb.init(mode="online", settings=wandb.Settings(init_timeout=float(cfg.init_timeout_s)), **kwargs)
    except Exception as e:  # wandb raises CommError, UsageError, AuthenticationError, ...; none may stop training
        reason = _reason(e)
    run = wandb.init(mode="offline", **kwargs)
    sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None) or Path(run_dir) / "wandb"
    warnings.warn(f"W&B online init failed ({reason}); logging offline to {sync_dir} instead. Upload it later with "
                  f"`wandb sync {sync_dir}` (or set wandb.mode=offline to skip the wait of up to "
                  f"wandb.init_timeout_s={cfg.init_timeout_s:g}s)", stacklevel=3)
    return run


class WandbLogger(NullLogger):
    def __init__(self, cfg: WandbConfig, run_dir: str | Path, config: dict, run_id: str | None = None, name: str = ""):
        import wandb

        self.wandb = wandb
        self.run = init_run(wandb, cfg, run_dir, config, run_id, name, os.environ.get("WANDB_MODE") or cfg.mode)
        self.run_id = getattr(self.run, "id", None)

    def _guarded(self, what: str, fn, *args, **kwargs) -> None:
        """Run one W&B call; the first exception is one warning and turns this logger into a no-op."""
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self.run = None
            warnings.warn(f"W&B {what} failed ({_reason(e)}); W&B logging is off for the rest of this run, "
                          "training goes on (metrics.jsonl in the run directory keeps every logged row)",
                          stacklevel=3)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._guarded("log", lambda: self.run.log(metrics, step=step))

    def image(self, key: str, path: str | Path, step: int | None = None) -> None:
        self._guarded("image", lambda: self.run.log({key: self.wandb.Image(str(path))}, step=step))

    def histogram(self, key: str, values, step: int | None = None) -> None:
        self._guarded("histogram", lambda: self.run.log({key: self.wandb.Histogram(values)}, step=step))

    def finish(self) -> None:
        self._guarded("finish", lambda: self.run.finish())


def make_logger(cfg: WandbConfig, run_dir: str | Path, config: dict, rank: int = 0, run_id: str | None = None,
                name: str = "") -> NullLogger:
    """W&B on rank 0 when enabled and not disabled by WANDB_MODE; a NullLogger otherwise (or when W&B cannot
    start at all: one warning, training goes on)."""
    if rank != 0 or not cfg.enabled or (os.environ.get("WANDB_MODE") or cfg.mode) == "disabled":
        return NullLogger()
    try:
        return WandbLogger(cfg, run_dir, config, run_id, name)
    except Exception as e:  # wandb missing, or even the offline run failed (e.g. an unwritable run directory)
        warnings.warn(f"W&B could not start ({_reason(e)}); W&B logging is off for this run (metrics.jsonl in "
                      f"{run_dir} keeps every logged row). Install wandb or set wandb.enabled=false", stacklevel=2)
        return NullLogger()
