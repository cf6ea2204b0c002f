"""Generation side of every suite: prompts -> a GenEval-layout folder.

The image generator is injected as a callable `(prompt, n, seed) -> list[PIL.Image]`, so this module
never imports model code; `pipeline_generator` adapts `fastardiff_ds.inference.load_pipeline` (imported
lazily, only on the `generate` path of a CLI).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from eval_suites.folders import write_prompt_entry

GenerateFn = Callable[[str, int, int], list]


def prompt_seed(seed: int, index: int) -> int:
    """Seed for prompt `index`: distinct per prompt, reproducible from the run seed."""
    return seed * 1_000_003 + index


def write_generation_folder(metadata: list[dict], out_dir: str | os.PathLike, generate_images: GenerateFn,
                            n_per_prompt: int = 4, seed: int = 0) -> Path:
    """Generate `n_per_prompt` images per metadata entry into `<out_dir>/<idx:05d>/`.

    A prompt folder that already holds `n_per_prompt` samples is skipped, so an interrupted run resumes.
    Each metadata dict needs a "prompt" key; it is written verbatim as the folder's metadata.jsonl.
    """
    if n_per_prompt < 1:
        raise ValueError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = getattr(generate_images, "record", None)  # the rule and tolerances that make these images
    if record is not None:
        (out_dir / "generation.json").write_text(json.dumps({**record, "seed": seed, "n_per_prompt": n_per_prompt},
                                                            indent=2, default=str) + "\n")
    for idx, meta in enumerate(tqdm(metadata, desc="generate", unit="prompt")):
        if "prompt" not in meta:
            raise KeyError(f"metadata entry {idx} has no 'prompt' key: {meta}")
        samples = out_dir / f"{idx:05d}" / "samples"
        if samples.is_dir() and len(list(samples.glob("*.png"))) >= n_per_prompt:
            continue
        images = generate_images(meta["prompt"], n_per_prompt, prompt_seed(seed, idx))
        if len(images) != n_per_prompt:
            raise ValueError(f"generator returned {len(images)} images for prompt {idx}, expected {n_per_prompt}")
        write_prompt_entry(out_dir, idx, meta, images)
    return out_dir


def pipeline_generator(ckpt: str, preset: str | None, mode: str, overrides: list[str] | None = None,
                       threads: int = 0) -> GenerateFn:
    """Wrap `fastardiff_ds.inference.load_pipeline(ckpt, preset, mode)` as a `(prompt, n, seed)` callable;
    `overrides` are dotted config overrides such as `inference.num_steps=25`."""
    try:
        from fastardiff_ds.inference import load_pipeline  # lazy: scoring never imports model code
    except ImportError as err:
        raise ImportError("the generate path needs fastardiff_ds.inference.load_pipeline, which failed to "
                          f"import ({err}); score an existing folder with the `score` command instead") from err
    if threads:
        import torch

        torch.set_num_threads(threads)
    pipeline = load_pipeline(ckpt, preset, mode, overrides)

    def generate(prompt: str, n: int, seed: int) -> list:
        return pipeline.generate([prompt] * n, [seed + j for j in range(n)])

    generate.record = {"ckpt": str(ckpt), "overrides": list(overrides or []), **pipeline.rule()}
    return generate


VAE_HELP = ("VAE folder for the generator, same as --set model.image.vae_path=DIR: the official "
            "NextStep-1-f8ch16-Tokenizer (config.json + checkpoint.pt, converted and cached on first use) or a "
            "diffusers AutoencoderKL folder; latent scale/shift come from its config")


class _VaeOverride(argparse.Action):
    """--vae DIR -> an entry `model.image.vae_path=DIR` in --set (a new list: argparse shares the default)."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.set = [f"model.image.vae_path={value}", *(getattr(namespace, "set", None) or [])]


def add_generate_args(parser: argparse.ArgumentParser, n_default: int) -> None:
    """The flags every suite's `generate` command shares."""
    parser.add_argument("--ckpt", required=True, help="checkpoint directory for load_pipeline")
    parser.add_argument("--preset", default=None, help="model preset, only for checkpoints without config.json "
                        "(official NextStep-1.x downloads are read from their own config.json)")
    parser.add_argument("--mode", default="fastardiff", choices=["baseline", "sd", "dmd", "fastardiff"],
                        help="inference mode")
    parser.add_argument("--outdir", required=True, help="folder to write <idx:05d>/samples/*.png into")
    parser.add_argument("--n-per-prompt", type=int, default=n_default, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0, help="run seed (per-prompt seeds derive from it)")
    parser.add_argument("--limit", type=int, default=None, help="only N prompts, spread evenly over the list "
                        "(keeps the task mix; for quick CPU runs)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads for generation (0 = torch "
                        "default; 1 is fastest for the tiny presets)")
    parser.add_argument("--vae", action=_VaeOverride, metavar="DIR", help=VAE_HELP)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="inference config override, e.g. --set inference.num_steps=25 (repeatable)")


def select_prompts(metadata: list[dict], limit: int | None) -> list[dict]:
    """An evenly spread subset of `limit` prompts (all when None)."""
    if not limit or limit >= len(metadata):
        return metadata
    step = len(metadata) / limit
    return [metadata[int(i * step)] for i in range(limit)]
