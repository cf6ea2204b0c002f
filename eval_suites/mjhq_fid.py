"""MJHQ-30K FID: overall and per category, against cached reference statistics.

Reference: `<mjhq-root>/meta_data.json` (`{image_id: {category, prompt}}`) and images at
`<mjhq-root>/<category>/<image_id>.{jpg,png}` (the unzipped `mjhq30k_imgs.zip`). Generated: a GenEval-layout
folder whose metadata carry the category. Features: FID Inception-v3 pool3 (local weights) or, for the tiny
preset, the shapes feature net. Protocols disagree across papers (systems.md §4.2), so the resolution,
resize, library and N are written beside every number.

    python -m eval_suites.mjhq_fid generate --meta ROOT/meta_data.json --ckpt C --preset P --outdir OUT
    python -m eval_suites.mjhq_fid score --images OUT --mjhq-root ROOT --inception-weights W.pth --out R.json
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from eval_suites import frechet
from eval_suites.fid_features import FIDProtocol, build_feature_net, extract_features, file_digest
from eval_suites.folders import read_generation_folder
from eval_suites.reporting import bar_plot, write_json

ALL = "all"


def read_mjhq_meta(path) -> dict[str, dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "meta_data.json"
    if not path.is_file():
        raise FileNotFoundError(f"MJHQ metadata {path} does not exist; pass --mjhq-root (folder with meta_data.json)")
    return json.loads(path.read_text())


def reference_images(root, limit_per_category: int | None = None) -> dict[str, list[Path]]:
    """Reference image paths per category (sorted by image id; at most `limit_per_category` each)."""
    root, by_cat = Path(root), defaultdict(list)
    for image_id, entry in sorted(read_mjhq_meta(root).items()):
        cat = entry["category"]
        if limit_per_category and len(by_cat[cat]) >= limit_per_category:
            continue
        hits = [root / cat / f"{image_id}{ext}" for ext in (".jpg", ".png", ".jpeg")]
        path = next((p for p in hits if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"reference image {hits[0]} (or .png) is missing; is --mjhq-root the unzipped set?")
        by_cat[cat].append(path)
    return dict(by_cat)


def generated_images(folder, category_key: str = "category") -> dict[str, list[Path]]:
    by_cat = defaultdict(list)
    for entry in read_generation_folder(folder):
        if category_key not in entry.metadata:
            raise KeyError(f"prompt folder {entry.index:05d} has no {category_key!r} in its metadata; "
                           "set --category-key to the field that names the category")
        by_cat[entry.metadata[category_key]].extend(entry.image_paths)
    return dict(by_cat)


def _stats_by_category(paths: dict[str, list[Path]], net, protocol: FIDProtocol, args, desc: str):
    order = sorted(paths)
    feats = extract_features([p for c in order for p in paths[c]], net, protocol.resolution, args.batch_size,
                             args.device, desc=desc)
    stats, start = {}, 0
    for cat in order:
        n = len(paths[cat])
        if n >= 2:
            stats[cat] = frechet.feature_stats(feats[start:start + n])
        start += n
    stats[ALL] = frechet.feature_stats(feats)
    return stats


def reference_stats(ref: dict[str, list[Path]], net, protocol: FIDProtocol, args) -> dict:
    """Per-category + overall reference statistics, cached as `.npz` keyed by protocol and N."""
    cache = Path(args.stats_cache) if args.stats_cache else None
    tag = f"{protocol.features}_{protocol.resolution}_n{sum(map(len, ref.values()))}"
    files = {c: cache / f"mjhq_{tag}_{c}.npz" for c in [*ref, ALL]} if cache else {}
    if files and all(f.is_file() for f in files.values()):
        loaded = {c: frechet.load_stats(f) for c, f in files.items()}
        if all(meta.get("protocol") == json.dumps(protocol.as_dict()) for _, meta in loaded.values()):
            return {c: s for c, (s, _) in loaded.items()}
    stats = _stats_by_category(ref, net, protocol, args, desc="reference features")
    for cat, path in files.items():
        if cat in stats:
            frechet.save_stats(path, stats[cat], protocol=json.dumps(protocol.as_dict()))
    return stats


def score(args) -> dict:
    protocol = FIDProtocol(resolution=args.resolution, features=args.features)
    if args.features == "shapes":
        protocol.library = "eval_suites.shapes_features (domain CNN, pooled penultimate features)"
    net = build_feature_net(args.features, args.inception_weights, args.shapes_weights)
    from eval_suites.shapes_features import DEFAULT_WEIGHTS
    weights = args.inception_weights if args.features == "inception" else (args.shapes_weights or DEFAULT_WEIGHTS)
    protocol.weights = file_digest(weights)
    ref = reference_images(args.mjhq_root, args.ref_limit_per_category)
    gen = generated_images(args.images, args.category_key)
    ref_stats = reference_stats(ref, net, protocol, args)
    gen_stats = _stats_by_category(gen, net, protocol, args, desc="generated features")
    per_cat = {c: frechet.frechet_distance(gen_stats[c], ref_stats[c]) for c in sorted(gen_stats)
               if c != ALL and c in ref_stats}
    return {
        "suite": "mjhq_fid", "fid": frechet.frechet_distance(gen_stats[ALL], ref_stats[ALL]),
        "fid_per_category": per_cat,
        "n_generated": {c: len(v) for c, v in gen.items()}, "n_reference": {c: len(v) for c, v in ref.items()},
        "protocol": {**protocol.as_dict(), "fid_dtype": "float64", "covariance": "unbiased (ddof=1)",
                     "reference_root": str(args.mjhq_root), "images": str(args.images)},
    }


def generate(args) -> None:
    from eval_suites.generation import pipeline_generator, select_prompts, write_generation_folder
    meta = read_mjhq_meta(args.meta)
    rows, seen = [], defaultdict(int)
    for image_id, entry in sorted(meta.items()):
        if args.limit_per_category and seen[entry["category"]] >= args.limit_per_category:
            continue
        seen[entry["category"]] += 1
        rows.append({"prompt": entry["prompt"], "category": entry["category"], "image_id": image_id})
    write_generation_folder(select_prompts(rows, args.limit), args.outdir, pipeline_generator(args.ckpt, args.preset, args.mode, args.set, args.threads),
                            n_per_prompt=args.n_per_prompt, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    from eval_suites.generation import add_generate_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one image per MJHQ prompt into a folder")
    g.add_argument("--meta", required=True, help="MJHQ meta_data.json (or the folder holding it)")
    g.add_argument("--limit-per-category", type=int, default=None, help="first K prompts of each category")
    add_generate_args(g, n_default=1)
    s = sub.add_parser("score", help="FID of a generated folder against MJHQ reference images")
    s.add_argument("--images", required=True, help="generated folder (<idx>/metadata.jsonl + samples/)")
    s.add_argument("--mjhq-root", required=True, help="folder with meta_data.json and <category>/<id>.jpg")
    s.add_argument("--features", default="inception", choices=["inception", "shapes"], help="feature network")
    s.add_argument("--inception-weights", default=None, help="local FID Inception state dict (pt_inception-2015-12-05-6726825d.pth)")
    s.add_argument("--shapes-weights", default=None, help="shapes feature net (default: assets/eval/shapes_features.pt)")
    s.add_argument("--resolution", type=int, default=None,
                   help="resize every image to this first (default: 1024 as the MJHQ card; 32 for --features shapes)")
    s.add_argument("--ref-limit-per-category", type=int, default=None, help="use the first K reference images per category")
    s.add_argument("--category-key", default="category", help="metadata field naming the category")
    s.add_argument("--stats-cache", default=None, help="folder for cached reference .npz statistics")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", required=True, help="results JSON path (a per-category bar plot is written beside it)")
    return p


def main(argv=None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    if args.resolution is None:
        args.resolution = 32 if args.features == "shapes" else 1024
    result = score(args)
    out = write_json(args.out, result)
    bar_plot(out.with_suffix(".png"), {**result["fid_per_category"], ALL: result["fid"]},
             title=f"FID ({args.features}, {args.resolution}px)", ylabel="FID (lower is better)", highlight=ALL)
    print(json.dumps({"fid": result["fid"], "fid_per_category": result["fid_per_category"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
