"""Raw sample -> training sample: caption checks, image decode + resize/centre-crop, latent decode.

Each failure raises `SkipSample(reason)`; the loader counts the reason and logs the key. Reasons:
missing_txt, bad_txt, empty_caption, bad_json, missing_image, decode_error, too_small,
missing_latent, bad_latent.
"""
from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LATENT_EXT = "latent.npy"
_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "box": Image.BOX,
            "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def decode_caption(raw: dict) -> str:
    """UTF-8 caption from ``KEY.txt`` with surrounding whitespace removed."""
    if "txt" not in raw:
        raise SkipSample("missing_txt")
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SkipSample("bad_txt", str(e)) from None
    if not caption:
        raise SkipSample("empty_caption")
    return caption


def decode_label(raw: dict, meta: dict, num_classes: int | None) -> int:
    """The class label: ``KEY.cls`` (ASCII integer, surrounding whitespace allowed) or the JSON's int "label"."""
    if "cls" in raw:
        try:
            label = int(raw["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise SkipSample("bad_cls", f"{raw['cls'][:24]!r} is not an integer") from None
    elif isinstance(meta.get("label"), int) and not isinstance(meta.get("label"), bool):
        label = meta["label"]
    else:
        raise SkipSample("missing_label", "no .cls member and no integer 'label' in the .json")
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise SkipSample("label_out_of_range", f"{label} not in [0, {num_classes})")
    return label


def decode_json(raw: dict) -> dict:
    """``KEY.json`` as a dict ({} when absent)."""
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkipSample("bad_json", str(e)) from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"expected an object, got {type(meta).__name__}")
    return meta


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white (as most T2I pipelines do)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if img.mode in ("I", "I;16", "F"):  # 16/32-bit grey: rescale to 8 bit before converting
        a = np.asarray(img, dtype=np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255.0
        return Image.fromarray(a.round().astype(np.uint8)).convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, ...


def resize_center_crop(img: Image.Image, resolution: int, interpolation: str = "bicubic") -> Image.Image:
    """Shorter side -> `resolution`, then the central resolution x resolution crop."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _FILTERS[interpolation], reducing_gap=None)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    a = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    return a.float().div_(127.5).sub_(1.0)


def decode_image(raw: dict, resolution: int, min_size: int, interpolation: str) -> torch.Tensor:
    """Image bytes -> (3, R, R) float tensor in [-1, 1] (RGB; resized and centre-cropped)."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise SkipSample("missing_image", f"no {'/'.join(IMAGE_EXTS)} member")
    try:
        img = Image.open(io.BytesIO(raw[ext]))
        img.load()  # force the full decode here so truncation shows up as an error
        img = to_rgb(img)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise SkipSample("decode_error", f"{type(e).__name__}: {e}") from None
    if min(img.size) < min_size:
        raise SkipSample("too_small", f"{img.size[0]}x{img.size[1]} < {min_size}")
    return pil_to_tensor(resize_center_crop(img, resolution, interpolation))


def decode_latent(raw: dict) -> torch.Tensor:
    """``KEY.latent.npy`` -> float32 tensor (C, h, w) latents, or (N, D) patch tokens."""
    if LATENT_EXT not in raw:
        raise SkipSample("missing_latent", f"no {LATENT_EXT} member")
    try:
        a = np.load(io.BytesIO(raw[LATENT_EXT]), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError / OSError / EOFError on damaged files
        raise SkipSample("bad_latent", f"{type(e).__name__}: {e}") from None
    if a.ndim not in (2, 3) or not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
        raise SkipSample("bad_latent", f"expected finite float (C,h,w) or (N,D), got {a.dtype} {a.shape}")
    return torch.from_numpy(a.astype(np.float32, copy=False))


def tokenize_caption(caption: str, tokenize, pad_id: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (L,) long, LEFT-padded with pad_id, and attention mask (L,) long (1 = real token).

    Truncation keeps the first `max_len` tokens (the start of a caption carries the subject).
    """
    ids = list(tokenize(caption))[:max_len]
    pad = max_len - len(ids)
    return (torch.tensor([pad_id] * pad + ids, dtype=torch.long),
            torch.tensor([0] * pad + [1] * len(ids), dtype=torch.long))
