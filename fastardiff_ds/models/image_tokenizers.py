"""Images <-> continuous token sequences.

`PixelPatchTokenizer` (tiny preset): the RGB image in [-1, 1] cut into p x p patches -> (B, N, 3 p^2).
`VAETokenizer`: NextStep-1's Flux-style AutoencoderKL (f8, 16 channels) loaded from a local path with `diffusers`,
latents normalised as (z - shift) * scale, then patchified 2 x 2 -> 64-d tokens (NextStep-1's
`einsum("nchpwq->nhwcpq")` order: channel-major inside a patch).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..config.schema import ImageConfig

# NextStep-1-f8ch16-Tokenizer / FLUX.1 VAE architecture (diffusers AutoencoderKL arguments).
FLUX_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C p p), raster order, channel-major inside a patch."""
    B, C, H, W = x.shape
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not divisible by patch size {p}")
    x = x.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwcpq", x).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, grid: int) -> torch.Tensor:
    """(B, grid^2, C p p) -> (B, C, grid p, grid p)."""
    B = tokens.shape[0]
    x = tokens.reshape(B, grid, grid, channels, p, p)
    return torch.einsum("nhwcpq->nchpwq", x).reshape(B, channels, grid * p, grid * p)


class PixelPatchTokenizer:
    """Tokens are raw pixel patches in [-1, 1]."""

    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B,3,R,R) in [-1,1] -> tokens (B,N,D)."""
        if pixels.shape[-1] != self.cfg.resolution:
            pixels = F.interpolate(pixels, size=(self.cfg.resolution,) * 2, mode="bilinear", antialias=True)
        return patchify(pixels, self.cfg.patch_size)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,N,D) -> pixels (B,3,R,R) clamped to [-1,1]."""
        return unpatchify(tokens, self.cfg.patch_size, self.cfg.channels, self.cfg.grid).clamp(-1, 1)


class VAETokenizer:
    """AutoencoderKL latents as tokens. `path`: a diffusers folder (config.json + weights) or one safetensors file
    in diffusers or original (LDM / BFL Flux) key layout."""

    def __init__(self, cfg: ImageConfig, vae, device=None):
        self.cfg, self.vae = cfg, vae.eval().requires_grad_(False)
        if device is not None:
            self.vae.to(device)

    @classmethod
    def from_local(cls, cfg: ImageConfig, device=None) -> "VAETokenizer":
        return cls(cfg, load_vae(cfg.vae_path), device)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = False) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        z = dist.sample() if sample else dist.mode()
        z = (z.float() - self.cfg.shift_factor) * self.cfg.scaling_factor
        return patchify(z, self.cfg.patch_size)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        z = unpatchify(tokens.float(), self.cfg.patch_size, self.cfg.channels, self.cfg.grid)
        z = z / self.cfg.scaling_factor + self.cfg.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


def load_vae(path: str | Path, config: dict | None = None):
    """AutoencoderKL from a local folder or safetensors file; never touches the network."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    path = Path(path)
    if not str(path) or not path.exists():
        raise FileNotFoundError(f"VAE weights not found at '{path}': set model.image.vae_path to a local diffusers "
                                "folder or a .safetensors file of the NextStep-1 f8ch16 tokenizer")
    if path.is_dir():
        return AutoencoderKL.from_pretrained(path, local_files_only=True)
    state = load_file(str(path))
    vae_cfg = dict(config or FLUX_VAE_CONFIG)
    if any(k.startswith("encoder.down.") for k in state):  # original LDM / BFL layout -> diffusers
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(state, {**vae_cfg, "block_out_channels": list(vae_cfg["block_out_channels"])})
    vae = AutoencoderKL(**vae_cfg)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"VAE checkpoint '{path}' does not match the f8ch16 AutoencoderKL: "
                         f"missing {missing[:5]}..., unexpected {unexpected[:5]}...")
    return vae


def build_image_tokenizer(cfg: ImageConfig, device=None):
    if cfg.tokenizer == "pixel":
        return PixelPatchTokenizer(cfg)
    if cfg.tokenizer == "vae":
        return VAETokenizer.from_local(cfg, device)
    raise ValueError(f"model.image.tokenizer='{cfg.tokenizer}' is not one of: pixel, vae")
