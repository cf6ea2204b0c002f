"""Train the tiny CLIP used for the tiny preset's CLIP score (open_clip model code and ClipLoss).

A small ViT (32 px, patch 4) and text transformer (open_clip's BPE tokenizer, context 32) trained
contrastively on rendered 32 px shapes scenes and their captions. Writes the model config
`assets/eval/shapes_clip.json` and fp16 weights `assets/eval/shapes_clip.pt` (loadable with
`open_clip.create_model(..., pretrained=path)` after `open_clip.add_model_config(json)`).

    python -m eval_suites.train_shapes_clip          # 1500 steps: ~5-10 CPU minutes, one thread
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eval_suites.clip_models import SHAPES_CLIP_CONFIG, SHAPES_CLIP_WEIGHTS
from eval_suites.shapes_data import render_pool

MODEL_CFG = {
    "embed_dim": 48,
    # 32 px with patch 8: a 4x4 token grid keeps a CPU step ~0.1 s; objects are >= 7 px.
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    # open_clip's BPE vocabulary is 49408 tokens: a narrow text width keeps the embedding table small;
    # shapes captions are <= 14 tokens with start/end.
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

def build(config_path: Path):
    import open_clip
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(MODEL_CFG, indent=2) + "\n")
    open_clip.add_model_config(str(config_path))
    model, _, preprocess = open_clip.create_model_and_transforms(config_path.stem)
    return model, preprocess, open_clip.get_tokenizer(config_path.stem)


def normalise(images_u8: torch.Tensor, preprocess) -> torch.Tensor:
    """uint8 (B, 3, 32, 32) -> the model's normalised input (the preprocess's Normalize, no resize needed)."""
    norm = preprocess.transforms[-1]
    return norm(images_u8.float() / 255.0)


@torch.no_grad()
def retrieval_accuracy(model, images, texts, chunk: int = 64) -> float:
    """Image->caption top-1 among `chunk` candidates (held-out scenes)."""
    hits, n = 0, 0
    for i in range(0, len(images) - chunk + 1, chunk):
        img = F.normalize(model.encode_image(images[i:i + chunk]), dim=-1)
        txt = F.normalize(model.encode_text(texts[i:i + chunk]), dim=-1)
        hits += (img @ txt.T).argmax(1).eq(torch.arange(chunk)).sum().item()
        n += chunk
    return hits / n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pool", type=int, default=24000, help="rendered training scenes")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--config-out", default=str(SHAPES_CLIP_CONFIG))
    p.add_argument("--out", default=str(SHAPES_CLIP_WEIGHTS))
    args = p.parse_args(argv)
    from open_clip import ClipLoss

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, preprocess, tok = build(Path(args.config_out))
    images, scenes = render_pool(args.pool, args.seed)
    texts = tok([s["prompt"] for s in scenes])
    val_images, val_scenes = render_pool(1024, args.seed + 1)
    val_x, val_t = normalise(val_images, preprocess), tok([s["prompt"] for s in val_scenes])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    loss_fn, gen, t0 = ClipLoss(), torch.Generator().manual_seed(args.seed), time.time()
    for step in range(args.steps):
        idx = torch.randint(len(images), (args.batch_size,), generator=gen)
        img_f, txt_f, scale = model(normalise(images[idx], preprocess), texts[idx])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    acc = retrieval_accuracy(model, val_x, val_t)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, args.out)
    info = {"val_top1_of_64": acc, "steps": args.steps, "seconds": round(time.time() - t0), "out": args.out}
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
