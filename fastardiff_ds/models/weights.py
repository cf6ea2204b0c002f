"""Checkpoint I/O in NextStep-1's safetensors key layout.

NextStep-1 stores one flat state dict (sharded with `model.safetensors.index.json`) without a `model.` prefix:
`embed_tokens.weight`, `layers.{i}.self_attn.q_proj.weight`, `norm.weight`, `lm_head.weight`,
`image_in_projector.*`, `image_out_projector.*`, `image_head.net.*`. Our own inference checkpoints use the same
layout in `model.safetensors` (target AR + teacher head), beside `config.json`, plus optional `draft.safetensors`,
`student_head.safetensors` and `meta.json` (e.g. the early-stop threshold tau).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HEAD_PREFIX = "image_head."
IGNORED_PREFIXES = ("lm_head.",)  # text LM head: not used for image generation


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A folder (`model.safetensors` or a sharded index) or a single .safetensors file -> flat state dict."""
    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    if single.is_file():
        return load_file(str(single))
    raise FileNotFoundError(f"no checkpoint at '{path}': expected a folder with model.safetensors (or "
                            "model.safetensors.index.json + shards) or a .safetensors file; pass --ckpt / "
                            "a local NextStep-1 download")


def split_nextstep_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """-> (AR state, head state (keys relative to FlowHead), ignored keys). A leading `model.` is stripped."""
    ar, head, ignored = {}, {}, []
    for key, value in state.items():
        key = key[len("model."):] if key.startswith("model.") else key
        if key.startswith(HEAD_PREFIX):
            head[key[len(HEAD_PREFIX):]] = value
        elif key.startswith(IGNORED_PREFIXES) or key == "gen_pos_embed":
            ignored.append(key)
        else:
            ar[key] = value
    return ar, head, ignored


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict load with an error that lists what is missing or unexpected."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shape = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        raise ValueError(f"{what}: checkpoint does not match the model built from the config "
                         f"(check --preset / config.json). missing={missing[:6]} unexpected={unexpected[:6]} "
                         f"shape mismatch={bad_shape[:4]}")
    module.load_state_dict(state)


def nextstep_state(target: torch.nn.Module, head: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Target AR + head as one NextStep-layout state dict."""
    state = {k: v for k, v in target.state_dict().items()}
    state.update({HEAD_PREFIX + k: v for k, v in head.state_dict().items()})
    return state


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    tmp.replace(path)  # atomic: a crash never leaves a half-written file under the final name
    return path
