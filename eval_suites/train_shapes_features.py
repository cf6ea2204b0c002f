"""Train the shapes-domain feature network used for the tiny preset's FID (`shapes_features.py`).

Supervision from the scene JSON of rendered 32 px scenes: which (shape, colour) pairs are present
(BCE over 40 logits) and how many objects of each shape (CE over 0..max_count per shape). Light blur and
colour noise are applied so the features also respond smoothly to imperfect generated images. Writes
`assets/eval/shapes_features.pt` (~1 MB).

    python -m eval_suites.train_shapes_features      # 900 steps: ~5-10 CPU minutes, one thread
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from eval_suites.shapes_data import render_pool, scene_targets
from eval_suites.shapes_features import (DEFAULT_WEIGHTS, ShapesFeatureConfig, ShapesFeatureNet,
                                         save_shapes_feature_net)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x (B, 3, H, W) in [0, 1]: random 3x3 box blur on half the batch, per-image colour shift, pixel noise."""
    b = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    x = x + 0.06 * (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) + 0.02 * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def losses(net: ShapesFeatureNet, x, pairs, counts) -> tuple[torch.Tensor, dict]:
    pair_logits, count_logits = net.heads(net(x))
    # ~2 of 40 pairs are present per scene: up-weight positives so presence is not drowned out
    l_pair = F.binary_cross_entropy_with_logits(pair_logits, pairs, pos_weight=torch.full_like(pairs[0], 5.0))
    l_count = F.cross_entropy(count_logits.flatten(0, 1), counts.flatten())
    return l_pair + l_count, {"pair": l_pair.item(), "count": l_count.item()}


@torch.no_grad()
def accuracy(net: ShapesFeatureNet, x, pairs, counts) -> dict:
    pair_logits, count_logits = net.heads(net(x))
    pred = pair_logits.gt(0).float()
    return {"pairs_exact": pred.eq(pairs).all(1).float().mean().item(),
            "pairs_recall": ((pred * pairs).sum() / pairs.sum()).item(),
            "pairs_precision": ((pred * pairs).sum() / pred.sum().clamp(min=1)).item(),
            "counts_exact": count_logits.argmax(-1).eq(counts).all(1).float().mean().item()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pool", type=int, default=24000, help="rendered training scenes")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    args = p.parse_args(argv)
    from fastardiff_ds.data.shapes import COLOR_NAMES, SHAPES

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ShapesFeatureConfig(n_pairs=len(SHAPES) * len(COLOR_NAMES), n_shapes=len(SHAPES))
    net = ShapesFeatureNet(cfg)
    images, scenes = render_pool(args.pool, args.seed)
    pairs, counts = scene_targets(scenes, cfg.max_count)
    val_images, val_scenes = render_pool(1024, args.seed + 1)
    val = (val_images.float() / 255, *scene_targets(val_scenes, cfg.max_count))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    gen, t0 = torch.Generator().manual_seed(args.seed), time.time()
    for step in range(args.steps):
        idx = torch.randint(len(images), (args.batch_size,), generator=gen)
        loss, parts = losses(net, augment(images[idx].float() / 255, gen), pairs[idx], counts[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} {parts} ({time.time() - t0:.0f}s)", flush=True)
    net.eval()
    info = {**accuracy(net, *val), "steps": args.steps, "seconds": round(time.time() - t0)}
    save_shapes_feature_net(net, args.out, **info)
    print(json.dumps({**info, "out": args.out}))
    return info


if __name__ == "__main__":
    main()
