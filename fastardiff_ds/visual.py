"""Tensors -> PIL images and sample grids (what people look at instead of reading numbers)."""
from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) in [-1,1] -> list of RGB PIL images."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(a.numpy()) for a in arr]


def make_grid(images: list[Image.Image], captions: list[str] | None = None, cols: int | None = None,
              scale: int = 1, caption_height: int = 0) -> Image.Image:
    """Tile images (upscaled `scale`x, nearest) into a grid, optional caption strip under each."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].width * scale, images[0].height * scale
    ch = caption_height if captions else 0
    grid = Image.new("RGB", (cols * w, rows * (h + ch)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + ch)
        grid.paste(img.resize((w, h), Image.NEAREST), (x, y))
        if captions:
            draw.text((x + 2, y + h + 1), captions[i][: max(4, w // 6)], fill="black")
    return grid
