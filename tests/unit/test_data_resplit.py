"""The data cursor across a change of world size: the interrupted epoch continues on the new ranks with no
sample seen twice and none skipped (resplit.py's rule), captions (text dropout) as the old readers drew them."""
from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest

from fastardiff_ds.data import DataConfig, build_loader
from fastardiff_ds.data.synthetic import write_shapes_dataset


def tok(text: str) -> list[int]:
    return [len(w) + 1 for w in text.split()]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_resplit")
    write_shapes_dataset(str(out), num_samples=80, shard_size=10, resolution=32, seed=0)
    return str(out)


def loader(shapes_dir, rank, world, workers=0, **kw):
    kw = {"batch_size": 4, **kw}
    cfg = DataConfig(shards=shapes_dir, resolution=32, num_workers=workers, shuffle_buffer=8,
                     drop_text_prob=0.5, max_text_len=6, seed=3, samples_per_epoch=80, **kw)
    return build_loader(cfg, rank=rank, world_size=world, tokenize=tok, pad_id=0)


def pairs(batches) -> list[tuple[str, str]]:
    return [(k, c) for b in batches for k, c in zip(b["keys"], b["captions"])]


def interrupted(shapes_dir, world, n, workers=0, **kw):
    """Each of ``world`` ranks reads ``n`` batches of epoch 0, then stops: (what was read, saved states)."""
    read, states = [], []
    for r in range(world):
        ld = loader(shapes_dir, r, world, workers, **kw)
        read += pairs(islice(iter(ld), n))
        states.append(ld.state_dict())
    return read, states


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_to_one_continue_the_epoch_exactly(shapes_dir, workers):
    ref = [p for r in range(2) for p in pairs(loader(shapes_dir, r, 2, workers))]  # the uninterrupted epoch
    read, states = interrupted(shapes_dir, 2, 3, workers)
    new = loader(shapes_dir, 0, 1, workers)
    new.resume_from(states)
    rest = pairs(new)
    assert Counter(read + rest) == Counter(ref) and len(ref) == 80  # same samples, same captions, once each
    assert new.state.epoch == 1 and new.state.carry is None  # the epoch closed normally
    assert len(list(new)) == 20  # and the next one is a full epoch on 1 rank


def test_one_rank_to_two_continue_the_epoch_exactly(shapes_dir):
    ref = pairs(loader(shapes_dir, 0, 1))
    read, states = interrupted(shapes_dir, 1, 4)
    rest = []
    for r in range(2):
        new = loader(shapes_dir, r, 2)
        new.resume_from(states)
        got = list(new)
        assert len(got) == 8  # 16 batches owed, 8 per new rank: every rank runs the same count
        rest += pairs(got)
    assert Counter(read + rest) == Counter(ref) and len(ref) == 80


def test_global_batch_kept_when_the_world_shrinks(shapes_dir):
    ref = [p for r in range(2) for p in pairs(loader(shapes_dir, r, 2, batch_size=2))]
    read, states = interrupted(shapes_dir, 2, 3, batch_size=2)  # 2 ranks x 2 samples
    new = loader(shapes_dir, 0, 1, batch_size=4)  # 1 rank x 4 samples: the same global batch
    new.resume_from(states)
    got = list(new)
    assert len(got) == 17 and Counter(read + pairs(got)) == Counter(ref)


def test_continued_epoch_survives_another_restart_on_the_same_size(shapes_dir):
    ref = [p for r in range(2) for p in pairs(loader(shapes_dir, r, 2))]
    read, states = interrupted(shapes_dir, 2, 3)
    first = loader(shapes_dir, 0, 1)
    first.resume_from(states)
    read += pairs(islice(iter(first), 5))
    again = loader(shapes_dir, 0, 1)
    again.resume_from([first.state_dict()])  # same world size: its own state, carry included
    assert Counter(read + pairs(again)) == Counter(ref)


def test_a_continued_epoch_re_splits_again(shapes_dir):
    """2 ranks -> 1 (reads 5 batches) -> 2 ranks: the continued streams are split once more."""
    ref = [p for r in range(2) for p in pairs(loader(shapes_dir, r, 2))]
    read, states = interrupted(shapes_dir, 2, 3)
    one = loader(shapes_dir, 0, 1)
    one.resume_from(states)
    read += pairs(islice(iter(one), 5))
    rest = []
    for r in range(2):
        two = loader(shapes_dir, r, 2)
        two.resume_from([one.state_dict()])
        got = list(two)
        assert len(got) == 4  # (80 - 24 - 20) samples = 36: 4 full batches of 4 per rank, 4 samples dropped
        rest += pairs(got)
    seen = Counter(read + rest)
    assert max(seen.values()) == 1 and not set(seen) - set(ref) and len(ref) - len(seen) == 4


def test_resampled_mode_continues_the_count(shapes_dir):
    states = []
    for r in range(2):
        ld = loader(shapes_dir, r, 2, resampled=True)
        list(islice(iter(ld), 3))
        states.append(ld.state_dict())
    new = loader(shapes_dir, 0, 1, resampled=True)
    new.resume_from(states)
    assert len(list(new)) == 20 - 6  # 24 samples consumed = 6 batches of the 1-rank epoch


def test_ratio_that_does_not_divide_closes_the_epoch_with_a_warning(shapes_dir, caplog):
    _, states = interrupted(shapes_dir, 2, 2)
    new = loader(shapes_dir, 0, 3, workers=0, shuffle_shards=True)
    with caplog.at_level("WARNING"):
        new.resume_from(states)
    assert new.state.epoch == 1 and "closing epoch 0" in caplog.text
