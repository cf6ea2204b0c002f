"""Cache VAE latents: pixel shards -> latent shards (KEY.latent.npy + KEY.txt + KEY.json).

    python data_pipelines/encode_latents.py --shards 'data/shapes/{00000..00019}.tar' \
        --out data/shapes_latents --vae /path/to/vae --resolution 256 --batch-size 64 --device cuda

The tokenizer is `fastardiff_ds.models.image_tokenizers.VAETokenizer.from_local(cfg)` with the
preset's image config and vae_path=PATH (imported lazily); what its `encode` returns per image is
stored as is ((C,h,w) latents or (N,D) patch tokens). From Python, any object with
`encode(pixels (B,3,H,W) in [-1,1]) -> (B,C,h,w) | (B,N,D)` works via `encode_shards`.
Both trainers then read the cache with `data.kind=latents data.shards=OUT` (training/batch.py: (N,D) tokens as
they are, (C,h,w) normalised latents patchified), without running the VAE; the cache must be encoded at the
model's resolution (the default here: the preset's model.image.resolution).
"""
from __future__ import annotations

import argparse
import importlib
import json

from fastardiff_ds.data.latents import encode_shards
from fastardiff_ds.data.shards import expand_shards


def load_vae(path: str, preset: str, device: str):
    """VAETokenizer of `preset`'s image config with vae_path=path (imports the model code lazily)."""
    module = importlib.import_module("fastardiff_ds.models.image_tokenizers")
    from fastardiff_ds.config import get_preset

    cfg = get_preset(preset).model.image
    cfg.tokenizer, cfg.vae_path = "vae", path
    return module.VAETokenizer.from_local(cfg, device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="brace pattern, directory or list file")
    p.add_argument("--out", required=True)
    p.add_argument("--vae", required=True, help="VAE folder: the official NextStep-1-f8ch16-Tokenizer (config.json + "
                   "checkpoint.pt) or a diffusers AutoencoderKL folder (VAETokenizer.from_local)")
    p.add_argument("--preset", default="nextstep-1-large", help="config preset whose image settings to use")
    p.add_argument("--resolution", type=int, default=None,
                   help="pixels per side before encoding (default: the preset's model.image.resolution, which the "
                        "trainers' data.kind=latents expects)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    vae = load_vae(a.vae, a.preset, a.device)
    if a.resolution is None:
        from fastardiff_ds.config import get_preset

        a.resolution = get_preset(a.preset).model.image.resolution
    result = encode_shards(expand_shards(a.shards), a.out, vae, a.resolution, a.batch_size, a.dtype, device=a.device)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
