"""Stage 0: pretrain a teacher (AR + flow head) with rectified flow, for presets without public weights.

    python launcher/pretrain_t2i.py --preset tiny run_dir=runs/tiny_teacher pretrain.steps=3000
    python launcher/pretrain_t2i.py --preset tiny --resume auto run_dir=runs/tiny_teacher   # continue

Without shards at `data.shards`, the tiny preset generates the synthetic shapes set there first.
Writes run_dir/checkpoint (config.json + model.safetensors, loadable by generate.py), metrics.jsonl, samples/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import ensure_shapes_data, sample_grid_callback  # noqa: E402
from fastardiff_ds.cli import add_config_args, config_from_args, text_and_image_tokenizers  # noqa: E402
from fastardiff_ds.data.loader import build_loader  # noqa: E402
from fastardiff_ds.logging import make_logger  # noqa: E402
from fastardiff_ds.models import build_head, build_target  # noqa: E402
from fastardiff_ds.training.pretrain import Pretrainer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--resume", choices=["auto", "never"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ensure_shapes_data(cfg)
    text, image = text_and_image_tokenizers(cfg, device)
    grid = cfg.model.image.grid
    loader = build_loader(cfg.data, rank=0, world_size=1, pad_id=text.pad_id,
                          tokenize=lambda s: text.prompt_ids(s, grid, strict=False))
    trainer = Pretrainer(cfg, build_target(cfg), build_head(cfg), image, loader, device)
    if args.resume == "auto" and trainer.resume():
        print(f"resumed from {cfg.run_dir} at step {trainer.state.step}")
    logger = make_logger(cfg.wandb, cfg.run_dir, {"preset": cfg.preset, **vars(args)}, name="pretrain")
    trainer.logger = logger
    state = trainer.fit(on_sample=sample_grid_callback(cfg, trainer, text, image, logger))
    logger.finish()
    print(f"done: step {state.step}, {state.samples} samples in {state.seconds / 60:.1f} min -> "
          f"{Path(cfg.run_dir) / 'checkpoint'}")


if __name__ == "__main__":
    main()
