"""The typed config tree: nested dataclasses, one source of truth for a run.

Resolution order (lingua-style): preset defaults -> optional YAML/JSON file -> dotted CLI overrides
(`train.lr=1e-4`). `fastardiff_ds.config.overrides` applies overrides; `presets` holds the named presets;
`resolve` runs that order and the checks. This module imports none of them.
Sub-configs that belong to one subsystem (data loader, samplers, engines, losses) are defined next to that
subsystem and composed here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..data.config import DataConfig
from ..logging import WandbConfig

CompileMode = Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


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
    o_proj_bias: bool = False  # NextStep `o_attention_bias`: a bias on the attention output projection


@dataclass
class HeadConfig:
    """Flow-matching head (MAR / NextStep-1 SimpleMLPAdaLN)."""

    width: int = 256
    depth: int = 4
    mlp_ratio: float = 1.0
    # (no guidance_embed knob: the CFG-distilled student head always has the guidance embedding, the teacher none)


@dataclass
class StudentHeadConfig:
    """The few-step student head's size, where it differs from the teacher head's (None = the teacher's value).

    The width stays the teacher head's. A larger student starts as the teacher head exactly (`models.grow_state`): its
    extra blocks are appended with adaLN-zero (identity), its extra MLP hidden units have zero output weights.
    """

    depth: int | None = None  # >= model.head.depth
    mlp_ratio: float | None = None  # >= model.head.mlp_ratio


@dataclass
class ImageConfig:
    """How images become continuous tokens.

    `pixel`: patches of the RGB image in [-1, 1] (tiny preset). `vae`: NextStep-1's Flux-style f8/16-channel
    AutoencoderKL latents, normalised as (z - shift) * scale, then patchified. `vae_path`: the official
    `NextStep-1-f8ch16-Tokenizer` folder (config.json + checkpoint.pt) or a diffusers AutoencoderKL folder / file.
    """

    tokenizer: Literal["pixel", "vae"] = "pixel"
    resolution: int = 32
    patch_size: int = 4
    channels: int = 3  # 3 for pixels, 16 for the VAE latent
    vae_path: str = ""
    vae_downsample: int = 8
    scaling_factor: float | None = None  # None: the VAE config's (official config.json / diffusers config)
    shift_factor: float | None = None  # latents are (z - shift) * scale
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
    tokenizer: Literal["sentencepiece", "hf"] = "sentencepiece"
    path: str = "assets/tokenizer/shapes_sp.model"
    max_length: int = 32  # text tokens, before the <image_area> h*w <boi> suffix
    add_special_tokens: bool = False  # hf only: add NextStep-1's special tokens to a plain LM tokenizer
    prompt_style: Literal["nextstep-1", "nextstep-1.1"] = "nextstep-1"  # the 1.1 pipelines prepend the BOS text
    # ids the checkpoint was trained with (NextStep config.json `boi`, `eoi`, `image_placeholder_id`); when set,
    # the loaded tokenizer must map <|begin_of_image|> etc. to them (checked by models.nextstep_config)
    boi_id: int | None = None
    eoi_id: int | None = None
    image_placeholder_id: int | None = None


@dataclass
class DraftConfig:
    """Draft AR: the first `num_layers` layers of the target plus its own final norm (Fast-ARDiff §4.1)."""

    num_layers: int = 2
    entropy_layer: int = -2  # layer whose attention entropy is trained (penultimate; negative = from the end)
    shallow_layer: int = 0  # layer whose entropy drives early stopping at inference (Eq. 10)
    train_embeddings: bool = False
    # truncated: the paper's draft (the target's first layers); eagle: also reads the target's hidden state of the
    # previous position, fused with the token's embedding (EAGLE's feature-level drafting, beyond the paper)
    kind: Literal["truncated", "eagle"] = "truncated"


@dataclass
class ModelConfig:
    ar: ARConfig = field(default_factory=ARConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    student_head: StudentHeadConfig = field(default_factory=StudentHeadConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the dtype checkpoints are loaded in


@dataclass
class PretrainConfig:
    """Stage 0 (launcher/pretrain_t2i.py): AR + flow head with rectified flow, for presets without public weights.
    DeepSpeed over N ranks; `data.batch_size` is per rank. The export (run_dir/checkpoint) holds the EMA weights."""

    ds_config: str = "ds_configs/zero3.json"  # engine knobs (ZeRO stage, bf16); --ds_config on the launcher
    # "" = random init; else an inference checkpoint folder (our export, e.g. assets/tiny_teacher) whose AR + head
    # weights start a fresh run (its model section must equal the run's); a resumed run reads its own checkpoint
    init: str = ""
    steps: int = 3000
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    batch_mul: int = 4  # noise draws per token (NextStep-1 fm_head_batch_mul)
    # AR inputs (teacher forcing) get N(0, s^2) noise, s ~ U[0, input_noise] per sample, so the AR learns to read
    # contexts with the head's sampling errors in them (exposure bias); the head's targets stay clean. 0 = off
    input_noise: float = 0.0
    ema_decay: float = 0.999  # EMA of AR + head (ceiling; warmed up as (1+s)/(10+s)); the export holds the EMA
    log_every: int = 20
    save_every: int = 250
    keep_last: int = 2  # training checkpoints kept under run_dir/checkpoints
    sample_every: int = 500
    max_minutes: float = 0.0  # > 0: save and stop after this much wall-clock time
    # seconds a save may take after SIGTERM / SIGUSR1 (training/preemption.py): the run stops at the next step,
    # saves and exits 75; a warning says when a step + a save do not fit
    preempt_grace_s: float = 30.0


@dataclass
class InferenceConfig:
    """How images are sampled (launcher/generate.py, eval suites, bench_inference.py)."""

    # teacher head: nextstep = official 1.0 (baseline only)
    sampler: Literal["sde", "ode", "nextstep", "nextstep-1.1"] = "sde"
    num_steps: int = 50  # teacher head evaluations per token (official num_sampling_steps; NextStep-1: 50)
    noise_level: float | None = None  # sde / nextstep-1.1 eta; None = the sampler's own (sde 1.0, nextstep-1.1 0.8)
    time_shift: float = 1.0  # official timesteps_shift
    cfg_scale: float = 5.0
    # linear: the official one, falling from cfg_scale
    cfg_schedule: Literal["constant", "linear", "linear-rising"] = "constant"
    positive_prompt: str = ""  # appended to every prompt after a space (official positive_prompt)
    negative_prompt: str = ""  # the unconditional CFG rows' text ("" = plain unconditional)
    student_steps: int | None = None  # few-step student head (dmd / fastardiff modes); None = train.student_steps
    student_final_std: float = 0.02  # > 0 so the student chain has a density (exact verification)
    gamma: int = 4  # draft length (the most tokens drafted per round)
    # fixed: gamma every round; adaptive: per sample, the gamma that pays (exact)
    draft_policy: Literal["fixed", "adaptive"] = "adaptive"
    draft_cost: float = 0.0  # adaptive: a drafted token's cost in target rounds; 0 = estimated from parameters
    probe_drafts: int = 4  # adaptive: drafts measured per sample before it may stop drafting
    tau: float | None = None  # entropy early-stop threshold; None = the checkpoint's (Eq. 10)
    # exact: lossless | relaxed: min(1, (P/Q)^(1/T)) | cspd: CSpD's last-step rule, the paper's Alg. 1 | feature:
    # Drift-AR's condition distance, no head call in verification. Only exact is target-distributed.
    accept: Literal["exact", "relaxed", "cspd", "feature"] = "exact"
    relax_temperature: float = 1.0  # relaxed only: accept min(1, (P/Q)^(1/T)), T > 1
    cspd_inner_temperature: float = 1.0  # cspd only: CSpD's T_in (42 in their code)
    cspd_independent: bool = False  # cspd only: each draft accepted on its own (CSpD's code), not truncated
    prefill_ratio: float = 0.0  # CSpD's token pre-filling: the first ratio*N tokens come from the target alone
    feature_threshold: float = 0.1  # feature only: keep a draft while d(target cond, draft cond) <= this
    feature_metric: Literal["l2", "cosine"] = "l2"  # feature only: l2 (Drift-AR) | cosine (1 - cos)
    # cspd / feature: at an accepted position commit the draft's token or the target's (its chain on the draft's
    # noise, one batched head call per round)
    commit: Literal["draft", "target"] = "draft"
    draft_steps: int | None = None  # fastardiff draft head chain steps; None = the student's (feature rule only)
    max_resample_tries: int = 16
    batch_size: int = 4
    compile: bool = False  # static KV cache + torch.compile'd AR decode/verify and head-chain steps (sampling/compiled.py)
    # auto: CUDA graphs on GPU, inductor on CPU
    compile_mode: CompileMode = "auto"


@dataclass
class TrainConfig:
    """The Fast-ARDiff joint run (launcher/train_t2i.py, DESIGN.md §3). Steps count optimizer steps."""

    teacher: str = "assets/tiny_teacher"  # frozen teacher checkpoint folder (NextStep-1 layout)
    ds_config: str = "ds_configs/zero3.json"
    steps: int = 60
    cd_steps: int = 30  # stage 1 (consistency distillation) for steps < cd_steps, then stage 2 (DMD)
    target_ar: bool = False  # also train the target AR (through the student's distillation loss)
    lambda_ent: float = 1.0
    # maximize: the paper's L_ent = -mean E (Eq. 5); align: mean (E_draft - E_target)^2 per row (beyond the paper),
    # the target's entropy at train.entropy_align_layer (None: the target layer at the draft entropy layer's
    # relative depth, draft layer i of k -> target layer (i + 1) L / k - 1)
    entropy_objective: Literal["maximize", "align"] = "maximize"
    entropy_align_layer: int | None = None
    # feature-level drafts (model.draft.kind=eagle): L_reg over this many passes; pass k reads the draft's own
    # features of pass k - 1 where the target's were, as drafted tokens 2..k of a round do (beyond the paper)
    draft_unroll: int = 1
    alpha_kind: Literal["linear", "cosine", "step", "constant"] = "linear"  # linear: Eq. 8
    alpha0: float = 0.95
    alphaT: float = 0.05
    alpha_step_at: float = 0.5
    alpha_mode: Literal["lr", "loss"] = "lr"  # lr: alpha(t) scales each engine's lr (SGD-equivalent of Eq. 9) | loss: scales the losses
    lr_draft: float = 1e-4
    lr_target: float = 1e-5
    lr_student_cd: float = 1e-4  # paper S2.3 stage 1
    lr_student_dmd: float = 2e-5  # paper S2.3 stage 2 (generator)
    lr_fake: float = 1e-5  # paper S2.3 stage 2 (fake branch)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    gen_every: int = 5  # DMD two time-scale rule: generator every k steps, fake score every step
    ema_decay: float = 0.95  # CD target network (LCM)
    # > 0: the export holds an EMA of the student head (this decay as the ceiling, warmed up as (1+s)/(10+s)),
    # updated after every student optimizer step of both stages; 0 = the online weights
    student_ema_decay: float = 0.0
    cd_delta: float = 0.02  # CD skip t' - t (t' clamped to 1; 1 = regress onto the teacher's ODE endpoint)
    cd_solver_steps: int = 1  # teacher Euler steps across the skip
    cd_batch_mul: int = 1  # noise draws per image token in CD (its AR condition reused; the head batch grows)
    cd_on_grid: bool = False  # CD's t drawn from the student's step start times (where its sampler evaluates it)
    guidance_min: float = 1.0  # CFG scales sampled in CD and fed to the student's guidance embedding
    guidance_max: float = 6.0
    dmd_guidance: float = 5.0  # teacher CFG of the real score in DMD; the student's fixed embedding there
    student_steps: int = 2  # few-step grid the DMD generator is trained on
    # > 0: DMD1's regression term: each generator step also minimises this weight x the CD loss (with
    # cd_delta=1: the distance to the teacher's guided ODE endpoint, at the DMD guidance), anchoring DMD's
    # mode-seeking to the teacher's own samples. 0 = DMD2 (no regression)
    dmd_reg_weight: float = 0.0
    # DMD2's backward simulation: the generator's trained step k starts from the student's own steps 0..k-1 run from
    # noise (false: from data tokens noised to t_k, DMD1's way; a 1-step student is the same either way)
    backward_simulation: bool = True
    # > 0: DMD2's GAN term. The fake-score network gets a classifier on its trunk's features, trained with weight
    # train.gan_disc_weight to tell (noised) data tokens from the student's; each generator step adds this weight x
    # softplus(-D(student's tokens)). DMD2 uses 3e-3 to 5e-3 (generator) and 1e-2 (classifier)
    gan_weight: float = 0.0
    gan_disc_weight: float = 1e-2
    lr_disc: float | None = None  # the GAN classifier's lr (None: train.lr_fake, as DMD2; a short run needs more)
    grad_accum: int = 1
    activation_checkpointing: bool = False  # recompute each AR decoder layer in backward (draft, trained target)
    teacher_group_size: int = 0  # ranks the frozen teacher is partitioned over (0 = ranks of one node)
    teacher_replicate: bool = False  # replicate the teacher instead (small models)
    log_every: int = 10
    save_every: int = 20
    sample_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    on_nonfinite: Literal["stop", "skip"] = "stop"  # what a NaN/inf loss does
    tau_batches: int = 4  # batches of training data for the early-stop threshold (Eq. 10)
    export_dir: str = ""  # default: run_dir/export
    # seconds a save may take after SIGTERM / SIGUSR1 (training/preemption.py): the run stops at the next step,
    # saves and exits 75; a warning says when a step + a save do not fit
    preempt_grace_s: float = 30.0


@dataclass
class Config:
    """Root of the config tree. Sections for data, sampling, training and engines are added by those subsystems.

    A config is checked when it is resolved (resolve.validate): types and enum values of every key, numeric
    ranges (ranges.py), derived values and cross-field rules (rules.py), each error naming the key."""

    preset: str = "tiny"
    seed: int = 0
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    # resolution, max_text_len and seed: None = derived from the model and the root seed (rules.DERIVED)
    data: DataConfig = field(default_factory=lambda: DataConfig(shards="data/shapes", resolution=None, batch_size=32,
                                                                 max_text_len=None, seed=None, drop_text_prob=0.1))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
