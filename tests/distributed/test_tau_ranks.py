"""tau on 2 CPU ranks (gloo): every rank runs the same number of draft forwards (the fewest batches any rank
read), the statistics are pooled over ranks, and a rank without data makes tau -inf everywhere."""
from __future__ import annotations

import math

import pytest
import torch
from test_engines_dist import run_ranks, setup_rank

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _values(rank: int, i: int) -> torch.Tensor:
    return torch.linspace(0.1, 0.9, 6).reshape(2, 3) * (1 + rank) / (2 + i)  # (B=2, N=3)


def _scenarios(rank: int, world: int, port: int, out_dir: str) -> None:
    setup_rank(rank, world, port)
    from fastardiff_ds import engines as E
    from fastardiff_ds.training.tau import measure_tau

    found = {"sum": E.all_reduce(torch.tensor([rank + 1.0])).item(),
             "min": E.all_reduce(torch.tensor([rank + 1.0]), "min").item(),
             "max": E.all_reduce(torch.tensor([rank + 1.0], dtype=torch.float64), "max").item()}
    calls = []

    def entropy(batch):
        calls.append(batch)
        return batch, torch.ones_like(batch, dtype=torch.bool)

    uneven = [_values(rank, i) for i in range(3 if rank == 0 else 1)]  # rank 0: 3 batches, rank 1: 1
    found["uneven"], found["uneven_calls"] = measure_tau(entropy, uneven), len(calls)
    calls.clear()
    found["dry"] = measure_tau(entropy, [] if rank == 1 else [_values(rank, 0)])
    found["dry_calls"] = len(calls)
    torch.save(found, f"{out_dir}/rank_{rank}.pt")
    E.barrier()


def test_tau_forwards_are_equal_across_ranks_and_pooled(tmp_path):
    from fastardiff_ds.losses.entropy import early_stop_threshold

    r0, r1 = run_ranks(_scenarios, tmp_path)
    for r in (r0, r1):
        assert (r["sum"], r["min"], r["max"]) == (3.0, 1.0, 2.0)
        assert r["uneven_calls"] == 1 and r["dry_calls"] == 0  # min over ranks: 1 forward, then none
        assert r["dry"]["tau"] == -math.inf and r["dry"]["rows"] == 0
    pooled = torch.cat([_values(0, 0).reshape(-1), _values(1, 0).reshape(-1)])
    assert r0["uneven"]["tau"] == r1["uneven"]["tau"] == pytest.approx(early_stop_threshold(pooled), abs=1e-12)
    assert r0["uneven"]["rows"] == 12
