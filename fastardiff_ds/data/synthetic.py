"""The synthetic shapes dataset on disk (img2dataset layout) and its held-out GenEval-style prompts."""
from __future__ import annotations

import io
import json
import os

import numpy as np

from fastardiff_ds.data.shapes import eval_prompts, render_scene, sample_scene
from fastardiff_ds.data.writer import ShardWriter, finish_dataset, i2d_meta, sample_key

EVAL_METADATA = "shapes_eval_metadata.jsonl"


def encode_jpeg(img, quality: int = 95) -> bytes:
    """JPEG bytes; 4:4:4 chroma so small objects keep their colour."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def shapes_sample(seed: int, index: int, resolution: int, key: str,
                  task: str | None = None) -> tuple[dict[str, bytes], dict]:
    """Tar members (jpg, txt, json; + cls, the class label as ASCII text, for `task`="single_object", the
    class-conditional set) and metadata of sample `index`; depends only on (seed, index, task)."""
    scene = sample_scene(np.random.default_rng([seed, index]), resolution, task)
    jpg = encode_jpeg(render_scene(scene))
    meta = {**i2d_meta(key, scene["prompt"], resolution, resolution, jpg), **scene}
    members = {"jpg": jpg, "txt": scene["prompt"].encode("utf-8"),
               "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
    if task == "single_object":
        members["cls"] = str(scene["label"]).encode("ascii")
    return members, meta


def _write_shard(args: tuple) -> None:
    out_dir, shard, num_samples, shard_size, resolution, seed, task = args
    writer = ShardWriter(out_dir, shard)
    for i in range(shard * shard_size, min(num_samples, (shard + 1) * shard_size)):
        key = sample_key(shard, i - shard * shard_size, shard_size)
        members, meta = shapes_sample(seed, i, resolution, key, task)
        writer.add(key, members, meta, {"task": meta["task"], "label": meta["label"]})
    writer.close()


def write_shapes_dataset(out_dir: str, num_samples: int, shard_size: int, resolution: int = 64,
                         seed: int = 0, eval_per_task: int = 48, workers: int = 1, task: str | None = None) -> dict:
    """Write ``ceil(num_samples / shard_size)`` shards + sizes.json + shapes_eval_metadata.jsonl.

    Deterministic for a seed: sample i is drawn from ``default_rng([seed, i])`` whatever the
    sharding, and tars are written with fixed mtimes/modes (stats.json timings aside). `workers` > 1
    writes shards in that many processes; the files are the same. `task` fixes every scene's task
    ("single_object": the class-labelled set of the MAR row, one object an image, label = its class).
    """
    if num_samples < 1 or shard_size < 1 or workers < 1:
        raise ValueError(f"num_samples={num_samples}, shard_size={shard_size} and workers={workers} must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    n_shards = -(-num_samples // shard_size)
    jobs = [(out_dir, shard, num_samples, shard_size, resolution, seed, task) for shard in range(n_shards)]
    if workers > 1 and n_shards > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, n_shards)) as pool:
            pool.map(_write_shard, jobs, chunksize=1)
    else:
        for job in jobs:
            _write_shard(job)
    sizes = finish_dataset(out_dir)
    prompts = eval_prompts(seed=seed, per_task=eval_per_task)
    with open(os.path.join(out_dir, EVAL_METADATA), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in prompts)
    return {"out": out_dir, "shards": n_shards, "samples": sum(sizes.values()), "eval_prompts": len(prompts)}
