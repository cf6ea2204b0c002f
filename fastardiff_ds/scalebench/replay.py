"""Per-image runs: baseline and dmd through the real loop (sampling/ar_loop.py), fastardiff as a replay.

The replay makes the calls a speculative round makes (sampling/speculative.py, one sample, gamma drafts): the
draft reads its 2-token window and drafts g tokens (a chain each, a decode between them, feeding back its own
hidden states as an EAGLE-style draft does), the target verifies [newest token, drafts] in one decode, one head call
over the g*K drafted states scores them (trajectory_logprob), then either the bonus chain (all accepted) or one
residual proposal (a target chain plus the draft head's log-prob over its K states), and both caches roll back.
How many drafts are accepted is not computed from the models but read from a fixed accept pattern: every
draft of a round is accepted with probability `a` until the first rejection (a seeded stream, so the same
pattern in every run). Same kernels and shapes, no quality claim. Every call is logged (`CallLog`) with the KV
length it ran at, so the cost model can price exactly this run, and every round logs one `glue_round` (what the
round does between its calls: concatenations, finalize, index writes, cache rollbacks, the accept draw), priced at
the cost `glue.py` measures by running this same replay with every model call answered from a cache.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..models.ar import draft_features
from ..sampling.ar_loop import generate_ar
from ..sampling.common import make_field, sample_rows
from ..sampling.flow import trajectory_logprob
from ..sampling.guidance import HeadCounter
from ..sampling.noise import make_generators
from .flows import Flows, clock, sync


@dataclass
class CallLog:
    """(name, kv length | None) of every call, in order; rounds: (drafted g, accepted a) per round."""

    calls: list[tuple[str, int | None]] = field(default_factory=list)
    rounds: list[tuple[int, int]] = field(default_factory=list)

    def add(self, name: str, kv: int | None = None) -> None:
        self.calls.append((name, kv))

    def counts(self) -> dict:
        """{call name: how many times the run made it}."""
        out: dict[str, int] = {}
        for name, _ in self.calls:
            out[name] = out.get(name, 0) + 1
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        drafted = sum(g for g, _ in self.rounds)
        accepted = sum(a for _, a in self.rounds)
        return {"rounds": len(self.rounds), "drafted": drafted, "accepted": accepted,
                "acceptance": accepted / drafted if drafted else 0.0,
                "mean_accepted_length": (accepted + len(self.rounds)) / max(1, len(self.rounds))}


class AcceptPattern:
    """Accepted drafts per round: each of g drafts accepted with probability a until the first rejection."""

    def __init__(self, a: float, seed: int = 0):
        self.a, self.rng = a, random.Random(seed)

    def __call__(self, g: int) -> int:
        n = 0
        while n < g and self.rng.random() < self.a:
            n += 1
        return n


def loop_log(kind: str, prompt_len: int, num_tokens: int) -> CallLog:
    """The calls generate_ar makes: prefill, a chain per token, a decode per token but the last (token i's decode
    appends to a cache holding prompt_len + i slots), and the loop's own per-token glue (glue.py)."""
    log = CallLog()
    if kind == "baseline":
        log.add("prefill_t_b2")
        chain, decode = "chain_teacher", "decode_t_b2"
    else:
        log.add("prefill_t_b1")
        chain, decode = "chain_student", "verify_t_b1_k1"
    for i in range(num_tokens):
        log.add(chain)
        if i + 1 < num_tokens:
            log.add(decode, prompt_len + i)
        log.add(f"glue_token_{kind}")
    return log


@torch.no_grad()
def run_loop(flows: Flows, kind: str, ids, mask, num_tokens: int, seed: int = 0) -> float:
    """Seconds of one image through ar_loop.generate_ar (kind 'baseline': teacher, CFG batch 2; 'dmd': student)."""
    flow = flows.teacher if kind == "baseline" else flows.student
    rows = 2 if flow.cfg.batch_mult == 2 else 1
    device, now = ids.device, clock(ids.device)
    sync(device)
    t0 = now()
    generate_ar(flow, ids[:rows], mask[:rows], num_tokens, make_generators([seed]))
    sync(device)
    return now() - t0


def _chain(flow, cond, n: int, num_tokens: int, gens, device):
    """One token's chain at AR condition cond (1, C) for token index n."""
    rows, active = torch.arange(1, device=device), torch.ones(1, dtype=torch.bool, device=device)
    index = torch.full((1,), n, dtype=torch.long, device=device)
    fld = make_field(flow, cond, index, num_tokens, rows, HeadCounter(), torch.float32)
    return sample_rows(flow, fld, gens, rows, active, torch.float32)


def _logprob(flow, cond, first: int, states, num_tokens: int):
    """Log-density of R trajectories states (R,K+1,D) at conditions cond (R,C): one head call of R*K rows."""
    R = states.shape[0]
    rows = torch.arange(R, device=states.device)
    fld = make_field(flow, cond, first + rows, num_tokens, rows, HeadCounter(), torch.float32)
    return trajectory_logprob(fld, flow.sampler, states)


class Calls:
    """The model calls a round makes (what the cost model prices); `CachedCalls` answers them from a cache."""

    def prefill(self, flow, ids, mask, cache, **kw):
        return flow.ar.prefill(ids, mask, cache, **kw)

    def decode(self, flow, tokens, cache, **kw):
        return flow.ar.decode(tokens, cache, **kw)

    def chain(self, flow, cond, n, num_tokens, gens, device):
        return _chain(flow, cond, n, num_tokens, gens, device)

    def logprob(self, flow, cond, first, states, num_tokens):
        return _logprob(flow, cond, first, states, num_tokens)


class CachedCalls(Calls):
    """Every call answered with the output the real call gave the first time it was made at the same shape (the
    cache only advances its lengths, as a decode does): timing a replay with these leaves the round's glue."""

    def __init__(self):
        self.memo: dict = {}

    def _get(self, key, fn):
        if key not in self.memo:
            self.memo[key] = fn()
        return self.memo[key]

    def prefill(self, flow, ids, mask, cache, **kw):
        step = self._get(("prefill", id(flow)), lambda: super(CachedCalls, self).prefill(flow, ids, mask, cache, **kw))
        cache.start = torch.zeros_like(cache.start)
        cache.lengths = torch.full_like(cache.lengths, ids.shape[1])
        return step

    def decode(self, flow, tokens, cache, **kw):
        T = tokens.shape[1]
        key = ("decode", id(flow), T)
        if key in self.memo:
            cache.advance(T)
            return self.memo[key]
        return self._get(key, lambda: super(CachedCalls, self).decode(flow, tokens, cache, **kw))

    def chain(self, flow, cond, n, num_tokens, gens, device):
        return self._get(("chain", id(flow)), lambda: super(CachedCalls, self).chain(flow, cond, n, num_tokens,
                                                                                     gens, device))

    def logprob(self, flow, cond, first, states, num_tokens):
        return self._get(("logprob", id(flow), states.shape[0]),
                         lambda: super(CachedCalls, self).logprob(flow, cond, first, states, num_tokens))


@torch.no_grad()
def replay_fastardiff(flows: Flows, ids, mask, num_tokens: int, gamma: int, pattern: AcceptPattern,
                      seed: int = 0, calls: Calls | None = None) -> tuple[float, CallLog]:
    """Seconds of one image of fastardiff rounds at the forced accept `pattern`, and the calls it made
    (`calls`: who answers the model calls; CachedCalls times the glue alone)."""
    tgt, dft, dev = flows.student, flows.draft, ids.device
    c = calls or Calls()
    ids, mask = ids[:1], mask[:1]
    P, N, log, gens = ids.shape[1], num_tokens, CallLog(), make_generators([seed])
    now = clock(dev)
    sync(dev)
    t0 = now()
    tcache = tgt.ar.new_cache(1, P + N + gamma + 2)
    tstep = c.prefill(tgt, ids, mask, tcache)
    dcache = dft.ar.new_cache(1, P + N + gamma + 2)
    c.prefill(dft, ids, mask, dcache, feats=draft_features(tstep.hidden, mask.bool()))
    log.add("prefill_t_b1"), log.add("prefill_d_b1")
    feat = torch.zeros(1, N, tstep.hidden.shape[-1], device=dev, dtype=tstep.hidden.dtype)
    feat[:, 0] = tstep.hidden[:, -1]
    out = torch.zeros(1, N, tgt.token_dim, device=dev)
    out[:, 0] = tgt.finalize(c.chain(tgt, tstep.cond[:, -1], 0, N, gens, dev).token)
    log.add("chain_student")
    n, first = 1, True
    while n < N:
        g = min(gamma, N - n - 1)
        states, conds = [], []
        if g > 0:
            w = 1 if first else 2
            dcache.rollback(dcache.start + P + n - w)
            log.add(f"draft_b1_k{w}", P + n - w)
            step = c.decode(dft, out[:, n - w:n], dcache, feats=feat[:, n - w:n])
            for j in range(g):
                traj = c.chain(dft, step.cond[:, -1], n + j, N, gens, dev)
                log.add("chain_student")
                states.append(traj.states)
                conds.append(step.cond[:, -1])
                if j + 1 < g:
                    log.add("draft_b1_k1", P + n + j)
                    step = c.decode(dft, dft.finalize(traj.token)[:, None], dcache, feats=step.hidden[:, -1:])
        drafts = tgt.finalize(torch.cat(states)[:, -1]) if g else out[:, :0, 0].reshape(0, tgt.token_dim)
        log.add(f"verify_t_b1_k{1 + g}", P + n - 1)
        vstep = c.decode(tgt, torch.cat([out[:, n - 1], drafts])[None], tcache)
        if g:
            c.logprob(tgt, vstep.cond[0, :g], n, torch.cat(states), N)
            log.add(f"logprob_r{g * tgt.sampler.steps}")
        a = pattern(g)
        y = c.chain(tgt, vstep.cond[:, a], n + a, N, gens, dev)
        log.add("chain_student")
        if a < g:  # the residual's first proposal is scored under the draft too
            c.logprob(dft, conds[a], n + a, y.states, N)
            log.add(f"logprob_r{tgt.sampler.steps}")
        out[:, n:n + a] = drafts[None, :a]
        out[:, n + a] = tgt.finalize(y.token)
        feat[:, n:n + a + 1] = vstep.hidden[:, :a + 1]
        n, first = n + a + 1, False
        tcache.rollback(tcache.start + P + n - 1)
        log.add("glue_round")
        log.rounds.append((g, a))
    sync(dev)
    return now() - t0, log
