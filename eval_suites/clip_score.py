"""CLIP score of a generated folder against its prompts (torchmetrics' definition).

torchmetrics (`functional/multimodal/clip_score.py`): per sample 100 * cos(E_image, E_caption); the reported
score is max(mean, 0) -- the clamp is on the mean, not per sample (systems.md pitfall 8). The unclamped
per-sample mean is reported too, since other repos (Pollux, DMD2) do not clamp. Model: open_clip from a
local checkpoint (`--clip-model ViT-L-14 --clip-ckpt F`), or the shipped shapes CLIP (`--clip-model shapes`).
OpenAI's weights run with QuickGELU, as they were trained (`--clip-act`, eval_suites/clip_weights.py).

    python -m eval_suites.clip_score generate --prompts P.jsonl --ckpt C --preset tiny --outdir OUT
    python -m eval_suites.clip_score score --images OUT --clip-model shapes --out R.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from eval_suites.clip_models import encode_images, encode_texts, load_open_clip, resolve_clip_paths
from eval_suites.clip_weights import ACT_HELP, ACTIVATIONS
from eval_suites.folders import read_generation_folder, read_metadata_jsonl
from eval_suites.reporting import write_json, write_jsonl


def clip_score_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict:
    """image_emb, text_emb: (N, D) paired embeddings (normalised here). Returns the torchmetrics score
    `max(mean(100 cos), 0)`, the unclamped mean, and the (N,) per-sample scores."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"need paired (N, D) embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    per_sample = 100 * (torch.nn.functional.normalize(image_emb.double(), dim=-1)
                        * torch.nn.functional.normalize(text_emb.double(), dim=-1)).sum(-1)
    mean = per_sample.mean().item()
    return {"clip_score": max(mean, 0.0), "clip_score_unclamped_mean": mean, "per_sample": per_sample.tolist()}


def score(args) -> tuple[dict, list[dict]]:
    model, ckpt = resolve_clip_paths(args.clip_model, args.clip_ckpt)
    bundle = load_open_clip(model, ckpt, device=args.device, activation=args.clip_act)
    rows, img_emb, txt_emb = [], [], []
    for entry in tqdm(read_generation_folder(args.images), desc="clip score", unit="prompt"):
        if not entry.image_paths:
            continue
        images = [Image.open(p) for p in entry.image_paths]
        img_emb.append(encode_images(bundle, images))
        txt_emb.append(encode_texts(bundle, [entry.metadata["prompt"]]).expand(len(images), -1))
        rows += [{"prompt_index": entry.index, "prompt": entry.metadata["prompt"], "filename": str(p)}
                 for p in entry.image_paths]
    if not rows:
        raise FileNotFoundError(f"{args.images} holds no sample images to score")
    res = clip_score_from_embeddings(torch.cat(img_emb), torch.cat(txt_emb))
    for row, s in zip(rows, res.pop("per_sample")):
        row["clip_score"] = s
    res.update({"suite": "clip_score", "n_images": len(rows), "n_prompts": len({r["prompt_index"] for r in rows}),
                "protocol": {"definition": "torchmetrics: max(mean_i 100*cos(E_img_i, E_txt_i), 0)",
                             "clip_model": str(model), "clip_ckpt": str(ckpt), "library": "open_clip",
                             "clip_activation": bundle.activation,
                             "context_length": int(getattr(bundle.model, "context_length", 77)),
                             "images": str(args.images)}})
    return res, rows


def read_prompts(path) -> list[dict]:
    """A metadata `.jsonl` (with "prompt") or a `.txt` with one prompt per line."""
    if str(path).endswith(".jsonl"):
        return read_metadata_jsonl(path)
    lines = Path(path).read_text().splitlines()
    return [{"prompt": line.strip()} for line in lines if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    from eval_suites.generation import add_generate_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images for a prompt list into a folder")
    g.add_argument("--prompts", required=True, help="prompts: .txt (one per line) or metadata .jsonl")
    add_generate_args(g, n_default=1)
    s = sub.add_parser("score", help="CLIP score of a generated folder")
    s.add_argument("--images", required=True, help="generated folder (<idx>/metadata.jsonl + samples/)")
    s.add_argument("--clip-model", default="shapes",
                   help="open_clip architecture name (ViT-L-14), a model-config .json, or 'shapes' (shipped tiny CLIP)")
    s.add_argument("--clip-ckpt", default=None, help="local CLIP checkpoint: an open_clip state dict, or OpenAI's "
                   "ViT-L-14.pt / state dict (required unless --clip-model shapes)")
    s.add_argument("--clip-act", default="auto", choices=ACTIVATIONS, help=ACT_HELP)
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", required=True, help="results JSON (per-image JSONL and a histogram are written beside it)")
    return p


def _histogram(path, scores: list[float], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(scores, bins=30, color="#86bbd8")
    ax.axvline(float(np.mean(scores)), color="#33658a", label=f"mean {np.mean(scores):.2f}")
    ax.set_xlabel("100 * cos(image, caption)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        from eval_suites.generation import pipeline_generator, select_prompts, write_generation_folder
        return write_generation_folder(select_prompts(read_prompts(args.prompts), args.limit), args.outdir,
                                       pipeline_generator(args.ckpt, args.preset, args.mode, args.set, args.threads),
                                       n_per_prompt=args.n_per_prompt, seed=args.seed)
    result, rows = score(args)
    out = write_json(args.out, result)
    write_jsonl(out.with_suffix(".jsonl"), rows)
    _histogram(out.with_suffix(".png"), [r["clip_score"] for r in rows], f"CLIP score ({args.clip_model})")
    print(json.dumps({k: result[k] for k in ("clip_score", "clip_score_unclamped_mean", "n_images")}, indent=2))
    return result


if __name__ == "__main__":
    main()
