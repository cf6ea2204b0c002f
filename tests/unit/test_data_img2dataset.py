"""img2dataset output as it comes (tests/i2d_fixture.py): finished shards with stats + parquet, failed urls,
one interrupted shard (tar cut short, no stats, no or footer-less parquet). Counting, loading, sizes.json."""
from __future__ import annotations

import json
import logging
import os

import pytest
from i2d_fixture import write_img2dataset_output

from fastardiff_ds.data import DataConfig, build_loader
from fastardiff_ds.data.metadata import count_samples, main, shard_count, write_sizes_json
from fastardiff_ds.data.shards import expand_shards, scan_tar


def tok(text: str) -> list[int]:
    return [len(w) + 1 for w in text.split()]


@pytest.fixture
def i2d(tmp_path):
    info = write_img2dataset_output(str(tmp_path / "i2d"), n_shards=4, per_shard=12, cut_shard=2, cut_after=3)
    return tmp_path / "i2d", info


def cfg_for(path, **kw) -> DataConfig:
    base = dict(shards=str(path), resolution=32, batch_size=3, num_workers=0, shuffle_buffer=4,
                drop_text_prob=0.0, max_text_len=8, seed=0)
    return DataConfig(**{**base, **kw})


def test_fixture_has_the_img2dataset_layout(i2d):
    path, info = i2d
    names = sorted(os.listdir(path))
    assert "00002.tar" in names and "00002.parquet" not in names and "00002_stats.json" not in names
    stats = json.loads((path / "00000_stats.json").read_text())
    assert stats["count"] == 12 and stats["successes"] == info["successes"]["00000.tar"] == 10
    assert stats["failed_to_download"] + stats["failed_to_resize"] == 2 and stats["status_dict"]["success"] == 10


def test_counts_from_stats_parquet_and_tar_scan(i2d, caplog):
    path, info = i2d
    shards = expand_shards(str(path))
    with caplog.at_level(logging.WARNING):
        assert count_samples(shards) == sum(info["usable"].values()) == 33  # 10 + 10 + 3 (cut) + 10
    warned = [r.getMessage() for r in caplog.records if "00002.tar" in r.getMessage()]
    assert warned and "scanning the tar" in warned[0] and "cut short" in warned[0]
    assert shard_count(shards[0]).source == "stats"
    os.remove(path / "00001_stats.json")  # parquet rows with status == "success" (failed urls have rows too)
    assert shard_count(shards[1]).samples == 10 and shard_count(shards[1]).source == "parquet"
    assert scan_tar(shards[2]).truncated and scan_tar(shards[3]).samples == 10 and not scan_tar(shards[3]).truncated


def test_unreadable_metadata_falls_back_with_a_warning(tmp_path, caplog):
    path = tmp_path / "d"
    write_img2dataset_output(str(path), n_shards=3, per_shard=12, cut_shard=2, cut_after=4, footerless_parquet=True)
    (path / "00000_stats.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        counts = [shard_count(s) for s in expand_shards(str(path))]
    assert [(c.samples, c.source) for c in counts] == [(10, "parquet"), (10, "stats"), (4, "tar scan")]
    text = caplog.text
    assert "00000_stats.json" in text and "unreadable parquet" in text and "00002.parquet" in text


def test_one_epoch_reads_every_usable_sample_once(i2d, caplog):
    path, info = i2d
    loader = build_loader(cfg_for(path), rank=0, world_size=1, tokenize=tok, pad_id=0)
    assert len(loader) == 33 // 3
    with caplog.at_level(logging.WARNING):
        keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 33
    assert set(keys) == {k for ks in info["keys"].values() for k in ks}  # incl. the 3 before the cut
    assert loader.skipped == {"truncated_tar": 1}
    assert any("truncated_tar" in r.getMessage() and "00002.tar" in r.getMessage() for r in caplog.records)


def test_resampled_needs_no_counts(i2d, caplog):
    path, _ = i2d
    for name in os.listdir(path):
        if name.endswith((".parquet", "_stats.json")):
            os.remove(path / name)
    with caplog.at_level(logging.WARNING):
        loader = build_loader(cfg_for(path, resampled=True), rank=0, world_size=2, tokenize=tok, pad_id=0)
    assert len(loader) >= 1 and "estimated" in caplog.text and "samples_per_epoch" in caplog.text
    assert sum(len(b["keys"]) for b in loader) == 3 * len(loader)
    fixed = build_loader(cfg_for(path, resampled=True, samples_per_epoch=12), rank=0, world_size=2,
                         tokenize=tok, pad_id=0)
    assert len(fixed) == 2


def test_write_sizes_json_never_raises_a_raw_error(i2d, tmp_path):
    path, info = i2d
    assert main([str(path)]) == 0
    sizes = json.loads((path / "sizes.json").read_text())
    assert sizes == info["usable"]
    (path / "sizes.json").write_text(json.dumps({**sizes, "00000.tar": 7}))  # sizes.json is trusted first
    assert count_samples(expand_shards(str(path))) == 33 - 3
    assert write_sizes_json(str(path))["00000.tar"] == 10  # ...but never by write_sizes_json itself
    with pytest.raises(ValueError, match="not a directory"):
        write_sizes_json(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.tar shards"):
        write_sizes_json(str(tmp_path / "empty"))
    assert main([str(tmp_path / "nope")]) == 1
