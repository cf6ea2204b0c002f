"""The image tokenizer of a class-conditional (MAR) config (config/c2i.py): pixel patches or the KL-16 VAE."""
from __future__ import annotations

from ..config.schema import ImageConfig
from .image_tokenizers import PixelPatchTokenizer
from .kl16_vae import KL16Tokenizer, load_kl16


def build_c2i_tokenizer(cfg, device=None):
    """Pixel patches of model.vae_stride (image.tokenizer=pixel), or the KL-16 VAE at image.vae_path."""
    m = cfg.model
    if cfg.image.tokenizer == "pixel":
        return PixelPatchTokenizer(ImageConfig(tokenizer="pixel", resolution=m.img_size, patch_size=m.vae_stride,
                                               channels=3))
    return KL16Tokenizer(load_kl16(cfg.image.vae_path), m.patch_size, device)
