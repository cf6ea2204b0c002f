"""Reading LTH14/mar's `checkpoint-last.pth` as downloaded (the MAR row, issue 28).

`util/misc.py: save_model` writes one torch pickle: {"model": state_dict, "model_ema": state_dict | None,
"optimizer", "epoch", "scaler", "args": argparse.Namespace}. `model_ema` holds the EMA weights the paper's numbers
use (None when a run saved without EMA). The Namespace is the only non-tensor object in it, so the file is read with
`torch.load(weights_only=True)` and argparse.Namespace alone allowed; anything else in the pickle is refused with
its name, and loads only when the caller names it (`allow_globals`, still under weights_only: the package never
unpickles fully outside engines/trusted.py's verified loader).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .mar import MAR, MARConfig
from .weights import load_pickle_weights_only

# Keys every MAR state dict has (models/mar.py); a file without them is another family's checkpoint.
MAR_KEYS = ("class_emb.weight", "z_proj.weight", "encoder_pos_embed_learned", "diffloss.net.input_proj.weight")
WEIGHTS = ("model_ema", "model")


@dataclass
class MARCheckpoint:
    state: dict[str, torch.Tensor]  # the chosen weights, official key names
    weights: str  # "model_ema" or "model"
    args: dict = field(default_factory=dict)  # the training run's argparse arguments
    epoch: int | None = None


def _load(path: Path, allow_globals: tuple):
    return load_pickle_weights_only(
        path, (argparse.Namespace, *allow_globals), fix="re-download checkpoint-last.pth",
        trust_hint="a MAR checkpoint holds only tensors and the training args; if you trust them, name them in "
                   "allow_globals=(...) (they are then allowed, nothing else)")


def read_mar_checkpoint(path: str | Path, weights: str = "model_ema", allow_globals: tuple = ()) -> MARCheckpoint:
    """The `weights` state dict ("model_ema", default, or "model") of an official MAR checkpoint, with its args."""
    path = Path(path)
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose one of {WEIGHTS}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such MAR checkpoint (expected pretrained_models/mar/<size>/"
                                "checkpoint-last.pth)")
    ck = _load(path, tuple(allow_globals))
    if not isinstance(ck, dict) or "model" not in ck:
        keys = sorted(ck)[:8] if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(f"{path}: not a MAR checkpoint-last.pth (top level {keys}; expected 'model', 'model_ema', "
                         "'optimizer', 'epoch', 'scaler', 'args')")
    missing = [k for k in MAR_KEYS if k not in ck["model"]]
    if missing:
        raise ValueError(f"{path}: 'model' is not a MAR state dict (no {', '.join(missing)}); this loader reads "
                         "LTH14/mar checkpoints (mar_base / mar_large / mar_huge)")
    state = ck.get(weights)
    if state is None:
        raise ValueError(f"{path}: '{weights}' is missing or None (the run saved without EMA); load the raw "
                         "weights with weights='model' (--weights model)")
    args = ck.get("args")
    return MARCheckpoint(dict(state), weights, vars(args) if isinstance(args, argparse.Namespace) else dict(args or {}),
                         ck.get("epoch"))


OFFICIAL_HEADS = {"mar_base": 12, "mar_large": 16, "mar_huge": 16}  # models/mar.py factories (encoder = decoder)


def mar_config(ck: MARCheckpoint, heads: int | None = None) -> MARConfig:
    """The MARConfig of a checkpoint: widths, depths, sizes from the state dict's shapes, the image geometry and
    DiffLoss steps from its args, the head count from the official model name (`args.model`) or `heads`."""
    s, a = ck.state, ck.args
    heads = heads or OFFICIAL_HEADS.get(a.get("model"))
    if heads is None:
        raise ValueError(f"args.model={a.get('model')!r} is not an official MAR size ({sorted(OFFICIAL_HEADS)}): "
                         "pass the attention head count (heads=..., --heads)")

    def depth(prefix: str) -> int:  # blocks in a ModuleList: distinct indices after "prefix."
        return len({k[len(prefix) + 1:].split(".")[0] for k in s if k.startswith(prefix + ".")})
    n_cls, enc = s["class_emb.weight"].shape
    dec = s["decoder_embed.weight"].shape[0]
    L_P = s["encoder_pos_embed_learned"].shape[1]
    L = s["diffusion_pos_embed_learned"].shape[1]
    patch = int(a.get("patch_size", 1))
    token_dim = s["z_proj.weight"].shape[1]
    vae_dim = int(a.get("vae_embed_dim", token_dim // patch**2))
    stride = int(a.get("vae_stride", 16))
    img = int(a.get("img_size", round(L**0.5) * stride * patch))
    cfg = MARConfig(img_size=img, vae_stride=stride, patch_size=patch, vae_embed_dim=vae_dim, enc_dim=enc,
                    enc_depth=depth("encoder_blocks"), enc_heads=heads, dec_dim=dec, dec_depth=depth("decoder_blocks"),
                    dec_heads=heads, mlp_ratio=s["encoder_blocks.0.mlp.fc1.weight"].shape[0] / enc,
                    buffer_size=L_P - L, class_num=n_cls, diffloss_d=depth("diffloss.net.res_blocks"),
                    diffloss_w=s["diffloss.net.input_proj.weight"].shape[0])
    if cfg.seq_len != L or cfg.token_dim != token_dim:
        raise ValueError(f"args (img_size {img}, vae_stride {stride}, patch_size {patch}, vae_embed_dim {vae_dim}) "
                         f"give {cfg.seq_len} tokens of {cfg.token_dim}, the weights hold {L} of {token_dim}")
    return cfg


def load_mar(path, weights: str = "model_ema", heads: int | None = None, allow_globals: tuple = ()):
    """(MAR model in eval mode, its num_sampling_steps) from an official checkpoint-last.pth."""
    ck = read_mar_checkpoint(path, weights, allow_globals)
    model = MAR(mar_config(ck, heads))
    missing, unexpected = model.load_state_dict(ck.state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: '{weights}' does not fit the MAR layout (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]})")
    return model.eval(), str(ck.args.get("num_sampling_steps", "100"))


EXPORT_WEIGHTS = "model.safetensors"


def save_mar_export(folder, cfg, state: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    """Our MAR inference checkpoint: `config.json` (the resolved class-conditional config), `model.safetensors`
    (the MAR state dict, official key names) and `meta.json`."""
    from safetensors.torch import save_file

    from ..config.overrides import save_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / EXPORT_WEIGHTS))
    save_config(cfg, folder / "config.json")
    (folder / "meta.json").write_text(json.dumps(meta or {}, indent=2, default=str))
    return folder


def load_mar_export(folder):
    """(MAR in eval mode, its C2IConfig) from a folder `save_mar_export` wrote."""
    from safetensors.torch import load_file

    from ..config.c2i import C2IConfig, derive_c2i
    from ..config.resolve import load_file as merge_config_file, validate

    folder = Path(folder)
    if not (folder / EXPORT_WEIGHTS).is_file() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a MAR checkpoint folder (needs config.json + {EXPORT_WEIGHTS}, as "
                                "launcher/pretrain_c2i.py writes to run_dir/checkpoint); an official "
                                "checkpoint-last.pth loads with load_mar")
    cfg = derive_c2i(validate(merge_config_file(C2IConfig(), folder / "config.json")))
    model = MAR(cfg.model)
    state = load_file(str(folder / EXPORT_WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}/{EXPORT_WEIGHTS} does not fit its config.json's model (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    return model.eval(), cfg
