"""Reading a local CLIP checkpoint and choosing its activation: QuickGELU for OpenAI's weights, GELU otherwise.

OpenAI trained CLIP with QuickGELU (x * sigmoid(1.702 x)); open_clip's built-in `ViT-L-14` config uses GELU, so
OpenAI weights loaded under that name run with the wrong activation. open_clip builds QuickGELU for them only via
the `pretrained="openai"` tag (official GenEval: `create_model_and_transforms("ViT-L-14", pretrained="openai")`,
tag config `quick_gelu=True` in open_clip/pretrained.py) or a `-quickgelu` model name. From a local file we tell
OpenAI's weights apart by (open_clip/openai.py, factory.py::load_state_dict):
- a TorchScript archive: OpenAI's release format (the file `pretrained="openai"` downloads, e.g. ViT-L-14.pt);
- the keys `input_resolution`, `context_length`, `vocab_size`, which only OpenAI's state dicts carry (open_clip
  drops them when it builds a model from one);
- "openai" in the path (open_clip's hub copies of OpenAI weights are named `*.openai`).
A setting forced by the user (`--clip-act quickgelu|gelu`, or a `-quickgelu` model name) wins, with a warning when
it contradicts that evidence.
"""
from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch

OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")
ACTIVATIONS = ("auto", "quickgelu", "gelu")
ACT_HELP = ("CLIP activation: auto (default) picks QuickGELU for OpenAI weights -- a TorchScript archive such as "
            "OpenAI's ViT-L-14.pt, a state dict with OpenAI's input_resolution/context_length/vocab_size keys, or "
            "'openai' in the path -- and GELU otherwise; quickgelu / gelu force it (a warning says when that "
            "contradicts the evidence). A model name ending in -quickgelu also forces QuickGELU. Official GenEval "
            "and CLIP-score numbers use OpenAI ViT-L-14 with QuickGELU")


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip whose records include TorchScript's constants.pkl / code/ (what torch.jit.save writes)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def read_clip_state(path: str | Path) -> tuple[dict, bool]:
    """-> (state dict on CPU, whether the file was a TorchScript archive). Unwraps {"state_dict": ...} and
    strips a DDP "module." prefix, as open_clip's load_state_dict does."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path), False
    if is_torchscript_archive(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the only reader
            return dict(torch.jit.load(path, map_location="cpu").state_dict()), True
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no CLIP state dict (got {type(state).__name__}); pass an open_clip or "
                         "OpenAI CLIP checkpoint with --clip-ckpt")
    if next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, False


def openai_evidence(path: str | Path, state: dict, torchscript: bool) -> str | None:
    """Why these look like OpenAI's weights, or None."""
    if torchscript:
        return "the checkpoint is a TorchScript archive (OpenAI's CLIP release format)"
    found = [k for k in OPENAI_ONLY_KEYS if k in state]
    if found:
        return f"the state dict has OpenAI's keys {found}"
    if "openai" in str(path).lower():
        return "'openai' is in the checkpoint path"
    return None


def choose_quick_gelu(model_name: str, path: str | Path, state: dict, torchscript: bool,
                      setting: str = "auto") -> tuple[bool, str]:
    """-> (use QuickGELU, the reason, for the results JSON)."""
    if setting not in ACTIVATIONS:
        raise ValueError(f"--clip-act must be one of {', '.join(ACTIVATIONS)}, got '{setting}'")
    evidence = openai_evidence(path, state, torchscript)
    detected = evidence is not None
    if setting == "auto" and model_name.endswith("-quickgelu"):
        setting, why = "quickgelu", f"model name {model_name}"
    else:
        why = f"--clip-act {setting}"
    if setting == "auto":
        return detected, (f"QuickGELU: {evidence}" if detected else
                          "GELU: no sign of OpenAI weights (not TorchScript, no OpenAI-only keys, no 'openai' in path)")
    forced = setting == "quickgelu"
    if forced != detected:
        seen = evidence or "nothing marks them as OpenAI's"
        warnings.warn(f"{why} forces {'QuickGELU' if forced else 'GELU'} although {seen}: the CLIP embeddings "
                      f"will differ from those of {'GELU' if forced else 'QuickGELU'}, which detection would pick",
                      stacklevel=2)
    return forced, f"{'QuickGELU' if forced else 'GELU'}: forced by {why}"
