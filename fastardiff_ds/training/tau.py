"""The early-stop threshold tau of a finished run (Fast-ARDiff Eq. 10), measured so it can never lose the run.

tau = 0.3 mean - 0.1 std of the draft's shallow-layer attention entropy over training data. The trainer
calls `measure_tau` after the last step, before the export:
- the data comes from its own pass (`collect_batches`: a fresh loader over the training shards, from the
  start, one process, no text dropout), never from the training iterator, which may be exhausted when the
  run ended on an epoch boundary;
- every rank runs the same number of draft forwards (the minimum over ranks of the batches it could read):
  under ZeRO-3 a forward gathers parameters collectively, so a rank with less data must not skip one;
- with no data at all (tau_batches=0, unreadable shards) it warns and returns tau = -inf, which the
  samplers read as "never stop drafting early" -- the export is written either way.
Collectives go through the `Runtime` (tensors are made on, or moved to, the communication device).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable

import torch

from .. import engines as E
from ..losses.entropy import EntropyStats

log = logging.getLogger(__name__)
NO_EARLY_STOP = float("-inf")


def collect_batches(loader, n: int) -> list[dict]:
    """Up to `n` batches from a fresh pass over `loader`'s data; [] (with a warning) if it cannot be read.

    `loader`: a StreamingLoader (its `fresh()` copy is read, single-process, captions kept) or any re-iterable.
    """
    if n <= 0:
        return []
    try:
        fresh = loader.fresh(num_workers=0, drop_text_prob=0.0) if hasattr(loader, "fresh") else loader
        return list(itertools.islice(iter(fresh), n))
    except Exception as e:  # noqa: BLE001 -- no data problem may lose a finished run; it is reported instead
        log.warning("tau: could not read training data for the early-stop threshold (%s: %s)", type(e).__name__, e)
        return []


@torch.no_grad()
def measure_tau(entropy_fn: Callable[[dict], tuple[torch.Tensor, torch.Tensor]], batches: Iterable[dict],
                rt: E.Runtime | None = None) -> dict:
    """Eq. 10 over `batches` on every rank.

    entropy_fn(batch) -> (entropy (B, R), valid (B, R) bool) of the draft's shallow layer (`row_entropy`).
    `rt`: the run's Runtime (default: this process's, a world of one without a process group).
    Returns {"tau", "shallow_entropy_mean", "shallow_entropy_std", "rows", "tau_batches"}; tau is -inf (and
    the statistics None) when no rank had data.
    """
    rt, batches = rt or E.Runtime(), list(batches)
    n = int(rt.reduce_scalar(len(batches), "min"))
    stats = EntropyStats()
    for batch in batches[:n]:
        entropy, valid = entropy_fn(batch)
        stats.update(entropy[valid.to(torch.bool)])
    stats = EntropyStats.from_tensor(rt.all_reduce(stats.to_tensor(rt.comm_device())))
    if not stats.count:
        log.warning("tau: no training data to measure the early-stop threshold (Eq. 10) on; storing tau=-inf "
                    "(never stop drafting early). Set inference.tau at generation time, or re-measure.")
        return {"tau": NO_EARLY_STOP, "shallow_entropy_mean": None, "shallow_entropy_std": None, "rows": 0,
                "tau_batches": n}
    return {"tau": stats.threshold(), "shallow_entropy_mean": stats.mean, "shallow_entropy_std": stats.std,
            "rows": int(stats.count), "tau_batches": n}
