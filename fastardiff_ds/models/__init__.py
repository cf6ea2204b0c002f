"""Single-device model code: target/draft AR, flow head, image and text tokenizers, checkpoint I/O.

Nothing here imports DeepSpeed, losses or samplers; parallelism is applied from outside (`fastardiff_ds.engines`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, get_preset, update_from_dict
from .ar import ARStep, DraftAR, TargetAR, row_entropy
from .flow_head import FlowHead
from .image_tokenizers import PixelPatchTokenizer, VAETokenizer, build_image_tokenizer, patchify, unpatchify
from .kv_cache import KVCache
from .text_tokenizer import TextTokenizer, load_text_tokenizer, resolve_asset
from .weights import (load_into, nextstep_state, read_state_dict, save_safetensors, split_nextstep_state)


def build_target(cfg: Config) -> TargetAR:
    return TargetAR(cfg.model)


def build_head(cfg: Config, student: bool = False) -> FlowHead:
    """Teacher head, or (student=True) a head with the guidance-scale embedding for CFG distillation."""
    hc = cfg.model.head
    if student and not hc.guidance_embed:
        hc = type(hc)(**{**hc.__dict__, "guidance_embed": True})
    return FlowHead(hc, cfg.model.image.token_dim, cfg.model.ar.hidden_size)


def build_draft(cfg: Config, target: TargetAR) -> DraftAR:
    return DraftAR.from_target(target, cfg.model)


@dataclass
class ModelBundle:
    """Everything an inference mode may need, loaded from one checkpoint folder."""

    cfg: Config
    target: TargetAR
    head: FlowHead
    draft: DraftAR | None = None
    student: FlowHead | None = None
    meta: dict = field(default_factory=dict)


def from_pretrained(local_dir: str | Path, cfg: Config) -> tuple[TargetAR, FlowHead]:
    """Target AR + head from a NextStep-1-layout checkpoint folder (e.g. a local NextStep-1-Large download)."""
    ar_state, head_state, _ignored = split_nextstep_state(read_state_dict(local_dir))
    target, head = build_target(cfg), build_head(cfg)
    load_into(target, ar_state, f"target AR from '{local_dir}'")
    load_into(head, head_state, f"flow head from '{local_dir}'")
    return target, head


def save_pretrained(out_dir: str | Path, cfg: Config, target: TargetAR, head: FlowHead, draft: DraftAR | None = None,
                    student: FlowHead | None = None, meta: dict | None = None) -> Path:
    """Our inference checkpoint: config.json + model.safetensors (NextStep layout) [+ draft / student / meta]."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(nextstep_state(target, head), out / "model.safetensors")
    if draft is not None:
        save_safetensors(draft.state_dict(), out / "draft.safetensors")
    if student is not None:
        save_safetensors(student.state_dict(), out / "student_head.safetensors")
    (out / "meta.json").write_text(json.dumps(meta or {}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg_to_dict(cfg), indent=2) + "\n")
    return out


def cfg_to_dict(cfg: Config) -> dict:
    from ..config import to_dict

    return to_dict(cfg)


def load_config(ckpt_dir: str | Path) -> Config:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{ckpt_dir}' has no config.json: pass a folder written by "
                                "save_pretrained / launcher/pretrain_t2i.py, or a NextStep folder with --preset")
    data = json.loads(path.read_text())
    cfg = get_preset(data.get("preset", "tiny"))
    return update_from_dict(cfg, data)


def load_pretrained(ckpt_dir: str | Path, cfg: Config | None = None, device=None) -> ModelBundle:
    """Load an inference checkpoint folder; missing optional parts (draft, student) are None."""
    ckpt = Path(ckpt_dir)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint '{ckpt}' does not exist: pass --ckpt with a folder holding "
                                "model.safetensors (e.g. assets/tiny_teacher) or train one with launcher/pretrain_t2i.py")
    cfg = cfg or load_config(ckpt)
    target, head = from_pretrained(ckpt, cfg)
    bundle = ModelBundle(cfg, target, head)
    if (ckpt / "draft.safetensors").is_file():
        bundle.draft = DraftAR(cfg.model)
        load_into(bundle.draft, read_state_dict(ckpt / "draft.safetensors"), f"draft AR from '{ckpt}'")
    if (ckpt / "student_head.safetensors").is_file():
        bundle.student = build_head(cfg, student=True)
        load_into(bundle.student, read_state_dict(ckpt / "student_head.safetensors"), f"student head from '{ckpt}'")
    if (ckpt / "meta.json").is_file():
        bundle.meta = json.loads((ckpt / "meta.json").read_text())
    for m in (bundle.target, bundle.head, bundle.draft, bundle.student):
        if m is not None:
            m.eval().requires_grad_(False).to(device or "cpu")
    return bundle


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "ARStep", "DraftAR", "FlowHead", "KVCache", "ModelBundle", "PixelPatchTokenizer", "TargetAR", "TextTokenizer",
    "VAETokenizer", "build_draft", "build_head", "build_image_tokenizer", "build_target", "count_params",
    "from_pretrained", "load_config", "nextstep_state", "load_pretrained", "load_text_tokenizer", "patchify", "resolve_asset",
    "row_entropy", "save_pretrained", "unpatchify",
]
