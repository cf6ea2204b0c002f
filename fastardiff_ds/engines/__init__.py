"""The engine layer: the only package that calls DeepSpeed or torch.distributed (DESIGN.md §2, STYLE.md principle 6).

- ``runtime``: ``Runtime``, the one object trainers and launchers hold for every distributed side effect
  (init, groups, collectives on the communication device, barriers, engine construction, checkpoint I/O, teardown).
- ``dist``: process-group bootstrap (gloo on CPU, nccl on GPU), rank helpers and the collectives (the bottom layer).
- ``ds_config``: ds_configs/*.json (engine knobs) + batch size / clipping injected from our config.
- ``engine``: ``EngineSpec`` + ``build_engine`` -- one ZeRO engine per trainable network.
- ``teacher``: frozen networks (teacher on its own process group, EMA copies), inference only.
- ``groups``: sub-group mpu and the scope that keeps DeepSpeed's global group per engine.
- ``checkpoint``: multi-engine save/load with atomic ``latest``, rotation, per-rank client state; ``manifest``:
  per-file sizes + checksums and verification (fallback to the newest intact checkpoint); ``reshard``: ZeRO-3
  engine state re-split onto another world size at load time.
- ``export``: gathered weights to/from safetensors; ``ema``: EMA of partitioned networks.
- ``update_size``: ‖Δθ‖/‖θ‖ of an optimizer step over the master shards (shows α(t) reaching each engine).
- ``memory``: per-GPU model-state estimates (DeepSpeed's ZeRO-3 estimator) and the README table.
"""

from fastardiff_ds.engines.checkpoint import (capture_rng_state, latest_intact, load_checkpoint, resolve_resume,
                                              restore_rng_state, save_checkpoint, step_tag)
from fastardiff_ds.engines.dist import (all_gather_object, all_reduce, barrier, comm_device, device, get_rank,
                                        get_world_size, init_distributed, is_rank0, local_world_size, shutdown)
from fastardiff_ds.engines.ds_config import inference_ds_config, load_ds_config, train_ds_config
from fastardiff_ds.engines.ema import EMA, ema_decay
from fastardiff_ds.engines.engine import Engine, EngineSpec, build_engine, default_lr_lambda
from fastardiff_ds.engines.export import export_safetensors, gathered_state_dict, load_gathered_state_dict
from fastardiff_ds.engines.runtime import Runtime
from fastardiff_ds.engines.memory import NetSize, count_params, estimate_memory, nextstep_large_table
from fastardiff_ds.engines.teacher import FrozenEngine, build_frozen, build_teacher
from fastardiff_ds.engines.update_size import step_with_update_size

__all__ = [
    "EMA", "ema_decay", "Engine", "Runtime", "all_gather_object", "all_reduce", "comm_device", "EngineSpec", "FrozenEngine", "NetSize", "count_params", "barrier", "build_engine", "build_frozen", "build_teacher",
    "capture_rng_state", "default_lr_lambda", "device", "estimate_memory", "export_safetensors",
    "gathered_state_dict", "get_rank", "get_world_size", "inference_ds_config", "init_distributed", "is_rank0",
    "latest_intact", "load_checkpoint", "load_ds_config", "load_gathered_state_dict", "local_world_size", "nextstep_large_table",
    "resolve_resume", "restore_rng_state", "save_checkpoint", "shutdown", "step_tag", "step_with_update_size", "train_ds_config",
]
