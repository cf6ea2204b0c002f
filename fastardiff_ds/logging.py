"""Rank-0 metrics fan-out: stdout/JSONL always, W&B when enabled (offline unless the user says otherwise).

W&B mode: `WANDB_MODE` wins when set (tests set `disabled`); otherwise `wandb.mode` from the config (default
"offline": runs are written under the run directory and can be uploaded later with `wandb sync`). A resumed run
passes the stored run id so the curve continues in the same W&B run. Non-zero ranks get a NullLogger.
"""
from __future__ import annotations

import os
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


class WandbLogger(NullLogger):
    def __init__(self, cfg: WandbConfig, run_dir: str | Path, config: dict, run_id: str | None = None, name: str = ""):
        import wandb

        mode = os.environ.get("WANDB_MODE") or cfg.mode
        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity or None, group=cfg.group or None,
                              tags=list(cfg.tags) or None, dir=str(run_dir), config=config, mode=mode,
                              id=run_id, resume="allow" if run_id else None, name=name or None)
        self.run_id = getattr(self.run, "id", None)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def image(self, key: str, path: str | Path, step: int | None = None) -> None:
        self.run.log({key: self.wandb.Image(str(path))}, step=step)

    def histogram(self, key: str, values, step: int | None = None) -> None:
        self.run.log({key: self.wandb.Histogram(values)}, step=step)

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg: WandbConfig, run_dir: str | Path, config: dict, rank: int = 0, run_id: str | None = None,
                name: str = "") -> NullLogger:
    """W&B on rank 0 when enabled and not disabled by WANDB_MODE; a NullLogger otherwise."""
    if rank != 0 or not cfg.enabled or (os.environ.get("WANDB_MODE") or cfg.mode) == "disabled":
        return NullLogger()
    return WandbLogger(cfg, run_dir, config, run_id, name)
