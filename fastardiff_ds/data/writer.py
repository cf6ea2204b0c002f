"""Write shards in img2dataset's webdataset layout, byte-deterministically.

Per shard: ``{shard:05d}.tar`` (``KEY.<ext>`` members, KEY = shard id + sample index),
``{shard:05d}.parquet`` (one row per sample: img2dataset's columns plus extras) and
``{shard:05d}_stats.json`` (count, successes, failed_to_download, failed_to_resize, duration,
start_time, end_time, status_dict). `finish_dataset` adds ``sizes.json``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from fastardiff_ds.data.metadata import write_sizes_json

# img2dataset's per-sample JSON / parquet keys (img2dataset/writer.py, README "Output format")
I2D_KEYS = ("url", "caption", "key", "status", "error_message", "width", "height",
            "original_width", "original_height", "exif", "sha256")


def sample_key(shard: int, index: int, shard_size: int) -> str:
    """img2dataset key: 5-digit shard id then the index padded to the digits of shard_size - 1 (>= 4)."""
    digits = max(4, len(str(max(shard_size - 1, 0))))
    return f"{shard:05d}{index:0{digits}d}"


class ShardWriter:
    """Collects samples of one shard; `close()` writes tar, parquet and stats atomically-ish."""

    def __init__(self, out_dir: str, shard: int):
        self.out_dir, self.shard = out_dir, shard
        self.stem = os.path.join(out_dir, f"{shard:05d}")
        self._tmp = self.stem + ".tar.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.rows: list[dict] = []
        self.failed = 0
        self.t0 = time.time()

    def add(self, key: str, members: dict[str, bytes], meta: dict, extra_columns: dict | None = None) -> None:
        """Write ``key.<ext>`` for each member (in the given order) and one parquet row."""
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        row = {k: meta.get(k) for k in I2D_KEYS}
        row.update(extra_columns or {})
        self.rows.append(row)

    def close(self) -> dict:
        """Finish the tar (renamed into place last), write parquet + stats; returns the stats dict."""
        self._tar.close()
        table = pa.Table.from_pylist(self.rows) if self.rows else pa.table({k: pa.array([], pa.string()) for k in I2D_KEYS})
        pq.write_table(table, self.stem + ".parquet")
        t1 = time.time()
        n = len(self.rows)
        stats = {"count": n + self.failed, "successes": n, "failed_to_download": 0, "failed_to_resize": self.failed,
                 "duration": t1 - self.t0, "start_time": self.t0, "end_time": t1,
                 "status_dict": {"success": n, **({"failed_to_resize": self.failed} if self.failed else {})}}
        with open(self.stem + "_stats.json", "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=4)
        os.replace(self._tmp, self.stem + ".tar")
        return stats


def i2d_meta(key: str, caption: str, width: int, height: int, payload: bytes) -> dict:
    """img2dataset's per-sample metadata for a locally generated image (no url)."""
    return {"url": None, "caption": caption, "key": key, "status": "success", "error_message": None,
            "width": width, "height": height, "original_width": width, "original_height": height,
            "exif": None, "sha256": hashlib.sha256(payload).hexdigest()}


def finish_dataset(out_dir: str) -> dict[str, int]:
    """Write ``sizes.json`` for all finished shards in `out_dir`."""
    return write_sizes_json(out_dir)
