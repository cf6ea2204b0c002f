"""An ImageFolder tree (torchvision's layout: ROOT/<class>/<image>, e.g. ImageNet's train/n01440764/*.JPEG) ->
webdataset shards with class labels, for the class-conditional (MAR) jobs.

    python data_pipelines/imagefolder_to_shards.py --root /data/imagenet/train --out /data/imagenet_wds \
        --shard-size 5000 --workers 8

Classes are the sorted sub-folder names, label = index in that order (torchvision's `ImageFolder.find_classes`), so
labels agree with a model trained on the tree itself; `classes.json` keeps the list. Each sample is the image's bytes
as they are (`KEY.jpg` / `KEY.png` / ..., no re-encoding), `KEY.cls` (the label as ASCII, webdataset's
convention), and `KEY.json` ({"label", "class_name", "path"}); the shards carry img2dataset's parquet / stats /
sizes.json, so the streaming loader counts them without a scan. Images are assigned to shards in sorted
(class, file) order, shuffled with `--seed` so that a shard holds many classes. Unreadable files are skipped and
counted (a truncated JPEG is not an error of the job); a tree without class folders or images is refused.
Train on the result with `data.shards=/data/imagenet_wds` (data.conditioning=class is the MAR presets' default).
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from PIL import Image

from fastardiff_ds.data.writer import ShardWriter, finish_dataset, i2d_meta, sample_key

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's IMG_EXTENSIONS


def find_classes(root: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders (expected ROOT/<class>/<image>, as torchvision's "
                                "ImageFolder reads)")
    return classes


def list_samples(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    out = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
            out += [(Path(dirpath) / f, label) for f in sorted(files) if f.lower().endswith(EXTENSIONS)]
    if not out:
        raise FileNotFoundError(f"{root}: no images with an extension in {EXTENSIONS} under its class folders")
    return out


def _write_shard(job: tuple) -> tuple[int, int]:
    out, shard, items, shard_size, root, classes = job
    writer, skipped = ShardWriter(out, shard), 0
    for i, (path, label) in enumerate(items):
        data = Path(path).read_bytes()
        try:
            with Image.open(path) as im:
                im.verify()  # header and structure; the loader decodes (and skips) for real
                width, height = im.size
        except Exception:  # PIL raises many types for broken files
            skipped += 1
            continue
        key = sample_key(shard, i, shard_size)
        ext = Path(path).suffix.lower().lstrip(".").replace("jpeg", "jpg")
        rel = str(Path(path).relative_to(root))
        meta = {**i2d_meta(key, classes[label], width, height, data), "label": label, "class_name": classes[label],
                "path": rel}
        writer.add(key, {ext: data, "cls": str(label).encode("ascii"),
                         "json": json.dumps(meta, sort_keys=True).encode("utf-8")}, meta, {"label": label})
    writer.failed = skipped
    writer.close()
    return len(items) - skipped, skipped


def convert(root: str, out: str, shard_size: int = 5000, seed: int = 0, workers: int = 1) -> dict:
    root_p = Path(root)
    classes = find_classes(root_p)
    samples = list_samples(root_p, classes)
    random.Random(seed).shuffle(samples)
    os.makedirs(out, exist_ok=True)
    jobs = [(out, k, [(str(p), c) for p, c in samples[k * shard_size:(k + 1) * shard_size]], shard_size, str(root_p),
             classes) for k in range(-(-len(samples) // shard_size))]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            counts = pool.map(_write_shard, jobs, chunksize=1)
    else:
        counts = [_write_shard(j) for j in jobs]
    finish_dataset(out)
    (Path(out) / "classes.json").write_text(json.dumps(classes))
    return {"out": out, "classes": len(classes), "shards": len(jobs), "samples": sum(c for c, _ in counts),
            "skipped_unreadable": sum(s for _, s in counts)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="ImageFolder root (ROOT/<class>/<image>)")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0, help="shuffles images across shards")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    try:
        summary = convert(a.root, a.out, a.shard_size, a.seed, a.workers)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
