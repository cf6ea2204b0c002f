"""Loader throughput: prints JSON with samples/s, MB/s (tar bytes read) and skipped samples by reason.

    python data_pipelines/bench.py --shards 'data/shapes/{00000..00019}.tar' --batch-size 64 \
        --workers 2 --seconds 20 --resolution 256
"""
from __future__ import annotations

import argparse
import json
import time

from fastardiff_ds.data import DataConfig, build_loader


def byte_tokenize(text: str) -> list[int]:
    """Stand-in tokenizer (UTF-8 bytes + 1) so the benchmark needs no model file."""
    return [b + 1 for b in text.encode("utf-8")]


def run(cfg: DataConfig, seconds: float) -> dict:
    loader = build_loader(cfg, rank=0, world_size=1, tokenize=byte_tokenize, pad_id=0)
    samples, start, t0 = 0, time.perf_counter(), None
    for batch in loader:  # one epoch at most; the clock starts after the first batch (worker start-up)
        if t0 is None:
            t0, first_bytes = time.perf_counter(), loader.bytes_read
            continue
        samples += len(batch["keys"])
        if time.perf_counter() - t0 >= seconds:
            break
    dt = time.perf_counter() - (t0 or start)
    return {"samples_per_s": samples / dt if dt else 0.0, "mb_per_s": (loader.bytes_read - first_bytes) / dt / 1e6,
            "samples": samples, "seconds": dt, "startup_s": (t0 or start) - start,
            "skipped": loader.skipped, "batch_size": cfg.batch_size, "workers": cfg.num_workers,
            "resolution": cfg.resolution, "kind": cfg.kind}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--kind", default="pixels", choices=["pixels", "latents"])
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    a = p.parse_args(argv)
    cfg = DataConfig(shards=a.shards, batch_size=a.batch_size, num_workers=a.workers, resolution=a.resolution,
                     kind=a.kind, shuffle_buffer=a.shuffle_buffer, resampled=True,
                     samples_per_epoch=10**12, drop_text_prob=0.0)
    result = run(cfg, a.seconds)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
