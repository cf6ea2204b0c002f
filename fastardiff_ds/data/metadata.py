"""Sample counts of img2dataset shards: ``sizes.json``, ``{shard}_stats.json``, ``{shard}.parquet``, tar scan.

img2dataset (rom1504/img2dataset, downloader.py / logger.py / writer.py) writes per shard
``{shard:05d}.tar`` (successful samples only), ``{shard:05d}.parquet`` (one row per input url, failed
ones included, column ``status`` in success / failed_to_download / failed_to_resize) and, once the shard
is finished, ``{shard:05d}_stats.json`` with keys count, successes, failed_to_download,
failed_to_resize, duration, start_time, end_time, status_dict. An interrupted download leaves a tar
(possibly cut short) with no stats and no (or an unreadable, footer-less) parquet.

One shard's count comes from, in order (the first that is present and readable):
  1. ``sizes.json`` in the shard's folder (open_clip / webdataset convention, {basename: count});
  2. ``_stats.json`` "successes";
  3. the parquet: rows with status == "success" (all rows when there is no status column);
  4. a scan of the tar's headers (`shards.scan_tar`): the complete samples before any cut, exactly what
     the loader will read -- with a warning naming the shard, since this is an unfinished download.
Unreadable metadata files are warned about and skipped, never raised. Resampled mode needs no exact
counts: `count_samples(resampled=True)` reads metadata only and estimates the rest (see there).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from fastardiff_ds.data.shards import scan_tar

log = logging.getLogger(__name__)


def _stem(shard: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if shard.endswith(suffix):
            return shard[: -len(suffix)]
    return os.path.splitext(shard)[0]


@dataclass
class ShardCount:
    """Samples of one shard and where the number came from ("sizes.json", "stats", "parquet", "tar scan")."""

    shard: str
    samples: int
    source: str


def read_parquet(shards_or_paths: list[str]) -> pa.Table:
    """Concatenate img2dataset parquet files (given directly, or the ``.parquet`` beside each shard)."""
    paths = [p if p.endswith(".parquet") else _stem(p) + ".parquet" for p in shards_or_paths]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} parquet files missing, e.g. {missing[0]!r}")
    return pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")


def parquet_successes(path: str) -> int:
    """Rows of one img2dataset parquet whose status is 'success' (all rows if there is no status)."""
    schema = pq.read_schema(path)
    if "status" not in schema.names:
        return pq.ParquetFile(path).metadata.num_rows
    return pq.read_table(path, columns=["status"]).column("status").to_pylist().count("success")


def read_stats(shard: str) -> dict | None:
    """The ``{shard}_stats.json`` dict img2dataset writes (count, successes, ...), or None if absent.

    Raises ValueError naming the file when it exists but is not a JSON object.
    """
    path = _stem(shard) + "_stats.json"
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable img2dataset stats ({type(e).__name__}: {e})") from None
    if not isinstance(stats, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(stats).__name__}")
    return stats


def _sizes_json(folder: str, cache: dict) -> dict:
    if folder not in cache:
        path, sizes = os.path.join(folder, "sizes.json"), {}
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    sizes = json.load(f)
                if not isinstance(sizes, dict):
                    raise ValueError(f"expected an object, got {type(sizes).__name__}")
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable %s (%s); counting shards from their own metadata", path, e)
                sizes = {}
        cache[folder] = sizes
    return cache[folder]


def _from_metadata(shard: str) -> ShardCount | None:
    """Count from ``_stats.json`` or the parquet; None when neither is present and readable."""
    try:
        stats = read_stats(shard)
        if stats is not None and isinstance(stats.get("successes"), int):
            return ShardCount(shard, stats["successes"], "stats")
        if stats is not None:
            log.warning("%s_stats.json has no integer 'successes'; trying the parquet", _stem(shard))
    except ValueError as e:
        log.warning("%s; trying the parquet", e)
    path = _stem(shard) + ".parquet"
    if os.path.isfile(path):
        try:
            return ShardCount(shard, parquet_successes(path), "parquet")
        except (OSError, pa.ArrowException) as e:  # a download killed mid-shard leaves a parquet without footer
            log.warning("unreadable parquet %s (%s: %s)", path, type(e).__name__, e)
    return None


def shard_count(shard: str, *, cache: dict | None = None, use_sizes_json: bool = True,
                scan: bool = True) -> ShardCount | None:
    """Samples in one shard (see the module docstring for the order); None only when `scan` is False and
    the shard has no readable metadata."""
    if use_sizes_json:
        sizes = _sizes_json(os.path.dirname(os.path.abspath(shard)), {} if cache is None else cache)
        n = sizes.get(os.path.basename(shard))
        if isinstance(n, int) and n >= 0:
            return ShardCount(shard, n, "sizes.json")
    found = _from_metadata(shard)
    if found is not None or not scan:
        return found
    res = scan_tar(shard)
    cut = f"; the tar is cut short ({res.error}), samples before the cut are used" if res.truncated else ""
    log.warning("shard %s has no _stats.json or readable parquet (an unfinished img2dataset download?): "
                "counted %d complete samples by scanning the tar%s", shard, res.samples, cut)
    return ShardCount(shard, res.samples, "tar scan")


def count_samples(shards: list[str], resampled: bool = False) -> int:
    """Total samples over `shards` (see `shard_count`).

    resampled=True reads metadata only (no tar is scanned but one): shards without metadata are estimated at
    the mean of those with it; with no metadata at all, at the first shard's scanned size. The result only
    sets how many batches make an "epoch" of a with-replacement stream.
    """
    cache: dict = {}
    if not resampled:
        return sum(shard_count(s, cache=cache).samples for s in shards)
    known = [c.samples for s in shards if (c := shard_count(s, cache=cache, scan=False)) is not None]
    if len(known) == len(shards):
        return sum(known)
    per_shard = sum(known) / len(known) if known else scan_tar(shards[0]).samples
    total = sum(known) + round(per_shard * (len(shards) - len(known)))
    log.warning("resampled stream: %d of %d shards have no sample counts; epoch length estimated at %d samples "
                "(set data.samples_per_epoch to fix it)", len(shards) - len(known), len(shards), total)
    return total


def write_sizes_json(folder: str) -> dict[str, int]:
    """Write ``sizes.json`` ({shard basename: count}) for every ``*.tar`` in `folder`.

    Counts come from each shard's stats / parquet, or a scan of its tar when both are missing or unreadable
    (an existing sizes.json is not trusted). Raises ValueError naming `folder` when it holds no tar.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"write_sizes_json: {folder!r} is not a directory (pass the folder holding the *.tar shards)")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
    if not names:
        raise ValueError(f"write_sizes_json: no *.tar shards in {folder!r}")
    counts = [shard_count(os.path.join(folder, n), use_sizes_json=False) for n in names]
    sizes = {n: c.samples for n, c in zip(names, counts)}
    path = os.path.join(folder, "sizes.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    by_source = {s: sum(c.source == s for c in counts) for s in ("stats", "parquet", "tar scan")}
    log.info("wrote %s: %d shards, %d samples (shards counted by source: %s)", path, len(sizes),
             sum(sizes.values()), by_source)
    return sizes


def main(argv: list[str] | None = None) -> int:
    """``python -m fastardiff_ds.data.metadata FOLDER``: write FOLDER/sizes.json, print it as JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m fastardiff_ds.data.metadata SHARD_FOLDER   (writes SHARD_FOLDER/sizes.json)")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        sizes = write_sizes_json(argv[0])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"shards": len(sizes), "samples": sum(sizes.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
