"""Derived values and cross-field rules of the root config, applied when a config is resolved (`resolve.validate`).

Derived keys (DERIVED) are computed once from the key they duplicate instead of being set twice: a derived key
left unset (None, the root default) follows its source, also when the source changes later (an override, a
teacher folder's model section); a key the user set keeps its value and is checked against the source.

Cross-field rules refuse combinations that used to fail late or silently, e.g. a `data.max_text_len` too small
for the prompt suffix (the loader cut `<|begin_of_image|>` off every training prompt), `train.cd_steps` past
`train.steps` (stage 2 never ran), or a draft deeper than its target.
"""
from __future__ import annotations

from typing import Any, Callable, Collection

from .checks import ConfigError


def prompt_suffix_bound(cfg: Any) -> int:
    """Most ids a training prompt adds to its <= model.text.max_length text ids: the BOS (two with the
    nextstep-1.1 prompt style, which also prepends the BOS text), `<|image_area|>`, `h*w` (at most one id per
    character plus a sentencepiece word-start piece) and `<|begin_of_image|>` (models/text_tokenizer.py)."""
    grid = cfg.model.image.grid
    bos = 2 if cfg.model.text.prompt_style == "nextstep-1.1" else 1
    return bos + 1 + len(f"{grid}*{grid}") + 1 + 1


DERIVED: dict[str, Callable[[Any], Any]] = {
    "data.resolution": lambda c: c.model.image.resolution,  # the loader decodes at the model's resolution
    "data.max_text_len": lambda c: c.model.text.max_length + prompt_suffix_bound(c),
    "data.seed": lambda c: c.seed,  # data order follows the run's seed unless set apart
    # the DMD generator is trained on a fixed few-step grid: sample the student on that grid unless told otherwise
    "inference.student_steps": lambda c: c.train.student_steps,
}


def _section(cfg: Any, key: str) -> tuple[Any, str]:
    *path, leaf = key.split(".")
    for part in path:
        cfg = getattr(cfg, part)
    return cfg, leaf


def derive(cfg: Any) -> None:
    """Fill every derived key that is unset (None) or was derived before (recomputed from its source)."""
    auto = cfg.__dict__.setdefault("_derived_keys", set())
    for key, source in DERIVED.items():
        obj, leaf = _section(cfg, key)
        if getattr(obj, leaf) is None or key in auto:
            setattr(obj, leaf, source(cfg))
            auto.add(key)


def reset_derived(cfg: Any) -> Any:
    """A config read back from a file holds every derived value as a plain value: the ones equal to what their
    source gives are marked derived again (they follow the model if an override changes it), the others stay as
    the user set them."""
    auto = cfg.__dict__.setdefault("_derived_keys", set())
    for key, source in DERIVED.items():
        obj, leaf = _section(cfg, key)
        if getattr(obj, leaf) in (None, source(cfg)):
            auto.add(key)
    return cfg


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def check_image(cfg: Any) -> None:
    im = cfg.model.image
    down = im.vae_downsample if im.tokenizer == "vae" else 1
    if im.resolution % (down * im.patch_size):
        _fail(f"model.image.resolution={im.resolution} is not a multiple of {down * im.patch_size} "
              f"(model.image.patch_size={im.patch_size}" + (f" x vae_downsample={down})" if down > 1 else ")")
              + ": the token grid would drop the image's edge; pick a multiple")
    if im.tokenizer == "pixel" and im.channels != 3:
        _fail(f"model.image.channels={im.channels} with model.image.tokenizer='pixel': pixel tokens are RGB, "
              "set model.image.channels=3 (16 is the VAE's, with tokenizer='vae')")


def check_networks(cfg: Any) -> None:
    m = cfg.model
    ar, k = m.ar, m.draft.num_layers
    if ar.hidden_size % ar.num_heads or ar.num_heads % ar.num_kv_heads:
        _fail(f"model.ar.hidden_size={ar.hidden_size} must be a multiple of model.ar.num_heads={ar.num_heads}, "
              f"and num_heads a multiple of model.ar.num_kv_heads={ar.num_kv_heads}")
    if k > ar.num_layers:
        _fail(f"model.draft.num_layers={k} > model.ar.num_layers={ar.num_layers}: the draft is the target's first "
              "layers; use at most model.ar.num_layers")
    for name in ("entropy_layer", "shallow_layer"):
        layer = getattr(m.draft, name)
        if not -max(k, 2) <= layer < k:  # -2 (the default, "penultimate") is the only layer of a 1-layer draft
            _fail(f"model.draft.{name}={layer} is not a layer of the {k}-layer draft: use 0..{k - 1} "
                  f"(or -{k}..-1 from the end; model.draft.num_layers={k})")
    head, student = m.head, m.student_head
    for name in ("depth", "mlp_ratio"):
        value, teacher = getattr(student, name), getattr(head, name)
        if value is not None and value < teacher:
            _fail(f"model.student_head.{name}={value} < model.head.{name}={teacher}: the student head starts as the "
                  f"teacher head and can only grow; use >= {teacher}, or none for the teacher's")
    align, L = cfg.train.entropy_align_layer, ar.num_layers
    if align is not None and not -L <= align < L:
        _fail(f"train.entropy_align_layer={align} is not a layer of the {L}-layer target: use 0..{L - 1} (or "
              f"-{L}..-1 from the end), or none for the layer at the draft entropy layer's relative depth")


def align_layer(cfg: Any) -> int:
    """The target layer whose attention entropy the draft's entropy layer is aligned to (train.entropy_objective=
    align): train.entropy_align_layer, else the same relative depth (draft layer i of k -> (i + 1) L / k - 1)."""
    L, k = cfg.model.ar.num_layers, cfg.model.draft.num_layers
    if cfg.train.entropy_align_layer is not None:
        return cfg.train.entropy_align_layer % L
    i = cfg.model.draft.entropy_layer % k
    return max(round((i + 1) * L / k) - 1, 0)


def check_text(cfg: Any) -> None:
    m = cfg.model
    if m.text.add_special_tokens and m.text.tokenizer != "hf":
        _fail("model.text.add_special_tokens=true applies to model.text.tokenizer='hf' only (a sentencepiece model "
              "must already hold the special tokens: data_pipelines/train_tokenizer.py)")
    for name in ("boi_id", "eoi_id", "image_placeholder_id"):
        if (i := getattr(m.text, name)) is not None and i >= m.ar.vocab_size:
            _fail(f"model.text.{name}={i} is outside model.ar.vocab_size={m.ar.vocab_size}")


def check_data(cfg: Any) -> None:
    d, im, text = cfg.data, cfg.model.image, cfg.model.text
    if d.resolution != im.resolution:
        _fail(f"data.resolution={d.resolution} != model.image.resolution={im.resolution}: images are decoded at "
              "the model's resolution; leave data.resolution unset (it is derived) or set both alike")
    need = text.max_length + prompt_suffix_bound(cfg)
    if d.max_text_len < need:
        _fail(f"data.max_text_len={d.max_text_len} would cut the prompt suffix `<|image_area|>{im.grid}*{im.grid}"
              f"<|begin_of_image|>` off long captions: a prompt is up to model.text.max_length={text.max_length} "
              f"text ids + {prompt_suffix_bound(cfg)} (BOS and suffix), so use data.max_text_len >= {need}, or leave "
              "it unset (it is derived)")
    if d.max_text_len + im.num_tokens > cfg.model.ar.max_position_embeddings:
        _fail(f"data.max_text_len={d.max_text_len} + {im.num_tokens} image tokens exceed "
              f"model.ar.max_position_embeddings={cfg.model.ar.max_position_embeddings}")


def check_train(cfg: Any) -> None:
    t = cfg.train
    if t.cd_steps > t.steps:
        _fail(f"train.cd_steps={t.cd_steps} > train.steps={t.steps}: stage 2 (DMD) would never run; use "
              f"train.cd_steps <= train.steps (= train.steps for consistency distillation only, 0 for DMD only)")
    if t.draft_unroll > 1 and cfg.model.draft.kind != "eagle":
        _fail(f"train.draft_unroll={t.draft_unroll} needs a draft that reads features (model.draft.kind=eagle); "
              f"the {cfg.model.draft.kind} draft reads only tokens: set train.draft_unroll=1")
    if t.gan_weight > 0 and t.cd_steps >= t.steps:
        _fail(f"train.gan_weight={t.gan_weight} with train.cd_steps={t.cd_steps} >= train.steps={t.steps}: the GAN "
              "term lives on the fake-score network, which only the DMD stage builds and trains; lower train.cd_steps "
              "below train.steps, or set train.gan_weight=0")
    if t.gan_weight > 0 and t.gan_disc_weight == 0:
        _fail(f"train.gan_weight={t.gan_weight} with train.gan_disc_weight=0: the classifier the student is trained to "
              "fool would never learn (it would stay at D = 1/2, a constant push); set train.gan_disc_weight > 0 "
              "(DMD2: 1e-2), or train.gan_weight=0")
    if t.guidance_min > t.guidance_max:
        _fail(f"train.guidance_min={t.guidance_min} > train.guidance_max={t.guidance_max}")


def check_preset(cfg: Any, presets: Collection[str]) -> None:
    if cfg.preset not in presets:
        _fail(f"preset={cfg.preset!r} is not a named preset: use one of {', '.join(presets)}")


def resolve(cfg: Any, presets: Collection[str]) -> Any:
    """Derive the derived keys, then apply every cross-field rule (ConfigError naming the keys); `presets`: the
    valid preset names (presets.PRESETS, passed in by resolve.validate)."""
    derive(cfg)
    check_preset(cfg, presets)
    for rule in (check_image, check_networks, check_text, check_data, check_train):
        rule(cfg)
    return cfg
