"""Single-device model code: target/draft AR, flow head, image and text tokenizers, checkpoint I/O.

Nothing here imports DeepSpeed, losses or samplers; parallelism is applied from outside (`fastardiff_ds.engines`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, apply_overrides, get_preset, reset_derived, update_from_dict
from .ar import ARStep, DraftAR, TargetAR, row_entropy
from .flow_head import FlowHead, grow_state, student_head_config
from .image_tokenizers import PixelPatchTokenizer, VAETokenizer, build_image_tokenizer, patchify, unpatchify
from .kv_cache import KVCache
from .nextstep_config import check_special_token_ids, folder_kind, official_config
from .text_tokenizer import TextTokenizer, load_text_tokenizer, resolve_asset
from .weights import load_streaming, nextstep_route, nextstep_state, resolve_dtype, save_safetensors


def build_target(cfg: Config) -> TargetAR:
    return TargetAR(cfg.model)


def build_head(cfg: Config, student: bool = False, discriminator: bool = False) -> FlowHead:
    """Teacher head, or (student=True) the few-step student: the guidance-scale embedding for CFG distillation, and
    the size of `model.student_head` (the teacher head's by default). discriminator: the fake score's GAN
    classifier (train.gan_weight > 0)."""
    size = student_head_config(cfg.model.head, cfg.model.student_head) if student else cfg.model.head
    return FlowHead(size, cfg.model.image.token_dim, cfg.model.ar.hidden_size, guidance_embed=student,
                    discriminator=discriminator)


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


def from_pretrained(local_dir: str | Path, cfg: Config, device=None) -> tuple[TargetAR, FlowHead]:
    """Target AR + head from a NextStep-layout folder (an official NextStep-1.x download or our export), built on
    the meta device and filled shard by shard in `cfg.model.dtype` (no full fp32 copy of a bf16 checkpoint)."""
    dtype = resolve_dtype(cfg.model.dtype)
    with torch.device("meta"):
        target, head = build_target(cfg), build_head(cfg)
    load_streaming(local_dir, {"ar": target, "head": head}, nextstep_route, dtype, device or "cpu",
                   f"target AR + flow head from '{local_dir}'")
    return target, head


def _load_part(path: Path, build, cfg: Config, device, what: str):
    """An optional extra module (draft / student head) from its own safetensors file, same meta-device path."""
    with torch.device("meta"):
        module = build()
    load_streaming(path, {"m": module}, lambda k: ("m", k), resolve_dtype(cfg.model.dtype), device, what)
    return module


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


def load_config(ckpt_dir: str | Path, preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """The config a checkpoint folder is built with, CLI overrides applied (before any model is built).

    Our export: its config.json is our config tree. An official NextStep-1.x download: its config.json is mapped
    by `nextstep_config.official_config` (with `preset` or the family preset for what it does not say). A folder
    without config.json needs `preset`."""
    ckpt = Path(ckpt_dir)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint '{ckpt}' does not exist: pass --ckpt with a folder holding "
                                "model.safetensors (e.g. assets/tiny_teacher) or train one with "
                                "launcher/pretrain_t2i.py")
    if not (ckpt / "config.json").is_file():
        if preset is None:
            raise FileNotFoundError(f"checkpoint '{ckpt}' has no config.json: pass a folder written by save_pretrained "
                                    "/ launcher/pretrain_t2i.py, a NextStep-1.x download, or name its --preset")
        cfg = get_preset(preset)
    else:
        kind, data = folder_kind(ckpt)
        if kind == "ours":
            draft = data.get("model", {}).get("draft")
            if isinstance(draft, dict):  # folders written before model.draft.kind existed hold truncated drafts
                draft.setdefault("kind", "truncated")
            cfg = reset_derived(update_from_dict(get_preset(data.get("preset", "tiny")), data))  # re-derived
        else:
            cfg = official_config(data, ckpt, preset)
    apply_overrides(cfg, overrides or [])
    resolve_dtype(cfg.model.dtype)  # a bad model.dtype fails here, before any weights are read
    return cfg


def adopt_teacher_model(cfg: Config, overrides: list[str] | None = None) -> Config:
    """Training: take the model section (and its resolution) from the `train.teacher` folder's config.json, then
    re-apply the CLI overrides, so `train.teacher=<NextStep-1.1 download>` builds the teacher's architecture."""
    folder = Path(resolve_asset(cfg.train.teacher))
    if not (folder / "config.json").is_file():
        return cfg  # a folder without config.json: the preset must match it
    teacher = load_config(folder)
    cfg.model = teacher.model  # derived keys (data.resolution, data.max_text_len) follow it when validated
    if folder_kind(folder)[0] == "official":
        cfg.pretrain.batch_mul = teacher.pretrain.batch_mul
    return apply_overrides(cfg, overrides or [])


def load_pretrained(ckpt_dir: str | Path, cfg: Config | None = None, device=None,
                    overrides: list[str] | None = None) -> ModelBundle:
    """Load an inference checkpoint folder; missing optional parts (draft, student) are None. `overrides` apply
    to the config before the models are built (they are ignored when `cfg` is given)."""
    ckpt = Path(ckpt_dir)
    cfg = cfg or load_config(ckpt, None, overrides)
    device = device or "cpu"
    target, head = from_pretrained(ckpt, cfg, device)
    bundle = ModelBundle(cfg, target, head)
    if (ckpt / "draft.safetensors").is_file():
        bundle.draft = _load_part(ckpt / "draft.safetensors", lambda: DraftAR(cfg.model), cfg, device,
                                  f"draft AR from '{ckpt}'")
    if (ckpt / "student_head.safetensors").is_file():
        bundle.student = _load_part(ckpt / "student_head.safetensors", lambda: build_head(cfg, student=True), cfg,
                                    device, f"student head from '{ckpt}'")
    if (ckpt / "meta.json").is_file():
        bundle.meta = json.loads((ckpt / "meta.json").read_text())
    for m in (bundle.target, bundle.head, bundle.draft, bundle.student):
        if m is not None:
            m.eval().requires_grad_(False)
    return bundle


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "ARStep", "DraftAR", "FlowHead", "KVCache", "ModelBundle", "PixelPatchTokenizer", "TargetAR", "TextTokenizer",
    "VAETokenizer", "adopt_teacher_model", "build_draft", "build_head", "build_image_tokenizer", "build_target",
    "check_special_token_ids", "count_params", "folder_kind", "from_pretrained", "grow_state", "load_config",
    "load_pretrained", "load_text_tokenizer", "nextstep_state", "official_config", "patchify", "resolve_asset",
    "row_entropy", "save_pretrained", "student_head_config", "unpatchify",
]
