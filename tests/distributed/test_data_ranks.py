"""Two gloo ranks x two loader workers: disjoint shards and equal batch counts, with a collective per batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastardiff_ds.data import DataConfig, build_loader
from fastardiff_ds.data.synthetic import write_shapes_dataset


def word_ids(text: str) -> list[int]:
    return [len(w) + 1 for w in text.split()]


def _worker(rank: int, world: int, port: int, shards: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    cfg = DataConfig(shards=shards, resolution=32, batch_size=3, num_workers=2, shuffle_buffer=6, seed=5)
    loader = build_loader(cfg, rank=rank, world_size=world, tokenize=word_ids, pad_id=0)
    keys, steps = [], torch.zeros(1)
    for batch in loader:  # a collective every step: unequal batch counts would hang / fail here
        alive = torch.ones(1)
        dist.all_reduce(alive)
        assert alive.item() == world
        keys += batch["keys"]
        steps += 1
    gathered = [None] * world
    dist.all_gather_object(gathered, (int(steps.item()), keys))
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_ranks_disjoint_equal(tmp_path):
    write_shapes_dataset(str(tmp_path / "d"), num_samples=48, shard_size=6, resolution=32, seed=1)  # 8 shards, 2 per reader
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(2, port, str(tmp_path / "d"), out), nprocs=2, join=True)
    (n0, k0), (n1, k1) = torch.load(out)
    assert n0 == n1 == 48 // 6
    assert {k[:5] for k in k0}.isdisjoint({k[:5] for k in k1})
    assert len(set(k0)) == len(k0) == 24 and len(set(k1)) == len(k1) == 24  # whole set, once
