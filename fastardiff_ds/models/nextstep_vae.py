"""NextStep-1's own VAE folder (`NextStep-1-f8ch16-Tokenizer`: config.json + checkpoint.pt) as a diffusers
AutoencoderKL with the official per-token `encoder_norm`.

Facts from stepfun-ai/NextStep-1 (learned, not copied):
- `nextstep/models/modeling_flux_vae.py`: the network is the Flux/LDM AutoencoderKL written with LDM module names
  (`encoder.down.{i}.block.{j}.norm1`, `encoder.mid.attn_1.q` as 1x1 convs, `decoder.up.{i}` indexed by resolution
  level, `nin_shortcut`, `norm_out`); `checkpoint.pt` is that module's flat `state_dict()`, read with `torch.load`.
- `config.json` holds the `AutoEncoderParams` fields: resolution, in_channels, ch, out_ch, ch_mult, num_res_blocks,
  z_channels, scaling_factor, shift_factor, deterministic, encoder_norm, psz (other keys are ignored).
- `encode`: moments = encoder(x) -> (mean, logvar); the mean is cut into psz x psz patches
  (`nchpwq->ncpqhw`, i.e. (B, C psz^2, h/psz, w/psz)), layer-normed over those C psz^2 values without affine
  (eps 1e-6) when `encoder_norm`, and put back; `deterministic` makes `posterior.sample()` return the mean.
- The pipelines normalise latents as `(z - shift_factor) * scaling_factor` after encode and undo it before decode,
  reading both from the VAE's config (`inference/gen_pipeline.py`, `pipeline_nextstep.py`).
Defaults for keys missing from config.json follow the newest official code (`inference/gen_pipeline.py`:
scale 1, shift 0, deterministic, encoder_norm, psz 1); the older `modeling_flux_vae.py` used 0.3611 / 0.1159 and no
norm, so a missing key is warned about.
"""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from .vae_cache import load_cached_state

OFFICIAL_NAME = "NextStep-1-f8ch16-Tokenizer"
DOWNLOAD_HINT = (f"download the official VAE folder {OFFICIAL_NAME} (config.json + checkpoint.pt) with "
                 f"`huggingface-cli download stepfun-ai/{OFFICIAL_NAME} --local-dir weights/{OFFICIAL_NAME}`")
CONVERTER_VERSION = "1"


@dataclass
class NextStepVAEParams:
    """The official `AutoEncoderParams` (config.json keys); defaults of the newest official code."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    deterministic: bool = True
    encoder_norm: bool = True
    psz: int | None = 1

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def diffusers_kwargs(self) -> dict:
        """The same network as diffusers `AutoencoderKL` arguments (no quant convs, GroupNorm(32), SiLU)."""
        n = len(self.ch_mult)
        return dict(in_channels=self.in_channels, out_channels=self.out_ch, latent_channels=self.z_channels,
                    block_out_channels=tuple(self.ch * m for m in self.ch_mult), layers_per_block=self.num_res_blocks,
                    down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                    norm_num_groups=32, sample_size=self.resolution, act_fn="silu", mid_block_add_attention=True,
                    scaling_factor=self.scaling_factor, shift_factor=self.shift_factor, use_quant_conv=False,
                    use_post_quant_conv=False)


def read_params(config_path: Path) -> NextStepVAEParams:
    """config.json -> params; unknown keys are ignored (as the official loader does), missing ones warned about."""
    try:
        raw = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the NextStep VAE config {config_path}: {e}; {DOWNLOAD_HINT}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} must hold a JSON object of AutoEncoderParams fields, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(NextStepVAEParams)}
    missing = [k for k in ("scaling_factor", "shift_factor", "encoder_norm", "psz", "deterministic") if k not in raw]
    if missing:
        defaults = NextStepVAEParams()
        warnings.warn(f"{config_path} has no {', '.join(missing)}: using the newest official defaults "
                      f"({', '.join(f'{k}={getattr(defaults, k)}' for k in missing)}); the older official "
                      "modeling_flux_vae.py defaulted to scaling_factor=0.3611, shift_factor=0.1159, no encoder_norm",
                      stacklevel=2)
    params = NextStepVAEParams(**{k: v for k, v in raw.items() if k in names})
    params.ch_mult = list(params.ch_mult)
    return params


# Official (LDM-named) keys -> diffusers AutoencoderKL keys. `{up}` is filled with the reversed level index.
_RENAMES = [
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.([qkv])\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^encoder\.down\.(\d+)\.attn\.(\d+)\.norm\.", r"encoder.down_blocks.\1.attentions.\2.group_norm."),
    (r"^encoder\.down\.(\d+)\.attn\.(\d+)\.([qkv])\.", r"encoder.down_blocks.\1.attentions.\2.to_\3."),
    (r"^encoder\.down\.(\d+)\.attn\.(\d+)\.proj_out\.", r"encoder.down_blocks.\1.attentions.\2.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
]


def convert_official_state(state: dict, num_levels: int, keep: tuple[str, ...] = ("encoder.", "decoder.")) -> dict:
    """Official (LDM-named) state dict -> diffusers AutoencoderKL state dict.

    The official decoder keeps `up[i]` at resolution level i (built with insert(0, ...)) while diffusers runs
    `up_blocks` from the lowest resolution, so `decoder.up.{i}` becomes `decoder.up_blocks.{num_levels-1-i}`.
    The attention's 1x1 convs (C, C, 1, 1) become linear weights (C, C); attention inside encoder levels
    (`encoder.down.{i}.attn.{j}`, as LDM's KL-f16 has) maps to `AttnDownEncoderBlock2D`. Keys outside `keep` are
    dropped (NextStep: encoder./decoder.; KL-16 also keeps quant_conv./post_quant_conv.).
    """
    out = {}
    for key, value in state.items():
        if not key.startswith(keep):
            continue
        m = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.", key)
        if m:
            level, kind = int(m.group(1)), m.group(2)
            new_kind = "resnets." if kind == "block" else "upsamplers.0."
            key = f"decoder.up_blocks.{num_levels - 1 - level}.{new_kind}" + key[m.end():]
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        if ".attentions." in key and key.endswith("weight") and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[key] = value.contiguous()
    return out


def normalize_mean(mean: torch.Tensor, psz: int | None, enabled: bool, eps: float = 1e-6) -> torch.Tensor:
    """The official `encoder_norm`: LayerNorm (no affine) of each psz x psz patch's C psz^2 values.

    mean: (B, C, h, w) -> (B, C, h, w). psz=None with the norm on is read as psz=1 (per latent position, the
    older official code's behaviour).
    """
    if not enabled:
        return mean
    p = psz or 1
    B, C, h, w = mean.shape
    x = torch.einsum("nchpwq->nhwcpq", mean.reshape(B, C, h // p, p, w // p, p)).reshape(B, h // p, w // p, C * p * p)
    x = F.layer_norm(x, (C * p * p,), None, None, eps)
    x = torch.einsum("nhwcpq->nchpwq", x.reshape(B, h // p, w // p, C, p, p))
    return x.reshape(B, C, h, w)


class NextStepAutoencoderKL(AutoencoderKL):
    """diffusers AutoencoderKL whose `encode` applies NextStep-1's `encoder_norm` and `deterministic` posterior."""

    def __init__(self, params: NextStepVAEParams):
        super().__init__(**params.diffusers_kwargs())
        self.nextstep = params

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """x (B, 3, H, W) in [-1, 1] -> posterior over (B, z_channels, H/f, W/f) with the normed mean."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        mean = normalize_mean(mean, self.nextstep.psz, self.nextstep.encoder_norm)
        posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1), deterministic=self.nextstep.deterministic)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)


def is_official_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "checkpoint.pt").is_file()


def read_official_checkpoint(ckpt: Path) -> dict:
    """checkpoint.pt -> flat state dict (also accepts {"state_dict": {...}})."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors vary by torch version
        raise ValueError(f"cannot read {ckpt} as a torch state dict ({type(e).__name__}: {e}); "
                         f"{DOWNLOAD_HINT}") from e
    if isinstance(state, dict) and not any(str(k).startswith("encoder.") for k in state) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(str(k).startswith("encoder.") for k in state):
        raise ValueError(f"{ckpt} holds no 'encoder.*' weights: it is not a NextStep VAE checkpoint; {DOWNLOAD_HINT}")
    return state


def load_nextstep_vae(folder: str | Path, cache_dir: str | Path | None = None) -> NextStepAutoencoderKL:
    """The official VAE folder -> `NextStepAutoencoderKL` in fp32 (eval mode).

    The converted weights are cached as `checkpoint.diffusers.safetensors` next to checkpoint.pt, or under
    `cache_dir` (default: $XDG_CACHE_HOME or ~/.cache, /fastardiff_ds/vae/...) when the folder is read-only.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has checkpoint.pt but no config.json; {DOWNLOAD_HINT}")
    params = read_params(folder / "config.json")
    state = load_cached_state(folder / "checkpoint.pt", cache_dir, CONVERTER_VERSION,
                              lambda: convert_official_state(read_official_checkpoint(folder / "checkpoint.pt"),
                                                             len(params.ch_mult)))
    vae = NextStepAutoencoderKL(params)
    try:
        missing, unexpected = vae.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"{folder}/checkpoint.pt does not fit its config.json (ch={params.ch}, ch_mult="
                         f"{params.ch_mult}, num_res_blocks={params.num_res_blocks}, z_channels={params.z_channels})"
                         f": {str(e).splitlines()[-1].strip()}") from e
    if missing or unexpected:
        raise ValueError(f"{folder}/checkpoint.pt does not match the VAE its config.json describes: missing "
                         f"{missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}")
    return vae.eval()
