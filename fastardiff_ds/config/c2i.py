"""The class-conditional (MAR) config tree: its own root, checked with the same machinery as `Config`.

Sections: `model` (MAR's sizes, models/mar.py MARConfig), `image` (how images become MAR's tokens: pixel patches at
tiny scale, or the KL-16 VAE), `data` (the streaming webdataset loader; samples carry a class label: a `.cls`
member or the JSON's "label"), `pretrain` (MAR's training recipe), `sampling` (MAR's generation knobs) and `wandb`.
Presets: `mar-tiny` (CPU: 32 px shapes, 40 classes, pixel patches 4 x 4 -> 64 tokens of 48), `mar-base`,
`mar-large`, `mar-huge` (ImageNet 256 px, KL-16 tokens, the official sizes).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Literal

from ..data.config import DataConfig
from ..logging import WandbConfig
from ..models.mar import MARConfig, mar_preset
from .checks import ConfigError
from .overrides import set_key
from .resolve import load_file, validate


@dataclass
class C2IImageConfig:
    """`pixel`: MAR's token grid is the image's p x p pixel patches in [-1, 1] (vae_stride = p, vae_embed_dim =
    3 p^2 in `model`). `kl16`: LTH14/mar's KL-16 VAE at `vae_path` (kl16.ckpt), tokens = posterior sample x 0.2325
    (vae_stride 16, vae_embed_dim 16)."""

    tokenizer: Literal["pixel", "kl16"] = "pixel"
    vae_path: str = "pretrained_models/vae/kl16.ckpt"


@dataclass
class MARPretrainConfig:
    """MAR's recipe (main_mar.py): AdamW (0.9, 0.95), weight decay 0.02, constant lr after a linear warmup, grad
    clip 3, EMA 0.9999, label drop 0.1 (CFG), mask ratio ~ truncated N(1, 0.25) on [mask_ratio_min, 1],
    diffusion_batch_mul 4. The tiny preset shortens the EMA and warmup to its step count."""

    ds_config: str = "ds_configs/zero3.json"
    init: str = ""  # a MAR export folder to start from (its EMA weights, a fresh optimizer), e.g. assets/tiny_mar
    steps: int = 3000
    lr: float = 8e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.02
    warmup_steps: int = 100
    grad_clip: float = 3.0
    ema_decay: float = 0.9999
    label_drop_prob: float = 0.1
    mask_ratio_min: float = 0.7
    batch_mul: int = 4
    log_every: int = 20
    save_every: int = 250
    keep_last: int = 2
    sample_every: int = 500
    max_minutes: float = 0.0
    preempt_grace_s: float = 30.0

    def __post_init__(self):
        if not 0 < self.mask_ratio_min <= 1:
            raise ValueError(f"mask_ratio_min={self.mask_ratio_min} must be in (0, 1]")
        if not 0 <= self.label_drop_prob < 1:
            raise ValueError(f"label_drop_prob={self.label_drop_prob} must be in [0, 1)")
        for name in ("steps", "batch_mul", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or not 0 <= self.ema_decay < 1 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ValueError(f"lr={self.lr} must be > 0, ema_decay={self.ema_decay} in [0, 1), grad_clip="
                             f"{self.grad_clip} and warmup_steps={self.warmup_steps} >= 0")


@dataclass
class MARDistillConfig:
    """The MAR row's head distillation (launcher/train_c2i.py): the DiffLoss head -> a few-step student by DMD
    (DMD2's two time-scale rule and backward simulation), on the frozen teacher MAR's conditions. The student and
    the fake score start as the teacher's DiffLoss net read as a flow (sampling/diffloss_flow.py). Conditions come
    from real images masked as at a uniform step of the cosine generation schedule (mask fraction cos(pi/2 u)).
    `guidance`: the teacher's CFG scale in the real score, built into the student (sample it with cfg 1)."""

    teacher: str = "assets/tiny_mar"  # a MAR export folder (launcher/pretrain_c2i.py's run_dir/checkpoint)
    ds_config: str = "ds_configs/zero3.json"
    steps: int = 300
    student_steps: int = 4
    guidance: float = 1.0
    lr_student: float = 1e-4
    lr_fake: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    gen_every: int = 5
    t_min: float = 0.05  # also the student's first time (sampling/mar_loop.py student_grid)
    t_max: float = 0.98
    teacher_replicate: bool = True  # small teachers: a full copy per rank; False partitions it (ZeRO-3)
    log_every: int = 10
    save_every: int = 100
    keep_last: int = 2
    max_minutes: float = 0.0
    preempt_grace_s: float = 30.0

    def __post_init__(self):
        if self.student_steps < 1 or self.gen_every < 1 or self.steps < 1:
            raise ValueError(f"student_steps={self.student_steps}, gen_every={self.gen_every} (DMD2's two "
                             f"time-scale ratio) and steps={self.steps} must be >= 1")
        if not 0 < self.t_min <= self.t_max < 1:
            raise ValueError(f"t_min={self.t_min}, t_max={self.t_max}: need 0 < t_min <= t_max < 1")
        if self.guidance < 1 or self.lr_student <= 0 or self.lr_fake <= 0:
            raise ValueError(f"guidance={self.guidance} must be >= 1, lr_student={self.lr_student} and lr_fake="
                             f"{self.lr_fake} > 0")


@dataclass
class MARSamplingConfig:
    """MAR's generation (engine_mar.py flags): `num_iter` masked steps, DiffLoss `num_sampling_steps` respaced
    DDPM steps, CFG scale and schedule, temperature."""

    num_iter: int = 16
    num_sampling_steps: str = "100"
    ddpm_start: int = 999  # first DDPM step (999 = the official process; see sampling/diffloss.py SpacedCosine.make)
    cfg: float = 1.0
    cfg_schedule: Literal["linear", "constant"] = "linear"
    temperature: float = 1.0
    batch_size: int = 16

    def __post_init__(self):
        if not 0 <= self.ddpm_start <= 999:
            raise ValueError(f"ddpm_start={self.ddpm_start} must be in [0, 999]")
        if self.num_iter < 1 or self.batch_size < 1 or self.temperature <= 0 or self.cfg < 1:
            raise ValueError(f"num_iter={self.num_iter} and batch_size={self.batch_size} must be >= 1, temperature="
                             f"{self.temperature} > 0, cfg={self.cfg} >= 1")


def shapes_mar() -> MARConfig:
    """The tiny default's MAR: 32 px as 64 pixel patches of 4 x 4 x 3, 40 classes, 2 + 2 blocks 128 wide, DiffLoss
    3 x 128."""
    return dataclasses.replace(mar_preset("mar-tiny"), img_size=32, vae_stride=4, vae_embed_dim=48, enc_dim=128,
                               dec_dim=128, enc_heads=4, dec_heads=4, buffer_size=4, class_num=40, diffloss_d=3,
                               diffloss_w=128)


@dataclass
class C2IConfig:
    preset: str = "mar-tiny"
    seed: int = 0
    run_dir: str = "runs/mar_tiny"
    model: MARConfig = field(default_factory=shapes_mar)
    image: C2IImageConfig = field(default_factory=C2IImageConfig)
    # resolution None = model.img_size, seed None = the root seed; conditioning / num_classes follow the model
    data: DataConfig = field(default_factory=lambda: DataConfig(shards="data/shapes_c2i", resolution=None,
                                                                batch_size=64, max_text_len=1, drop_text_prob=0.0,
                                                                seed=None, conditioning="class"))
    pretrain: MARPretrainConfig = field(default_factory=MARPretrainConfig)
    sampling: MARSamplingConfig = field(default_factory=MARSamplingConfig)
    distill: MARDistillConfig = field(default_factory=MARDistillConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        m = self.model
        if self.image.tokenizer == "pixel" and m.vae_embed_dim != 3 * m.vae_stride**2:
            raise ValueError(f"image.tokenizer=pixel makes tokens of 3 x vae_stride^2 = {3 * m.vae_stride ** 2} "
                             f"values per patch: set model.vae_embed_dim={3 * m.vae_stride ** 2} (got "
                             f"{m.vae_embed_dim})")
        if self.image.tokenizer == "kl16" and (m.vae_stride, m.vae_embed_dim) != (16, 16):
            raise ValueError(f"image.tokenizer=kl16 has stride 16 and 16 channels: set model.vae_stride=16 and "
                             f"model.vae_embed_dim=16 (got {m.vae_stride}, {m.vae_embed_dim})")
        if self.data.resolution not in (None, m.img_size):
            raise ValueError(f"data.resolution={self.data.resolution} must equal model.img_size={m.img_size}")


def mar_tiny() -> C2IConfig:
    """CPU preset: class-labelled 32 px shapes (40 classes = 4 shapes x 10 colours, one object an image) on the
    `shapes_mar` network."""
    cfg = C2IConfig(preset="mar-tiny")
    cfg.sampling.ddpm_start = 990  # its small head's eps is not exact enough for the official start (999)
    cfg.pretrain = MARPretrainConfig(steps=3000, lr=1e-3, warmup_steps=100, ema_decay=0.999, sample_every=1000)
    return cfg


def _official(name: str) -> C2IConfig:
    cfg = C2IConfig(preset=name, run_dir=f"runs/{name.replace('-', '_')}", model=mar_preset(name),
                    image=C2IImageConfig(tokenizer="kl16"),
                    data=DataConfig(shards="", resolution=None, batch_size=64, max_text_len=1, drop_text_prob=0.0,
                                    seed=None, conditioning="class"))
    cfg.sampling = MARSamplingConfig(num_iter=64, num_sampling_steps="100", cfg={"mar-base": 2.9, "mar-large": 3.0,
                                                                               "mar-huge": 3.2}[name])
    return cfg


C2I_PRESETS = {"mar-tiny": mar_tiny, **{n: (lambda n=n: _official(n)) for n in ("mar-base", "mar-large", "mar-huge")}}


def resolve_c2i_config(preset: str = "mar-tiny", config_file: str | None = None,
                       overrides: list[str] | None = None) -> C2IConfig:
    """Preset -> file -> `key=value` overrides, then every check (types, ranges, each section's rules)."""
    if preset not in C2I_PRESETS:
        close = difflib.get_close_matches(preset, list(C2I_PRESETS), n=1, cutoff=0.0)
        raise ConfigError(f"unknown class-conditional preset '{preset}'. Did you mean '{close[0]}'? Valid: "
                          f"{', '.join(C2I_PRESETS)}")
    cfg = C2I_PRESETS[preset]()
    if config_file:
        load_file(cfg, config_file)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. pretrain.lr=1e-4)")
        key, raw = item.split("=", 1)
        set_key(cfg, key.strip(), raw.strip())
    return derive_c2i(validate(cfg))


def derive_c2i(cfg: C2IConfig) -> C2IConfig:
    """Fill the data keys that follow the model: resolution (None -> model.img_size), seed (None -> the root
    seed), conditioning "class", num_classes = model.class_num."""
    d = cfg.data
    d.resolution = cfg.model.img_size if d.resolution is None else d.resolution
    d.seed = cfg.seed if d.seed is None else d.seed
    d.conditioning, d.num_classes = "class", cfg.model.class_num
    return cfg
