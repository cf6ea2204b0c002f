"""Fixture generator: a folder shaped like `img2dataset --output_format webdataset` output.

Written from img2dataset's own code (rom1504/img2dataset @ 95523bc), independently of
fastardiff_ds.data.writer:
- downloader.py `compute_key`: key = shard_id * 10**oom_sample + index, zero-padded to oom_sample + 5
  digits (oom_sample = ceil(log10(number_sample_per_shard))); the index counts every input url, failed
  ones included, and samples complete in any order (a thread pool's imap_unordered).
- writer.py `WebDatasetSampleWriter`: webdataset's TarWriter (stream mode "w|", USTAR, members of a sample
  in sorted extension order jpg/json/txt, mode 0o444, user/group "bigdata", mtime = time.time());
  ``KEY.json`` = json.dumps(meta, indent=4); only successes go to the tar, every url gets a parquet row
  (BufferedParquetWriter, 100-row batches).
- downloader.py schema: the input columns (url, caption) + key, status, error_message, width, height,
  original_width, original_height (int32), exif, sha256 (sha256 of the downloaded bytes, before resizing).
- logger.py `write_stats`: ``{shard}_stats.json`` = {count, successes, failed_to_download,
  failed_to_resize, duration, start_time, end_time, status_dict} with indent=4, written last.
An interrupted download leaves the shard's tar cut short and no stats (`cut_shard`), with no parquet or
with one whose footer was never written (`footerless_parquet`).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                    ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
                    ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
                    ("exif", pa.string()), ("sha256", pa.string())])


def _image(rng: random.Random, size: tuple[int, int]) -> tuple[bytes, str]:
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    img = Image.new("RGB", size, (245, 245, 245))
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(box, fill=COLORS[color])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), f"a photo of a {color} {shape}"


def _key(shard: int, index: int, per_shard: int) -> str:
    oom = math.ceil(math.log10(per_shard))
    return f"{shard * 10**oom + index:0{oom + 5}d}"


def _add(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    for ext in sorted(members):  # webdataset TarWriter.write: sorted(obj.keys())
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(members[ext]), time.time(), 0o444, "bigdata", "bigdata"
        tar.addfile(info, io.BytesIO(members[ext]))


def _shard(out: str, shard: int, per_shard: int, rng: random.Random, failed_every: int) -> dict:
    """Write one finished shard; returns {"successes", "count", "keys", "offsets"} (tar offset of each sample)."""
    t0, rows, keys, offsets, status = time.time(), [], [], [], {}
    order = list(range(per_shard))
    rng.shuffle(order)  # completion order of the download threads
    with open(os.path.join(out, f"{shard:05d}.tar"), "wb") as fd, tarfile.open(fileobj=fd, mode="w|",
                                                                                format=tarfile.USTAR_FORMAT) as tar:
        for i in order:
            key, url = _key(shard, i, per_shard), f"https://example.com/img/{shard}/{i}.jpg"
            size = (rng.randint(36, 60), rng.randint(36, 60))
            data, caption = _image(rng, size)
            meta = {"url": url, "caption": caption, "key": key, "status": None, "error_message": None,
                    "width": None, "height": None, "original_width": None, "original_height": None,
                    "exif": None, "sha256": None}
            if failed_every and i % failed_every == failed_every - 1:
                err = "HTTP Error 404: Not Found" if i % 2 else "image decoding error"
                meta.update(status="failed_to_download" if i % 2 else "failed_to_resize", error_message=err)
                status[err] = status.get(err, 0) + 1
            else:
                meta.update(status="success", width=size[0], height=size[1], original_width=size[0],
                            original_height=size[1], exif=json.dumps({}), sha256=hashlib.sha256(data).hexdigest())
                status["success"] = status.get("success", 0) + 1
                offsets.append(tar.offset)  # archive offset of the sample's first header
                _add(tar, key, {"jpg": data, "txt": caption.encode("utf-8"), "json": json.dumps(meta, indent=4).encode()})
                keys.append(key)
            rows.append(meta)
    return {"rows": rows, "keys": keys, "offsets": offsets, "status": status, "t0": t0}


def _parquet(path: str, rows: list[dict]) -> None:
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for i in range(0, len(rows), 100):  # BufferedParquetWriter flushes every 100 rows
            writer.write_table(pa.Table.from_pylist(rows[i:i + 100], schema=SCHEMA))


def write_img2dataset_output(out: str, n_shards: int = 4, per_shard: int = 12, failed_every: int = 5,
                             cut_shard: int | None = None, cut_after: int = 3, footerless_parquet: bool = False,
                             seed: int = 0) -> dict:
    """Write `n_shards` shards of `per_shard` urls each (every `failed_every`-th url fails, half of them to
    download, half to resize). Shard `cut_shard` is interrupted: its tar is cut in the middle of the image
    of its sample number `cut_after` (so exactly `cut_after` complete samples remain), it has no stats and
    no parquet (or a footer-less one). Returns {"usable": {tar name: complete samples}, "keys": {...},
    "successes": {tar name: successes written}}.
    """
    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    usable, keys, successes = {}, {}, {}
    for shard in range(n_shards):
        name, stem = f"{shard:05d}.tar", os.path.join(out, f"{shard:05d}")
        res = _shard(out, shard, per_shard, rng, failed_every)
        successes[name] = len(res["keys"])
        if shard == cut_shard:
            blob = open(stem + ".tar", "rb").read()
            cut = res["offsets"][cut_after] + 512 + 100  # past the jpg's header, inside its data
            open(stem + ".tar", "wb").write(blob[:cut])
            usable[name], keys[name] = cut_after, res["keys"][:cut_after]
            if footerless_parquet:  # ParquetWriter opened, some row groups flushed, never closed
                _parquet(stem + ".parquet", res["rows"])
                data = open(stem + ".parquet", "rb").read()
                open(stem + ".parquet", "wb").write(data[: len(data) // 2])
            continue
        _parquet(stem + ".parquet", res["rows"])
        t1 = time.time()
        stats = {"count": per_shard, "successes": len(res["keys"]),
                 "failed_to_download": sum(r["status"] == "failed_to_download" for r in res["rows"]),
                 "failed_to_resize": sum(r["status"] == "failed_to_resize" for r in res["rows"]),
                 "duration": t1 - res["t0"], "start_time": res["t0"], "end_time": t1, "status_dict": res["status"]}
        with open(stem + "_stats.json", "w") as f:
            json.dump(stats, f, indent=4)
        usable[name], keys[name] = len(res["keys"]), res["keys"]
    return {"usable": usable, "keys": keys, "successes": successes}
