"""The loops' own work between model calls ("glue"), timed as a per-call cost of its own.

A plain loop (sampling/ar_loop.generate_ar) does per token, besides its chain and its decode: the token index
tensor, `finalize` (NextStep's token layer-norm), the write into the output, the CFG row copy (`ar_rows`), the
condition slice and the stats. A replayed speculative round (replay.py) does, besides its calls: concatenations,
finalize of the drafts, index writes, both cache rollbacks and the accept draw. Neither is inside any call the
cost model prices, so each is timed here by running the real loop with every model call answered from a cache of
its own earlier output (`CachedCalls`; for generate_ar a cached AR plus cached `make_field` / `sample_rows`, which
are what a `chain_*` call times):

    glue_token_{baseline,dmd}  ms per token of generate_ar  = (t(T_LONG) - t(T_SHORT)) / (T_LONG - T_SHORT)
    glue_round                 ms per round of the replay  = (t(T_LONG) - t(T_SHORT)) / (rounds difference)

Differences of two lengths, so the per-image setup (cache allocation) is not spread over the tokens.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..sampling import ar_loop
from ..sampling.guidance import HeadCounter
from ..sampling.noise import make_generators
from .replay import AcceptPattern, CachedCalls, replay_fastardiff

T_SHORT, T_LONG = 16, 112
GLUE_ACCEPTANCE = 0.6  # the accept pattern the round glue is timed at (bonus and residual rounds both occur)


class _CachedAR:
    """An AR answering prefill / decode with one earlier output (its cache is real, so allocation still counts)."""

    def __init__(self, ar, step):
        self.ar, self.step = ar, step

    def new_cache(self, batch, max_len):
        return self.ar.new_cache(batch, max_len)

    def prefill(self, ids, mask, cache, **kw):
        return self.step

    def decode(self, tokens, cache, **kw):
        return self.step


@contextlib.contextmanager
def _cached_chain(traj):
    mf, sr = ar_loop.make_field, ar_loop.sample_rows
    ar_loop.make_field = lambda *a, **k: None
    ar_loop.sample_rows = lambda *a, **k: traj
    try:
        yield
    finally:
        ar_loop.make_field, ar_loop.sample_rows = mf, sr


@torch.no_grad()
def loop_glue_calls(flow, kind: str, ids, mask) -> dict:
    """Closures {name: fn} timing generate_ar over T_SHORT and T_LONG tokens with every model call cached."""
    rows = 2 if flow.cfg.batch_mult == 2 else 1
    ids, mask = ids[:rows], mask[:rows]
    cache = flow.ar.new_cache(rows, ids.shape[1] + 1)
    step = flow.ar.prefill(ids, mask, cache)
    step = type(step)(cond=step.cond[:, -1:], hidden=step.hidden[:, -1:])  # what a 1-token decode returns
    fake = dataclasses.replace(flow, ar=_CachedAR(flow.ar, step))
    dev = ids.device
    fld = ar_loop.make_field(flow, step.cond[:, -1], torch.zeros(1, dtype=torch.long, device=dev), 1024,
                             torch.arange(1, device=dev), HeadCounter(), torch.float32)
    traj = ar_loop.sample_rows(flow, fld, make_generators([0]), torch.arange(1, device=dev),
                               torch.ones(1, dtype=torch.bool, device=dev), torch.float32)

    def run(T):
        def call():
            with _cached_chain(traj):
                ar_loop.generate_ar(fake, ids, mask, T, make_generators([0]))
        return call
    return {f"_glue_{kind}_{T}": run(T) for T in (T_SHORT, T_LONG)}


def round_glue_calls(flows, ids, mask, gamma: int) -> tuple[dict, dict]:
    """Closures timing the replay over T_SHORT and T_LONG tokens with cached calls, and the rounds each makes."""
    cached = CachedCalls()
    calls, rounds = {}, {}
    for T in (T_SHORT, T_LONG):
        _, log = replay_fastardiff(flows, ids, mask, T, gamma, AcceptPattern(GLUE_ACCEPTANCE), calls=cached)
        rounds[T] = len(log.rounds)
        calls[f"_glue_round_{T}"] = (lambda T=T: replay_fastardiff(flows, ids, mask, T, gamma,
                                                                   AcceptPattern(GLUE_ACCEPTANCE), calls=cached))
    return calls, rounds


def glue_terms(ms: dict, rounds: dict) -> dict:
    """The named glue terms (ms) from the raw timings of the closures above."""
    out = {}
    for kind in ("baseline", "dmd"):
        out[f"glue_token_{kind}"] = (ms[f"_glue_{kind}_{T_LONG}"] - ms[f"_glue_{kind}_{T_SHORT}"]) / (T_LONG - T_SHORT)
    out["glue_round"] = ((ms[f"_glue_round_{T_LONG}"] - ms[f"_glue_round_{T_SHORT}"])
                         / (rounds[T_LONG] - rounds[T_SHORT]))
    return out
