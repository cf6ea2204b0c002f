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

    rt = E.Runtime()
    found = {"sum": rt.all_reduce(torch.tensor([rank + 1.0])).item(),
             "min": rt.all_reduce(torch.tensor([rank + 1.0]), "min").item(),
             "max": rt.all_reduce(torch.tensor([rank + 1.0], dtype=torch.float64), "max").item(),
             "legacy_sum": E.all_reduce(torch.tensor([rank + 1.0])).item(),  # engines.dist's alias of the same
             # the finiteness vote: rank 1's NaN stops (or skips) the step on every rank, never on one only
             "finite_vote": rt.all_finite(torch.tensor([float("nan") if rank == 1 else 1.0])),
             "finite_all": rt.all_finite(torch.ones(2)), "any": rt.any_rank(rank == 1),
             "scalar_min": rt.reduce_scalar(rank + 5, "min"), "bcast": rt.broadcast_object({"from": rank}),
             "gather": rt.all_gather_object(rank * 10), "world": (rt.rank, rt.world_size, rt.backend)}
    calls = []

    def entropy(batch):
        calls.append(batch)
        return batch, torch.ones_like(batch, dtype=torch.bool)

    uneven = [_values(rank, i) for i in range(3 if rank == 0 else 1)]  # rank 0: 3 batches, rank 1: 1
    found["uneven"], found["uneven_calls"] = measure_tau(entropy, uneven, rt=rt), len(calls)
    calls.clear()
    found["dry"] = measure_tau(entropy, [] if rank == 1 else [_values(rank, 0)])
    found["dry_calls"] = len(calls)
    torch.save(found, f"{out_dir}/rank_{rank}.pt")
    rt.barrier()


def test_tau_forwards_are_equal_across_ranks_and_pooled(tmp_path):
    from fastardiff_ds.losses.entropy import early_stop_threshold

    r0, r1 = run_ranks(_scenarios, tmp_path)
    for r in (r0, r1):
        assert (r["sum"], r["min"], r["max"], r["legacy_sum"]) == (3.0, 1.0, 2.0, 3.0)
        assert (r["finite_vote"], r["finite_all"], r["any"], r["scalar_min"]) == (False, True, True, 5.0)
        assert r["bcast"] == {"from": 0} and r["gather"] == [0, 10]
        assert r["uneven_calls"] == 1 and r["dry_calls"] == 0  # min over ranks: 1 forward, then none
        assert r["dry"]["tau"] == -math.inf and r["dry"]["rows"] == 0
    pooled = torch.cat([_values(0, 0).reshape(-1), _values(1, 0).reshape(-1)])
    assert (r0["world"], r1["world"]) == ((0, 2, "gloo"), (1, 2, "gloo"))
    assert r0["uneven"]["tau"] == r1["uneven"]["tau"] == pytest.approx(early_stop_threshold(pooled), abs=1e-12)
    assert r0["uneven"]["rows"] == 12
