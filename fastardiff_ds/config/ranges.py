"""The allowed range of every numeric config key, in one table (checked by `checks.check_ranges`).

A value outside its range is refused when the config is resolved, before any data or weights are read, with
an error naming the key, the range and the value (e.g. `train.gen_every=0` used to crash at the first DMD step).
Tuple keys (`train.betas`) apply the range to every item; `None` (Optional keys) is always allowed. Keys that may
take any value are listed in UNBOUNDED, those whose range depends on other keys in BY_RULE (rules.py), so a test
can check that every numeric key is in one of the three.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """lo <= x <= hi (`lo_open` / `hi_open` make the bound strict); None = unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, x: float) -> bool:
        if isinstance(x, float) and math.isnan(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


def at_least(lo: float) -> Range:
    return Range(lo)


POSITIVE = Range(0, lo_open=True)  # > 0: learning rates, temperatures, scales
NONNEG = Range(0)  # >= 0
ONE_UP = Range(1)  # >= 1: step counts, sizes, intervals
UNIT = Range(0, 1)  # [0, 1]: probabilities, alpha endpoints, fractions
BETA = Range(0, 1, hi_open=True)  # Adam betas in [0, 1)

RANGES: dict[str, Range] = {
    "seed": NONNEG,
    # model
    **{f"model.ar.{k}": ONE_UP for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                         "intermediate_size", "vocab_size", "max_position_embeddings")},
    "model.ar.rope_theta": POSITIVE, "model.ar.rms_norm_eps": POSITIVE,
    "model.head.width": ONE_UP, "model.head.depth": ONE_UP, "model.head.mlp_ratio": POSITIVE,
    "model.student_head.depth": ONE_UP, "model.student_head.mlp_ratio": POSITIVE,
    "model.image.resolution": ONE_UP, "model.image.patch_size": ONE_UP, "model.image.channels": ONE_UP,
    "model.image.vae_downsample": ONE_UP, "model.image.scaling_factor": POSITIVE,
    "model.text.max_length": ONE_UP,
    "model.text.boi_id": NONNEG, "model.text.eoi_id": NONNEG, "model.text.image_placeholder_id": NONNEG,
    "model.draft.num_layers": ONE_UP,  # <= model.ar.num_layers and the layer indices: rules.py
    # data
    "data.resolution": ONE_UP, "data.batch_size": ONE_UP, "data.num_workers": NONNEG,
    "data.shuffle_buffer": NONNEG, "data.samples_per_epoch": ONE_UP, "data.seed": NONNEG,
    "data.drop_text_prob": UNIT, "data.max_text_len": ONE_UP, "data.min_image_size": ONE_UP, "data.num_classes": ONE_UP,
    "data.prefetch_factor": ONE_UP,
    # pretrain
    "pretrain.steps": ONE_UP, "pretrain.lr": POSITIVE, "pretrain.betas": BETA, "pretrain.weight_decay": NONNEG,
    "pretrain.warmup_steps": NONNEG, "pretrain.min_lr_ratio": UNIT, "pretrain.grad_clip": POSITIVE,
    "pretrain.batch_mul": ONE_UP, "pretrain.log_every": ONE_UP, "pretrain.save_every": ONE_UP,
    "pretrain.sample_every": NONNEG, "pretrain.max_minutes": NONNEG, "pretrain.ema_decay": UNIT,
    "pretrain.keep_last": ONE_UP, "pretrain.input_noise": NONNEG,
    "pretrain.preempt_grace_s": POSITIVE,
    # inference
    "inference.num_steps": ONE_UP, "inference.noise_level": NONNEG, "inference.time_shift": POSITIVE,
    "inference.cfg_scale": NONNEG, "inference.student_steps": ONE_UP, "inference.student_final_std": NONNEG,
    "inference.gamma": NONNEG, "inference.draft_cost": NONNEG, "inference.probe_drafts": ONE_UP,
    "inference.relax_temperature": Range(1, None), "inference.cspd_inner_temperature": POSITIVE,
    "inference.prefill_ratio": Range(0, 1, hi_open=True), "inference.feature_threshold": NONNEG,
    "inference.draft_steps": ONE_UP,
    "inference.max_resample_tries": ONE_UP, "inference.batch_size": ONE_UP,
    # train
    "train.steps": ONE_UP, "train.cd_steps": NONNEG,  # cd_steps <= steps: rules.py
    "train.lambda_ent": NONNEG, "train.draft_unroll": ONE_UP, "train.alpha0": UNIT, "train.alphaT": UNIT,
    "train.alpha_step_at": Range(0, 1, lo_open=True),
    **{f"train.lr_{k}": POSITIVE for k in ("draft", "target", "student_cd", "student_dmd", "fake")},
    "train.betas": BETA, "train.weight_decay": NONNEG, "train.warmup_steps": NONNEG,
    "train.gen_every": ONE_UP, "train.ema_decay": UNIT, "train.student_ema_decay": Range(0, 1, hi_open=True),
    "train.cd_delta": Range(0, 1, lo_open=True),
    "train.cd_solver_steps": ONE_UP, "train.cd_batch_mul": ONE_UP, "train.dmd_reg_weight": NONNEG,
    "train.gan_weight": NONNEG, "train.gan_disc_weight": NONNEG, "train.lr_disc": POSITIVE,
    "train.guidance_min": NONNEG, "train.guidance_max": NONNEG, "train.dmd_guidance": NONNEG,
    "train.student_steps": ONE_UP, "train.grad_accum": ONE_UP, "train.teacher_group_size": NONNEG,
    "train.log_every": ONE_UP, "train.save_every": ONE_UP, "train.sample_every": NONNEG,  # 0 = only at the end
    "train.keep_last": ONE_UP, "train.tau_batches": NONNEG,  # 0 = no tau measurement (tau = -inf)
    "train.preempt_grace_s": POSITIVE,
    "wandb.init_timeout_s": POSITIVE,
}

# numeric keys that may take any value
UNBOUNDED = frozenset({
    "model.image.shift_factor",  # latents are (z - shift) * scale; any real shift
    "inference.tau",  # an entropy threshold; -inf disables early stopping
})
# numeric keys whose range depends on other keys: checked by rules.py
BY_RULE = frozenset({"model.draft.entropy_layer", "model.draft.shallow_layer",  # layers of the draft
                     "train.entropy_align_layer"})  # a layer of the target
