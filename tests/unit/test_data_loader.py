"""Streaming loader: batch contract, rank/worker splitting, equal batch counts, resume, latents."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from fastardiff_ds.data import DataConfig, LoaderState, build_loader
from fastardiff_ds.data.latents import encode_shards
from fastardiff_ds.data.shards import expand_shards
from fastardiff_ds.data.synthetic import write_shapes_dataset


def tok(text: str) -> list[int]:
    return [len(w) + 1 for w in text.split()]  # one id per word, never the pad id 0


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(str(out), num_samples=80, shard_size=10, resolution=64, seed=0)
    return str(out)


def cfg_for(shards, **kw) -> DataConfig:
    base = dict(shards=shards, resolution=32, batch_size=4, num_workers=2, shuffle_buffer=8,
                drop_text_prob=0.0, max_text_len=6, seed=1)
    return DataConfig(**{**base, **kw})


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_batch_contract(shapes_dir):
    loader = build_loader(cfg_for(shapes_dir, num_workers=0), rank=0, world_size=1, tokenize=tok, pad_id=0)
    batch = next(iter(loader))
    assert batch["pixels"].shape == (4, 3, 32, 32) and batch["pixels"].dtype == torch.float32
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1 and batch["pixels"].std() > 0.1
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 6)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["labels"].shape == (4,) and len(batch["captions"]) == len(batch["keys"]) == 4
    for ids, mask, cap in zip(batch["input_ids"], batch["attention_mask"], batch["captions"]):
        want = tok(cap)[:6]  # truncation keeps the first tokens; padding is on the left
        n = len(want)
        assert ids[6 - n:].tolist() == want and mask.tolist() == [0] * (6 - n) + [1] * n
        assert ids[: 6 - n].eq(0).all()


def test_text_dropout_rate_and_empty_caption(shapes_dir):
    cfg = cfg_for(shapes_dir, drop_text_prob=0.3, batch_size=8, num_workers=0, max_text_len=16)
    caps = [c for b in build_loader(cfg, rank=0, world_size=1, tokenize=tok, pad_id=0) for c in b["captions"]]
    dropped = sum(c == "" for c in caps)
    assert len(caps) == 80 and 12 <= dropped <= 36  # binomial(80, 0.3): mean 24, sd 4.1 -> 3 sd
    cfg.drop_text_prob = 1.0
    b = next(iter(build_loader(cfg, rank=0, world_size=1, tokenize=tok, pad_id=0)))
    assert b["captions"] == [""] * 8 and b["attention_mask"].sum() == 0


def test_two_ranks_two_workers_disjoint_and_equal(shapes_dir):
    per_rank = []
    for rank in (0, 1):
        loader = build_loader(cfg_for(shapes_dir), rank=rank, world_size=2, tokenize=tok, pad_id=0)
        batches = list(loader)
        assert len(batches) == len(loader) == 10
        per_rank.append(keys_of(batches))
    shards = [{k[:5] for k in keys} for keys in per_rank]
    assert shards[0].isdisjoint(shards[1]) and len(shards[0]) == len(shards[1]) == 4
    assert len(set(per_rank[0]) | set(per_rank[1])) == 80  # one epoch covers the set exactly once


def test_equal_batch_counts_with_unequal_shards(tmp_path):
    write_shapes_dataset(str(tmp_path), num_samples=47, shard_size=9, resolution=32, seed=2)  # 9,9,9,9,9,2
    counts = []
    for rank in (0, 1, 2):
        loader = build_loader(cfg_for(str(tmp_path), num_workers=2, batch_size=3), rank=rank, world_size=3,
                              tokenize=tok, pad_id=0)
        counts.append(sum(1 for _ in loader))
    assert counts == [5, 5, 5]  # 47 // (3 * 3)


def test_epochs_reshuffle_and_state_advances(shapes_dir):
    loader = build_loader(cfg_for(shapes_dir), rank=0, world_size=1, tokenize=tok, pad_id=0)
    e0, e1 = keys_of(loader), keys_of(loader)
    assert sorted(e0) == sorted(e1) and e0 != e1 and loader.state.epoch == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_without_repeats(shapes_dir, workers):
    cfg = cfg_for(shapes_dir, num_workers=workers, drop_text_prob=0.5)
    full = list(build_loader(cfg, rank=0, world_size=1, tokenize=tok, pad_id=0))
    first = build_loader(cfg, rank=0, world_size=1, tokenize=tok, pad_id=0)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = first.state_dict()
    del it
    assert state["batches_consumed"] == 7 and state["samples_consumed"] == 28
    resumed = build_loader(cfg, rank=0, world_size=1, tokenize=tok, pad_id=0, state=LoaderState.from_dict(state))
    tail = list(resumed)
    assert len(tail) == len(full) - 7 and resumed.state.epoch == 1
    got = keys_of(head) + keys_of(tail)
    assert sorted(got) == sorted(keys_of(full)) and len(set(got)) == 80
    if workers == 0:
        assert got == keys_of(full)
    drop = {k: c for b in full for k, c in zip(b["keys"], b["captions"])}
    assert all(drop[k] == c for b in tail for k, c in zip(b["keys"], b["captions"]))  # same dropout draws


def test_resampled_mode_counts_and_resume(shapes_dir):
    cfg = cfg_for(shapes_dir, resampled=True, samples_per_epoch=64)
    loader = build_loader(cfg, rank=1, world_size=4, tokenize=tok, pad_id=0)  # 4 ranks x 2 workers > shards? fine
    it = iter(loader)
    [next(it) for _ in range(2)]
    del it
    resumed = build_loader(cfg, rank=1, world_size=4, tokenize=tok, pad_id=0, state=loader.state_dict())
    assert len(list(resumed)) == 64 // 16 - 2 and resumed.state.epoch == 1


def test_more_ranks_than_shards(shapes_dir):
    shards = expand_shards(shapes_dir)[:3]
    with pytest.raises(ValueError, match="3 shards .* world_size=4"):
        build_loader(cfg_for(shards, num_workers=1), rank=0, world_size=4, tokenize=tok, pad_id=0)
    loader = build_loader(cfg_for(shards, num_workers=1, resampled=True), rank=3, world_size=4, tokenize=tok, pad_id=0)
    assert sum(1 for _ in loader) == 30 // 16


def test_latent_shards_round_trip(shapes_dir, tmp_path):
    class TinyEncoder:  # stand-in VAE: 4x average pool + fixed 1x1 conv to 4 channels
        weight = torch.linspace(-1, 1, 12).reshape(4, 3, 1, 1)

        def encode(self, pixels):  # (B,3,H,W) -> (B,4,H/4,W/4)
            return torch.nn.functional.conv2d(torch.nn.functional.avg_pool2d(pixels, 4), self.weight)

    enc = TinyEncoder()
    shards = expand_shards(shapes_dir)[:2]
    out = encode_shards(shards, str(tmp_path), enc, resolution=32, batch_size=6, dtype="float32")
    assert out == {"samples": 20, "skipped": {}}
    lat_cfg = cfg_for(str(tmp_path), kind="latents", num_workers=0, shuffle_buffer=0, shuffle_shards=False)
    pix_cfg = cfg_for(shards, num_workers=0, shuffle_buffer=0, shuffle_shards=False)
    lat = list(build_loader(lat_cfg, rank=0, world_size=1, tokenize=tok, pad_id=0))
    pix = list(build_loader(pix_cfg, rank=0, world_size=1, tokenize=tok, pad_id=0, image_transform=enc.encode))
    assert keys_of(lat) == keys_of(pix) and lat[0]["latents"].shape == (4, 4, 8, 8) and "pixels" not in lat[0]
    for a, b in zip(lat, pix):
        torch.testing.assert_close(a["latents"], b["latents"], rtol=1e-5, atol=1e-5)
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_encode_latents_cli_uses_the_lead_vae_lazily(shapes_dir, tmp_path, monkeypatch):
    import data_pipelines.encode_latents as cli

    seen = {}

    class FakeVAE:
        def encode(self, pixels):
            return pixels[:, :, ::8, ::8]

    monkeypatch.setattr(cli, "load_vae", lambda path, preset, device: seen.update(path=path) or FakeVAE())
    res = cli.main(["--shards", expand_shards(shapes_dir)[0], "--out", str(tmp_path), "--vae", "/x/vae",
                    "--resolution", "32", "--preset", "tiny"])
    assert seen["path"] == "/x/vae" and res["samples"] == 10 and (tmp_path / "00000.tar").exists()


def test_skip_counts_reach_the_main_process(shapes_dir, tmp_path):
    import shutil

    d = tmp_path / "mixed"
    shutil.copytree(shapes_dir, d)
    (d / "00003.tar").write_bytes((d / "00003.tar").read_bytes()[:5000])  # truncate one shard
    loader = build_loader(cfg_for(str(d)), rank=0, world_size=1, tokenize=tok, pad_id=0)
    assert sum(1 for _ in loader) == 20  # sizes.json still says 80: the short reader starts another pass
    assert Counter(loader.skipped)["truncated_tar"] >= 1
