"""MAR (Li et al. 2024, LTH14/mar `models/mar.py`): a bidirectional ViT encoder-decoder over [class buffer + image
tokens] whose decoder output conditions a per-token DiffLoss head (sampling/diffloss.py).

State-dict keys are the official ones, so `checkpoint-last.pth` loads as saved (models/mar_checkpoint.py):
`class_emb`, `fake_latent`, `z_proj`, `z_proj_ln`, `encoder_pos_embed_learned`, `encoder_blocks.{i}` (timm's
ViT Block: `norm1`, `attn.{qkv,proj}`, `norm2`, `mlp.{fc1,fc2}`), `encoder_norm`, `decoder_embed`, `mask_token`,
`decoder_pos_embed_learned`, `decoder_blocks.{i}`, `decoder_norm`, `diffusion_pos_embed_learned`, `diffloss.net.*`.
The forward returns the DiffLoss conditions only; masks, orders and label drops are passed in (no hidden RNG).
Shapes: B images, L = seq_len image tokens of C = token_dim, P = buffer_size class tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .flow_head import SimpleMLPAdaLN


@dataclass
class MARConfig:
    """The network's sizes (models/mar.py `MAR.__init__` arguments). Mutable so it can be a config section
    (config/c2i.py `model`); take presets with `mar_preset(name)` (a copy)."""

    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    enc_dim: int = 1024
    enc_depth: int = 16
    enc_heads: int = 16
    dec_dim: int = 1024
    dec_depth: int = 16
    dec_heads: int = 16
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    class_num: int = 1000
    diffloss_d: int = 3
    diffloss_w: int = 1024
    attn_dropout: float = 0.1  # MAR's training dropout (attention probabilities; projections and MLP below)
    proj_dropout: float = 0.1

    def __post_init__(self):
        if self.img_size % (self.vae_stride * self.patch_size):
            raise ValueError(f"img_size={self.img_size} must be a multiple of vae_stride * patch_size = "
                             f"{self.vae_stride * self.patch_size}")
        for width, heads, name in ((self.enc_dim, self.enc_heads, "enc"), (self.dec_dim, self.dec_heads, "dec")):
            if heads < 1 or width % heads:
                raise ValueError(f"{name}_dim={width} must be a multiple of {name}_heads={heads}")
        for name in ("enc_depth", "dec_depth", "class_num", "diffloss_d", "diffloss_w", "vae_embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.buffer_size < 0:
            raise ValueError(f"buffer_size={self.buffer_size} must be >= 0")
        for name in ("attn_dropout", "proj_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")

    @property
    def seq_len(self) -> int:
        return (self.img_size // self.vae_stride // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size**2


def diffloss_net(cfg: MARConfig) -> SimpleMLPAdaLN:
    """MAR's DiffLoss net: tokens of token_dim, conditions of dec_dim, learned sigma (out 2 token_dim)."""
    return SimpleMLPAdaLN(cfg.token_dim, cfg.dec_dim, cfg.diffloss_w, cfg.diffloss_d, mlp_ratio=1.0,
                          out_dim=2 * cfg.token_dim)


def _ln(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)  # mar_base/large/huge pass norm_layer=partial(nn.LayerNorm, eps=1e-6)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):  # (B, T, dim), full bidirectional attention
        B, T, E = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(a.transpose(1, 2).reshape(B, T, E)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """timm's pre-norm ViT block with MAR's dropouts (no layer scale, no drop path)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.norm1, self.attn = _ln(dim), Attention(dim, heads, attn_drop, proj_drop)
        self.norm2, self.mlp = _ln(dim), Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MAR(nn.Module):
    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.cfg = cfg
        L, P, E, Dd = cfg.seq_len, cfg.buffer_size, cfg.enc_dim, cfg.dec_dim
        self.class_emb = nn.Embedding(cfg.class_num, E)
        self.fake_latent = nn.Parameter(torch.zeros(1, E))
        self.z_proj, self.z_proj_ln = nn.Linear(cfg.token_dim, E), _ln(E)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L + P, E))
        drops = (cfg.attn_dropout, cfg.proj_dropout)
        self.encoder_blocks = nn.ModuleList(Block(E, cfg.enc_heads, cfg.mlp_ratio, *drops)
                                            for _ in range(cfg.enc_depth))
        self.encoder_norm = _ln(E)
        self.decoder_embed = nn.Linear(E, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L + P, Dd))
        self.decoder_blocks = nn.ModuleList(Block(Dd, cfg.dec_heads, cfg.mlp_ratio, *drops)
                                            for _ in range(cfg.dec_depth))
        self.decoder_norm = _ln(Dd)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, Dd))
        self.diffloss = nn.Module()
        self.diffloss.net = diffloss_net(cfg)

    def init_weights(self) -> None:
        """MAR's `initialize_weights`: embeddings, the mask token and positions N(0, 0.02^2), Linear xavier-uniform
        with zero bias, LayerNorm (1, 0); then the DiffLoss net's own init (adaLN-zero), as MAR builds it after."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.diffloss.net.reset_parameters()

    def class_embedding(self, labels: torch.Tensor | None, batch: int, drop: torch.Tensor | None = None):
        """(B, E): the class embedding, `fake_latent` (the unconditional row) where labels is None or drop (B,)."""
        if labels is None:
            return self.fake_latent.expand(batch, -1)
        if labels.min() < 0 or labels.max() >= self.cfg.class_num:
            raise ValueError(f"class labels {labels.tolist()}: must be in [0, class_num = {self.cfg.class_num})")
        emb = self.class_emb(labels)
        if drop is not None:
            d = drop.to(emb.dtype)[:, None]
            emb = d * self.fake_latent + (1 - d) * emb
        return emb

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, C), mask (B, L) with 1 = masked (the same count per row), class_emb (B, E)
        -> (B, P + visible, E): the encoder over the class buffer and the visible tokens."""
        x = self.z_proj(tokens)
        B, _, E = x.shape
        P = self.cfg.buffer_size
        x = torch.cat([class_emb[:, None].expand(B, P, E).to(x.dtype), x], 1)
        keep = self._visible(mask)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        x = x[keep].reshape(B, -1, E)  # drop the masked tokens
        for blk in self.encoder_blocks:
            x = blk(x)
        return self.encoder_norm(x)

    def decode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, P + visible, E), mask (B, L) -> DiffLoss conditions (B, L, Dd) for every token."""
        x = self.decoder_embed(x)
        B, P = x.shape[0], self.cfg.buffer_size
        keep = self._visible(mask)
        full = self.mask_token.to(x.dtype).expand(B, keep.shape[1], -1).clone()
        full[keep] = x.reshape(-1, x.shape[-1])
        x = full + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)[:, P:] + self.diffusion_pos_embed_learned

    def _visible(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, P + L) bool: the class buffer and the unmasked image tokens."""
        return torch.cat([mask.new_zeros(mask.shape[0], self.cfg.buffer_size), mask], 1) == 0

    def forward(self, tokens, mask, class_emb=None, *, labels=None, drop=None):
        """DiffLoss conditions (B, L, Dd). The class rows are `class_emb` (B, E), or made here from `labels` /
        `drop` (training: inside forward, so ZeRO-3 gathers `fake_latent` with the rest of this module)."""
        if class_emb is None:
            class_emb = self.class_embedding(labels, tokens.shape[0], drop)
        return self.decode(self.encode(tokens, mask, class_emb), mask)


MAR_PRESETS = {  # models/mar.py mar_base / mar_large / mar_huge (diffloss sizes: main_mar.py's documented flags)
    "mar-base": MARConfig(enc_dim=768, enc_depth=12, enc_heads=12, dec_dim=768, dec_depth=12, dec_heads=12,
                          diffloss_d=6, diffloss_w=1024),
    "mar-large": MARConfig(diffloss_d=8, diffloss_w=1280),
    "mar-huge": MARConfig(enc_dim=1280, enc_depth=20, enc_heads=16, dec_dim=1280, dec_depth=20, dec_heads=16,
                          diffloss_d=12, diffloss_w=1536),
    "mar-tiny": MARConfig(img_size=64, enc_dim=64, enc_depth=2, enc_heads=4, dec_dim=64, dec_depth=2, dec_heads=4,
                          buffer_size=4, class_num=10, diffloss_d=2, diffloss_w=64),
}


def mar_preset(name: str) -> MARConfig:
    """A copy of a named MAR size (`MAR_PRESETS`); an unknown name lists the valid ones."""
    if name not in MAR_PRESETS:
        raise KeyError(f"unknown MAR preset {name!r}: choose one of {', '.join(MAR_PRESETS)}")
    return dataclasses.replace(MAR_PRESETS[name])
