"""Official NextStep-1.x `config.json` -> our Config; telling an official download from our own export.

Sources: stepfun-ai/NextStep-1 `nextstep/models/configuration_nextstep.py` (NextStepConfig(LlamaConfig), 1-Large
keys), `inference/nextstep_model.py` and `nextstep/models/nextstep/modeling_nextstep.py` (Qwen2 backbone,
`image_size`/`patch_size`/`num_channels`), vLLM-Omni `nextstep_1_1` (1.1 keys `genloss_*`, `use_gen_pos_embed`,
`use_2d_rope`). Both key schemes are read; where a folder has both names for one field they must agree.

| official key: 1-Large scheme / 1.1 scheme | our field | note |
|---|---|---|
| hidden_size, intermediate_size | model.ar.hidden_size, intermediate_size | |
| num_hidden_layers | model.ar.num_layers | |
| num_attention_heads, num_key_value_heads | model.ar.num_heads, num_kv_heads | kv default: num_attention_heads |
| vocab_size, max_position_embeddings | model.ar.vocab_size, max_position_embeddings | |
| rope_theta, rms_norm_eps | model.ar.rope_theta, rms_norm_eps | |
| o_attention_bias | model.ar.o_proj_bias | null / absent: whether the weights hold `o_proj.bias` |
| fm_head_dim / genloss_width | model.head.width | default 1536 |
| fm_head_layers / genloss_depth | model.head.depth | default 12 |
| fm_head_mlp_ratio | model.head.mlp_ratio | default 1.0 |
| fm_head_batch_mul / genloss_batch_mul | pretrain.batch_mul | noise draws per token in training |
| latent_channels / num_channels | model.image.channels | token dim = channels x patch^2 |
| latent_patch_size / patch_size | model.image.patch_size | |
| latent_size / image_size | model.image.resolution = size x 8 | the f8 VAE latent side; grid = size / patch |
| boi, eoi, image_placeholder_id | model.text.boi_id, eoi_id, image_placeholder_id | checked against the tokenizer |
| vae_name_or_path | model.image.vae_path | a local folder (relative to the checkpoint), else `<ckpt>/vae` if present |
| tokenizer files in the folder | model.text.path = the folder, tokenizer = hf | |
| (not in config.json) | model.draft.num_layers | the preset's 6, at most half of num_hidden_layers |

Refused with a ValueError naming the key unless set as shown (we do not implement the alternative):
attention_bias true, use_gen_pos_embed false, use_2d_rope false, attention_use_qk_norm false,
genloss_net_arch "mlp", genloss_type "transport", mlp_bias false, hidden_act "silu", rope_scaling null,
use_sliding_window false, head_dim = hidden_size / num_attention_heads.
Warned: noise_strength > 0 (training-time noise on input tokens; inference is unaffected; our trainers do not add it)
and keys not in the table or in INFORMATIONAL.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..config import Config, get_preset

NEXTSTEP_MARKERS = ("fm_head_dim", "fm_head_layers", "genloss_width", "genloss_depth", "latent_channels",
                    "latent_patch_size", "boi", "image_placeholder_id")
REFUSE_UNLESS = {  # key -> (accepted values, what to use instead)
    "attention_bias": ((True,), "Qwen2-style q/k/v biases"),
    "use_gen_pos_embed": ((False, None), "no 2-D sin-cos position table on image tokens"),
    "use_2d_rope": ((False, None), "1-D RoPE over the whole sequence"),
    "attention_use_qk_norm": ((False, None), "no q/k norm"),
    "genloss_net_arch": (("mlp", None), "the SimpleMLPAdaLN head"),
    "genloss_type": (("transport", None), "flow matching (rectified-flow transport)"),
    "mlp_bias": ((False, None), "bias-free SwiGLU"),
    "hidden_act": (("silu", None), "SiLU"),
    "rope_scaling": ((None,), "plain RoPE"),
    "use_sliding_window": ((False, None), "full attention"),
}
INFORMATIONAL = {  # read and not needed for image generation (HF bookkeeping, text-only or training-only settings)
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "pad_token_id_added", "initializer_range", "use_cache",
    "tie_word_embeddings", "attention_dropout", "pretraining_tp", "max_window_layers", "sliding_window",
    "layer_types", "lm_loss_weight", "im_loss_weight", "image_loss_weight", "use_token_length_weight",
    "use_mlp_before_lm_head", "create_kwargs", "genloss_num_sampling_steps", "image_decoder_arch",
    "image_feature_layer", "hw_aspect_ratios_ids", "image_grid_prefix_ids", "base_image_grid_size",
    "noise_strength", "rope_parameters",
}
MAPPED = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps", "o_attention_bias", "head_dim",
          "fm_head_dim", "genloss_width", "fm_head_layers", "genloss_depth", "fm_head_mlp_ratio",
          "fm_head_batch_mul", "genloss_batch_mul", "latent_channels", "num_channels", "latent_patch_size",
          "patch_size", "latent_size", "image_size", "boi", "eoi", "image_placeholder_id", "vae_name_or_path"}
VAE_DOWNSAMPLE = 8  # NextStep-1-f8ch16-Tokenizer


def folder_kind(ckpt: str | Path) -> tuple[str, dict]:
    """-> ("ours" | "official", parsed config.json). Ours: a nested tree with `model.ar`; official: HF-style flat
    keys with NextStep's own (`fm_head_*`, `genloss_*`, `latent_*`, `boi`). Anything else is an error."""
    path = Path(ckpt) / "config.json"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON ({e}); re-download or re-export the checkpoint") from e
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' holds {type(data).__name__}, not a config mapping")
    if isinstance(data.get("model"), dict) and "ar" in data["model"]:
        return "ours", data
    if "hidden_size" in data and (any(k in data for k in NEXTSTEP_MARKERS) or data.get("model_type") == "nextstep"):
        return "official", data
    if "hidden_size" in data:
        raise ValueError(f"'{path}' is a plain language-model config (model_type={data.get('model_type')!r}), not a "
                         "NextStep-1.x checkpoint: it has no image head (fm_head_* / genloss_*). Download a NextStep "
                         "folder, e.g. stepfun-ai/NextStep-1.1")
    raise ValueError(f"'{path}' is neither a fastardiff-ds export (no model.ar section) nor a NextStep-1.x config "
                     f"(no hidden_size); keys found: {sorted(data)[:8]}")


def _pick(data: dict, old: str, new: str | None, default=None):
    """The value under the 1-Large name `old` or the 1.1 name `new`; both present must agree."""
    have = [k for k in (old, new) if k is not None and data.get(k) is not None]
    if len(have) == 2 and data[old] != data[new]:
        raise ValueError(f"config.json sets both '{old}'={data[old]!r} and '{new}'={data[new]!r}; they name the same "
                         "setting, make them equal")
    if have:
        return data[have[0]]
    if default is None:
        names = f"'{old}'" + (f" (or '{new}')" if new else "")
        raise ValueError(f"config.json lacks {names}; it is needed to build the model: add it from the model card")
    return default


def _check_supported(data: dict) -> None:
    for key, (ok, ours) in REFUSE_UNLESS.items():
        if key in data and data[key] not in ok:
            raise ValueError(f"config.json sets {key}={data[key]!r}, which fastardiff-ds does not implement (we "
                             f"implement {key}={ok[0]!r}: {ours}); this checkpoint cannot be loaded faithfully")
    heads, hidden = data["num_attention_heads"], data["hidden_size"]
    if data.get("head_dim") is not None and data["head_dim"] * heads != hidden:
        raise ValueError(f"config.json sets head_dim={data['head_dim']} but hidden_size / num_attention_heads = "
                         f"{hidden // heads}; fastardiff-ds implements head_dim = hidden_size / heads only")
    if float(data.get("noise_strength") or 0.0) > 0:
        warnings.warn(f"config.json noise_strength={data['noise_strength']}: NextStep's training-time noise on input "
                      "image tokens; inference is unaffected, and fastardiff-ds training does not add it")
    unknown = sorted(set(data) - MAPPED - INFORMATIONAL - set(REFUSE_UNLESS))
    if unknown:
        warnings.warn(f"config.json keys not read by fastardiff-ds (check they do not change the model): {unknown}")


def _o_proj_bias(data: dict, folder: Path) -> bool:
    if data.get("o_attention_bias") is not None:
        return bool(data["o_attention_bias"])
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        keys = json.loads(index.read_text()).get("weight_map", {})
    else:
        from safetensors import safe_open

        single = folder / "model.safetensors"
        if not single.is_file():
            return False
        with safe_open(str(single), framework="pt") as f:
            keys = list(f.keys())
    return any(k.endswith("self_attn.o_proj.bias") for k in keys)


def official_config(data: dict, folder: str | Path, preset: str | None = None) -> Config:
    """Our Config for an official NextStep-1.x folder. The preset (default: `nextstep-1.1` for the genloss_* /
    image_size scheme, else `nextstep-1-large`) supplies what config.json does not say (sampling, data, text limits);
    every model setting config.json does say comes from it."""
    folder = Path(folder)
    _check_supported(data)
    new_scheme = any(k in data for k in ("genloss_width", "genloss_depth", "image_size", "num_channels"))
    cfg = get_preset(preset or ("nextstep-1.1" if new_scheme else "nextstep-1-large"))
    ar, head, image, text = cfg.model.ar, cfg.model.head, cfg.model.image, cfg.model.text
    ar.hidden_size, ar.intermediate_size = data["hidden_size"], data["intermediate_size"]
    ar.num_layers, ar.num_heads = data["num_hidden_layers"], data["num_attention_heads"]
    ar.num_kv_heads = data.get("num_key_value_heads") or data["num_attention_heads"]
    ar.vocab_size = data["vocab_size"]
    ar.max_position_embeddings = data.get("max_position_embeddings", ar.max_position_embeddings)
    ar.rope_theta = float(data.get("rope_theta", ar.rope_theta))
    ar.rms_norm_eps = float(data.get("rms_norm_eps", ar.rms_norm_eps))
    ar.o_proj_bias = _o_proj_bias(data, folder)
    # the preset's draft depth (6 of 48) must fit a shallower checkpoint: at most half of its layers
    cfg.model.draft.num_layers = min(cfg.model.draft.num_layers, max(1, ar.num_layers // 2))
    head.width = int(_pick(data, "fm_head_dim", "genloss_width", 1536))
    head.depth = int(_pick(data, "fm_head_layers", "genloss_depth", 12))
    head.mlp_ratio = float(data.get("fm_head_mlp_ratio", 1.0))
    cfg.pretrain.batch_mul = int(_pick(data, "fm_head_batch_mul", "genloss_batch_mul", cfg.pretrain.batch_mul))
    image.tokenizer, image.vae_downsample = "vae", VAE_DOWNSAMPLE
    image.channels = int(_pick(data, "latent_channels", "num_channels"))
    image.patch_size = int(_pick(data, "latent_patch_size", "patch_size"))
    latent = int(_pick(data, "latent_size", "image_size"))
    if latent % image.patch_size:
        raise ValueError(f"config.json latent size {latent} is not divisible by the patch size {image.patch_size}")
    image.resolution = latent * VAE_DOWNSAMPLE
    cfg.data.resolution = image.resolution
    vae = data.get("vae_name_or_path")
    for cand in ([folder / vae] if vae else []) + [folder / "vae"]:  # vLLM-Omni's lookup order
        if cand.is_dir():
            image.vae_path = str(cand)
            break
    text.boi_id, text.eoi_id, text.image_placeholder_id = (data.get(k) for k in ("boi", "eoi", "image_placeholder_id"))
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        text.tokenizer, text.path, text.add_special_tokens = "hf", str(folder), False
    cfg.train.teacher = str(folder)
    return cfg


def check_special_token_ids(text_cfg, tokenizer) -> None:
    """The loaded tokenizer must give <|begin_of_image|> etc. the ids the checkpoint was trained with."""
    pairs = [("boi_id", "boi_id", "<|begin_of_image|>"), ("eoi_id", "eoi_id", "<|end_of_image|>"),
             ("image_placeholder_id", "placeholder_id", "<|image_placeholder|>")]
    for field, attr, token in pairs:
        want = getattr(text_cfg, field)
        if want is not None and getattr(tokenizer, attr) != want:
            raise ValueError(f"the text tokenizer at '{text_cfg.path}' maps {token} to {getattr(tokenizer, attr)}, "
                             f"but the checkpoint was trained with {want} (model.text.{field}): use the tokenizer "
                             "shipped with the checkpoint (model.text.path=<checkpoint folder>)")
