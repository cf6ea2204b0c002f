"""DeepSpeed config dicts: engine knobs from ``ds_configs/*.json``, everything else injected from our config.

The JSON files hold engine knobs only (ZeRO stage and its buckets, bf16 "auto" with fp32 gradient accumulation,
clipping, monitors).
Batch sizes, learning rates and optimizer hyper-parameters live once, in the typed config tree, and are
injected here -- a JSON that carries them is rejected so there is never a second source of truth.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"

# Keys whose value belongs to the experiment config (one source of truth), never to a ds_configs JSON.
FORBIDDEN_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "optimizer", "scheduler")


def load_ds_config(name_or_path: str | Path = "zero3") -> dict[str, Any]:
    """Read a ds_configs JSON by short name (``"zero3"``, ``"zero3_offload"``, ``"zero2"``) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"DeepSpeed config {path} not found; use one of {known} or a path to a JSON file")
    base = json.loads(path.read_text())
    check_engine_knobs_only(base, source=str(path))
    return base


def check_engine_knobs_only(base: dict, source: str = "ds config") -> None:
    """Raise if ``base`` carries batch size / optimizer / scheduler settings (they come from our config)."""
    bad = [k for k in FORBIDDEN_KEYS if k in base]
    if bad:
        raise ValueError(f"{source} sets {bad}: batch sizes, optimizer and lr come from the experiment config "
                         f"(train.micro_batch, train.grad_accum, EngineSpec.lr); remove them from the JSON")


def bf16_enabled(setting: Any, device_type: str) -> bool:
    """Resolve ``"bf16": {"enabled": "auto"}``: on for CUDA devices that support bf16, off on CPU."""
    if setting != "auto":
        return bool(setting)
    if device_type != "cuda":
        return False  # CPU runs are tests/smoke runs: fp32 keeps them exact and comparable.
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _fp32_grad_accumulation(cfg: dict) -> None:
    """bf16 weights and activations, fp32 gradient accumulation and master weights (NextStep-1's recipe).

    DeepSpeed 0.19.8 reads ``"data_types": {"grad_accum_dtype": "fp32"}``: ZeRO-1 then uses its BF16_Optimizer,
    ZeRO-2/3 accumulate into fp32 gradient partitions. Defaulted here when bf16 is on and the JSON is silent;
    ZeRO stage 0 has no fp32 accumulation path (DeepSpeed raises "unsupported mix"), so it is refused by name.
    """
    dtypes = cfg.setdefault("data_types", {})
    dtypes.setdefault("grad_accum_dtype", "fp32")
    if dtypes["grad_accum_dtype"] == "fp32" and cfg["zero_optimization"].get("stage", 0) == 0:
        raise ValueError("bf16 with fp32 gradient accumulation (data_types.grad_accum_dtype=fp32) needs ZeRO stage "
                         ">= 1; DeepSpeed has no such path at stage 0. Use ds_configs/zero2.json or zero3.json, or "
                         'set "data_types": {"grad_accum_dtype": "bf16"} in the DeepSpeed JSON to accept bf16 '
                         "accumulation")


def _resolve_common(base: dict, *, micro_batch: int, device_type: str, zero_stage: int | None,
                    zero_overrides: dict | None) -> dict:
    check_engine_knobs_only(base)
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch} must be >= 1")
    cfg = copy.deepcopy(base)
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if zero_stage is not None:
        zero["stage"] = zero_stage
    zero.update(zero_overrides or {})
    bf16 = cfg.setdefault("bf16", {"enabled": "auto"})
    bf16["enabled"] = bf16_enabled(bf16.get("enabled", "auto"), device_type)
    if bf16["enabled"]:
        _fp32_grad_accumulation(cfg)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    if client_optimizer(cfg, device_type):
        # A client torch.optim.AdamW, which ZeRO only accepts with this flag.
        cfg["zero_allow_untested_optimizer"] = True
    return cfg


def client_optimizer(cfg: dict, device_type: str) -> bool:
    """Whether the engine's optimizer is a client torch.optim.AdamW (every case but ZeRO-Offload on an
    accelerator, whose DeepSpeedCPUAdam only DeepSpeed builds). On a GPU that replaces DeepSpeed's FusedAdam,
    whose first use JIT-compiles a CUDA extension (nvcc, ~1-2 min per fresh machine) and fails on some images:
    DeepSpeed 0.19.8 cannot parse a TORCH_CUDA_ARCH_LIST holding '9.0a' (ValueError: invalid literal '0a')."""
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer") or {}
    return device_type == "cpu" or offload.get("device", "none") in ("none", None)


def train_ds_config(base: dict, *, micro_batch: int, grad_accum: int, world_size: int, device_type: str,
                    grad_clip: float | None = None, zero_stage: int | None = None,
                    zero_overrides: dict | None = None) -> dict:
    """Resolved DeepSpeed dict of a trainable engine.

    ``train_batch_size = micro_batch * grad_accum * world_size`` (DeepSpeed re-checks this identity).
    ``grad_clip`` (if given) overrides the JSON's ``gradient_clipping``.
    """
    if grad_accum < 1 or world_size < 1:
        raise ValueError(f"grad_accum={grad_accum} and world_size={world_size} must be >= 1")
    cfg = _resolve_common(base, micro_batch=micro_batch, device_type=device_type, zero_stage=zero_stage,
                          zero_overrides=zero_overrides)
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    if grad_clip is not None:
        cfg["gradient_clipping"] = float(grad_clip)
    return cfg


def inference_ds_config(base: dict, *, micro_batch: int, device_type: str,
                        zero_overrides: dict | None = None) -> dict:
    """Resolved DeepSpeed dict of a frozen ZeRO-3 engine (teacher, EMA): no optimizer, no offload of states.

    ``train_batch_size`` is left out: DeepSpeed derives it from the engine's own data-parallel group,
    which for the teacher is a sub-group, not the world (a world-sized value would fail its check).
    """
    cfg = _resolve_common(base, micro_batch=micro_batch, device_type=device_type, zero_stage=3,
                          zero_overrides=zero_overrides)
    cfg["gradient_accumulation_steps"] = 1
    cfg["zero_optimization"].pop("offload_optimizer", None)
    cfg.pop("gradient_clipping", None)
    return cfg
