"""tau (Eq. 10) at the end of a run: its own data pass, equal forwards on every rank, -inf without data."""
from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch

from fastardiff_ds.data import DataConfig, build_loader
from fastardiff_ds.data.synthetic import write_shapes_dataset
from fastardiff_ds.losses.entropy import early_stop_threshold
from fastardiff_ds.training.tau import collect_batches, measure_tau


def tok(text: str) -> list[int]:
    return [len(w) + 1 for w in text.split()]


@pytest.fixture
def loader(tmp_path):
    write_shapes_dataset(str(tmp_path / "d"), num_samples=12, shard_size=6, resolution=32, seed=0)
    cfg = DataConfig(shards=str(tmp_path / "d"), resolution=32, batch_size=4, num_workers=0, shuffle_buffer=2,
                     drop_text_prob=1.0, max_text_len=8)
    return build_loader(cfg, rank=0, world_size=1, tokenize=tok, pad_id=0)


def test_tau_is_eq10_over_the_valid_rows():
    gen = torch.Generator().manual_seed(0)
    batches = [{"e": torch.rand(2, 5, generator=gen), "v": torch.rand(2, 5, generator=gen) > 0.3} for _ in range(3)]
    out = measure_tau(lambda b: (b["e"], b["v"]), batches)
    values = torch.cat([b["e"][b["v"]] for b in batches])
    assert out["tau"] == pytest.approx(early_stop_threshold(values), abs=1e-12)
    assert out["rows"] == values.numel() and out["tau_batches"] == 3
    assert out["shallow_entropy_mean"] == pytest.approx(values.double().mean().item())


def test_a_loader_finished_on_an_epoch_boundary_still_gives_data(loader):
    assert len(list(loader)) == 3  # the whole epoch: the training iterator has nothing left
    state = loader.state_dict()
    batches = collect_batches(loader, 2)
    assert len(batches) == 2 and loader.state_dict() == state  # a fresh pass; the run's loader is untouched
    assert all(c for b in batches for c in b["captions"])  # no text dropout in the tau pass


def test_no_data_gives_minus_inf_with_a_warning(loader, tmp_path, caplog):
    shutil.rmtree(tmp_path / "d")  # the shards are gone by the end of the run
    with caplog.at_level(logging.WARNING):
        batches = collect_batches(loader, 4)
        out = measure_tau(lambda b: (_ for _ in ()).throw(AssertionError("no forward without data")), batches)
    assert batches == [] and out["tau"] == -math.inf and out["rows"] == 0
    assert "could not read training data" in caplog.text and "tau=-inf" in caplog.text
    assert collect_batches(loader, 0) == [] and measure_tau(lambda b: None, [])["tau"] == -math.inf
