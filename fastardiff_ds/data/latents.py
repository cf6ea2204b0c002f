"""Latent caching: run an image tokenizer once over pixel shards, write latent shards.

Output shards keep the input shard names and sample keys, in img2dataset layout with
``KEY.latent.npy`` (C, h, w) in place of ``KEY.jpg``, plus ``KEY.txt`` / ``KEY.json`` (the input JSON
with "latent_shape" added), parquet, stats and sizes.json. The loader reads them with kind="latents".
"""
from __future__ import annotations

import io
import json
import os
from typing import Protocol

import numpy as np
import torch

from fastardiff_ds.data.decode import SkipSample, decode_caption, decode_image, decode_json
from fastardiff_ds.data.shards import SkipCounter, iter_tar
from fastardiff_ds.data.writer import ShardWriter, finish_dataset, i2d_meta


class ImageEncoder(Protocol):
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) in [-1,1] -> (B,C,h,w)
        ...


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _flush(writer: ShardWriter, encoder: ImageEncoder, pending: list, dtype: np.dtype, device) -> None:
    if not pending:
        return
    pixels = torch.stack([p[2] for p in pending])  # (B, 3, R, R)
    with torch.no_grad():
        latents = encoder.encode(pixels.to(device) if device is not None else pixels)
    latents = latents.detach().float().cpu().numpy().astype(dtype)  # (B, C, h, w)
    for (key, caption, _, meta), lat in zip(pending, latents):
        npy = _npy(lat)
        meta = {**meta, **i2d_meta(key, caption, meta.get("width"), meta.get("height"), npy),
                "latent_shape": list(lat.shape)}
        writer.add(key, {"latent.npy": npy, "txt": caption.encode("utf-8"),
                         "json": json.dumps(meta, sort_keys=True).encode("utf-8")}, meta)
    pending.clear()


def encode_shards(shards: list[str], out_dir: str, encoder: ImageEncoder, resolution: int,
                  batch_size: int = 32, dtype: str = "float16", interpolation: str = "bicubic",
                  min_size: int = 16, device=None) -> dict:
    """Encode every usable sample of `shards` into latent shards under `out_dir`.

    Bad samples are skipped and counted exactly as in the loader. Returns {"samples", "skipped"}.
    """
    os.makedirs(out_dir, exist_ok=True)
    skips, total = SkipCounter(), 0
    for shard in shards:
        name = os.path.basename(shard)
        writer = ShardWriter(out_dir, int(name.split(".")[0]) if name.split(".")[0].isdigit() else shards.index(shard))
        pending: list = []
        for raw in iter_tar(shard, skips):
            try:
                caption, meta = decode_caption(raw), decode_json(raw)
                pixels = decode_image(raw, resolution, min_size, interpolation)  # (3, R, R)
            except SkipSample as e:
                skips.skip(e.reason, raw["__key__"], shard, e.detail)
                continue
            pending.append((raw["__key__"], caption, pixels, meta))
            if len(pending) == batch_size:
                _flush(writer, encoder, pending, np.dtype(dtype), device)
        _flush(writer, encoder, pending, np.dtype(dtype), device)
        total += writer.close()["successes"]
    finish_dataset(out_dir)
    return {"samples": total, "skipped": dict(skips.counts)}
