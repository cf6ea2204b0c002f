"""data_pipelines tools: the shipped shapes tokenizer, its deterministic training, bench JSON."""
from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from fastardiff_ds.data.synthetic import write_shapes_dataset

ASSET = Path(__file__).resolve().parents[2] / "assets" / "tokenizer" / "shapes_sp.model"
SPECIAL = ["[PAD]", "<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image_placeholder|>"]


def test_shipped_tokenizer_covers_captions_and_specials():
    sp = spm.SentencePieceProcessor(model_file=str(ASSET))
    assert sp.get_piece_size() <= 512
    assert all(sp.piece_to_id(t) != sp.unk_id() for t in SPECIAL)
    assert sp.encode("<|image_area|>32*32<|begin_of_image|>", out_type=str)[1:] == \
        ["<|image_area|>", "3", "2", "*", "3", "2", "<|begin_of_image|>"]
    pieces = sp.encode("a photo of a purple diamond right of a brown circle", out_type=str)
    assert pieces == ["▁a", "▁photo", "▁of", "▁a", "▁purple", "▁diamond", "▁right", "▁of", "▁a", "▁brown", "▁circle"]


def test_tokenizer_training_is_deterministic(tmp_path):
    from data_pipelines.train_tokenizer import train

    a = train(str(tmp_path / "a"), num_captions=3000, vocab_size=400)
    b = train(str(tmp_path / "b"), num_captions=3000, vocab_size=400)
    assert Path(a).read_bytes() == Path(b).read_bytes()


def test_bench_prints_json(tmp_path, capsys):
    from data_pipelines import bench

    write_shapes_dataset(str(tmp_path), num_samples=20, shard_size=10, resolution=32, seed=0)
    res = bench.main(["--shards", str(tmp_path), "--batch-size", "4", "--workers", "0", "--seconds", "0.5",
                      "--resolution", "32", "--shuffle-buffer", "4"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == res["samples"] > 0 and printed["samples_per_s"] > 0 and printed["mb_per_s"] > 0
    assert printed["skipped"] == {}
