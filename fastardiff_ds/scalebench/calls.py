"""Per-call costs at several KV lengths: what every per-image row is made of.

Each call is timed the way the loops make it: a decode appends T tokens to a cache holding L slots and is rolled
back (O(1), models/kv_cache.py) so every repetition sees the same L; a chain is `make_field` + `sample_rows`
(K head steps with their Gaussian transitions and per-sample noise); a log-prob call is `trajectory_logprob`
(one head call over g*K rows, what the exact acceptance test evaluates). Names:

    prefill_t_b{1,2}, prefill_d_b1           prompt of P tokens into an empty cache
    decode_t_b2@L                            target, 1 token, CFG batch 2 (baseline)
    verify_t_b1_k{k}@L, k = 1..8             target, k tokens, batch 1 (k = 1 is dmd's decode)
    draft_b1_k{1,2}@L                        draft, 1 token (drafting) or 2 (the round's window)
    chain_teacher, chain_student             one token's chain (K steps, two-pass / distilled)
    logprob_r{n}                             one head call over n = g*K rows (n = K: the residual's Q)
    head_r{n}                                a bare head forward over n rows (the call a round makes)
    kv_rollback                              one cache rollback (subtracted from every decode figure above, whose
                                             closure rolls back after each call; the loops' own rollbacks are glue)
    glue_token_{baseline,dmd}, glue_round    the loops' work between calls, per token / per round (glue.py)

Every figure is the mean over its repetitions (after two warm-up calls; each timed call right after an untimed one
of the same closure, `_interleaved_ms`), not the median: a per-image time is a sum of such calls, so its
expectation is the sum of their means, slow spells included.
"""
from __future__ import annotations

import random
import statistics

import torch

from ..sampling.common import make_field, sample_rows
from ..sampling.flow import trajectory_logprob
from ..sampling.guidance import HeadCounter
from ..sampling.noise import make_generators
from .flows import Flows, clock, sync
from .glue import glue_terms, loop_glue_calls, round_glue_calls


def prompt(batch: int, length: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    return ids, torch.ones_like(ids)


def _filled_cache(flow, batch: int, length: int, max_len: int, device):
    """A cache of `batch` rows holding `length` slots (a prefill of random ids); -> (cache, prefill step)."""
    ar = flow.ar
    cache = ar.new_cache(batch, max_len)
    ids, mask = prompt(batch, length, ar.config.vocab_size, device)
    kw = {}
    if getattr(ar, "reads_features", False):
        kw["feats"] = torch.zeros(batch, length, ar.config.hidden_size, device=device,
                                  dtype=ar.embed_tokens.weight.dtype)
    return cache, ar.prefill(ids, mask, cache, **kw)


def _decode_call(flow, cache, width: int, device):
    """A closure: append `width` random tokens to `cache`, then roll it back (every call sees the same KV)."""
    ar, D = flow.ar, flow.token_dim
    tokens = torch.randn(cache.batch_size, width, D, device=device)
    kw = {}
    if getattr(ar, "reads_features", False):
        kw["feats"] = torch.randn(cache.batch_size, width, ar.config.hidden_size, device=device,
                                  dtype=ar.embed_tokens.weight.dtype)
    lengths = cache.lengths.clone()

    def call():
        ar.decode(tokens, cache, **kw)
        cache.rollback(lengths)
    return call


def _chain_call(flow, num_tokens: int, device):
    C = flow.ar.config.hidden_size
    cond = torch.randn(flow.cfg.batch_mult, C, device=device)
    gens = make_generators([0])
    rows, active = torch.arange(1, device=device), torch.ones(1, dtype=torch.bool, device=device)
    index = torch.zeros(1, dtype=torch.long, device=device)

    def call():
        fld = make_field(flow, cond, index, num_tokens, rows, HeadCounter(), torch.float32)
        return sample_rows(flow, fld, gens, rows, active, torch.float32)
    return call


def _logprob_call(flow, drafts: int, num_tokens: int, device):
    """trajectory_logprob of `drafts` trajectories under `flow` (one head call of drafts*K rows)."""
    C, K, D = flow.ar.config.hidden_size, flow.sampler.steps, flow.token_dim
    cond = torch.randn(drafts, C, device=device)
    states = torch.randn(drafts, K + 1, D, device=device)
    rows = torch.arange(drafts, device=device)

    def call():
        fld = make_field(flow, cond, rows, num_tokens, rows, HeadCounter(), torch.float32)
        return trajectory_logprob(fld, flow.sampler, states)
    return call


def _head_call(head, rows: int, cond_dim: int, token_dim: int, device, guidance: bool):
    dtype = head.net.input_proj.weight.dtype
    x = torch.randn(rows, token_dim, device=device, dtype=dtype)
    c = torch.randn(rows, cond_dim, device=device, dtype=dtype)
    t = torch.rand(rows, device=device)
    g = torch.full((rows,), 7.5, device=device) if guidance else None
    return lambda: head(x, t, c, g)


def _interleaved_ms(calls: dict, device, reps: int) -> dict:
    """Mean ms of every closure, timed in `reps` rounds that each run every closure in a shuffled order, so that
    slow spells of a shared machine are spread over all of them. Each timed call comes right after an untimed call
    of the same closure: a loop makes the same few calls over and over, so their weights and caches are warm in
    the CPU's caches; a call timed cold, right after some 80 other closures, cost 10-15 % more than in the loop
    (scale 0.05, CPU) and priced the rows that much too high."""
    now = clock(device)
    names = list(calls)
    for name in names:  # warm-up (and compilation)
        calls[name]()
        calls[name]()
    times = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(names)
        for name in names:
            calls[name]()
            sync(device)
            t0 = now()
            calls[name]()
            sync(device)
            times[name].append(now() - t0)
    return {n: 1000.0 * statistics.fmean(v) for n, v in times.items()}


def kv_grid(prompt_len: int, num_tokens: int, gamma: int) -> list[int]:
    """KV lengths the decode costs are measured at: the prompt, half the image, the whole image."""
    return [prompt_len, prompt_len + num_tokens // 2, prompt_len + num_tokens + gamma]


@torch.no_grad()
def measure_calls(flows: Flows, prompt_len: int, num_tokens: int, gamma: int, device, reps: int,
                  max_verify: int = 8) -> dict:
    """{"at_kv": {name: {L: ms}}, "fixed": {name: ms}, "kv_grid"} for the names in the module docstring."""
    max_len = prompt_len + num_tokens + gamma + max_verify + 2
    grid = kv_grid(prompt_len, num_tokens, gamma)
    K = flows.student.sampler.steps
    C, D = flows.student.ar.config.hidden_size, flows.student.token_dim
    calls = {}
    for L in grid:  # one cache per (flow, batch, L), rolled back after every call
        tc2, tc1, dc1 = (_filled_cache(f, b, L, max_len, device)[0]
                         for f, b in ((flows.teacher, 2), (flows.student, 1), (flows.draft, 1)))
        calls[("decode_t_b2", L)] = _decode_call(flows.teacher, tc2, 1, device)
        for k in range(1, max_verify + 1):
            calls[(f"verify_t_b1_k{k}", L)] = _decode_call(flows.student, tc1, k, device)
        for k in (1, 2):
            calls[(f"draft_b1_k{k}", L)] = _decode_call(flows.draft, dc1, k, device)
    for name, (flow, b) in {"prefill_t_b2": (flows.teacher, 2), "prefill_t_b1": (flows.student, 1),
                            "prefill_d_b1": (flows.draft, 1)}.items():
        calls[(name, None)] = (lambda f=flow, b=b: _filled_cache(f, b, prompt_len, max_len, device))
    calls[("chain_teacher", None)] = _chain_call(flows.teacher, num_tokens, device)
    calls[("chain_student", None)] = _chain_call(flows.student, num_tokens, device)
    for g in range(1, gamma + 1):
        calls[(f"logprob_r{g * K}", None)] = _logprob_call(flows.student, g, num_tokens, device)
    head, student = flows.teacher.head, flows.student.head
    calls[("head_r2", None)] = _head_call(head, 2, C, D, device, False)  # one baseline step: both CFG rows
    calls[("head_r1_student", None)] = _head_call(student, 1, C, D, device, True)
    calls[(f"head_r{gamma * K}_student", None)] = _head_call(student, gamma * K, C, D, device, True)
    rb_cache, _ = _filled_cache(flows.student, 1, grid[1], max_len, device)
    rb_lengths = rb_cache.lengths.clone()
    calls[("kv_rollback", None)] = lambda: rb_cache.rollback(rb_lengths)
    ids, mask = prompt(2, prompt_len, flows.student.ar.config.vocab_size, device)
    for flow, kind in ((flows.teacher, "baseline"), (flows.student, "dmd")):
        calls.update({(k, None): f for k, f in loop_glue_calls(flow, kind, ids, mask).items()})
    round_calls, rounds = round_glue_calls(flows, ids, mask, gamma)
    calls.update({(k, None): f for k, f in round_calls.items()})
    ms = _interleaved_ms(calls, device, reps)
    at_kv: dict[str, dict[int, float]] = {}
    fixed: dict[str, float] = {}
    rollback = ms[("kv_rollback", None)]
    for (name, L), v in ms.items():
        if L is None:
            fixed[name] = v
        else:  # the decode closures roll back after every call; the loops' decodes do not
            at_kv.setdefault(name, {})[L] = v - rollback
    fixed.update(glue_terms(fixed, rounds))
    for name in [k for k in fixed if k.startswith("_glue")]:
        del fixed[name]
    return {"at_kv": {k: dict(sorted(v.items())) for k, v in at_kv.items()}, "fixed": fixed, "kv_grid": grid}


def average_costs(*sets: dict) -> dict:
    """The mean of several measurements of the same calls (e.g. those taken before and after one image)."""
    a, n = sets[0], len(sets)
    return {"at_kv": {k: {L: sum(s["at_kv"][k][L] for s in sets) / n for L in pts} for k, pts in a["at_kv"].items()},
            "fixed": {k: sum(s["fixed"][k] for s in sets) / n for k in a["fixed"]}, "kv_grid": a["kv_grid"]}


def interp(points: dict[int, float], L: float) -> float:
    """Piecewise-linear cost at KV length L from {L_i: ms} (extrapolated linearly past the ends)."""
    xs = sorted(points)
    if len(xs) == 1:
        return points[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if L <= b or b == xs[-1]:
            return points[a] + (points[b] - points[a]) * (L - a) / (b - a)
    return points[xs[-1]]
