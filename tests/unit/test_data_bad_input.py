"""Bad input never crashes and is never silent: skipped, counted by reason, logged with its key."""
from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from fastardiff_ds.data import DataConfig, build_loader
from fastardiff_ds.data.shards import SkipCounter, expand_shards, iter_tar


def tok(text):
    return [len(w) + 1 for w in text.split()]


def img_bytes(mode: str, size=(40, 40), fmt="JPEG") -> bytes:
    color = {"L": 90, "RGBA": (200, 10, 10, 128), "CMYK": (0, 255, 255, 0), "RGB": (10, 200, 10), "P": 3}[mode]
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


GOOD = {"jpg": img_bytes("RGB"), "txt": b"a photo of a square", "json": json.dumps({"label": 3}).encode()}
BAD = [
    ("corrupt_jpeg", {"jpg": img_bytes("RGB")[:200], "txt": b"x"}, "decode_error"),
    ("garbage_jpeg", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"x"}, "decode_error"),
    ("no_txt", {"jpg": img_bytes("RGB")}, "missing_txt"),
    ("empty_caption", {"jpg": img_bytes("RGB"), "txt": b"  \n"}, "empty_caption"),
    ("no_image", {"txt": b"a caption"}, "missing_image"),
    ("tiny", {"jpg": img_bytes("RGB", (5, 40)), "txt": b"x"}, "too_small"),
    ("bad_json", {"jpg": img_bytes("RGB"), "txt": b"x", "json": b"{nope"}, "bad_json"),
]
ODD_MODES = [("gray", {"jpg": img_bytes("L"), "txt": b"grey"}), ("rgba", {"png": img_bytes("RGBA", fmt="PNG"), "txt": b"a"}),
             ("cmyk", {"jpg": img_bytes("CMYK"), "txt": b"c"}), ("pal", {"png": img_bytes("P", fmt="PNG"), "txt": b"p"})]


@pytest.fixture
def messy(tmp_path):
    samples = [(f"good{i}", GOOD) for i in range(4)] + [(k, m) for k, m, _ in BAD] + ODD_MODES
    write_tar(tmp_path / "00000.tar", samples)
    write_tar(tmp_path / "00001.tar", [(f"more{i}", GOOD) for i in range(6)])
    full = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(full[: len(full) // 2 + 100])  # truncated mid-member
    return tmp_path


def test_each_bad_sample_is_skipped_counted_and_logged(messy, caplog):
    cfg = DataConfig(shards=str(messy / "00000.tar"), resolution=16, batch_size=8, num_workers=0,
                     shuffle_buffer=0, shuffle_shards=False, samples_per_epoch=8, min_image_size=8, drop_text_prob=0)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(build_loader(cfg, rank=0, world_size=1, tokenize=tok, pad_id=0)))
    assert batch["keys"] == [f"good{i}" for i in range(4)] + ["gray", "rgba", "cmyk", "pal"]
    px = batch["pixels"]
    assert px.shape == (8, 3, 16, 16) and px.min() >= -1 and px.max() <= 1
    assert (px[4, 0] == px[4, 1]).all() and (px[4, 1] == px[4, 2]).all()  # grey -> equal channels
    assert px[5, 0].mean() > px[5, 1].mean()  # RGBA red over white stays reddish
    assert "labels" not in batch  # only some samples carry a label
    loader_skips = {}
    for rec in caplog.records:
        for key, _, reason in BAD:
            if repr(key) in rec.getMessage() and reason in rec.getMessage():
                loader_skips[key] = reason
    assert loader_skips == {k: r for k, _, r in BAD}


def test_truncated_tar_keeps_complete_samples(messy):
    skips = SkipCounter()
    keys = [s["__key__"] for s in iter_tar(str(messy / "00001.tar"), skips)]
    assert len(keys) >= 1 and len(keys) < 6 and keys == [f"more{i}" for i in range(len(keys))]
    assert skips.counts == {"truncated_tar": 1}
    (messy / "empty.tar").write_bytes(b"")
    assert list(iter_tar(str(messy / "empty.tar"), skips)) == [] and skips.counts["truncated_tar"] == 2


def test_counts_by_reason_over_an_epoch(messy):
    cfg = DataConfig(shards=str(messy), resolution=16, batch_size=2, num_workers=2, shuffle_buffer=4,
                     samples_per_epoch=24, min_image_size=8)
    loader = build_loader(cfg, rank=0, world_size=1, tokenize=tok, pad_id=0)
    assert sum(1 for _ in loader) == 12  # the messy shard's reader (8 good / pass) goes through it twice
    assert loader.skipped["truncated_tar"] >= 1 and loader.skipped["decode_error"] >= 2
    for _, _, reason in BAD:
        assert loader.skipped[reason] >= 1, reason


@pytest.mark.parametrize("spec,match", [("", "empty shard pattern"), ("/nonexistent/{0..3}.tar", "do not exist"),
                                        ("/nonexistent_dir_xyz/", "do not exist")])
def test_empty_or_missing_pattern_names_it(spec, match):
    with pytest.raises(ValueError, match=match):
        expand_shards(spec)


def test_empty_directory_and_list_file(tmp_path):
    with pytest.raises(ValueError, match="matched no shards"):
        expand_shards(str(tmp_path))
    write_tar(tmp_path / "a.tar", [("k", GOOD)])
    (tmp_path / "list.txt").write_text("# shards\na.tar\n")
    assert expand_shards(str(tmp_path / "list.txt")) == [str(tmp_path / "a.tar")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("resampled", [False, True])
def test_stream_without_usable_samples_is_an_error_naming_the_pattern(tmp_path, resampled):
    write_tar(tmp_path / "00000.tar", [(k, m) for k, m, _ in BAD])  # every sample bad
    write_tar(tmp_path / "00001.tar", [])  # no samples at all
    cfg = DataConfig(shards=str(tmp_path), batch_size=2, num_workers=0, samples_per_epoch=4, resampled=resampled,
                     shuffle_buffer=2)
    with pytest.raises(RuntimeError, match=f"empty stream: shard pattern '{tmp_path}'"):
        next(iter(build_loader(cfg, rank=0, world_size=1, tokenize=tok, pad_id=0)))


def test_bad_latents_are_skipped(tmp_path):
    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    write_tar(tmp_path / "00000.tar", [
        ("ok0", {"latent.npy": npy(np.ones((4, 2, 2), np.float16)), "txt": b"a"}),
        ("nan", {"latent.npy": npy(np.full((4, 2, 2), np.nan, np.float32)), "txt": b"a"}),
        ("cut", {"latent.npy": npy(np.ones((4, 2, 2), np.float32))[:40], "txt": b"a"}),
        ("shape", {"latent.npy": npy(np.ones((4, 3, 3), np.float32)), "txt": b"a"}),
        ("ok1", {"latent.npy": npy(np.zeros((4, 2, 2), np.float32)), "txt": b"a"}),
    ])
    cfg = DataConfig(shards=str(tmp_path), kind="latents", batch_size=2, num_workers=0, shuffle_buffer=0,
                     samples_per_epoch=2)
    loader = build_loader(cfg, rank=0, world_size=1, tokenize=tok, pad_id=0)
    batch = next(iter(loader))
    assert batch["keys"] == ["ok0", "ok1"] and batch["latents"].shape == (2, 4, 2, 2)
    assert loader.skipped == {"bad_latent": 2, "bad_shape": 1}
