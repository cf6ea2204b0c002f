"""Reading LTH14/mar's `checkpoint-last.pth` as downloaded (the MAR row, issue 28).

`util/misc.py: save_model` writes one torch pickle: {"model": state_dict, "model_ema": state_dict | None,
"optimizer", "epoch", "scaler", "args": argparse.Namespace}. `model_ema` holds the EMA weights the paper's numbers
use (None when a run saved without EMA). The Namespace is the only non-tensor object in it, so the file is read with
`torch.load(weights_only=True)` and argparse.Namespace alone allowed; anything else in the pickle is refused with
its name, and loads only with `trust_pickle=True` (full unpickling: run only on files you trust).
"""
from __future__ import annotations

import argparse
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Keys every MAR state dict has (models/mar.py); a file without them is another family's checkpoint.
MAR_KEYS = ("class_emb.weight", "z_proj.weight", "encoder_pos_embed_learned", "diffloss.net.input_proj.weight")
WEIGHTS = ("model_ema", "model")


@dataclass
class MARCheckpoint:
    state: dict[str, torch.Tensor]  # the chosen weights, official key names
    weights: str  # "model_ema" or "model"
    args: dict = field(default_factory=dict)  # the training run's argparse arguments
    epoch: int | None = None


def _load(path: Path, trust_pickle: bool):
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: holds objects other than tensors and the training args ({str(e).splitlines()[-1]})"
                         "; if you trust the file, load it with trust_pickle=True (--trust-pickle), which unpickles "
                         "arbitrary code") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e}); re-download checkpoint-last.pth") from None


def read_mar_checkpoint(path: str | Path, weights: str = "model_ema", trust_pickle: bool = False) -> MARCheckpoint:
    """The `weights` state dict ("model_ema", default, or "model") of an official MAR checkpoint, with its args."""
    path = Path(path)
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose one of {WEIGHTS}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such MAR checkpoint (expected pretrained_models/mar/<size>/"
                                "checkpoint-last.pth)")
    ck = _load(path, trust_pickle)
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
