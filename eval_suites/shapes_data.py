"""Rendered synthetic-shapes images for the tiny evaluation networks and the FID reference set.

Two views of a scene: `direct` (rendered at 32 px, aliased, exactly as `render_scene` draws) and
`pipeline` (what the tiny preset trains on: rendered at 64 px, JPEG-encoded by `make_shapes`, decoded
and bicubic-resized to 32 px by the data loader). The networks train on both, so they score a model's
outputs (which imitate the pipeline view) and exact renders alike. A fixed pool is rendered once and
batches are drawn from it, so training costs no rendering time per step.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

PIPELINE_RENDER = 64  # make_shapes' default resolution (fastardiff_ds.data.synthetic)


def pipeline_view(scene: dict, resolution: int = 32) -> Image.Image:
    """`scene` as the tiny preset's training data shows it: JPEG (q95, 4:4:4) then resize/centre-crop."""
    from fastardiff_ds.data.decode import resize_center_crop
    from fastardiff_ds.data.shapes import render_scene
    from fastardiff_ds.data.synthetic import encode_jpeg

    jpg = Image.open(io.BytesIO(encode_jpeg(render_scene(scene)))).convert("RGB")
    return resize_center_crop(jpg, resolution)


def render_view(rng: np.random.Generator, view: str, resolution: int = 32, task=None) -> tuple[Image.Image, dict]:
    """A fresh scene in the `direct` or `pipeline` view; the scene's boxes are in its render resolution."""
    from fastardiff_ds.data.shapes import render_scene, sample_scene

    if view == "direct":
        scene = sample_scene(rng, resolution, task=task)
        return render_scene(scene), scene
    if view == "pipeline":
        scene = sample_scene(rng, PIPELINE_RENDER, task=task)
        return pipeline_view(scene, resolution), scene
    raise ValueError(f"unknown view {view!r}; expected 'direct' or 'pipeline'")


def render_pool(n: int, seed: int, resolution: int = 32) -> tuple[torch.Tensor, list[dict]]:
    """(n, 3, R, R) uint8 images, alternating direct and pipeline views, and their scene dicts."""
    rng = np.random.default_rng(seed)
    pairs = [render_view(rng, ("direct", "pipeline")[i % 2], resolution) for i in tqdm(range(n), desc="render")]
    images = np.stack([np.asarray(im) for im, _ in pairs])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [sc for _, sc in pairs]


def scene_targets(scenes: list[dict], max_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, shapes*colours) presence multi-hot and (n, shapes) object counts (clipped to max_count)."""
    from fastardiff_ds.data.shapes import COLOR_NAMES, SHAPES, label_of

    pairs = torch.zeros(len(scenes), len(SHAPES) * len(COLOR_NAMES))
    counts = torch.zeros(len(scenes), len(SHAPES), dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene["objects"]:
            pairs[i, label_of(obj["shape"], obj["color"])] = 1.0
            counts[i, SHAPES.index(obj["shape"])] += 1
    return pairs, counts.clamp(max=max_count)
