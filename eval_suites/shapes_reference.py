"""A synthetic-shapes reference set in MJHQ-30K's layout, so the tiny preset runs the MJHQ FID suite.

Writes `<out>/meta_data.json` (`{image_id: {category, prompt}}`, category = the scene's GenEval task)
and `<out>/<category>/<image_id>.png` at the tiny preset's 32 px, by default in the `pipeline` view (what
the tiny model is trained on: 64 px render -> JPEG -> bicubic 32 px; see shapes_data.py). Then:

    python -m eval_suites.shapes_reference --out REF --n-per-category 500
    python -m eval_suites.mjhq_fid generate --meta REF --ckpt C --preset tiny --outdir GEN
    python -m eval_suites.mjhq_fid score --images GEN --mjhq-root REF --features shapes --resolution 32 --out R.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm


def write_shapes_reference(out, n_per_category: int, seed: int = 1234, resolution: int = 32,
                           view: str = "pipeline") -> Path:
    """Render `n_per_category` scenes of each GenEval task into MJHQ layout; returns `out`."""
    from fastardiff_ds.data.shapes import TASKS

    from eval_suites.shapes_data import render_view

    out, rng, meta = Path(out), np.random.default_rng(seed), {}
    for task in TASKS:
        (out / task).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(n_per_category), desc=f"reference {task}", unit="img"):
            image, scene = render_view(rng, view, resolution, task=task)
            image_id = f"{task}_{i:06d}"
            image.save(out / task / f"{image_id}.png")
            meta[image_id] = {"category": task, "prompt": scene["prompt"]}
    (out / "meta_data.json").write_text(json.dumps(meta, indent=1))
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write meta_data.json and <category>/<id>.png into")
    p.add_argument("--n-per-category", type=int, default=500, help="images per task category")
    p.add_argument("--seed", type=int, default=1234, help="keep it apart from training seeds")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--view", default="pipeline", choices=["pipeline", "direct"],
                   help="pipeline: as the tiny model's training data (64 px JPEG -> 32 px); direct: aliased 32 px renders")
    args = p.parse_args(argv)
    return write_shapes_reference(args.out, args.n_per_category, args.seed, args.resolution, args.view)


if __name__ == "__main__":
    main()
