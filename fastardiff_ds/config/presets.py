"""Named presets, from a CPU-sized `tiny` to NextStep-1's 14B `nextstep-1-large` (DiT-style table of factories).

Each factory returns an unchecked Config; `resolve.get_preset` builds one and validates it.
"""
from __future__ import annotations

from typing import Callable

from .schema import ARConfig, Config, DraftConfig, HeadConfig, ImageConfig, ModelConfig, TextConfig


def tiny() -> Config:
    """CPU preset: 32 px pixel patches (64 tokens of 48-d), 4-layer AR, 2-layer draft, sentencepiece tokenizer.
    Training runs adopt the model section of `train.teacher` (the bundled teacher is tiny-bench-shaped), so the main
    job distils the bundled teacher at its own CFG sweet spot (inference.cfg_scale = train.dmd_guidance = 3)."""
    cfg = Config(preset="tiny")
    cfg.inference.cfg_scale = cfg.train.dmd_guidance = 3.0
    return cfg


def small() -> Config:
    """One-GPU preset: a 16-layer, 1024-wide Qwen2 backbone on VAE tokens (256 tokens of 64-d at 256 px)."""
    model = ModelConfig(
        ar=ARConfig(hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=4, intermediate_size=2816,
                    vocab_size=151680, max_position_embeddings=4096, rope_theta=1_000_000.0),
        head=HeadConfig(width=1024, depth=6),
        image=ImageConfig(tokenizer="vae", resolution=256, patch_size=2, channels=16, vae_path="weights/vae"),
        text=TextConfig(tokenizer="hf", path="weights/tokenizer", max_length=128, add_special_tokens=True),
        draft=DraftConfig(num_layers=4),
    )
    cfg = Config(preset="small", model=model)
    cfg.data.shards, cfg.data.batch_size = "", 8  # resolution and max_text_len are derived from the model
    cfg.train.teacher = "weights/small_teacher"
    return cfg


def nextstep_1_large() -> Config:
    """NextStep-1-Large (Qwen2.5-14B backbone; head 12 x 1536; 64-d tokens = 16 VAE channels x patch 2^2) at the
    512 px of every released checkpoint but NextStep-1.1-Pretrain-256px: latent 64 x 64, 32 x 32 = 1024 tokens.
    An official folder's own config.json overrides these (models/nextstep_config.py)."""
    model = ModelConfig(
        ar=ARConfig(hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8, intermediate_size=13824,
                    vocab_size=152064, max_position_embeddings=131072, rope_theta=1_000_000.0, rms_norm_eps=1e-5),
        head=HeadConfig(width=1536, depth=12),
        image=ImageConfig(tokenizer="vae", resolution=512, patch_size=2, channels=16, vae_path="weights/vae",
                          token_layernorm=True),
        text=TextConfig(tokenizer="hf", path="weights/NextStep-1-Large", max_length=256,
                        boi_id=151667, eoi_id=151668, image_placeholder_id=151669),
        draft=DraftConfig(num_layers=6),
        dtype="bfloat16",
    )
    cfg = Config(preset="nextstep-1-large", model=model)
    cfg.data.shards, cfg.data.batch_size = "", 4
    cfg.train.teacher = "weights/NextStep-1-Large"
    # the official text-to-image example of NextStep-1-Large: its sampler, 50 steps, CFG 7.5 constant, shift 1, use_norm
    inf = cfg.inference
    inf.sampler, inf.num_steps, inf.cfg_scale, inf.cfg_schedule, inf.time_shift = "nextstep", 50, 7.5, "constant", 1.0
    inf.positive_prompt = "masterpiece, film grained, best quality."
    inf.negative_prompt = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                           "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                           "username, blurry.")
    return cfg


def nextstep_1_1() -> Config:
    """NextStep-1.1 (the family its authors recommend): the same 14B backbone, head and 512 px token grid as
    nextstep-1-large, trained longer plus flow-RL post-training; its config.json uses genloss_* / image_size keys."""
    cfg = nextstep_1_large()
    cfg.preset = "nextstep-1.1"
    cfg.model.text.path = cfg.train.teacher = "weights/NextStep-1.1"
    cfg.model.text.prompt_style = "nextstep-1.1"
    # NextStep-1.1's sampler (noise level 0.8) at vLLM-Omni's serving defaults: 28 steps, CFG 7.5
    cfg.inference.sampler, cfg.inference.num_steps, cfg.inference.noise_level = "nextstep-1.1", 28, None
    return cfg


def tiny_bench() -> Config:
    """CPU preset shaped like NextStep-1 at tiny scale: per-token FLOPs split between AR and head (two-pass CFG, 50
    head steps) of about 63 : 37 as in nextstep-1-large, and a draft of 1/8 of the target's depth (1 of 8 layers;
    NextStep-1's is 6 of 48), feature-level (EAGLE-style: it also reads the target's previous hidden state; the paper's
    truncated draft is model.draft.kind=truncated). Its recipe is the bundled model's (assets/tiny_teacher/meta.json):

        python launcher/pretrain_t2i.py --preset tiny-bench --threads 2 --ds_config ds_configs/zero2.json \
            run_dir=runs/teacher                       # 3600 steps, ~83 min on 2 CPU threads; then extended:
        python launcher/pretrain_t2i.py --preset tiny-bench --threads 1 --ds_config ds_configs/zero2.json \
            run_dir=runs/teacher pretrain.steps=5000   # resumes at 3600, ~63 min; then on one GPU (4.5 min):
        deepspeed --num_gpus 1 launcher/pretrain_t2i.py --preset tiny-bench --ds_config ds_configs/zero2.json \
            run_dir=runs/teacher3 data.shards=data/shapes240k pretrain.init=runs/teacher/checkpoint \
            data.batch_size=128 pretrain.warmup_steps=300 pretrain.steps=1787   # then the distillation:
        python launcher/train_t2i.py --preset tiny-bench --ds_config ds_configs/zero2.json run_dir=runs/j3s4 \
            train.teacher=runs/teacher3/checkpoint data.batch_size=16
    """
    cfg = Config(preset="tiny-bench")
    cfg.model.ar = ARConfig(hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=1024)
    cfg.model.head = HeadConfig(width=64, depth=2)
    # EAGLE-style draft: teacher-forced acceptance 0.21 vs 0.08 for the truncated one, same recipe (README, issue 14)
    cfg.model.draft = DraftConfig(num_layers=1, entropy_layer=0, shallow_layer=0, kind="eagle")
    p = cfg.pretrain
    p.steps, p.lr, p.warmup_steps, p.batch_mul, p.input_noise, p.sample_every = 3600, 5e-4, 200, 8, 0.05, 1200
    cfg.inference.cfg_scale = 3.0  # the teacher's best of 3 / 5 / 7.5 on shapes-GenEval, FID and CLIP (README)
    # the distillation shipped in assets/tiny_teacher: CD onto the teacher's ODE endpoint (8 Euler steps), then DMD
    t = cfg.train
    t.teacher, t.steps, t.cd_steps, t.gen_every, t.dmd_guidance = "assets/tiny_teacher", 400, 150, 3, 3.0
    t.student_steps = 4  # the 4-step grid keeps more of the teacher than 2 steps (README: Quality)
    t.cd_delta, t.cd_solver_steps = 1.0, 8
    t.lr_draft, t.lr_student_cd, t.lr_student_dmd, t.lr_fake = 1e-3, 3e-4, 5e-5, 5e-5
    t.lambda_ent = 0.0  # the paper's L_ent drives the draft's entropy to 1 and halves its acceptance here (README)
    return cfg  # (the shipped run also set data.batch_size=16 on one rank; pretraining used the default 32)


PRESETS: dict[str, Callable[[], Config]] = {
    "tiny": tiny,
    "tiny-bench": tiny_bench,
    "small": small,
    "nextstep-1-large": nextstep_1_large,
    "nextstep-1.1": nextstep_1_1,
}

