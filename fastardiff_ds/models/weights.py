"""Checkpoint I/O in NextStep-1's safetensors key layout, loaded shard by shard in the requested dtype.

NextStep-1 / 1.1 store one flat state dict (sharded with `model.safetensors.index.json`) without a `model.` prefix
(their model class subclasses Qwen2Model / the Llama stack directly): `embed_tokens.weight`,
`layers.{i}.self_attn.q_proj.weight`, `norm.weight`, `lm_head.weight`, `image_in_projector.*`,
`image_out_projector.*`, `image_head.net.*`, and (NextStep-1-Large) the unused `gen_pos_embed` buffer. A leading
`model.` is stripped all the same. Our own inference checkpoints use the same layout in `model.safetensors` (target
AR + teacher head), beside `config.json`, plus optional `draft.safetensors`, `student_head.safetensors`, `meta.json`.

`load_streaming` fills modules built on the meta device: one tensor at a time is read, cast to the target dtype and
assigned (`load_state_dict(assign=True)`), so a bf16 14B checkpoint never exists as an fp32 copy.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HEAD_PREFIX = "image_head."
# text LM head, its optional pre-projection and the 2-D sin-cos table: not used for image generation
IGNORED_PREFIXES = ("lm_head.", "before_lm_head.", "gen_pos_embed")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def load_pickle_weights_only(path: Path, allow_globals: tuple = (), fix: str = "", trust_hint: str = ""):
    """`torch.load(weights_only=True)` of a foreign .pth/.ckpt with `allow_globals` allowed, errors named: a
    pickle with other objects names the first refused global (and `trust_hint`, how to allow it), a file that is
    no torch checkpoint at all says so; `fix` ends both messages."""
    try:
        with torch.serialization.safe_globals(list(allow_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if found is None:
            raise ValueError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0][:120]}); "
                             f"{fix}") from None
        raise ValueError(f"{path}: holds objects other than tensors ({found}); {trust_hint or fix}") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e}); {fix}") from None


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype='{name}' is not one of {', '.join(DTYPES)}: set model.dtype=bfloat16 (14B "
                         "presets) or model.dtype=float32")
    return DTYPES[name]


def shard_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: a folder (sharded index or model.safetensors) or one file."""
    path = Path(path)
    if path.is_file():
        return [path]
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"'{index}' has no weight_map: re-download the checkpoint folder")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"'{path}' lists shards that are not there: {missing[:4]}; the download is "
                                    "incomplete, fetch the missing model-*.safetensors files")
        return files
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no checkpoint at '{path}': expected a folder with model.safetensors (or "
                            "model.safetensors.index.json + shards) or a .safetensors file; pass --ckpt / "
                            "a local NextStep-1 download")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A folder or a single .safetensors file -> flat state dict (in the stored dtype)."""
    state = {}
    for f in shard_files(path):
        state.update(load_file(str(f)))
    return state


def nextstep_route(key: str) -> tuple[str, str] | None:
    """Checkpoint key -> ("ar" | "head", key inside that module), or None for keys we do not use."""
    key = key.removeprefix("model.")
    if key.startswith(HEAD_PREFIX):
        return "head", key[len(HEAD_PREFIX):]
    if key.startswith(IGNORED_PREFIXES):
        return None
    return "ar", key


def split_nextstep_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """-> (AR state, head state (keys relative to FlowHead), ignored keys)."""
    parts, ignored = {"ar": {}, "head": {}}, []
    for key, value in state.items():
        routed = nextstep_route(key)
        if routed is None:
            ignored.append(key)
        else:
            parts[routed[0]][routed[1]] = value
    return parts["ar"], parts["head"], ignored


def load_streaming(path: str | Path, modules: dict[str, torch.nn.Module], route: Callable[[str], tuple | None],
                   dtype: torch.dtype, device="cpu", what: str = "checkpoint") -> None:
    """Fill `modules` (built on the meta device, or materialised) from `path`, shard by shard.

    route(key) -> (module name, local key) | None (skipped). Floating tensors are cast to `dtype` one at a time
    and assigned, so peak host memory is one shard's worth of tensors in their stored dtype. Raises a ValueError
    listing missing / unexpected / mis-shaped keys; non-persistent buffers (RoPE) are rebuilt on `device`.
    """
    expected = {name: m.state_dict(keep_vars=True) for name, m in modules.items()}
    seen = {name: set() for name in modules}
    unexpected, bad_shape = [], []
    for shard in shard_files(path):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            part = {name: {} for name in modules}
            for key in f.keys():
                routed = route(key)
                if routed is None:
                    continue
                name, local = routed
                if name not in modules or local not in expected[name]:
                    unexpected.append(key)
                    continue
                want = tuple(expected[name][local].shape)
                got = tuple(f.get_slice(key).get_shape())
                if got != want:
                    bad_shape.append(f"{key}: {got} vs {want}")
                    continue
                t = f.get_tensor(key)
                part[name][local] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            for name, sd in part.items():
                if sd:
                    modules[name].load_state_dict(sd, strict=False, assign=True)
                    seen[name].update(sd)
    missing = [f"{n}:{k}" for n in modules for k in expected[n] if k not in seen[n]]
    if missing or unexpected or bad_shape:
        raise ValueError(f"{what}: checkpoint does not match the model built from the config (check config.json / "
                         f"--preset / model.* overrides). missing={missing[:6]} unexpected={unexpected[:6]} "
                         f"shape mismatch={bad_shape[:4]}")
    for m in modules.values():
        for sub in m.modules():
            if hasattr(sub, "rebuild_rope"):
                sub.rebuild_rope(device)
        stray = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
        if stray:
            raise ValueError(f"{what}: {stray[:4]} were not loaded and have no initialiser; report this as a bug")
        m.to(device)


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
