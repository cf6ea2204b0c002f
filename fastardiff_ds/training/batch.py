"""A loader batch's clean image tokens, for both trainers (pretraining and the joint run).

`data.kind=pixels`: the batch's "pixels" (B,3,R,R) in [-1,1] go through the image tokenizer (pixel patches, or the
VAE's normalised latents patchified). `data.kind=latents`: the batch's "latents" were cached by
`data_pipelines/encode_latents.py` (at NextStep-1 scale the VAE runs once, not every epoch) and become tokens here
without the VAE, in one of the two layouts the cache holds:

- (B, N, D) tokens, what `VAETokenizer.encode` / `PixelPatchTokenizer.encode` return (encode_latents' default):
  used as they are;
- (B, C, h, w) normalised latents, i.e. `(z - shift) * scale` for the VAE (the pixels for the pixel tokenizer),
  patchified here exactly as the tokenizer patchifies them (NextStep-1's channel-major patch order).

A cache that does not fit the model (another VAE, patch size or resolution) is refused naming the keys.
"""
from __future__ import annotations

import torch

from ..config.schema import ImageConfig
from ..models.image_tokenizers import patchify


def latent_tokens(latents: torch.Tensor, image: ImageConfig) -> torch.Tensor:
    """Cached latents (B,N,D) or (B,C,h,w) -> tokens (B, N, D) with N = image.num_tokens, D = image.token_dim."""
    n, d = image.num_tokens, image.token_dim
    side = image.grid * image.patch_size
    if latents.ndim == 3 and tuple(latents.shape[1:]) == (n, d):
        return latents.float()
    if latents.ndim == 4 and tuple(latents.shape[1:]) == (image.channels, side, side):
        return patchify(latents.float(), image.patch_size)
    raise ValueError(f"cached latents of shape {tuple(latents.shape[1:])} do not fit the model: expected tokens "
                     f"({n}, {d}) or latents ({image.channels}, {side}, {side}) from model.image (resolution="
                     f"{image.resolution}, patch_size={image.patch_size}, channels={image.channels}); re-encode "
                     "data.shards with data_pipelines/encode_latents.py for this model, or use data.kind=pixels")


def image_tokens(batch: dict, kind: str, image_tokenizer, image: ImageConfig, device) -> torch.Tensor:
    """The batch's clean image tokens (B, N, D) on `device`: `kind` is data.kind ("pixels" | "latents")."""
    if kind == "latents":
        if "latents" not in batch:
            raise KeyError(f"data.kind=latents but the batch has {sorted(k for k in batch if not k.startswith('_'))}"
                           ": point data.shards at shards written by data_pipelines/encode_latents.py")
        return latent_tokens(batch["latents"].to(device), image)
    return image_tokenizer.encode(batch["pixels"].to(device))
