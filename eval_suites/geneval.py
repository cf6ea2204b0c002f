"""GenEval: object-focused compositional alignment (Ghosh et al. 2023, djghosh13/geneval).

`generate` writes 4 images per prompt of the official 553-prompt metadata (shipped in geneval_data/)
into `<outdir>/<idx:05d>/`; `score` reads such a folder only. Rules: eval_suites.geneval_rules
(threshold 0.3, counting 0.9, <= 16 objects per class, position threshold 0.1, overall = task mean).

    python -m eval_suites.geneval generate --ckpt C --preset P --mode fastardiff --outdir OUT
    python -m eval_suites.geneval score --images OUT --detector mask2former --detector-config CFG.py \\
        --detector-ckpt M2F.pth --clip-model ViT-L-14 --clip-ckpt L14.pt --out results.json
    python -m eval_suites.geneval score --images OUT --detector shapes --out results.json   # tiny preset
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from eval_suites.clip_weights import ACT_HELP, ACTIVATIONS
from eval_suites.folders import read_generation_folder, read_metadata_jsonl
from eval_suites.geneval_rules import GenEvalRules, asked_objects, evaluate, select_detections, summarize
from eval_suites.reporting import bar_plot, write_json, write_jsonl, write_parquet

DATA = Path(__file__).resolve().parent / "geneval_data"
OFFICIAL_METADATA = DATA / "evaluation_metadata.jsonl"


def load_metadata(spec: str) -> list[dict]:
    """`official` (the 553 GenEval prompts), `shapes` (the synthetic domain's held-out set) or a path."""
    if spec == "official":
        return read_metadata_jsonl(OFFICIAL_METADATA)
    if spec == "shapes":
        from fastardiff_ds.data.shapes import eval_prompts
        return eval_prompts()
    return read_metadata_jsonl(spec)


def build_detector(args):
    if args.detector == "shapes":
        from eval_suites.shapes_detector import ShapesDetector
        return ShapesDetector()
    from eval_suites.detectors import MMDetDetector
    classnames = (DATA / "object_names.txt").read_text().split("\n")
    return MMDetDetector(args.detector_config, args.detector_ckpt, [c for c in classnames if c], args.device)


def build_color_fn(args):
    colors = args.colors or ("exact" if args.detector == "shapes" else "clip")
    if colors == "exact":
        from eval_suites.clip_models import exact_colors
        return exact_colors, "exact palette colour (shapes domain)"
    from eval_suites.clip_models import ClipColorClassifier, load_open_clip, resolve_clip_paths
    model, ckpt = resolve_clip_paths(args.clip_model, args.clip_ckpt)
    bundle = load_open_clip(model, ckpt, args.device, activation=args.clip_act)
    return ClipColorClassifier(bundle), f"open_clip zero-shot ({model}, {ckpt}; {bundle.activation})"


def score_image(path, metadata: dict, detector, color_fn, rules: GenEvalRules) -> dict:
    """One image's GenEval verdict (evaluate_images.py::evaluate_image)."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    detected = select_detections(detector.detect(image), metadata["tag"], rules)
    correct, reason = evaluate(image, detected, metadata, color_fn, rules)
    details = {c: [[*map(float, d.box), d.score] for d in dets] for c, dets in detected.items()}
    return {"filename": str(path), "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": correct,
            "reason": reason, "metadata": json.dumps(metadata), "details": json.dumps(details),
            "n_objects": sum(len(d) for d in detected.values()), "n_asked": asked_objects(metadata)}


def score(args) -> tuple[dict, list[dict]]:
    defaults = GenEvalRules()
    rules = GenEvalRules(**{k: type(getattr(defaults, k))(v) for k, v in args.options.items()})
    detector, (color_fn, color_desc) = build_detector(args), build_color_fn(args)
    rows = []
    entries = read_generation_folder(args.images)
    for entry in tqdm(entries, desc="geneval", unit="prompt"):
        for path in entry.image_paths:
            rows.append({"prompt_index": entry.index, **score_image(path, entry.metadata, detector, color_fn, rules)})
    summary = summarize(rows)
    summary.update({"suite": "geneval", "protocol": {
        **asdict(rules), "detector": args.detector, "colors": color_desc, "n_prompts_in_folder": len(entries),
        "overall": "mean of the per-task accuracies (summary_scores.py)", "images": str(args.images)}})
    return summary, rows


def format_table(summary: dict) -> str:
    """The per-task table summary_scores.py prints, plus the overall (task-mean) row."""
    lines = [f"{'task':<15}{'accuracy':>10}{'images':>8}", "-" * 33]
    for task, acc in summary["tasks"].items():
        lines.append(f"{task:<15}{acc:>10.4f}{summary['images_per_task'][task]:>8d}")
    lines += ["-" * 33, f"{'overall':<15}{summary['overall']:>10.4f}{summary['n_images']:>8d}",
              *([f"objects per image {summary['objects_per_image']:.2f} (asked {summary['objects_asked']:.2f}); "
                 f"exact object count {summary['exact_object_count']:.4f}; single-object images with exactly one "
                 f"object {summary['exact_count_per_task'].get('single_object', float('nan')):.4f}"]
                if "exact_object_count" in summary else []),
              f"images correct {summary['images_correct']:.4f}; prompts with >= 1 correct "
              f"{summary['prompts_any_correct']:.4f}"]
    return "\n".join(lines)


def _parse_options(items: list[str]) -> dict:
    known = {f.name for f in fields(GenEvalRules)}
    opts = dict(item.split("=", 1) for item in items)
    unknown = set(opts) - known
    if unknown:
        raise SystemExit(f"unknown --options {sorted(unknown)}; known: {sorted(known)}")
    return opts


def build_parser() -> argparse.ArgumentParser:
    from eval_suites.generation import add_generate_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate n images per GenEval prompt into a folder")
    g.add_argument("--metadata", default="official",
                   help="'official' (553 GenEval prompts), 'shapes' (synthetic held-out set) or a .jsonl path")
    add_generate_args(g, n_default=4)
    s = sub.add_parser("score", help="score a generated folder")
    s.add_argument("--images", required=True, help="generated folder (<idx>/metadata.jsonl + samples/NNNN.png)")
    s.add_argument("--detector", default="mask2former", choices=["mask2former", "shapes"], help="detector plug-in")
    s.add_argument("--detector-config", default=None, help="mmdet config .py of Mask2Former Swin-S (local)")
    s.add_argument("--detector-ckpt", default=None, help="Mask2Former checkpoint .pth (local)")
    s.add_argument("--colors", default=None, choices=["clip", "exact"],
                   help="colour classifier (default: clip for mask2former, exact for shapes)")
    s.add_argument("--clip-model", default="ViT-L-14", help="open_clip arch, model-config .json, or 'shapes'")
    s.add_argument("--clip-ckpt", default=None, help="local CLIP checkpoint for the colour check: OpenAI's ViT-L-14.pt "
                   "(what official GenEval loads with pretrained='openai') or an open_clip state dict")
    s.add_argument("--clip-act", default="auto", choices=ACTIVATIONS, help=ACT_HELP)
    s.add_argument("--options", nargs="*", default=[], help="rule overrides, e.g. threshold=0.3 counting_threshold=0.9")
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", required=True, help="results JSON (per-image .jsonl/.parquet and a .png plot beside it)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        from eval_suites.generation import pipeline_generator, select_prompts, write_generation_folder
        return write_generation_folder(select_prompts(load_metadata(args.metadata), args.limit), args.outdir,
                                       pipeline_generator(args.ckpt, args.preset, args.mode, args.set, args.threads),
                                       n_per_prompt=args.n_per_prompt, seed=args.seed)
    args.options = _parse_options(args.options)
    summary, rows = score(args)
    out = write_json(args.out, summary)
    write_jsonl(out.with_suffix(".jsonl"), rows)
    write_parquet(out.with_suffix(".parquet"), rows)
    bar_plot(out.with_suffix(".png"), {**summary["tasks"], "overall": summary["overall"]},
             title=f"GenEval ({args.detector})", ylabel="accuracy", highlight="overall")
    print(format_table(summary))
    return summary


if __name__ == "__main__":
    main()
