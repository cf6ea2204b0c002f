"""Write the synthetic shapes dataset in img2dataset's webdataset layout.

    python data_pipelines/make_shapes.py --out data/shapes --num-samples 20000 --shard-size 1000 \
        --resolution 64 --seed 0

Writes {shard:05d}.tar (KEY.jpg / KEY.txt / KEY.json), {shard:05d}.parquet, {shard:05d}_stats.json,
sizes.json and shapes_eval_metadata.jsonl (held-out prompts in GenEval's metadata schema).
"""
from __future__ import annotations

import argparse
import json

from fastardiff_ds.data.synthetic import write_shapes_dataset


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=64, help="render size in px (the loader resizes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-per-task", type=int, default=48, help="max held-out prompts per GenEval tag")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards (same files for any number)")
    a = p.parse_args(argv)
    summary = write_shapes_dataset(a.out, a.num_samples, a.shard_size, a.resolution, a.seed, a.eval_per_task,
                                   a.workers)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
