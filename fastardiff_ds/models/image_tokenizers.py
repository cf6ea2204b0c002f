"""Images <-> continuous token sequences.

`PixelPatchTokenizer` (tiny preset): the RGB image in [-1, 1] cut into p x p patches -> (B, N, 3 p^2).
`VAETokenizer`: NextStep-1's Flux-style AutoencoderKL (f8, 16 channels) from a local path -- the official
`NextStep-1-f8ch16-Tokenizer` folder (nextstep_vae.py: encoder_norm, scale/shift from its config.json) or a diffusers
folder / file -- latents normalised as (z - shift) * scale, then patchified 2 x 2 -> 64-d tokens (NextStep-1's
`einsum("nchpwq->nhwcpq")` order: channel-major inside a patch).
"""
from __future__ import annotations

import warnings
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
    """AutoencoderKL latents as tokens: encode -> (z - shift) * scale -> patchify; decode undoes each step.

    `scale` / `shift` are `model.image.scaling_factor` / `shift_factor` when set, else the VAE config's (the
    official NextStep folder's config.json, or a diffusers config's scaling_factor / shift_factor), as the official
    pipelines read them.
    """

    def __init__(self, cfg: ImageConfig, vae, device=None):
        self.cfg, self.vae = cfg, vae.eval().requires_grad_(False)
        check_vae_fits(cfg, vae)
        self.scale, self.shift = resolve_scale_shift(cfg, vae)
        if device is not None:
            self.vae.to(device)

    @classmethod
    def from_local(cls, cfg: ImageConfig, device=None) -> "VAETokenizer":
        return cls(cfg, load_vae(cfg.vae_path), device)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """pixels (B,3,R,R) in [-1,1] -> tokens (B,N,C p^2); the posterior mean unless `sample`."""
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        z = dist.sample() if sample else dist.mode()
        z = (z.float() - self.shift) * self.scale
        return patchify(z, self.cfg.patch_size)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,N,C p^2) -> pixels (B,3,R,R) clamped to [-1,1]."""
        z = unpatchify(tokens.float(), self.cfg.patch_size, self.cfg.channels, self.cfg.grid)
        z = z / self.scale + self.shift
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


def vae_scale_shift(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from a VAE's config; absent or null -> (1, 0)."""
    scale = getattr(vae.config, "scaling_factor", None)
    shift = getattr(vae.config, "shift_factor", None)
    return float(1.0 if scale is None else scale), float(0.0 if shift is None else shift)


def resolve_scale_shift(cfg: ImageConfig, vae) -> tuple[float, float]:
    """The config's values when set (warning when they differ from the VAE's), else the VAE's."""
    own = vae_scale_shift(vae)
    chosen = (own[0] if cfg.scaling_factor is None else float(cfg.scaling_factor),
              own[1] if cfg.shift_factor is None else float(cfg.shift_factor))
    if chosen != own:
        warnings.warn(f"model.image.scaling_factor/shift_factor = {chosen[0]}/{chosen[1]} override the VAE's own "
                      f"{own[0]}/{own[1]}; set both to null to use the VAE's (as the official pipeline does)",
                      stacklevel=3)
    return chosen


def check_vae_fits(cfg: ImageConfig, vae) -> None:
    """The VAE's latent channels and downsampling must match model.image.channels / vae_downsample."""
    channels = getattr(vae.config, "latent_channels", cfg.channels)
    down = 2 ** (len(getattr(vae.config, "block_out_channels", [0] * 4)) - 1)
    if channels != cfg.channels or down != cfg.vae_downsample:
        raise ValueError(f"the VAE at '{cfg.vae_path}' has {channels} latent channels and downsamples {down}x, but "
                         f"model.image.channels={cfg.channels}, model.image.vae_downsample={cfg.vae_downsample}: "
                         "point model.image.vae_path (--vae) at the VAE this model was trained with")


def load_vae(path: str | Path, config: dict | None = None, cache_dir: str | Path | None = None):
    """AutoencoderKL from a local path; never touches the network.

    `path`: the official NextStep folder (config.json + checkpoint.pt, converted and cached, see nextstep_vae.py),
    a diffusers folder (config.json + diffusion_pytorch_model.*), or one .safetensors file in diffusers or original
    (LDM / BFL Flux) key layout (architecture `config`, default FLUX_VAE_CONFIG).
    """
    from .nextstep_vae import DOWNLOAD_HINT, is_official_folder, load_nextstep_vae

    path = Path(path)
    if not str(path) or str(path) == "." or not path.exists():
        raise FileNotFoundError(f"VAE weights not found at '{path}': {DOWNLOAD_HINT}, then set "
                                "model.image.vae_path (or pass --vae) to that folder; a diffusers AutoencoderKL "
                                "folder or a .safetensors file also works")
    if path.is_file() and path.name == "checkpoint.pt":
        path = path.parent
    if is_official_folder(path):
        return load_nextstep_vae(path, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file() or not any(path.glob("diffusion_pytorch_model.*")):
            found = sorted(p.name for p in path.iterdir())[:8]
            raise FileNotFoundError(f"'{path}' is neither the official NextStep VAE folder (config.json + "
                                    "checkpoint.pt) nor a diffusers AutoencoderKL folder (config.json + "
                                    f"diffusion_pytorch_model.safetensors); it holds {found}. {DOWNLOAD_HINT}")
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(path, local_files_only=True)
    return _load_vae_file(path, config)


def _load_vae_file(path: Path, config: dict | None):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

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

