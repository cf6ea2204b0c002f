"""img2dataset metadata: per-shard parquet and ``_stats.json``, and open_clip's ``sizes.json``.

Sample counts (for epoch length and consumed-samples bookkeeping) come from, in order of preference:
``sizes.json`` next to the shards, ``{shard}_stats.json`` ("successes"), ``{shard}.parquet``
(rows with status == "success").
"""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq


def _stem(shard: str) -> str:
    base = shard
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return os.path.splitext(base)[0]


def read_parquet(shards_or_paths: list[str]) -> pa.Table:
    """Concatenate img2dataset parquet files (given directly, or the ``.parquet`` beside each shard)."""
    paths = [p if p.endswith(".parquet") else _stem(p) + ".parquet" for p in shards_or_paths]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} parquet files missing, e.g. {missing[0]!r}")
    return pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")


def parquet_successes(path: str) -> int:
    """Rows of one img2dataset parquet whose status is 'success' (all rows if there is no status)."""
    table = pq.read_table(path, columns=None)
    if "status" not in table.column_names:
        return table.num_rows
    return sum(1 for s in table.column("status").to_pylist() if s == "success")


def read_stats(shard: str) -> dict | None:
    """The ``{shard}_stats.json`` dict img2dataset writes (count, successes, ...), or None."""
    path = _stem(shard) + "_stats.json"
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sizes_json(folder: str, cache: dict) -> dict:
    if folder not in cache:
        path = os.path.join(folder, "sizes.json")
        cache[folder] = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}
    return cache[folder]


def shard_size(shard: str, _cache: dict | None = None) -> int:
    """Number of samples in one shard from sizes.json, _stats.json or parquet (see module doc)."""
    sizes = _sizes_json(os.path.dirname(os.path.abspath(shard)), {} if _cache is None else _cache)
    if os.path.basename(shard) in sizes:
        return int(sizes[os.path.basename(shard)])
    stats = read_stats(shard)
    if stats is not None and "successes" in stats:
        return int(stats["successes"])
    if os.path.isfile(_stem(shard) + ".parquet"):
        return parquet_successes(_stem(shard) + ".parquet")
    raise FileNotFoundError(
        f"no sample count for shard {shard!r}: write sizes.json (data_pipelines/make_shapes.py does; "
        "for img2dataset output use fastardiff_ds.data.metadata.write_sizes_json) or set samples_per_epoch")


def count_samples(shards: list[str]) -> int:
    """Total samples over `shards` (see `shard_size`)."""
    cache: dict = {}
    return sum(shard_size(s, cache) for s in shards)


def write_sizes_json(folder: str) -> dict[str, int]:
    """Write ``sizes.json`` ({shard basename: count}) for every ``*.tar`` in `folder` from stats/parquet."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
    sizes = {}
    for n in names:
        shard = os.path.join(folder, n)
        stats = read_stats(shard)
        sizes[n] = int(stats["successes"]) if stats and "successes" in stats else parquet_successes(_stem(shard) + ".parquet")
    with open(os.path.join(folder, "sizes.json"), "w", encoding="utf-8") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)
    return sizes
