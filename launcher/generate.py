"""Prompts -> images with any inference mode.

    python launcher/generate.py --ckpt assets/tiny_teacher --prompt "a photo of a red circle" --num-images 4 \
        --mode baseline --out outputs/red_circle
    python launcher/generate.py --ckpt CKPT --prompts-file prompts.txt --mode fastardiff --out outputs/run
    python launcher/generate.py --ckpt weights/NextStep-1.1 --prompt "a red fox" --out outputs/fox \
        model.image.vae_path=weights/NextStep-1-f8ch16-Tokenizer    # an official download as is, bf16
    python launcher/generate.py --preset tiny --random-init --prompt "a red circle" --out /tmp/x   # smoke test
    python launcher/generate.py --ckpt weights/NextStep-1-Large --preset nextstep-1-large \
        --vae weights/NextStep-1-f8ch16-Tokenizer --prompt "a corgi" --out outputs/corgi
    python launcher/generate.py --ckpt runs/mar_tiny/checkpoint --class-label 3 --class-label 17 --out outputs/mar
    python launcher/generate.py --ckpt pretrained_models/mar/mar_large/checkpoint-last.pth \
        --vae pretrained_models/vae/kl16.ckpt --class-label 207 --out outputs/golden sampling.cfg=3.0 sampling.num_iter=64

Class-conditional (MAR) checkpoints take --class-label instead of prompts: our export (launcher/pretrain_c2i.py's
run_dir/checkpoint) or an official LTH14/mar checkpoint-last.pth (--vae = kl16.ckpt; --weights model for the raw
weights instead of model_ema); overrides are `sampling.*` keys (num_iter, num_sampling_steps, cfg, cfg_schedule,
temperature). The images of class i are one batch seeded seed + i (orders, then noise, in the official order).

Writes one PNG per image plus grid.png and stats.json (forward counts, acceptance, seconds per image).
Dotted overrides change sampling, e.g. `inference.num_steps=20 inference.cfg_scale=4`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fastardiff_ds.cli import add_vae_arg, vae_overrides
from fastardiff_ds.config import resolve_config
from fastardiff_ds.inference import MODES, Pipeline, load_pipeline, random_init_bundle
from fastardiff_ds.visual import make_grid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import writable_problem  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint folder: our export (config.json + model.safetensors [+ draft/"
                   "student]) or an official NextStep-1.x download as is (config.json, shards + index, tokenizer)")
    p.add_argument("--preset", default=None, help="preset for --random-init; with --ckpt it only fills what an "
                   "official config.json does not say (default: its family, nextstep-1.1 or nextstep-1-large), "
                   "or names the model of a folder without config.json")
    p.add_argument("--random-init", action="store_true", help="no checkpoint: random weights (images are noise)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--class-label", action="append", type=int, default=[], help="a class id for a class-"
                   "conditional (MAR) checkpoint (repeatable)")
    p.add_argument("--weights", default="model_ema", choices=("model_ema", "model"), help="official MAR "
                   "checkpoint-last.pth: which weights (default model_ema, as the paper's numbers)")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--mode", choices=MODES, default="baseline")
    p.add_argument("--seed", type=int, default=0, help="image j of prompt i uses seed + i * num_images + j")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default; 1 is fastest "
                   "for the tiny preset, whose per-token matmuls are too small to split)")
    add_vae_arg(p)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. inference.num_steps=20")
    a = p.parse_args(argv)
    a.overrides = [*vae_overrides(a.vae), *a.overrides]
    return a


def generate_classes(a) -> None:
    """--class-label: a MAR checkpoint, one batch of --num-images per class."""
    from fastardiff_ds.inference_c2i import MARPipeline, parse_sampling_overrides

    if a.mode not in ("baseline", "dmd"):
        sys.exit(f"error: --mode {a.mode} is not built for class-conditional (MAR) checkpoints yet; use --mode "
                 "baseline (MAR's own sampler) or dmd (a launcher/train_c2i.py export's few-step student)")
    try:
        overrides = parse_sampling_overrides(a.overrides)
    except ValueError as e:
        sys.exit(f"error: {e}")
    vae = next((o.split("=", 1)[1] for o in vae_overrides(a.vae)), None)
    try:
        pipe = MARPipeline.from_pretrained(a.ckpt, vae_path=vae, weights=a.weights, mode=a.mode)
        images, t0 = [], time.time()
        for i, label in enumerate(tqdm(a.class_label, desc="generate (mar)", unit="class")):
            images += pipe.generate([label] * a.num_images, seed=a.seed + i, **overrides)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"error: {e}")
    seconds = time.time() - t0
    out = Path(a.out)
    names = [f"class {c}" for c in a.class_label for _ in range(a.num_images)]
    for idx, (img, label) in enumerate(zip(images, [c for c in a.class_label for _ in range(a.num_images)])):
        img.save(out / f"{idx:05d}_class{label}.png")
    make_grid(images, names, cols=a.num_images, scale=max(1, 128 // images[0].width), caption_height=12).save(
        out / "grid.png")
    stats = {"mode": a.mode, "family": "mar", "images": len(images), "seconds_per_image": seconds / len(images),
             "sampling": dataclasses.asdict(dataclasses.replace(pipe.cfg.sampling, **overrides))}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))
    print(f"wrote {len(images)} images and grid.png to {out}")


def main(argv=None):
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.class_label:
        if a.prompt or a.prompts_file or a.random_init or a.ckpt is None:
            sys.exit("error: --class-label needs --ckpt (a MAR checkpoint) and no --prompt / --prompts-file / "
                     "--random-init")
        problem = writable_problem(Path(a.out), "--out")
        if problem:
            sys.exit(f"error: {problem}")
        return generate_classes(a)
    prompts = list(a.prompt)
    if a.prompts_file:
        prompts += [line.strip() for line in Path(a.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        sys.exit("error: give --prompt TEXT or --prompts-file FILE")
    if a.ckpt is None and not a.random_init:
        sys.exit("error: no --ckpt given. Pass --ckpt PATH (e.g. assets/tiny_teacher), or --random-init to run "
                 "randomly initialised weights (the images will be noise)")
    out = Path(a.out)
    problem = writable_problem(out, "--out")  # before the (slow) model load, not after the images are made
    if problem:
        sys.exit(f"error: {problem}")
    try:
        if a.random_init:
            cfg = resolve_config(a.preset or "tiny", overrides=a.overrides)
            pipe = Pipeline(random_init_bundle(cfg, a.seed), a.mode)
            print("NOTE: --random-init: randomly initialised weights, the images are noise, not a trained model")
        else:
            pipe = load_pipeline(a.ckpt, a.preset, a.mode, a.overrides)
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad folder / config / override / VAE: say what and how
        sys.exit(f"error: {e}")
    jobs = [(p, a.seed + i * a.num_images + j) for i, p in enumerate(prompts) for j in range(a.num_images)]
    bs = max(1, pipe.inf.batch_size)
    images, t0 = [], time.time()
    for k in tqdm(range(0, len(jobs), bs), desc=f"generate ({a.mode})", unit="batch"):
        chunk = jobs[k:k + bs]
        images += pipe.generate([p for p, _ in chunk], [s for _, s in chunk])
    seconds = time.time() - t0
    for idx, (img, (prompt, seed)) in enumerate(zip(images, jobs)):
        img.save(out / f"{idx:05d}_seed{seed}.png")
    make_grid(images, [p for p, _ in jobs], cols=a.num_images, scale=max(1, 128 // images[0].width),
              caption_height=12).save(out / "grid.png")
    stats = {"mode": a.mode, "images": len(images), "seconds_per_image": seconds / len(images),
             "random_init": bool(a.random_init), "rule": pipe.rule(),
             "inference": dataclasses.asdict(pipe.inf),  # every sampling knob
             "decode": [s.as_dict() for s in pipe.stats]}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k != "decode"}))
    print(f"wrote {len(images)} images and grid.png to {out}")


if __name__ == "__main__":
    main()
