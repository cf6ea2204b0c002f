"""MAR's KL-16 VAE (`pretrained_models/vae/kl16.ckpt`) as a diffusers AutoencoderKL (the MAR row, issue 28).

Facts from LTH14/mar `models/vae.py` (LDM's KL autoencoder; learned, not copied):
- `AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))` with ch 128, 2 res blocks a level, resolution 256; the
  encoder has attention after each res block of the level at resolution 16 (`attn_resolutions=(16,)`, the last
  level), the decoder none outside its mid block; GroupNorm(32, eps 1e-6), swish, LDM's asymmetric-pad downsample.
- `quant_conv` (2E -> 2E, 1x1) follows the encoder, `post_quant_conv` (E -> E) precedes the decoder; the posterior
  is a diagonal Gaussian with logvar clamped to [-30, 20].
- `init_from_ckpt` reads `torch.load(path)["model"]` and loads it with strict=False (the file may hold more).
- MAR's tokens are `posterior.sample() * 0.2325` of images in [-1, 1] (engine_mar.py), and images are
  `vae.decode(tokens / 0.2325)`, mapped to [0, 1] by (x + 1) / 2.
The layout (widths, levels, blocks, attention levels, embed dim) is read from the weights' shapes, so a checkpoint
of another size loads without a config.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .image_tokenizers import patchify, unpatchify
from .nextstep_vae import convert_official_state
from .weights import load_pickle_weights_only

MAR_SCALE = 0.2325  # engine_mar.py: tokens = posterior.sample() * 0.2325
DOWNLOAD_HINT = ("download it with LTH14/mar's util/download.py (download_pretrained_vae) to "
                 "pretrained_models/vae/kl16.ckpt")
_KEEP = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


@dataclass(frozen=True)
class KL16Params:
    """The official network's layout; defaults are kl16.ckpt's."""

    embed_dim: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (4,)  # encoder levels with attention (resolution 16 of 256)
    scale: float = MAR_SCALE

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def diffusers_kwargs(self) -> dict:
        n = len(self.ch_mult)
        down = tuple("AttnDownEncoderBlock2D" if i in self.attn_levels else "DownEncoderBlock2D" for i in range(n))
        return dict(in_channels=3, out_channels=3, latent_channels=self.embed_dim,
                    block_out_channels=tuple(self.ch * m for m in self.ch_mult), layers_per_block=self.num_res_blocks,
                    down_block_types=down, up_block_types=("UpDecoderBlock2D",) * n, norm_num_groups=32,
                    act_fn="silu", mid_block_add_attention=True, scaling_factor=self.scale, use_quant_conv=True,
                    use_post_quant_conv=True)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], scale: float = MAR_SCALE) -> KL16Params:
        """The layout of an official (LDM-named) state dict, from its keys and shapes."""
        ch = state["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        mult = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels)
        blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
        attn = tuple(sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.attn\.", k))}))
        return cls(embed_dim=state["post_quant_conv.weight"].shape[0], ch=ch, ch_mult=mult, num_res_blocks=blocks,
                   attn_levels=attn, scale=scale)


class KL16VAE(AutoencoderKL):
    """diffusers AutoencoderKL with MAR's token scaling: `tokens(images)` and `images(tokens)`."""

    def __init__(self, params: KL16Params = KL16Params()):
        super().__init__(**params.diffusers_kwargs())
        self.kl16 = params

    def tokens(self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """images (B, 3, H, W) in [-1, 1] -> MAR latents (B, E, H/16, W/16): a posterior sample (as MAR trains)
        or its mean, times the scale."""
        post = self.encode(images).latent_dist
        z = post.sample(generator) if sample else post.mode()
        return z * self.kl16.scale

    def images(self, tokens: torch.Tensor) -> torch.Tensor:
        """MAR latents (B, E, h, w) -> images in [-1, 1] (unclamped, as vae.decode returns them)."""
        return self.decode(tokens / self.kl16.scale).sample


def read_kl16_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """kl16.ckpt -> its official state dict (`["model"]`, or a flat state dict), tensors only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such KL-16 VAE checkpoint; {DOWNLOAD_HINT}")
    ck = load_pickle_weights_only(path, fix=DOWNLOAD_HINT)
    state = ck.get("model", ck) if isinstance(ck, dict) else None
    if not isinstance(state, dict) or "post_quant_conv.weight" not in state or "encoder.conv_in.weight" not in state:
        top = sorted(map(str, ck))[:6] if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(f"{path}: not a KL-16 VAE checkpoint (top level {top}; expected 'model' holding encoder.*, "
                         f"decoder.*, quant_conv.*, post_quant_conv.*); {DOWNLOAD_HINT}")
    return state


def load_kl16(path: str | Path, scale: float = MAR_SCALE) -> KL16VAE:
    """kl16.ckpt (or another LDM KL autoencoder in its layout) -> KL16VAE in fp32, eval mode. Keys outside the
    autoencoder (a training loss's, as strict=False lets the official loader skip) are ignored."""
    state = read_kl16_checkpoint(path)
    try:
        params = KL16Params.from_state(state, scale)
    except (KeyError, IndexError) as e:
        raise ValueError(f"{path}: the state dict lacks {e} of the LDM KL autoencoder layout; {DOWNLOAD_HINT}") from None
    vae = KL16VAE(params)
    converted = convert_official_state(state, len(params.ch_mult), keep=_KEEP)
    try:
        missing, unexpected = vae.load_state_dict(converted, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the layout read from them ({params}): "
                         f"{str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"{path}: does not match the KL-16 layout {params}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return vae.eval()


class KL16Tokenizer:
    """Images <-> MAR tokens through the KL-16 VAE: encode samples the posterior (as MAR trains; `sample=False`
    for its mean), scales by 0.2325 and patchifies by `patch_size`; decode undoes it and clamps to [-1, 1]."""

    def __init__(self, vae: KL16VAE, patch_size: int = 1, device=None):
        self.vae, self.patch_size = vae.eval().requires_grad_(False), patch_size
        if device is not None:
            self.vae.to(device)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = True) -> torch.Tensor:
        return patchify(self.vae.tokens(pixels, sample=sample), self.patch_size)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        grid = round((tokens.shape[1]) ** 0.5)
        return self.vae.images(unpatchify(tokens, self.patch_size, self.vae.kl16.embed_dim, grid)).clamp(-1, 1)
