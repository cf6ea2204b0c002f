"""Fixture generator: tiny CLIP checkpoints in OpenAI's formats and in open_clip's.

OpenAI's release (`ViT-L-14.pt`, what open_clip's `pretrained="openai"` downloads) is a TorchScript archive of the
CLIP model with fp16 weights; its `state_dict()` names match open_clip's CLIP (`visual.conv1.weight`,
`transformer.resblocks.0.attn.in_proj_weight`, `text_projection`, ...) plus the integer entries `input_resolution`,
`context_length`, `vocab_size` (open_clip/openai.py and factory.py drop them). Here: the same names and extra keys
on a tiny config, written as (a) a TorchScript archive, (b) a plain `torch.save` of that state dict; and (c) an
open_clip-trained (GELU) model's `torch.save(model.state_dict())`.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

TINY_CONFIG = {"embed_dim": 16,
               "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
               "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def write_config(folder: Path, stem: str = "tinyclip") -> Path:
    path = Path(folder) / f"{stem}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def tiny_clip(config: Path, quick_gelu: bool, seed: int) -> nn.Module:
    import open_clip

    open_clip.add_model_config(str(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(Path(config).stem, quick_gelu=quick_gelu)
    with torch.no_grad():  # larger pre-activations than the default init, so GELU vs QuickGELU shows
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(3.0)
    return model.eval()


def _scriptable_holder(state: dict) -> nn.Module:
    """A module tree whose buffers carry exactly `state`'s names (what a TorchScript CLIP archive exposes)."""
    root = nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        mod = root
        for part in parents:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_buffer(leaf, value.clone())
    return root


def openai_state(model: nn.Module) -> dict:
    """OpenAI's state-dict layout: fp16 floats plus input_resolution / context_length / vocab_size."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    vision, text = TINY_CONFIG["vision_cfg"], TINY_CONFIG["text_cfg"]
    state.update(input_resolution=torch.tensor(vision["image_size"]),
                 context_length=torch.tensor(text["context_length"]), vocab_size=torch.tensor(text["vocab_size"]))
    return state


def write_checkpoints(folder: Path, seed: int = 0) -> dict[str, Path]:
    """-> {"openai_jit", "openai_state", "open_clip", "config"} paths; the OpenAI ones hold a QuickGELU-trained
    model's weights, "open_clip" a GELU one's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(folder)
    state = openai_state(tiny_clip(config, True, seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save is deprecated
        torch.jit.save(torch.jit.script(_scriptable_holder(state)), str(folder / "ViT-tiny.pt"))
    torch.save(state, folder / "openai_state_dict.pt")
    torch.save(tiny_clip(config, False, seed).state_dict(), folder / "open_clip_gelu.pt")
    return {"config": config, "openai_jit": folder / "ViT-tiny.pt", "openai_state": folder / "openai_state_dict.pt",
            "open_clip": folder / "open_clip_gelu.pt"}
