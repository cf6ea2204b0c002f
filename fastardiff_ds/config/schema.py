"""The typed config tree: nested dataclasses, one source of truth for a run.

Resolution order (lingua-style): preset defaults -> optional YAML/JSON file -> dotted CLI overrides
(`train.lr=1e-4`). `fastardiff_ds.config.overrides` applies overrides; `presets` holds the named presets.
Sub-configs that belong to one subsystem (data loader, samplers, engines, losses) are defined next to that
subsystem and composed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ARConfig:
    """Qwen2-architecture causal decoder (the NextStep-1 backbone)."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 704
    vocab_size: int = 512
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6


@dataclass
class HeadConfig:
    """Flow-matching head (MAR / NextStep-1 SimpleMLPAdaLN)."""

    width: int = 256
    depth: int = 4
    mlp_ratio: float = 1.0
    guidance_embed: bool = False  # a CFG-distilled student takes the guidance scale as input


@dataclass
class ImageConfig:
    """How images become continuous tokens.

    `pixel`: patches of the RGB image in [-1, 1] (tiny preset). `vae`: NextStep-1's Flux-style f8/16-channel
    AutoencoderKL latents, normalised as (z - shift) * scale, then patchified.
    """

    tokenizer: str = "pixel"  # pixel | vae
    resolution: int = 32
    patch_size: int = 4
    channels: int = 3  # 3 for pixels, 16 for the VAE latent
    vae_path: str = ""
    vae_downsample: int = 8
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    token_layernorm: bool = False  # NextStep-1 `use_norm`: layer_norm(token) after sampling

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch_size**2

    @property
    def grid(self) -> int:
        down = self.vae_downsample if self.tokenizer == "vae" else 1
        return self.resolution // (down * self.patch_size)

    @property
    def num_tokens(self) -> int:
        return self.grid**2


@dataclass
class TextConfig:
    tokenizer: str = "sentencepiece"  # sentencepiece | hf
    path: str = "assets/tokenizer/shapes_sp.model"
    max_length: int = 32  # text tokens, before the <image_area> h*w <boi> suffix
    add_special_tokens: bool = False  # hf only: add NextStep-1's special tokens to a plain LM tokenizer


@dataclass
class DraftConfig:
    """Draft AR: the first `num_layers` layers of the target plus its own final norm (Fast-ARDiff §4.1)."""

    num_layers: int = 2
    entropy_layer: int = -2  # layer whose attention entropy is trained (penultimate; negative = from the end)
    shallow_layer: int = 0  # layer whose entropy drives early stopping at inference (Eq. 10)
    train_embeddings: bool = False


@dataclass
class ModelConfig:
    ar: ARConfig = field(default_factory=ARConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    dtype: str = "float32"  # float32 | bfloat16 (weights at inference)


@dataclass
class Config:
    """Root of the config tree. Sections for data, sampling, training and engines are added by those subsystems."""

    preset: str = "tiny"
    seed: int = 0
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
