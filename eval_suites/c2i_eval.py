"""Class-conditional (MAR) quality and speed: FID, class accuracy and seconds per image of a MAR checkpoint.

    python -m eval_suites.c2i_eval --ckpt runs/mar_tiny/checkpoint --per-class 25 --seed 0 --out R.json
    python -m eval_suites.c2i_eval --ckpt runs/mar_dmd/export --mode dmd --per-class 25 --seed 0 --out D.json
    python -m eval_suites.c2i_eval --ckpt pretrained_models/mar/mar_large/checkpoint-last.pth \
        --vae pretrained_models/vae/kl16.ckpt --features inception --inception-weights pt_inception-2015-12-05.pth \
        --ref-stats fid_stats/adm_in256_stats.npz --per-class 50 --out fid50k.json sampling.cfg=3.0 sampling.num_iter=64

Images of class c are one batch seeded (seed * 100003 + c). Two reference kinds:
- `--ref-stats NPZ`: feature statistics with `mu` / `sigma` (MAR's fid_stats/adm_in256_stats.npz, ADM's
  VIRTUAL_imagenet256_labeled.npz, or ours): the FID-50K protocol is 1000 classes x `--per-class 50`.
- the tiny default (no --ref-stats): `--ref-n` real class-labelled shapes images (one object each, the training
  pipeline's 64 px JPEG -> 32 px view, seed 1234, kept apart from the training seed) through the shapes feature net
  (`--features shapes`); class accuracy = the exact shapes detector finds one object of the label's shape and
  colour.
Prints one JSON line: fid, class_accuracy (tiny) with its binomial standard error, seconds_per_image, n.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REF_SEED = 1234


def class_accuracy(images, labels) -> tuple[float, float]:
    """(fraction whose only detected object has the label's shape and colour, its binomial std error)."""
    from eval_suites.shapes_detector import ShapesDetector
    from fastardiff_ds.data.shapes import COLOR_NAMES, SHAPES

    det = ShapesDetector()
    ok = []
    for img, c in zip(images, labels):
        found = [(s, d.color) for s, ds in det.detect(img).items() for d in ds]
        ok.append(found == [(SHAPES[c // len(COLOR_NAMES)], COLOR_NAMES[c % len(COLOR_NAMES)])])
    p = float(np.mean(ok))
    return p, float(np.sqrt(p * (1 - p) / max(len(ok), 1)))


def shapes_reference(folder: Path, n: int, resolution: int) -> list[Path]:
    """`n` real single-object images (the training pipeline's view) as PNGs in `folder` (kept when present)."""
    from eval_suites.shapes_data import render_view

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.png" for i in range(n)]
    if all(p.is_file() for p in paths):
        return paths
    rng = np.random.default_rng(REF_SEED)
    for p in tqdm(paths, desc="reference", unit="img"):
        render_view(rng, "pipeline", resolution, task="single_object")[0].save(p)
    return paths


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="MAR export folder or official checkpoint-last.pth")
    p.add_argument("--vae", default=None, help="kl16.ckpt (official checkpoints)")
    p.add_argument("--mode", default="baseline", choices=("baseline", "dmd"), help="dmd: the export's student")
    p.add_argument("--per-class", type=int, default=25)
    p.add_argument("--classes", type=int, default=None, help="first N classes (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", default="shapes", choices=("shapes", "inception"))
    p.add_argument("--shapes-weights", default=None)
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--ref-stats", default=None, help="reference .npz with mu / sigma")
    p.add_argument("--ref-n", type=int, default=2000, help="tiny default: real reference images")
    p.add_argument("--images-dir", default=None, help="where the generated PNGs go (default: next to --out)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("overrides", nargs="*", help="sampling.KEY=VALUE")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from eval_suites.fid_features import build_feature_net, extract_features
    from eval_suites.frechet import feature_stats, frechet_distance, load_stats
    from fastardiff_ds.inference_c2i import MARPipeline, parse_sampling_overrides

    try:
        overrides = parse_sampling_overrides(a.overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    pipe = MARPipeline.from_pretrained(a.ckpt, vae_path=a.vae, mode=a.mode)
    res = pipe.model.cfg.img_size
    classes = list(range(a.classes or pipe.model.cfg.class_num))
    out = Path(a.out)
    img_dir = Path(a.images_dir) if a.images_dir else out.with_suffix("") / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    paths, labels, seconds = [], [], 0.0
    for c in tqdm(classes, desc="generate", unit="class"):
        t0 = time.perf_counter()
        images = pipe.generate([c] * a.per_class, seed=a.seed * 100003 + c, **overrides)
        seconds += time.perf_counter() - t0
        for j, im in enumerate(images):
            path = img_dir / f"c{c:04d}_{j:03d}.png"
            im.save(path)
            paths.append(path)
            labels.append(c)
    net = build_feature_net(a.features, a.inception_weights, a.shapes_weights)
    gen = feature_stats(extract_features(paths, net, res, desc="generated features"))
    if a.ref_stats:
        ref, _ = load_stats(a.ref_stats)
        ref_name = a.ref_stats
    else:
        ref_paths = shapes_reference(out.with_suffix("").parent / f"c2i_ref_{a.ref_n}_{res}", a.ref_n, res)
        ref = feature_stats(extract_features(ref_paths, net, res, desc="reference features"))
        ref_name = f"shapes single_object x {a.ref_n} (seed {REF_SEED})"
    result = {"ckpt": str(a.ckpt), "mode": a.mode, "n": len(paths), "classes": len(classes), "seed": a.seed,
              "sampling": dataclasses.asdict(dataclasses.replace(pipe.cfg.sampling, **overrides)),
              "features": a.features, "reference": ref_name, "fid": frechet_distance(gen, ref),
              "seconds_per_image": seconds / len(paths)}
    if a.features == "shapes" and not a.ref_stats:
        from PIL import Image

        acc, se = class_accuracy([Image.open(q) for q in paths], labels)
        result.update(class_accuracy=acc, class_accuracy_se=se)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
